#!/usr/bin/env python3
"""Message loss under SIGKILL (issue 13): steady client traffic through the whole server
while its processes are killed one at a time and restarted by the supervisor; every
message is then either delivered exactly once, bounced to its sender with an error, or
silently lost, and the driver counts which.

The servers:

- `localhost`, run by the real supervisor (scripts/jabberd) in a temporary directory:
  router, xdb-file, sm, c2s and s2s, configured as the end-to-end tests configure them
  (tests/py/serverproc.py, s2s_servers.FedServer);
- `b.test`, a second installation of ours (FedServer, run directly, never killed),
  federated with the first through a static route each way, so that some pairs talk
  across s2s.

The clients (all in this one asyncio process: the machine has two cores):

- N pairs; a third of them (`--cross`) have one side on b.test. Each client logs in on
  direct TLS with SCRAM-SHA-256, enables XEP-0198 with resumption, sends initial
  presence and answers the server's `<r/>`. Both sides of a pair send chat messages to
  the partner's bare JID, `id='mSEQ'` and body `loss SEQ TRY`, SEQ unique in the run,
  at a steady total rate (`--rate` messages/s spread over all clients).
- A sender keeps what it sent until the server acknowledges it (`<a h/>`, asked for
  with `<r/>`). When its connection drops it reconnects and asks for `<resume previd
  h/>`; on `<resumed h/>` it sends again what the server had not acknowledged; when
  resumption fails it binds a new session (same resource), enables stream management
  and sends the unacknowledged messages again (XEP-0198 5: they may be duplicated),
  each marked as a resend by its TRY count. Messages due while it is offline wait and
  go out after the reconnection.
- A message is *delivered* when its body reaches the partner (counted per SEQ: a
  second copy is a duplicate), *bounced* when an error message with its id comes back
  to the sender, and *silently lost* when neither happened by the end of the drain.

One phase per process of `--kill`: traffic for `--pre` seconds, SIGKILL of the process
(its pid from the supervisor's control socket), traffic until `--post` seconds after the
kill while the supervisor restarts it, then no new messages and a drain (polling, at
most `--drain` seconds) until every message of the phase is accounted for and every
client is online with nothing unacknowledged, or until nothing more came for 4 s with
every client settled (a delivery or bounce later in the run still counts). Each run
starts with a phase without a kill (the warm-up); `none` in the list adds more. Per
phase: sent, delivered once, duplicates, bounced, silently lost, clients that had to log
in again, the restart time (kill to the new pid) and the time until service is back:
for each sending client, the delivery of its first message sent after the kill,
measured from the kill; the table gives the slowest client ("back") and the median.

JABBERD_LINK_ACKS (acknowledged component links) is passed to every server process
through the supervisor's environment: `--acks off` sets it to `off`, `--acks on`
removes it, by default it is inherited.

    .venv/bin/python tests/py/lossrun.py --pairs 24 --rate 300 \\
        --kill router,xdb-file,sm,c2s,s2s [--acks off] [--runs 3] [--json FILE]

The test tests/py/test_loss.py runs `run_loss` from here.
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from s2s_servers import FedServer  # noqa: E402
from scram_client import Scram  # noqa: E402
from serverproc import ROOT, accepts, bin_dir, free_port  # noqa: E402

JABBERD = ROOT / "scripts" / "jabberd"
PROGRAMS = ["router", "xdb-file", "sm", "c2s", "s2s", "jabberctl", "muc"]  # muc: serverproc checks it
KILLABLE = ["router", "xdb-file", "sm", "c2s", "s2s"]
MAIN, PEER = "localhost", "b.test"

NS_STREAM = "http://etherx.jabber.org/streams"
NS_CLIENT = "jabber:client"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SM = "urn:xmpp:sm:3"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_DELAY = "urn:xmpp:delay"
STANZAS = {f"{{{NS_CLIENT}}}{n}" for n in ("message", "presence", "iq")}


class LoginFailed(Exception):
    pass


class StreamGone(Exception):
    pass


# -- the servers ----------------------------------------------------------------------------

def snapshot_binaries(source, target):
    """Hard links (or copies) of the executables in `target`, so that a rebuild of
    target/ during a run does not change them. Waits for a running cargo build (the
    cooperating sessions hold /tmp/cargo.lock) when one is missing."""
    target.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        missing = [p for p in PROGRAMS if not (source / p).exists()]
        if not missing:
            break
        if attempt == 0:
            subprocess.run(["flock", "/tmp/cargo.lock", "true"], check=False, timeout=1800)
    else:
        raise RuntimeError(f"not built in {source}: {', '.join(missing)}")
    for p in PROGRAMS:
        dst = target / p
        try:
            os.link(source / p, dst)
        except OSError:
            shutil.copy2(source / p, dst)
    return target


@contextlib.contextmanager
def environment(**values):
    """os.environ with `values` set (None: removed), restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def set_log_level(path, level):
    text = path.read_text()
    text = re.sub(r"<log level=(['\"])\w+\1", f"<log level='{level}'", text)
    path.write_text(text)


