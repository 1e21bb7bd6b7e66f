#!/usr/bin/env python3
"""Messages per second with one, two and four sm instances, each on a host of its own
(issue 15): the server spread over Linux network namespaces as tests/py/test_multihost.py
spreads it, and the `loadgen messages` load (clients in pairs, a window of chat messages
in flight each) driven at it. On a 2-core machine more sm instances cannot add
throughput, so what it reports is where the CPU goes: server CPU per delivered message
in total and per process, and how the sm work divides among the instances.

Topology for N sm instances (one namespace per host, a veth each into a bridge, private
10.x.y.0/24 addresses; each host run by its own `scripts/jabberd`):

    router  router          store  xdb-file
    sm1..smN  sm-1..sm-N    c2s    c2s, and the load generator (to c2s over loopback)

`--loopback` adds the same processes in one namespace, everything on 127.0.0.1, with
one sm: the same load without veth links. `--loadgen` adds plain `loadgen messages`
(its own server on the machine's loopback, as in docs/benchmarks.md issue 3).

The load generator is bench/src/bin/multism_load.rs: loadgen's message pump and
bench::client, for a server that runs elsewhere. `--build` builds it with the servers
(release, under `flock /tmp/cargo.lock`), then hard-links the binaries into --bin-dir,
so later builds do not change them under a run.

Run as root (ip netns), with the tests' virtualenv (test_multihost imports pytest and
cryptography; `scripts/test` makes .venv):

    sudo .venv/bin/python bench/multism.py --build --loopback --loadgen --runs 3

Other options: --sms 1,2,4  --clients 200  --inflight 10  --seconds 10
--without mam,carbons,blocking (sm modules left out, as loadgen's)  --keep (keep the
configs and logs in /tmp)  --json FILE (every run's figures).  During each measured
interval the script holds /tmp/cargo.lock, so no cargo build of a cooperating session
runs at the same time.
Namespaces, bridge and processes are removed on exit, also after Ctrl-C.
"""

import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "py"))

ROUTER_PORT = 5347
C2S_PORT = 5222
SECRETS = {"xdb-file": "xdb-secret", "sm": "sm-secret", "c2s": "c2s-secret",
           "admin": "admin-secret", "s2s": "s2s-secret"}
SERVERS = ["router", "c2s", "sm", "xdb-file"]


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


# -- building ---------------------------------------------------------------------------

def build(bin_dir):
    """The servers, loadgen and multism_load in release, linked into bin_dir."""
    sh("flock", "/tmp/cargo.lock", "cargo", "build", "--release", "-p", "router",
       "-p", "c2s", "-p", "sm", "-p", "xdb-file", "-p", "bench", "--bins", cwd=ROOT)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in SERVERS + ["loadgen", "multism_load"]:
        target = bin_dir / name
        target.unlink(missing_ok=True)
        os.link(ROOT / "target" / "release" / name, target)


# -- the topology -----------------------------------------------------------------------

def topology(n_sm, loopback):
    """{host: [(process name, program, extra args)]}, in start order."""
    sms = [(f"sm-{k}", "sm", f"--instance {k}") for k in range(1, n_sm + 1)]
    if loopback:
        return {"all": [("router", "router", ""), ("xdb-file", "xdb-file", "")]
                + sms + [("c2s", "c2s", "")]}
    hosts = {"router": [("router", "router", "")], "store": [("xdb-file", "xdb-file", "")]}
    for k, sm in enumerate(sms, 1):
        hosts[f"sm{k}"] = [sm]
    hosts["c2s"] = [("c2s", "c2s", "")]
    return hosts


