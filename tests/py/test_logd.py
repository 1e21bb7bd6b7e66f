"""Log packets and the log sink, end to end with real processes: sm's warnings travel
through the router as log packets to logd (files, an admin's chat) and to
`jabberctl log --follow`; level and host filters; a burst is summarised.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_logd.py -q
"""

import hashlib
import re
import socket
import subprocess
import threading
import time

import pytest

from scram_client import local, login
from serverproc import ServerError, bin_dir, serving

USERS = {"alice": "alice-pw", "boss": "boss-pw"}
TOO_MANY = "session refused: too many sessions"
NO_JID = "session packet without a valid 'jid', 'sid' or 'from' ignored"
NOT_SERVED = "session for a domain this sm does not serve"
BURST = 300

OUTPUTS = (
    "<file path='log/server.log' level='warn'/>"
    "<file path='log/hosts/{host}.log' level='warn'/>"
    # Level filter: the warnings must not get here.
    "<file path='log/errors.log' level='error'/>"
    # Host filter: only records about other.example.
    "<file path='log/other.log' level='warn' host='other.example'/>"
    # Process and text filters.
    "<file path='log/sm-refusals.log' level='warn' process='sm' match='REFUSED'/>"
    "<admin jid='boss@localhost' level='warn' per-minute='100'/>"
)


def read(server, rel):
    try:
        return server.path(rel).read_text()
    except OSError:
        return ""


def wait_for(server, what, condition, timeout=15.0):
    return server.wait_for(condition, what, timeout=timeout, watch=["logd", "sm"])


