#!/usr/bin/env python3
"""Server CPU of a FAST reconnect (XEP-0484: SASL2 with an HT-SHA-256-NONE token and
Bind 2, one round trip) beside a full SCRAM-SHA-256 login (SASL, stream restart, bind),
both over STARTTLS, on the release build.

Starts the whole server (router, xdb-file, sm, c2s) with tests/py/serverproc.py on
loopback, logs in N times each way one after the other (alternating blocks, so that
drifts of the machine hit both alike), and prints the server CPU per login (all
processes, from /proc/PID/stat) and the wall time per login.

    cargo build --release --workspace
    JABBERD_BIN_DIR=target/release .venv/bin/python c2s/bench/bench_fast.py [--logins 300]
"""

import argparse
import base64
import hashlib
import hmac
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "py"))

from scram_client import RawClient, login, tag  # noqa: E402
from serverproc import Server  # noqa: E402

NS_SASL2 = "urn:xmpp:sasl:2"
NS_BIND2 = "urn:xmpp:bind:0"
NS_FAST = "urn:xmpp:fast:0"
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
    c = RawClient.connect(server.starttls_port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    payload = b64(f"\0{user}\0{password}".encode())
    c.send(f"<authenticate xmlns='{NS_SASL2}' mechanism='PLAIN'><initial-response>{payload}"
           f"</initial-response>{UA}<request-token xmlns='{NS_FAST}' mechanism='HT-SHA-256-NONE'/>"
           "</authenticate>")
    success = c.next(what="the SASL2 success")
    token = success.find(tag(NS_FAST, "token")).get("token")
    c.close()
    return token


def fast_login(server, user, token, count):
    c = RawClient.connect(server.starttls_port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    proof = hmac.new(token.encode(), b"Initiator", hashlib.sha256).digest()
    c.send(f"<authenticate xmlns='{NS_SASL2}' mechanism='HT-SHA-256-NONE'><initial-response>"
           f"{b64(user.encode() + bytes([0]) + proof)}</initial-response>{UA}"
           f"<bind xmlns='{NS_BIND2}'><tag>bench</tag></bind>"
           f"<fast xmlns='{NS_FAST}' count='{count}'/></authenticate>")
    outcome = c.next(what="the FAST outcome")
    assert outcome.tag.endswith("success"), outcome
    # A new token, if the server rotated it, replaces the old one.
    new = outcome.find(tag(NS_FAST, "token"))
    c.close()
    return new.get("token") if new is not None else token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logins", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        server = Server(Path(d))
        server.start()
        try:
            server.addusers({"alice@localhost": "alice-pw"})
            pids = [p.pid for p in server.procs.values()]
            token, count = token_for(server, "alice", "alice-pw"), 0
            per = args.logins // args.blocks
            results = {"scram": [0.0, 0.0], "fast": [0.0, 0.0]}
            by_process = {k: {name: 0.0 for name in server.procs} for k in results}
            for _ in range(args.blocks):
                for kind in ("scram", "fast"):
                    cpu0, t0 = cpu_seconds(pids), time.monotonic()
                    each0 = {name: cpu_seconds([p.pid]) for name, p in server.procs.items()}
                    for _ in range(per):
                        if kind == "scram":
                            login(server.starttls_port, "alice", "alice-pw", resource="b").close()
                        else:
                            count += 1
                            token = fast_login(server, "alice", token, count)
                    results[kind][0] += cpu_seconds(pids) - cpu0
                    for name, p in server.procs.items():
                        by_process[kind][name] += cpu_seconds([p.pid]) - each0[name]
                    results[kind][1] += time.monotonic() - t0
            n = per * args.blocks
            for kind, (cpu, wall) in results.items():
                print(f"{kind}: {n} logins, server CPU {cpu / n * 1e6:.0f} µs per login, "
                      f"wall {wall / n * 1e3:.2f} ms per login; by process (µs): "
                      + ", ".join(f"{name} {v / n * 1e6:.0f}" for name, v in by_process[kind].items()))
            print(f"ratio of server CPU (scram / fast): {results['scram'][0] / results['fast'][0]:.2f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
