#!/usr/bin/env bash
# Instructions per lone message in each server process for two sets of binaries (say
# the last commit's, copied to a directory, against this build's), counted by valgrind's
# callgrind the way bench/callgrind_pair.sh counts them: a short and a long
# `loadgen pair` with router, xdb-file, sm and c2s under callgrind, the difference of
# instructions divided by the difference of messages. With `--logins`, per login
# instead: `loadgen logins`, 2 000 and then 6 000 logins, 50 at a time. docs/benchmarks.md,
# "Spans entered and left" and "Storage requests without formatting".
#
#   bench/callgrind_ab.sh [--logins] DIR_A DIR_B [loadgen options, e.g. --without mam]
#
# DIR_A and DIR_B hold router, xdb-file, sm and c2s (copies, not links to
# target/release); loadgen is this checkout's release build. Needs valgrind. About two
# minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
logins=false
if [ "${1:-}" = --logins ]; then
    logins=true
    shift
fi
a=$(realpath "$1") b=$(realpath "$2")
shift 2
work=$(mktemp -d /tmp/callgrind-ab-XXXXXX)
mkdir -p "$work/out"
for v in a b; do
    dir=${!v}
    mkdir -p "$work/$v"
    # Wrappers as in callgrind_pair.sh: valgrind in the background, so the harness's
    # SIGKILL reaches the wrapper and the measured process gets SIGTERM below.
    for p in router xdb-file sm c2s; do
        cat > "$work/$v/$p" <<EOS
#!/bin/sh
valgrind --tool=callgrind --callgrind-out-file=$work/out/\${CG_TAG}.$p.%p.out $dir/$p "\$@" &
echo \$! >> $work/pids
wait
EOS
        chmod +x "$work/$v/$p"
    done
    for p in "$dir"/*; do
        [ -e "$work/$v/$(basename "$p")" ] || ln -s "$p" "$work/$v/"
    done
done

one() { # TAG VARIANT SIZE OPTIONS... (SIZE: seconds of pair, or logins)
    local tag=$1 variant=$2 size=$3
    shift 3
    rm -f "$work/pids"
    if $logins; then
        JABBERD_BIN_DIR="$work/$variant" CG_TAG="$tag" \
            target/release/loadgen "$@" logins --count "$size" --concurrency 50 >/dev/null 2>&1
        echo "$tag: logins: $size of $size delivered" >> "$work/runs.txt"
    else
        JABBERD_BIN_DIR="$work/$variant" CG_TAG="$tag" \
            target/release/loadgen pair --seconds "$size" "$@" 2>&1 |
            grep "messages over TCP" | sed "s/^/$tag: /" >> "$work/runs.txt"
    fi
    for pid in $(cat "$work/pids"); do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $(cat "$work/pids"); do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    done
}

for v in a b; do
    if $logins; then
        one "$v-short" "$v" 2000 "$@"
        one "$v-long" "$v" 6000 "$@"
    else
        one "$v-short" "$v" 4 "$@"
        one "$v-long" "$v" 12 "$@"
    fi
done

python3 - "$work" "$a" "$b" <<'PY'
import sys
sys.path.insert(0, "bench")
from callgrind_counts import line, per_unit
work, dirs = sys.argv[1], {"a": sys.argv[2], "b": sys.argv[3]}
print("instructions per message or login (long run minus short run, divided by the messages or logins between)")
for v in "ab":
    per, n = per_unit(work, f"{v}-short", f"{v}-long")
    print(f"{dirs[v]}: {line(per)}; {n} between)")
print(f"callgrind files: {work}/out")
PY
