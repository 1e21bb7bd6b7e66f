#!/usr/bin/env python3
"""Server CPU of a FAST reconnect (XEP-0484: SASL2 with an HT-SHA-256-NONE token, one
round trip) beside a full SCRAM-SHA-256 login (SASL, stream restart, bind), all over
STARTTLS, on the release build. Four ways of logging in, in alternating blocks:

- `scram`: a new TLS session, SCRAM-SHA-256, stream restart, bind; `</stream>` at the end.
- `scram-tls-resumed`: the same with TLS session resumption (a ticket from before).
- `fast-bind`: TLS resumed, FAST token and Bind 2 inline (a new session each time).
- `fast-resume`: TLS resumed, FAST token and XEP-0198 resumption inline (the session
  stays, hibernated between connections: the connection is dropped without
  `</stream>`), which is how a mobile client reconnects.

Starts the whole server (router, xdb-file, sm, c2s) with tests/py/serverproc.py on
loopback and prints the server CPU per login (all processes, from /proc/PID/stat) and
the wall time per login.

With `--storage pg` the storage is xdb-pg on a throwaway PostgreSQL cluster
(tests/py/pgcluster.py, removed at the end), and the server CPU includes PostgreSQL's
(the postmaster and its children, those that exited too).

    cargo build --release --workspace
    JABBERD_BIN_DIR=target/release .venv/bin/python c2s/bench/bench_fast.py [--logins 300] [--storage pg]
"""
import argparse
import base64
import hashlib
import hmac
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "py"))

from pgcluster import Cluster  # noqa: E402
from scram_client import RawClient, local, tag  # noqa: E402
from serverproc import Server  # noqa: E402

NS_SASL2 = "urn:xmpp:sasl:2"
NS_BIND2 = "urn:xmpp:bind:0"
NS_FAST = "urn:xmpp:fast:0"
NS_SM = "urn:xmpp:sm:3"
UA = "<user-agent id='b0e6a1c2-bench'><software>bench</software></user-agent>"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def b64(data):
    return base64.b64encode(data).decode()


def token_for(server, user, password):
    """A FAST token, a TLS session to resume, and the id of a resumable XEP-0198
    session (hibernated when this returns)."""
    c = RawClient.connect(server.starttls_port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    payload = b64(f"\0{user}\0{password}".encode())
    c.send(f"<authenticate xmlns='{NS_SASL2}' mechanism='PLAIN'><initial-response>{payload}"
           f"</initial-response>{UA}<request-token xmlns='{NS_FAST}' mechanism='HT-SHA-256-NONE'/>"
           f"<bind xmlns='{NS_BIND2}'><tag>bench</tag><enable xmlns='{NS_SM}' resume='true'/></bind>"
           "</authenticate>")
    success = c.next(what="the SASL2 success")
    token = success.find(tag(NS_FAST, "token")).get("token")
    enabled = success.find(f".//{tag(NS_SM, 'enabled')}")
    session = c.tls_session()
    c.sock.close()  # no </stream>: the session hibernates
    # OpenSSL marks the TLS session unresumable when the connection that made it is
    # freed without a TLS shutdown: the caller keeps `c`.
    return token, session, enabled.get("id"), c


def fast_login(server, user, token, count, session, previd=None):
    """A FAST reconnect; with previd, resuming that XEP-0198 session inline (and dropping
    the connection at the end so that it hibernates again), else binding a new one
    (another Bind 2 tag, so another resource: the hibernating session stays)."""
    c = RawClient.connect(server.starttls_port)
    c.open_stream()
    c.starttls(session=session)
    c.open_stream()
    proof = hmac.new(token.encode(), b"Initiator", hashlib.sha256).digest()
    inline = (f"<resume xmlns='{NS_SM}' previd='{previd}' h='0'/>" if previd
              else f"<bind xmlns='{NS_BIND2}'><tag>bench-bind</tag></bind>")
    c.send(f"<authenticate xmlns='{NS_SASL2}' mechanism='HT-SHA-256-NONE'><initial-response>"
           f"{b64(user.encode() + bytes([0]) + proof)}</initial-response>{UA}{inline}"
           f"<fast xmlns='{NS_FAST}' count='{count}'/></authenticate>")
    outcome = c.next(what="the FAST outcome")
    assert outcome.tag.endswith("success"), outcome
    if previd:
        assert outcome.find(f".//{tag(NS_SM, 'resumed')}") is not None, ET.tostring(outcome)
    resumed = c.tls_resumed()
    # A new token, if the server rotated it, replaces the old one.
    new = outcome.find(tag(NS_FAST, "token"))
    if previd:
        c.sock.close()
    else:
        c.close()
    return (new.get("token") if new is not None else token), resumed


def scram_login(server, session):
    c = RawClient.connect(server.starttls_port)
    c.open_stream()
    c.starttls(session=session)
    c.open_stream()
    outcome, _ = c.scram("alice", "alice-pw", "SCRAM-SHA-256")
    assert local(outcome) == "success", outcome
    c.open_stream()
    assert c.bind("b").get("type") == "result"
    resumed = c.tls_resumed()
    c.close()
    return resumed


KINDS = ("scram", "scram-tls-resumed", "fast-bind", "fast-resume")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logins", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--storage", choices=("file", "pg"), default="file",
                    help="xdb-file, or xdb-pg on a throwaway PostgreSQL cluster")
    args = ap.parse_args()
    cluster = Cluster() if args.storage == "pg" else None
    try:
        bench(args, cluster)
    finally:
        if cluster:
            cluster.destroy()


