"""What the bench/callgrind_*.sh scripts read back: the messages (or logins) each tagged
run delivered (WORK/runs.txt, lines `TAG: ... N of M delivered`) and the instructions
callgrind counted in each process (WORK/out/TAG.PROCESS.PID.out), and the difference
per message between a short and a long run of the same binaries."""

import glob
import re


def delivered(work):
    counts = {}
    for line in open(f"{work}/runs.txt"):
        m = re.match(r"(\S+): .* (\d+) of \d+ delivered", line)
        if m:
            counts[m.group(1)] = int(m.group(2))
    return counts


def instructions(work, tag):
    counts = {}
    for f in glob.glob(f"{work}/out/{tag}.*.out"):
        proc = f.split("/")[-1].split(".")[1]
        for line in open(f):
            if line.startswith("summary:"):
                counts[proc] = int(line.split()[1])
    return counts


def per_unit(work, short, long):
    """Instructions per message (or login) by process, and how many were between."""
    done = delivered(work)
    a, b = instructions(work, short), instructions(work, long)
    n = done[long] - done[short]
    return {p: (b[p] - a[p]) / n for p in sorted(b)}, n


def line(per):
    parts = ", ".join(f"{p} {v:,.0f}" for p, v in per.items())
    return f"{sum(per.values()):,.0f} ({parts}"