def make_cluster_class(tm):
    class BenchCluster(tm.Cluster):
        """test_multihost's Cluster (process lists, `scripts/jabberd` per host in its
        namespace, start/stop, logs) with loadgen's configurations over plain TCP links:
        the same settings as the issue 3 figures, so the runs compare."""

        def __init__(self, directory, net, hosts, loopback, without=()):
            self.dir, self.net, self.hosts, self.loopback = directory, net, hosts, loopback
            self.without = without
            self.started = []

        def addr(self, host):
            return "127.0.0.1" if self.loopback else self.net.ip(host)

        def host_of(self, process):
            return next(h for h, procs in self.hosts.items() if any(p[0] == process for p in procs))

        def link(self, name):
            return (f"<router address='{self.addr(self.host_of('router'))}' port='{ROUTER_PORT}' "
                    f"name='{name}' secret='{SECRETS[name]}' reconnect='0.05'/>")

        def write(self):
            users = "".join(
                f"<component name='{n}' secret='{s}' trusted='true'>{allow}</component>\n"
                for n, s, allow in [
                    ("xdb-file", SECRETS["xdb-file"],
                     "<allow type='xdb' host='any'/><allow type='xdb' host='*'/>"),
                    ("sm", SECRETS["sm"],
                     "<allow type='session' host='any'/><allow type='normal' host='any'/>"),
                    ("c2s", SECRETS["c2s"], ""), ("admin", SECRETS["admin"], "")])
            configs = {
                "router": (
                    f"<router>\n  <listen address='{self.addr(self.host_of('router'))}' "
                    f"port='{ROUTER_PORT}'/>\n  <users file='{{d}}/router-users.xml'/>\n"
                    "  <limits max-stanza-bytes='262144' max-depth='64' max-queue-bytes='67108864' "
                    "handshake-timeout='5'/>\n  <grace seconds='2' max-packets='1000'/>\n"
                    "  <keepalive seconds='30'/>\n  <log level='info'/>\n</router>\n"),
                "xdb-file": (f"<xdb-file>{self.link('xdb-file')}<host>localhost</host>"
                             "<spool dir='{d}/spool'/><log level='warn'/></xdb-file>\n"),
                "sm": (f"<sm>{self.link('sm')}<host>localhost</host>"
                       "<modules defaults='true'>"
                       + "".join(f"<module name='{m}' enabled='false'/>" for m in self.without)
                       + "</modules><log level='warn'/></sm>\n"),
                "c2s": (f"<c2s>{self.link('c2s')}<host name='localhost' cert='{{d}}/certs/"
                        "localhost.crt' key='{d}/certs/localhost.key' self-signed='true'/>"
                        f"<listen address='127.0.0.1' port='{C2S_PORT}'/>"
                        "<tls required='false'/><limits max-stanza-bytes='65536' max-depth='32' "
                        "rate-bytes='100000000'/><timeouts idle='3600'/><log level='info'/></c2s>\n"),
            }
            for host, procs in self.hosts.items():
                d = self.host_dir(host)
                (d / "certs").mkdir(exist_ok=True)
                (d / "router-users.xml").write_text(f"<users>\n{users}</users>\n")
                listed = []
                for name, program, args in procs:
                    config = d / f"{program}.xml"
                    config.write_text(configs[program].replace("{d}", str(d)))
                    wait = (f"{self.addr(host)}:{ROUTER_PORT}" if program == "router" else None)
                    listed.append((name, program, config, args, wait))
                self.process_list(host, listed)

        def pids(self):
            """{pid: (host, process name)} from each host's `jabberd status`."""
            found = {}
            for host, procs in self.hosts.items():
                out = self.jabberd(host, "status").stdout
                names = {p[0] for p in procs}
                for line in out.splitlines():
                    cells = line.split()
                    if len(cells) >= 3 and cells[0] in names and cells[1].isdigit():
                        found[int(cells[1])] = (host, cells[0])
            return found

    return BenchCluster


# -- one measurement --------------------------------------------------------------------

class CargoLock:
    """Holds /tmp/cargo.lock: no cooperating cargo build runs during a measurement."""

    def __init__(self, enabled):
        self.enabled, self.f = enabled, None

    def __enter__(self):
        if self.enabled:
            self.f = open("/tmp/cargo.lock", "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        if self.f:
            self.f.close()


def measure(tm, args, n_sm, loopback):
    hosts = topology(n_sm, loopback)
    tm.HOSTS.clear()
    tm.HOSTS.update({h: i for i, h in enumerate(hosts, 1)})
    net = tm.Network()
    directory = Path(tempfile.mkdtemp(prefix="jrs-multism-"))
    cluster = make_cluster_class(tm)(directory, net, hosts, loopback, args.without)
    ok, pids = False, {}
    try:
        net.up()
        cluster.write()
        cluster.start()
        router_host = cluster.host_of("router")
        names = [p[0] for procs in hosts.values() for p in procs if p[0] != "router"]
        for name in names:
            cluster.wait(lambda: re.search(rf"component=\"?{name}\"?.*component connected",
                                           cluster.log(router_host, "router")),
                         f"{name} to connect to the router")
        pids = cluster.pids()
        if len(pids) != len(names) + 1:
            raise RuntimeError(f"expected {len(names) + 1} server processes, got {pids}")
        c2s_host = cluster.host_of("c2s")
        cmd = ["ip", "netns", "exec", net.ns(c2s_host), str(args.bin_dir / "multism_load"),
               "--port", str(C2S_PORT), "--router", f"{cluster.addr(router_host)}:{ROUTER_PORT}",
               "--clients", str(args.clients), "--inflight", str(args.inflight),
               "--seconds", str(args.seconds), "--pids", ",".join(map(str, pids))]
        with CargoLock(not args.no_lock):
            load = os.getloadavg()[0]
            r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"multism_load failed: {r.stderr}\n{cluster.logs()}")
        result = json.loads(r.stdout.strip().splitlines()[-1])
        result["loadavg"] = load
        result["procs"] = [pids[p] for p in result["pids"]]
        ok = True
        return result
    finally:
        cluster.stop()
        for pid in cluster_pids_alive(pids):  # whatever `jabberd stop` left
            os.kill(pid, signal.SIGKILL)
        net.down()
        if ok and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"  (configs and logs kept in {directory})", file=sys.stderr)


