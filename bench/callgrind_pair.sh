#!/usr/bin/env bash
# Instructions per lone message in each server process, with and without acknowledged
# component links, counted by valgrind's callgrind (repeatable where CPU time is not,
# and this VM has no hardware counters). docs/benchmarks.md, "The cost of acknowledged
# links".
#
# Runs `loadgen pair --without mam` (one pair, one message in flight each) with router,
# xdb-file, sm and c2s under callgrind, for a short and a long run, and divides the
# difference of instructions by the difference of messages: what start-up, logins and
# shutdown cost cancels out. Alternates JABBERD_LINK_ACKS on and off, RUNS times.
# (The 200-client benchmark does not lend itself to this: under callgrind its batching,
# and with it the instructions per message, changes from run to run.)
#
#   bench/callgrind_pair.sh [RUNS]        (release build: cargo build --release first)
#
# Needs valgrind (Debian: apt-get install valgrind). Takes about a minute per run.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-2}
release=$PWD/target/release
work=$(mktemp -d /tmp/callgrind-pair-XXXXXX)
mkdir -p "$work/bin" "$work/out"
# The harness starts programs from JABBERD_BIN_DIR: wrappers run the measured ones under
# callgrind, in the background so that the harness's SIGKILL at the end reaches the
# wrapper and not valgrind; the wrapper's children are stopped with SIGTERM below, and
# callgrind writes its counts as they exit.
for p in router xdb-file sm c2s; do
    cat > "$work/bin/$p" <<EOF
#!/bin/sh
valgrind --tool=callgrind --callgrind-out-file=$work/out/\${CG_TAG}.$p.%p.out $release/$p "\$@" &
echo \$! >> $work/pids
wait
EOF
    chmod +x "$work/bin/$p"
done
for p in "$release"/*; do
    [ -x "$p" ] && [ ! -e "$work/bin/$(basename "$p")" ] && ln -s "$p" "$work/bin/"
done

one() { # TAG SECONDS ACKS
    rm -f "$work/pids"
    local env=()
    [ "$3" = off ] && env=(JABBERD_LINK_ACKS=off)
    env "${env[@]}" JABBERD_BIN_DIR="$work/bin" CG_TAG="$1" \
        "$release/loadgen" pair --seconds "$2" --without mam 2>&1 |
        grep "messages over TCP" | sed "s/^/$1: /" >> "$work/runs.txt"
    for pid in $(cat "$work/pids"); do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $(cat "$work/pids"); do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    done
}

for r in $(seq 1 "$runs"); do
    for acks in on off; do
        one "$acks-short-$r" 4 "$acks"
        one "$acks-long-$r" 12 "$acks"
    done
done

python3 - "$work" "$runs" <<'EOF'
import sys
sys.path.insert(0, "bench")
from callgrind_counts import line, per_unit
work, runs = sys.argv[1], int(sys.argv[2])
print("instructions per message (long run minus short run, divided by the messages between)")
for r in range(1, runs + 1):
    for acks in ("on", "off"):
        per, n = per_unit(work, f"{acks}-short-{r}", f"{acks}-long-{r}")
        print(f"run {r} acks {acks:3}: {line(per)}; {n} messages)")
print(f"callgrind files: {work}/out")
EOF