def bench(args, cluster):
    with tempfile.TemporaryDirectory() as d:
        server = Server(Path(d), log_level="info",  # as shipped
                        storage=args.storage, pg_url=cluster.url if cluster else None)
        server.start()
        try:
            server.addusers({"alice@localhost": "alice-pw"})
            pids = [p.pid for p in server.procs.values()]

            def server_cpu():
                # PostgreSQL's processes count as the server's.
                return cpu_seconds(pids) + (cluster.cpu_seconds() if cluster else 0.0)

            def each_process():
                each = {name: cpu_seconds([p.pid]) for name, p in server.procs.items()}
                if cluster:
                    each["postgres"] = cluster.cpu_seconds()
                return each

            token, session, previd, _keep = token_for(server, "alice", "alice-pw")
            count = 0
            per = args.logins // args.blocks
            results = {k: [0.0, 0.0, 0] for k in KINDS}  # cpu, wall, TLS resumed
            by_process = {k: {name: 0.0 for name in each_process()} for k in KINDS}
            for _ in range(args.blocks):
                for kind in KINDS:
                    cpu0, t0 = server_cpu(), time.monotonic()
                    each0 = each_process()
                    for _ in range(per):
                        if kind == "scram":
                            resumed = scram_login(server, None)
                        elif kind == "scram-tls-resumed":
                            resumed = scram_login(server, session)
                        else:
                            count += 1
                            token, resumed = fast_login(
                                server, "alice", token, count, session,
                                previd if kind == "fast-resume" else None)
                        results[kind][2] += resumed
                    results[kind][0] += server_cpu() - cpu0
                    for name, v in each_process().items():
                        by_process[kind][name] += v - each0[name]
                    results[kind][1] += time.monotonic() - t0
            n = per * args.blocks
            print(f"storage: {'xdb-pg on PostgreSQL (its process is named xdb-file here)' if cluster else 'xdb-file'}")
            for kind, (cpu, wall, resumed) in results.items():
                print(f"{kind}: {n} logins ({resumed} with TLS resumed), server CPU "
                      f"{cpu / n * 1e6:.0f} µs per login, wall {wall / n * 1e3:.2f} ms per "
                      "login; by process (µs): "
                      + ", ".join(f"{name} {v / n * 1e6:.0f}" for name, v in by_process[kind].items()))
            for kind in KINDS[1:]:
                print(f"ratio of server CPU (scram / {kind}): "
                      f"{results['scram'][0] / max(results[kind][0], 1e-9):.2f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