def cluster_pids_alive(pids):
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def plain_loadgen(args):
    """`loadgen messages` with its own server on the machine's loopback."""
    env = dict(os.environ, JABBERD_BIN_DIR=str(args.bin_dir))
    without = ["--without", ",".join(args.without)] if args.without else []
    cmd = [str(args.bin_dir / "loadgen"), *without, "messages", "--clients", str(args.clients),
           "--inflight", str(args.inflight), "--seconds", str(args.seconds)]
    with CargoLock(not args.no_lock):
        load = os.getloadavg()[0]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/tmp")
    if r.returncode != 0:
        raise RuntimeError(f"loadgen failed: {r.stdout}{r.stderr}")
    m = re.search(r"([\d.]+) messages/s, latency p50 ([\d.]+) ms p99 ([\d.]+) ms, "
                  r"server CPU ([\d.]+) µs/message", r.stdout)
    per = dict((n, float(v)) for n, v in
               re.findall(r"([\w-]+) ([\d.]+)", r.stdout.split("by process:")[1]))
    return {"rate": float(m[1]), "p50": float(m[2]), "p99": float(m[3]),
            "cpu": float(m[4]), "per": per, "loadavg": load}


# -- figures ----------------------------------------------------------------------------

def figures(tm, result, n_sm):
    """Rate, latency, CPU µs per delivered message (total, by process), and for each sm
    instance its users, the message passes it made and its CPU per pass."""
    delivered = result["delivered"]
    rate = delivered / result["elapsed"]
    per = {}
    for (host, name), us in zip(result["procs"], result["cpu_us"]):
        per[name] = us / delivered
    sm_names = [f"sm-{k}" for k in range(1, n_sm + 1)]
    received = result["received"]
    users = {n: 0 for n in sm_names}
    passes = {n: 0 for n in sm_names}
    for i, got in enumerate(received):
        home = tm.owner(f"user{i}@localhost", tuple(sm_names))
        users[home] += 1
        # The sm of a user handles the messages its users send (outbound, from their
        # session) and those they receive (inbound, to their session).
        passes[home] += got + received[i ^ 1]
    cross = sum(1 for i in range(0, len(received), 2)
                if tm.owner(f"user{i}@localhost", tuple(sm_names))
                != tm.owner(f"user{i + 1}@localhost", tuple(sm_names)))
    sm_cpu = {n: per.get(n, 0.0) * delivered for n in sm_names}
    return {
        "rate": rate, "p50": result["p50_ms"], "p99": result["p99_ms"],
        "cpu": sum(per.values()), "per": per,
        "loader": result["loader_cpu_us"] / delivered, "loadavg": result["loadavg"],
        "sm": {n: {"users": users[n], "share": passes[n] / max(1, sum(passes.values())),
                   "cpu_share": sm_cpu[n] / max(1, sum(sm_cpu.values())),
                   "us_per_pass": sm_cpu[n] / max(1, passes[n])} for n in sm_names},
        "cross_pairs": cross, "pairs": len(received) // 2,
    }


def med(values):
    return statistics.median(values)


def across(f):
    return f"{f['cross_pairs']} of {f['pairs']}" if "pairs" in f else "-"