class Follower:
    """`jabberctl log --follow ARGS` in the background, its lines collected."""

    def __init__(self, server, *args):
        self.lines = []
        self.proc = subprocess.Popen(
            [str(bin_dir() / "jabberctl"), "-c", str(server.path("ctl.xml")), "log", "--follow",
             *args],
            cwd=server.dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        # Bound once it says so on stderr.
        line = self.proc.stderr.readline()
        if "following" not in line:
            self.stop()
            raise ServerError(f"jabberctl log --follow did not start: {line}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self):
        return "\n".join(self.lines)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RawComponent:
    """A bare XEP-0114 link (as `admin-N`, trusted): sends what the test writes."""

    def __init__(self, port, name, secret):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(
            f"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
            f"xmlns:stream='http://etherx.jabber.org/streams' to='{name}'>".encode())
        data = b""
        while b"id=" not in data or b">" not in data[data.find(b"id="):]:
            data += self.sock.recv(4096)
        stream_id = re.search(rb"id=['\"]([^'\"]+)['\"]", data).group(1).decode()
        digest = hashlib.sha1((stream_id + secret).encode()).hexdigest()
        self.sock.sendall(f"<handshake>{digest}</handshake>".encode())
        while b"<handshake/>" not in data:
            chunk = self.sock.recv(4096)
            assert chunk, f"handshake refused: {data!r}"
            data += chunk
        # Drain whatever comes back (sm's refusals) so the router never blocks on us.
        self.sock.settimeout(None)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data.encode())

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def messages_with(client, text, timeout=10.0):
    """Waits for a chat message whose body contains `text`; returns its element."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no chat message with {text!r}; received:\n"
                                 f"{client.received.decode(errors='replace')[-3000:]}")
        e = client.next(left, what=f"a message with {text!r}")
        if local(e) == "message":
            body = next((c.text or "" for c in e if local(c) == "body"), "")
            if text in body:
                return e, body


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS, logd=True, logd_extra=OUTPUTS,
                 sm_extra="<sessions max-per-user='1' max-directed='100' queue='10000' "
                          "hibernated-per-user='5' hibernated-total='10000'/>") as s:
        yield s


def test_sm_warning_reaches_file_and_admin_chat(server):
    boss = login(server.starttls_port, "boss", USERS["boss"], resource="desk")
    boss.send("<presence/>")
    follower = Follower(server, "--level", "warn", "--host", "localhost")
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="one")
    try:
        # A second session is one too many: sm warns.
        with pytest.raises(AssertionError, match="resource-constraint"):
            login(server.starttls_port, "alice", USERS["alice"], resource="two")

        line = wait_for(server, "the warning in log/server.log", lambda: next(
            (l for l in read(server, "log/server.log").splitlines() if TOO_MANY in l), None))
        # TIME LEVEL HOST INSTANCE TARGET: MESSAGE fields
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARN  localhost sm sm::\S+: "
                        + re.escape(TOO_MANY) + r" max=1$", line), line
        assert TOO_MANY in read(server, "log/hosts/localhost.log")
        assert TOO_MANY in read(server, "log/sm-refusals.log")

        # The admin's client gets it as a chat message from logd.
        msg, body = messages_with(boss, TOO_MANY)
        assert msg.get("from") == "logd" and msg.get("type") == "chat", msg.attrib
        assert "WARN  localhost sm" in body

        # The second sink got its copy too.
        wait_for(server, "jabberctl to print the warning", lambda: TOO_MANY in follower.text())
        # Level filter and host filter of logd's files.
        assert TOO_MANY not in read(server, "log/errors.log")
        assert TOO_MANY not in read(server, "log/other.log")
    finally:
        follower.stop()
        alice.close()
        boss.close()


def test_burst_is_summarised_and_every_sink_gets_copies(server):
    everything = Follower(server, "--level", "warn")
    other_host = Follower(server, "--host", "other.example")
    link = RawComponent(server.port, "admin-4242", "admin-secret")
    try:
        started = time.monotonic()
        # BURST identical warnings from sm (session packets without a jid), as fast as
        # they go, and one about another domain.
        link.send("<session type='start' to='localhost' from='admin-4242'/>" * BURST)
        link.send("<session type='start' to='localhost' from='admin-4242' sid='s1' "
                  "jid='carol@other.example/r'/>")

        summary = wait_for(server, "the burst's summary in log/server.log", lambda: next(
            (l for l in read(server, "log/server.log").splitlines()
             if NO_JID in l and "[repeated" in l), None), timeout=20.0)
        assert time.monotonic() - started < 20
        lines = [l for l in read(server, "log/server.log").splitlines() if NO_JID in l]
        # The first on its own, then one summary for the rest: not 300 lines.
        assert len(lines) == 2, "\n".join(lines)
        assert "[repeated" not in lines[0] and "from=admin-4242" in lines[0]
        m = re.search(r"\[repeated (\d+) times from (\S+) to (\S+)\]$", summary)
        assert m and int(m.group(1)) == BURST - 1, summary
        assert m.group(2) <= m.group(3)

        # Host filter: the record about other.example, and nothing else.
        other = read(server, "log/other.log")
        assert NOT_SERVED in other and "jid=carol@other.example/r" in other
        assert NO_JID not in other
        assert NOT_SERVED in read(server, "log/hosts/other.example.log")

        # jabberctl got the same copies as logd.
        wait_for(server, "jabberctl's copy of the summary",
                 lambda: any(NO_JID in l and "[repeated" in l for l in everything.lines))
        assert len([l for l in everything.lines if NO_JID in l]) == 2, everything.text()
        assert NOT_SERVED in everything.text()
        wait_for(server, "the host-filtered follower's copy",
                 lambda: NOT_SERVED in other_host.text())
        assert NO_JID not in other_host.text()
    finally:
        link.close()
        everything.stop()
        other_host.stop()


def test_sink_restart_and_check(server):
    """logd --check takes the shipped file; a logd killed and restarted binds again and
    writes on."""
    from serverproc import ROOT
    check = subprocess.run([str(bin_dir() / "logd"), "-c", str(ROOT / "etc" / "logd.xml"),
                            "--check"], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stdout + check.stderr
    server.restart("logd")
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="one")
    try:
        with pytest.raises(AssertionError, match="resource-constraint"):
            login(server.starttls_port, "alice", USERS["alice"], resource="two")
        wait_for(server, "the warning after logd's restart",
                 lambda: TOO_MANY in read(server, "log/server.log"))
    finally:
        alice.close()