class Installation:
    """`localhost` under scripts/jabberd (router, xdb-file, sm, c2s, s2s) in
    `directory`/main, and the federated `b.test` (FedServer, not supervised) in
    `directory`/peer, with the accounts `main_users` and `peer_users` ({local part:
    password}). A context manager: everything is stopped on exit, whatever happened."""

    def __init__(self, directory, main_users, peer_users, acks=None, binaries=None,
                 grace=5, log_level="info", s2s_queue_timeout=10):
        self.dir = Path(directory)
        self.main_users = main_users
        self.peer_users = peer_users
        self.acks = acks  # None: inherited; "off"; "on" (the variable removed)
        self.source_bin = Path(binaries) if binaries else bin_dir()
        self.bin = None
        self.grace = grace
        self.log_level = log_level
        self.queue = f"<queue timeout='{s2s_queue_timeout}'/>"
        self.main = FedServer(self.dir / "main", MAIN, grace_seconds=grace, log_level=log_level)
        self.peer = FedServer(self.dir / "peer", PEER, grace_seconds=grace, log_level=log_level)
        self.main.s2s_extra = (f"<route domain='{PEER}' address='127.0.0.1' "
                               f"port='{self.peer.s2s_port}'/>{self.queue}")
        self.peer.s2s_extra = (f"<route domain='{MAIN}' address='127.0.0.1' "
                               f"port='{self.main.s2s_port}'/>{self.queue}")
        self.supervisor_xml = self.main.dir / "supervisor.xml"
        self.supervisor_started = False

    # -- environment and the supervisor

    def env(self):
        env = dict(os.environ, JABBERD_BIN_DIR=str(self.bin))
        env.pop("RUST_LOG", None)
        if self.acks == "off":
            env["JABBERD_LINK_ACKS"] = "off"
        elif self.acks == "on":
            env.pop("JABBERD_LINK_ACKS", None)
        return env

    def jabberd(self, *args, timeout=90):
        return subprocess.run([sys.executable, str(JABBERD), *args, "-f", str(self.supervisor_xml)],
                              env=self.env(), capture_output=True, text=True, timeout=timeout)

    def status(self):
        """The supervisor's process list ({name: {pid, state, ...}}) through its control
        socket."""
        path = self.main.dir / "run" / "supervisor.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(15)
            s.connect(str(path))
            s.sendall(b'{"cmd": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
        return {p["name"]: p for p in reply.get("processes", [])}

    # -- start and stop

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin = snapshot_binaries(self.source_bin, self.dir / "bin")
        acks_env = {"off": "off", "on": None}.get(self.acks, os.environ.get("JABBERD_LINK_ACKS"))
        with environment(JABBERD_BIN_DIR=str(self.bin), JABBERD_LINK_ACKS=acks_env):
            self._start_main()
            self.peer.start()
            self._add_users(self.peer, self.peer_users)
        return self

    def _start_main(self):
        m = self.main
        m.dir.mkdir(parents=True, exist_ok=True)
        (m.dir / "log").mkdir(exist_ok=True)
        m.port, m.starttls_port, m.tls_port = free_port(), free_port(), free_port()
        m.write_configs()
        for name in KILLABLE:
            set_log_level(m.dir / f"{name}.xml", self.log_level)
        processes = "".join(
            f"<process name='{name}' program='{name}' config='{m.dir / (name + '.xml')}'"
            + (f" wait-for='127.0.0.1:{m.port}'" if name == "router" else "") + "/>"
            for name in KILLABLE)
        self.supervisor_xml.write_text(
            f"<supervisor><run-dir>{m.dir / 'run'}</run-dir><log-dir>{m.dir / 'log'}</log-dir>"
            f"<stop-timeout>5</stop-timeout>{processes}</supervisor>")
        started = self.jabberd("start", "--daemon", "--no-build")
        self.supervisor_started = True
        if started.returncode != 0:
            raise RuntimeError(f"jabberd start failed: {started.stdout}{started.stderr}")
        self.status()
        m.wait_for(lambda: accepts(m.tls_port) and accepts(m.s2s_port), "c2s and s2s to listen",
                   timeout=20)
        m.wait_for(lambda: all("connected to the router" in m.log(n)
                               for n in ("xdb-file", "sm", "c2s", "s2s")),
                   "the components to connect", timeout=20)
        self._add_users(m, self.main_users)

    @staticmethod
    def _add_users(server, users):
        items = [(f"{u}@{server.domain}", p) for u, p in users.items()]
        for i in range(0, len(items), 12):
            server.addusers(dict(items[i:i + 12]), timeout=60)

    def stop(self):
        """Stops both servers; whatever still runs afterwards (a supervisor interrupted
        while stopping, a process it left behind) is killed: every process whose command
        line names this run's directory. Returns what went wrong."""
        errors = []
        try:
            if self.supervisor_started:
                try:
                    stopped = self.jabberd("stop")
                    if stopped.returncode != 0:
                        errors.append(f"jabberd stop: {stopped.stdout}{stopped.stderr}")
                except BaseException as e:  # noqa: BLE001 (Ctrl-C too: clean up first)
                    errors.append(f"jabberd stop: {e!r}")
                    self._stop_supervisor()
        finally:
            try:
                self.peer.stop()
            except BaseException as e:  # noqa: BLE001
                errors.append(f"peer stop: {e!r}")
            finally:
                self._kill_leftovers()
        return errors

    def _ours(self):
        """Pids of running processes whose command line names this run's directory."""
        marker = str(self.dir).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def _stop_supervisor(self):
        """SIGTERM to the supervisor (it stops its processes in order), if it still runs."""
        pidfile = self.main.dir / "run" / "jabberd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if pid in self._ours():
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while pid in self._ours() and time.monotonic() < deadline:
                    time.sleep(0.1)

    def _kill_leftovers(self):
        for pid in self._ours():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
        return False

    def logs(self):
        """{'main/NAME' or 'peer/NAME': log text}."""
        out = {}
        for side, server in (("main", self.main), ("peer", self.peer)):
            for path in sorted((server.dir / "log").glob("*.log")):
                out[f"{side}/{path.stem}"] = path.read_text(errors="replace")
        return out


# -- the clients ----------------------------------------------------------------------------

class Msg:
    __slots__ = ("seq", "sender", "recipient", "phase", "t_gen", "t_sent", "tries",
                 "deliveries", "bounces")

    def __init__(self, seq, sender, recipient, phase, t_gen):
        self.seq = seq
        self.sender = sender
        self.recipient = recipient
        self.phase = phase
        self.t_gen = t_gen
        self.t_sent = None
        self.tries = 0  # times written (resends included)
        self.deliveries = []  # (time, try, delayed, receiver)
        self.bounces = []  # (time, condition)

    def accounted(self):
        return bool(self.deliveries or self.bounces)


def server_duplicated(m):
    """Two live (not offline, no <delay/>) copies of the same send of a message."""
    tries = [d[1] for d in m.deliveries if not d[2]]
    return len(tries) != len(set(tries))


class XmlConn:
    """One TLS connection and its XML stream: top-level elements come out of next()."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.pending = collections.deque()
        self.closed = False
        self.new_parser()

    def new_parser(self):
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.root = None

    def write(self, data):
        if not self.closed:
            self.writer.write(data.encode() if isinstance(data, str) else data)

    def feed(self, data):
        self.parser.feed(data)
        for event, element in self.parser.read_events():
            if event == "start":
                self.depth += 1
                if self.depth == 1:
                    self.root = element
            else:
                self.depth -= 1
                if self.depth == 0:
                    self.closed = True
                elif self.depth == 1:
                    self.pending.append(element)
                    self.root.remove(element)

    async def next(self, timeout=None):
        while not self.pending:
            if self.closed:
                raise StreamGone("stream closed")
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
            except (ConnectionError, ssl.SSLError, OSError) as e:
                raise StreamGone(repr(e)) from None
            if not data:
                self.closed = True
                raise StreamGone("connection closed")
            try:
                self.feed(data)
            except ET.ParseError as e:
                raise StreamGone(f"XML we cannot parse: {e}") from None
        return self.pending.popleft()

    def abort(self):
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def text_of(e):
    return ET.tostring(e, encoding="unicode")


class Client:
    """One account's client: login, XEP-0198, reconnection; sends and receives the
    run's messages (see the module's docstring)."""

    def __init__(self, run, idx, user, domain, password, port):
        self.run = run
        self.idx = idx
        self.user = user
        self.domain = domain
        self.password = password
        self.port = port
        self.bare = f"{user}@{domain}"
        self.partner = None  # the partner's Client
        self.conn = None
        self.online = False
        self.sm_id = None
        self.sm_enabled = False  # stanzas are counted (XEP-0198) on this stream
        self.h_in = 0  # stanzas received in this XEP-0198 session
        self.acked = 0  # the server's last h
        self.unacked = collections.deque()  # (xml, seq or None) sent, not acknowledged
        self.outbox = collections.deque()  # seqs due while offline
        self.since_request = 0
        self.last_request = 0.0
        self.task = None
        self.stopping = False
        self.ever_online = asyncio.Event()
        self.events = []  # (time, what)

    # -- sending

    def message_xml(self, seq, attempt):
        return (f"<message to='{self.partner.bare}' type='chat' id='m{seq}'>"
                f"<body>loss {seq} {attempt}</body></message>")

    def new_message(self, seq):
        if self.online:
            self._send_message(seq)
        else:
            self.outbox.append(seq)

    def _send_message(self, seq):
        m = self.run.msgs[seq]
        m.tries += 1
        if m.t_sent is None:
            m.t_sent = time.monotonic()
        elif m.tries > 1:
            self.run.phase_stat(m.phase)["resends"] += 1
        self._send(self.message_xml(seq, m.tries), seq)

    def _send(self, xml, seq=None):
        self.unacked.append((xml, seq))
        self.conn.write(xml)
        self.since_request += 1
        if self.since_request >= 5:
            self.request_ack()

    def request_ack(self):
        if self.conn is not None and self.online:
            self.conn.write(f"<r xmlns='{NS_SM}'/>")
            self.since_request = 0
            self.last_request = time.monotonic()

    def tick(self, now):
        """Called by the traffic loop: ask for an ack when something waits for one."""
        if self.online and self.unacked and now - self.last_request > 0.25:
            self.request_ack()

    def _acked_to(self, h):
        n = (h - self.acked) % (1 << 32)
        if n > len(self.unacked):
            self.event(f"server acknowledged {n}, only {len(self.unacked)} were unacknowledged")
            n = len(self.unacked)
        for _ in range(n):
            self.unacked.popleft()
        self.acked = h

    # -- receiving

    def handle(self, e):
        """A top-level element of the bound stream."""
        tag = e.tag
        if tag in STANZAS:
            if self.sm_enabled:
                self.h_in = (self.h_in + 1) % (1 << 32)
            if tag == f"{{{NS_CLIENT}}}message":
                self.run.on_message(self, e)
            elif tag == f"{{{NS_CLIENT}}}iq" and e.get("type") in ("get", "set"):
                self._send(f"<iq type='error' id='{e.get('id')}' to='{e.get('from') or self.domain}'>"
                           f"<error type='cancel'><service-unavailable xmlns='{NS_STANZAS}'/>"
                           "</error></iq>")
        elif tag == f"{{{NS_SM}}}r":
            self.conn.write(f"<a xmlns='{NS_SM}' h='{self.h_in}'/>")
        elif tag == f"{{{NS_SM}}}a":
            self._acked_to(int(e.get("h")))
        elif tag == f"{{{NS_STREAM}}}error":
            cond = next((c.tag.split("}")[1] for c in e if not c.tag.endswith("}text")), "?")
            self.event(f"stream error {cond}")
            self.run.count("stream errors", cond)

    def event(self, what):
        self.events.append((time.monotonic(), what))

    # -- the connection

    async def connect(self):
        ctx = self.run.tls_context
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port, ssl=ctx, server_hostname=self.domain),
            10)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return XmlConn(reader, writer)

    async def open_stream(self, conn):
        conn.new_parser()
        conn.write(f"<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' "
                   f"xmlns:stream='{NS_STREAM}' to='{self.domain}' version='1.0'>")
        e = await conn.next(10)
        if e.tag != f"{{{NS_STREAM}}}features":
            raise LoginFailed(f"expected features, got {text_of(e)}")
        return e

    async def login(self):
        """Connects, authenticates, and resumes or binds; returns True when resumed."""
        conn = self.conn = await self.connect()
        self.sm_enabled = False
        await self.open_stream(conn)
        scram = Scram("SCRAM-SHA-256", self.user, self.password)
        conn.write(f"<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-256'>"
                   f"{base64.b64encode(scram.client_first()).decode()}</auth>")
        e = await conn.next(10)
        if not e.tag.endswith("}challenge"):
            raise LoginFailed(f"SASL: {text_of(e)}")
        final = scram.client_final(base64.b64decode(e.text or ""))
        conn.write(f"<response xmlns='{NS_SASL}'>{base64.b64encode(final).decode()}</response>")
        e = await conn.next(10)
        if not e.tag.endswith("}success"):
            raise LoginFailed(f"SASL: {text_of(e)}")
        features = await self.open_stream(conn)
        if features.find(f"{{{NS_SM}}}sm") is None:
            raise LoginFailed("no stream management offered")
        if self.sm_id is not None:
            conn.write(f"<resume xmlns='{NS_SM}' previd='{self.sm_id}' h='{self.h_in}'/>")
            while True:
                e = await conn.next(10)
                if e.tag == f"{{{NS_SM}}}resumed":
                    self.sm_enabled = True
                    self._acked_to(int(e.get("h")))
                    again = list(self.unacked)
                    self.unacked.clear()
                    self.online = True
                    for xml, seq in again:
                        if seq is not None:
                            self._send_message(seq)
                        else:
                            self._send(xml)
                    return True
                if e.tag == f"{{{NS_SM}}}failed":
                    break
                self.handle(e)
        # A new session: what the server had not acknowledged is sent again (first, then
        # what came due meanwhile), once the session is up.
        self.outbox.extendleft(reversed([seq for _, seq in self.unacked if seq is not None]))
        self.unacked.clear()
        self.sm_id, self.h_in, self.acked = None, 0, 0
        conn.write(f"<iq type='set' id='bind'><bind xmlns='{NS_BIND}'><resource>r</resource>"
                   "</bind></iq>")
        while True:
            e = await conn.next(15)
            if e.tag == f"{{{NS_CLIENT}}}iq" and e.get("id") == "bind":
                if e.get("type") != "result":
                    raise LoginFailed(f"bind: {text_of(e)}")
                break
            self.handle(e)
        conn.write(f"<enable xmlns='{NS_SM}' resume='true'/>")
        while True:
            e = await conn.next(10)
            if e.tag == f"{{{NS_SM}}}enabled":
                self.sm_id = e.get("id")
                self.sm_enabled = True
                break
            if e.tag == f"{{{NS_SM}}}failed":
                raise LoginFailed(f"enable: {text_of(e)}")
            self.handle(e)
        self.online = True
        self._send("<presence/>")
        return False

    async def serve(self):
        backoff = 0.05
        first = True
        while not self.stopping:
            try:
                resumed = await asyncio.wait_for(self.login(), 30)
            except (LoginFailed, StreamGone, OSError, asyncio.TimeoutError, ssl.SSLError,
                    ValueError, TypeError) as e:
                self.online = False
                if self.conn is not None:
                    self.conn.abort()
                self.event(f"login failed: {e!r}"[:300])
                if self.stopping:
                    return
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if not first:
                self.run.phase_stat()["resumed" if resumed else "relogins"] += 1
                if not resumed:
                    self.run.relogged[self.run.phase].add(self.idx)
                self.event("resumed" if resumed else "logged in again")
            first = False
            while self.outbox and self.online:
                self._send_message(self.outbox.popleft())
            self.request_ack()
            self.ever_online.set()
            try:
                while True:
                    e = await self.conn.next()
                    try:
                        self.handle(e)
                    except (ValueError, TypeError) as err:  # a malformed count or the like
                        self.event(f"cannot handle {text_of(e)[:200]}: {err!r}")
                        self.run.count("unhandled", e.tag)
            except StreamGone as e:
                self.event(f"connection lost: {e}")
            finally:
                self.online = False
                self.conn.abort()
            if not self.stopping:
                self.run.phase_stat()["disconnects"] += 1

    async def close(self):
        self.stopping = True
        if self.conn is not None and self.online:
            with contextlib.suppress(Exception):
                self.conn.write("</stream:stream>")
                await asyncio.wait_for(self.conn.writer.drain(), 1)
        if self.conn is not None:
            self.conn.abort()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


# -- one run --------------------------------------------------------------------------------

def accounts(pairs, cross):
    """(main users, peer users, pair list): pair i is (a_i, b_i); the last `cross` pairs
    have b on the peer."""
    main, peer, plan = {}, {}, []
    for i in range(pairs):
        main[f"a{i}"] = f"pw-a{i}"
        if i >= pairs - cross:
            peer[f"b{i}"] = f"pw-b{i}"
            plan.append((("a", i, MAIN), ("b", i, PEER)))
        else:
            main[f"b{i}"] = f"pw-b{i}"
            plan.append((("a", i, MAIN), ("b", i, MAIN)))
    return main, peer, plan


class LossRun:
    """The clients and the message ledger of one run against an Installation."""

    def __init__(self, inst, pairs, rate, cross):
        self.inst = inst
        self.rate = rate
        self.msgs = {}
        self.seq = 0
        self.phase = 0
        self.phases = [collections.Counter()]
        self.phase_msgs = [[]]
        self.relogged = [set()]
        self.loop_lag = [0.0]
        self.counters = collections.defaultdict(collections.Counter)
        self.misdelivered = 0
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["xmpp-client"])
        self.tls_context = ctx
        _, _, plan = accounts(pairs, cross)
        self.clients = []
        for a, b in plan:
            pair = []
            for letter, i, domain in (a, b):
                server = inst.main if domain == MAIN else inst.peer
                c = Client(self, len(self.clients), f"{letter}{i}", domain, f"pw-{letter}{i}",
                           server.tls_port)
                self.clients.append(c)
                pair.append(c)
            pair[0].partner, pair[1].partner = pair[1], pair[0]
        self.sending = False

    def phase_stat(self, phase=None):
        return self.phases[self.phase if phase is None else phase]

    def count(self, kind, what):
        self.counters[kind][what] += 1

    def on_message(self, client, e):
        body = e.findtext(f"{{{NS_CLIENT}}}body") or ""
        now = time.monotonic()
        if e.get("type") == "error":
            mid = e.get("id") or ""
            if mid.startswith("m") and mid[1:].isdigit() and int(mid[1:]) in self.msgs:
                err = e.find(f"{{{NS_CLIENT}}}error")
                cond = "?"
                if err is not None:
                    cond = next((c.tag.split("}")[1] for c in err
                                 if c.tag.startswith(f"{{{NS_STANZAS}}}") and not c.tag.endswith("}text")),
                                "?")
                self.msgs[int(mid[1:])].bounces.append((now, cond))
            return
        parts = body.split()
        if len(parts) != 3 or parts[0] != "loss":
            return
        m = self.msgs.get(int(parts[1]))
        if m is None:
            return
        if m.recipient != client.idx:
            self.misdelivered += 1
        delayed = e.find(f"{{{NS_DELAY}}}delay") is not None
        m.deliveries.append((now, int(parts[2]), delayed, client.idx))

    # -- traffic

    async def traffic(self):
        """Messages at `rate` per second in all, round-robin over the clients; acks
        asked for where something waits."""
        produced, rr = 0, 0
        start = None
        n = len(self.clients)
        before = time.monotonic()
        while True:
            now = time.monotonic()
            lag = now - before
            if lag > self.loop_lag[self.phase]:
                self.loop_lag[self.phase] = lag
            if self.sending:
                if start is None:
                    start, produced = now, 0
                due = int((now - start) * self.rate) - produced
                for _ in range(due):
                    c = self.clients[rr % n]
                    rr += 1
                    self.seq += 1
                    m = self.msgs[self.seq] = Msg(self.seq, c.idx, c.partner.idx, self.phase, now)
                    self.phase_msgs[self.phase].append(m)
                    c.new_message(self.seq)
                produced += due
            else:
                start = None
            for c in self.clients:
                c.tick(now)
            before = time.monotonic() + 0.01
            await asyncio.sleep(0.01)

    def clients_settled(self):
        return all(c.online and not c.unacked and not c.outbox for c in self.clients)

    def settled(self, phase):
        """Everything of `phase` accounted for, every client online with nothing
        unacknowledged or waiting."""
        return (all(m.accounted() for m in self.phase_msgs[phase]) and self.clients_settled())

    async def drain(self, phase, timeout, quiet):
        """Waits until the phase is settled; gives up after `timeout`, or once the clients
        are settled and nothing more was accounted for in `quiet` seconds (what is left
        then is lost; a later delivery or bounce is still counted by summarise())."""
        t0 = last = time.monotonic()
        seen = None
        while True:
            now = time.monotonic()
            if self.settled(phase):
                return True
            progress = (sum(len(m.deliveries) + len(m.bounces) for m in self.phase_msgs[phase]),
                        sum(len(c.unacked) for c in self.clients))
            if progress != seen:
                seen, last = progress, now
            elif self.clients_settled() and now - last > quiet:
                return False
            if now - t0 > timeout:
                return False
            await asyncio.sleep(0.05)

    async def wait(self, condition, timeout, step=0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            await asyncio.sleep(step)
        return condition()

    # -- phases

    async def run_phase(self, target, pre, post, drain, log, quiet=4.0):
        """One phase: traffic, SIGKILL of `target` (or none), restart, drain. Returns the
        phase's record (figures filled in by summarise())."""
        rec = {"process": target, "phase": self.phase}
        loop = asyncio.get_running_loop()
        self.sending = True
        await asyncio.sleep(pre)
        kill_time = time.monotonic()
        if target != "none":
            status = await loop.run_in_executor(None, self.inst.status)
            old = status[target]["pid"]
            if status[target]["state"] != "running" or not old:
                raise RuntimeError(f"{target} is not running before its kill: {status[target]}")
            kill_time = time.monotonic()
            os.kill(old, signal.SIGKILL)
            log(f"  {target}: SIGKILL pid {old}")

            def restarted():
                p = self.inst.status().get(target)
                return p and p["state"] == "running" and p["pid"] != old and p["pid"]

            new = None
            deadline = kill_time + 30
            while time.monotonic() < deadline:
                new = await loop.run_in_executor(None, restarted)
                if new:
                    break
                await asyncio.sleep(0.05)
            rec["restart_s"] = time.monotonic() - kill_time if new else None
            log(f"  {target}: restarted as pid {new} after {rec['restart_s'] or 0:.2f} s")
        rec["kill_time"] = kill_time
        await asyncio.sleep(max(0.0, kill_time + post - time.monotonic()))
        self.sending = False
        t0 = time.monotonic()
        ok = await self.drain(self.phase, drain, quiet)
        rec["drain_s"] = time.monotonic() - t0
        rec["drained"] = ok
        log(f"  {target}: drained in {rec['drain_s']:.1f} s"
            + ("" if ok else " (not settled: what is missing is counted as lost)"))
        self.phase += 1
        self.phases.append(collections.Counter())
        self.phase_msgs.append([])
        self.relogged.append(set())
        self.loop_lag.append(0.0)
        return rec

    def summarise(self, rec):
        """The figures of a phase, from the ledger as it is now."""
        phase = rec["phase"]
        msgs = self.phase_msgs[phase]
        once = [m for m in msgs if len(m.deliveries) == 1]
        dups = [m for m in msgs if len(m.deliveries) > 1]
        bounced = [m for m in msgs if not m.deliveries and m.bounces]
        lost = [m for m in msgs if not m.accounted()]
        both = [m for m in msgs if m.deliveries and m.bounces]
        stat = self.phases[phase]
        rec.update(
            sent=len(msgs), once=len(once), duplicates=len(dups),
            dup_resent=sum(1 for m in dups if len({d[1] for d in m.deliveries}) > 1),
            dup_offline=sum(1 for m in dups if any(d[2] for d in m.deliveries)),
            # Copies neither a client's resend nor an offline message given again explains:
            # the server itself delivered one stanza twice.
            dup_unexplained=sum(1 for m in dups if server_duplicated(m)),
            bounced=len(bounced), delivered_and_bounced=len(both),
            bounce_conditions=dict(collections.Counter(m.bounces[0][1] for m in bounced)),
            lost=len(lost), relogins=len(self.relogged[phase]), resumed=stat["resumed"],
            loop_lag_ms=round(1000 * self.loop_lag[phase]),
            disconnects=stat["disconnects"], resends=stat["resends"],
            lost_seqs=[(m.seq, self.clients[m.sender].bare, self.clients[m.recipient].bare,
                        round(m.t_gen - rec["kill_time"], 3), m.tries) for m in lost][:200],
            dup_seqs=[m.seq for m in dups][:50],
        )
        # Service back: per sending client, its first message sent after the kill that
        # was delivered, measured from the kill.
        k = rec["kill_time"]
        firsts = {}
        for m in msgs:
            if m.t_gen >= k and m.deliveries:
                t = min(d[0] for d in m.deliveries) - k
                if m.sender not in firsts or t < firsts[m.sender]:
                    firsts[m.sender] = t
        senders = {m.sender for m in msgs if m.t_gen >= k}
        if senders and len(firsts) == len(senders):
            rec["back_s"] = max(firsts.values())
        else:
            rec["back_s"] = None
        rec["back_median_s"] = statistics.median(firsts.values()) if firsts else None
        lat = sorted(min(d[0] for d in m.deliveries) - m.t_gen for m in msgs if m.deliveries)
        rec["latency_p50_ms"] = 1000 * lat[len(lat) // 2] if lat else None
        return rec

    async def start_clients(self, timeout=60):
        for c in self.clients:
            c.task = asyncio.create_task(c.serve())
        ok = await self.wait(lambda: all(c.ever_online.is_set() for c in self.clients), timeout)
        if not ok:
            missing = [c.bare for c in self.clients if not c.ever_online.is_set()]
            events = {c.bare: c.events[-3:] for c in self.clients if not c.ever_online.is_set()}
            raise RuntimeError(f"clients did not log in: {missing[:10]} {events}")

    async def close(self):
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


async def _run_loss(inst, pairs, rate, cross, kill, pre, post, drain, log):
    run = LossRun(inst, pairs, rate, cross)
    traffic = None
    try:
        await run.start_clients()
        traffic = asyncio.create_task(run.traffic())
        # Warm-up: the federation's streams come up, every pair has talked.
        warm = await run.run_phase("none", 1.0, 0.0, 20, log)
        records = []
        for target in kill:
            records.append(await run.run_phase(target, pre, post, drain, log))
        # Late deliveries and duplicates of the last phase.
        await asyncio.sleep(1.0)
        warm = run.summarise(warm)
        results = [run.summarise(r) for r in records]
        status = await asyncio.get_running_loop().run_in_executor(None, inst.status)
        extra = {"warmup": warm, "misdelivered": run.misdelivered,
                 # Restarts per process: one per kill; more means a process died by itself.
                 "restarts": {name: p["restarts"] for name, p in status.items()},
                 "counters": {k: dict(v) for k, v in run.counters.items()},
                 "client_events": {c.bare: [(round(t, 3), w) for t, w in c.events[-20:]]
                                   for c in run.clients if c.events}}
        return results, extra
    finally:
        if traffic is not None:
            traffic.cancel()
            await asyncio.gather(traffic, return_exceptions=True)
        await run.close()


def run_loss(directory, pairs=24, rate=300, cross=None, kill=tuple(KILLABLE), acks=None,
             pre=3.0, post=6.0, drain=15.0, binaries=None, log_level="info", grace=5,
             log=print, keep_logs=None):
    """Starts the servers in `directory`, runs the phases and stops everything. Returns
    (phase records, extra): each record has process, sent, once, duplicates, bounced,
    lost, relogins, restart_s, back_s, ... (see LossRun.summarise). keep_logs: a dict
    that receives every log of the run ({'main/sm': text, ...})."""
    cross = pairs // 3 if cross is None else cross
    # Writes to a connection that just dropped are expected: no warnings for them.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    main_users, peer_users, _ = accounts(pairs, cross)
    inst = Installation(directory, main_users, peer_users, acks=acks, binaries=binaries,
                        log_level=log_level, grace=grace)
    with inst:
        log(f"servers up in {directory}; {len(main_users)} users at {MAIN}, "
            f"{len(peer_users)} at {PEER}")
        try:
            results, extra = asyncio.run(
                _run_loss(inst, pairs, rate, cross, list(kill), pre, post, drain, log))
        finally:
            if keep_logs is not None:
                keep_logs.update(inst.logs())
    return results, extra


# -- the command line -----------------------------------------------------------------------

COLUMNS = [("process", "process", "{}"), ("sent", "sent", "{}"), ("once", "once", "{}"),
           ("duplicates", "dup", "{}"), ("bounced", "bounced", "{}"), ("lost", "lost", "{}"),
           ("relogins", "relogin", "{}"), ("resumed", "resumed", "{}"),
           ("restart_s", "restart s", "{:.2f}"), ("back_s", "back s", "{:.2f}"),
           ("back_median_s", "median s", "{:.2f}"), ("drain_s", "drain s", "{:.1f}"),
           ("loop_lag_ms", "lag ms", "{}")]


def table(records):
    rows = [[title for _, title, _ in COLUMNS]]
    for r in records:
        rows.append([("-" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--rate", type=float, default=300, help="messages per second in all")
    ap.add_argument("--cross", type=int, default=None,
                    help="pairs with one side on the federated server (default: a third)")
    ap.add_argument("--kill", default=",".join(KILLABLE),
                    help="processes to kill, one phase each, in order ('none': no kill)")
    ap.add_argument("--acks", choices=["on", "off"], default=None,
                    help="JABBERD_LINK_ACKS for the servers (default: inherited)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--pre", type=float, default=3.0, help="seconds of traffic before the kill")
    ap.add_argument("--post", type=float, default=6.0, help="seconds of traffic after the kill")
    ap.add_argument("--drain", type=float, default=15.0, help="at most this long for late deliveries")
    ap.add_argument("--bin-dir", default=None, help="executables (default: $JABBERD_BIN_DIR or target/debug)")
    ap.add_argument("--log-level", default="info", help="of every server process")
    ap.add_argument("--grace", type=int, default=5, help="the router's grace period, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--json", help="write every run's records here")
    args = ap.parse_args()

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM, and SIGINT even where the shell ignores it (a background job): the servers
    # are stopped before the script exits.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    kill = [k.strip() for k in args.kill.split(",") if k.strip()]
    for k in kill:
        if k not in KILLABLE + ["none"]:
            ap.error(f"cannot kill {k!r}: one of {', '.join(KILLABLE)}, none")
    all_runs = []
    for n in range(args.runs):
        directory = Path(tempfile.mkdtemp(prefix="lossrun-"))
        print(f"run {n + 1}/{args.runs} in {directory} (acks: {args.acks or 'inherited'}, "
              f"binaries: {args.bin_dir or bin_dir()})", flush=True)
        try:
            t0 = time.monotonic()
            records, extra = run_loss(directory, args.pairs, args.rate, args.cross, kill, args.acks,
                                      args.pre, args.post, args.drain, args.bin_dir, args.log_level,
                                      args.grace, log=lambda s: print(s, flush=True))
            print(table(records))
            print(f"warm-up: {extra['warmup']['sent']} sent, {extra['warmup']['lost']} lost; "
                  f"misdelivered {extra['misdelivered']}; counters {extra['counters']}; "
                  f"restarts {extra['restarts']}; "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
            for r in records:
                if r["lost"] or r["bounced"] or r["duplicates"]:
                    print(f"  {r['process']}: bounces {r['bounce_conditions']}, "
                          f"dups resent {r['dup_resent']} offline {r['dup_offline']}, "
                          f"lost (seq, from, to, s after kill, tries) {r['lost_seqs'][:8]}")
            all_runs.append({"records": records, "extra": extra, "dir": str(directory)})
        finally:
            if not args.keep:
                shutil.rmtree(directory, ignore_errors=True)
    if args.runs > 1:
        print("\nall runs (per process: values of each run)")
        for i, target in enumerate(kill):
            rows = [run["records"][i] for run in all_runs]
            cells = {k: "/".join("-" if r.get(k) is None else fmt.format(r[k]) for r in rows)
                     for k, _, fmt in COLUMNS[1:]}
            print(f"{target:9} " + "  ".join(f"{title} {cells[k]}" for k, title, _ in COLUMNS[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "runs": all_runs}, indent=1, default=str))


if __name__ == "__main__":
    main()