def report(rows):
    """rows: [(label, n_sm, [figures per run])] -> the two tables, as Markdown: medians
    over the runs, except messages/s and total CPU, which list every run."""
    out = ["| setup | messages/s | p50 / p99 ms | server CPU µs/msg | router | c2s "
           "| sm (all) | xdb-file | loader µs/msg | pairs across sm |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for label, n_sm, runs in rows:
        def by(name):
            return med([sum(v for k, v in f["per"].items()
                            if k == name or (name == "sm" and k.startswith("sm")))
                        for f in runs])
        rates = " / ".join(f"{f['rate'] / 1000:.1f}k" for f in runs)
        cpus = " / ".join(f"{f['cpu']:.1f}" for f in runs)
        loaders = [f["loader"] for f in runs if f.get("loader") is not None]
        loader = f"{med(loaders):.1f}" if loaders else "-"
        out.append(f"| {label} | {rates} | {med([f['p50'] for f in runs]):.1f} / "
                   f"{med([f['p99'] for f in runs]):.1f} | {cpus} | {by('router'):.2f} | "
                   f"{by('c2s'):.2f} | {by('sm'):.2f} | {by('xdb-file'):.2f} | {loader} | "
                   f"{across(runs[0])} |")
    out += ["", "| setup | sm instance | users | share of sm passes | share of sm CPU "
            "| sm CPU µs/pass |", "|---|---|---|---|---|---|"]
    for label, n_sm, runs in rows:
        if "sm" not in runs[0]:
            continue
        for name in runs[0]["sm"]:
            s = [f["sm"][name] for f in runs]
            out.append(f"| {label} | {name} | {s[0]['users']} | "
                       f"{med([x['share'] for x in s]) * 100:.1f}% | "
                       f"{med([x['cpu_share'] for x in s]) * 100:.1f}% | "
                       f"{med([x['us_per_pass'] for x in s]):.2f} |")
    return "\n".join(out)


def on_sigterm(*_):
    raise KeyboardInterrupt()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="store_true", help="build HEAD's binaries first")
    p.add_argument("--bin-dir", type=Path, default=Path("/tmp/jrs-multism-bin"))
    p.add_argument("--sms", default="1,2,4")
    p.add_argument("--loopback", action="store_true",
                   help="also one namespace, everything on 127.0.0.1, one sm")
    p.add_argument("--loadgen", action="store_true", help="also plain `loadgen messages`")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--inflight", type=int, default=10)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--without", type=lambda v: [m for m in v.split(",") if m], default=[],
                   help="sm modules to leave out, as loadgen's --without (e.g. mam,carbons,blocking)")
    p.add_argument("--keep", action="store_true", help="keep configs and logs")
    p.add_argument("--no-lock", action="store_true", help="do not hold /tmp/cargo.lock")
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    args = p.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        sys.exit("multism.py makes network namespaces: run it as root, with iproute2")
    # SIGTERM as Ctrl-C, so the finally blocks clean up.
    signal.signal(signal.SIGTERM, on_sigterm)
    if args.build:
        build(args.bin_dir)
    os.environ["JABBERD_BIN_DIR"] = str(args.bin_dir)  # serverproc.bin_dir(), the process lists
    import test_multihost as tm

    setups = []
    if args.loadgen:
        setups.append(("loadgen messages (own loopback server)", None, None))
    if args.loopback:
        setups.append(("one namespace, loopback, 1 sm", 1, True))
    for n in map(int, args.sms.split(",")):
        setups.append((f"namespaces, {n} sm host{'s' if n > 1 else ''}", n, False))
    results = {label: [] for label, _, _ in setups}
    for run in range(1, args.runs + 1):
        for label, n_sm, loopback in setups:
            if n_sm is None:
                f = plain_loadgen(args)
                f["loader"] = None
            else:
                f = figures(tm, measure(tm, args, n_sm, loopback), n_sm)
            results[label].append(f)
            per = ", ".join(f"{k} {v:.2f}" for k, v in sorted(f["per"].items()))
            print(f"run {run} {label}: {f['rate']:.0f} msg/s, p50 {f['p50']:.1f} ms, "
                  f"p99 {f['p99']:.1f} ms, {f['cpu']:.2f} µs/msg ({per}); "
                  f"load avg before {f['loadavg']:.2f}", flush=True)
    rows = [(label, n_sm, results[label]) for label, n_sm, _ in setups]
    print()
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (namespaces and processes removed)")
