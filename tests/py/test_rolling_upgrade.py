"""Rolling restarts and upgrades (issue 13): `scripts/jabberd upgrade NAME` and
`scripts/jabberd restart NAME --rolling` restart the instances of a program one after
the other, each once the previous one serves again (docs/supervisor.md, "Rolling
restarts and upgrades").

The first tests run the supervisor over the fake programs of tests/py/fakes (as
tests/py/test_supervisor.py does): the order and the readiness wait, an unknown name, a
readiness timeout (the instances after it untouched, crashed processes still restarted
meanwhile), a new executable that exits, a failing build. The last one runs the whole
server under the supervisor with two c2s instances: two users exchange numbered
messages with XEP-0198 while `upgrade c2s --no-build` restarts both c2s; the clients
resume on the other instance (or the restarted one) without binding a new session, and
every message arrives exactly once, in order.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_rolling_upgrade.py -q
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from xml.sax.saxutils import quoteattr

import pytest

from serverproc import Server, accepts, bin_dir, binaries_missing, free_port
from test_supervisor import SCRIPT, Env, wait_for

try:  # the raw XMPP client needs pyOpenSSL; only the last test uses it
    from scram_client import RawClient, StreamClosed, local, login, stream_error_condition, to_xml
except ImportError:
    RawClient = None

# -- over fake programs ----------------------------------------------------------------


class Rolling(Env):
    """Env with a list of its own: a router and `other` (fakes that just run) and
    two processes of program c2s, web-a and web-b, each a fake listening on its own
    port (after --delay) with a config file naming that port as its <listen>: the
    readiness a rolling restart waits for."""

    def __init__(self, delay=0.3):
        super().__init__()
        self.ports = {"web-a": free_port(), "web-b": free_port()}
        self.delay = delay

    def write(self, listen_args=None):
        listen_args = listen_args or {}
        processes = (f'<process name="router" program="router" args="--listen {self.port}" '
                     f'wait-for="127.0.0.1:{self.port}" wait-timeout="5"/>\n'
                     '<process name="other" program="sm"/>\n')
        for name, port in self.ports.items():
            config = self.root / f"{name}.xml"
            config.write_text(f"<c2s><listen address='127.0.0.1' port='{port}' mode='starttls'/></c2s>\n")
            args = listen_args.get(name, f"--listen {port} --delay {self.delay}")
            processes += (f'<process name="{name}" program="c2s" config="{config}" '
                          f'args="{args}" stop-timeout="2"/>\n')
        self.write_config(processes)

    def start_all(self):
        result = self.jabberd("start", "--daemon", "--no-build")
        assert result.returncode == 0, result.stderr
        for name in ("router", "other", "web-a", "web-b"):
            wait_for(lambda: self.events(name, "START"), f"{name} to start")

    def untouched(self, name, pid):
        """name still runs as pid and never got SIGTERM."""
        return self.pids()[name] == pid and not self.events(name, "TERM")


@pytest.fixture
def rolling():
    env = Rolling()
    env.write()
    yield env
    env.cleanup()


def progress_lines(stdout):
    return [line for line in stdout.splitlines() if "serving again after" in line]


def test_rolling_restart_waits_until_each_instance_serves(rolling):
    rolling.start_all()
    before = rolling.pids()
    result = rolling.jabberd("restart", "c2s", "--rolling")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = progress_lines(result.stdout)
    assert [line.split()[1] for line in lines] == ["web-a", "web-b"], result.stdout
    assert f"pid {before['web-a']} -> " in lines[0]
    after = rolling.pids()
    assert after["web-a"] != before["web-a"] and after["web-b"] != before["web-b"]
    assert after["router"] == before["router"] and after["other"] == before["other"]
    # web-b was stopped only once the new web-a listened (it takes --delay to).
    listening_again = rolling.events("web-a", "LISTENING")[-1][0]
    assert rolling.events("web-a", "START")[-1][0] + 0.3 <= listening_again
    assert rolling.events("web-b", "TERM")[0][0] > listening_again
    assert len(rolling.events("web-a", "TERM")) == 1
    log = rolling.supervisor_log()
    assert "restart of web-a requested (rolling restart of c2s, 1 of 2)" in log
    assert re.search(r"web-b \(pid \d+\) serves \(accepting on 127\.0\.0\.1:\d+\)", log)
    # The same question in plain text on the control socket.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(rolling.run_dir / "supervisor.sock"))
        sock.sendall(b"ready web-b\n")
        assert sock.makefile().read().strip() == "web-b: serving"


def test_rolling_restart_of_one_instance_and_plain_restart_unchanged(rolling):
    rolling.start_all()
    before = rolling.pids()
    result = rolling.jabberd("upgrade", "web-b", "--no-build")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[1] for line in progress_lines(result.stdout)] == ["web-b"]
    assert rolling.untouched("web-a", before["web-a"])
    # Without --rolling a program name is not a process name, as before.
    result = rolling.jabberd("restart", "c2s")
    assert result.returncode == 1 and "unknown process 'c2s'" in result.stderr
    assert rolling.jabberd("restart", "web-a", "--timeout", "3").returncode == 2


def test_unknown_name_exits_1_and_touches_nothing(rolling):
    rolling.start_all()
    before = rolling.pids()
    for command in (["upgrade", "nosuch", "--no-build"], ["restart", "nosuch", "--rolling"]):
        result = rolling.jabberd(*command)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "unknown process or program 'nosuch'" in result.stderr
    assert rolling.pids() == before
    assert rolling.jabberd("stop").returncode == 0
    result = rolling.jabberd("upgrade", "c2s", "--no-build")
    assert result.returncode == 3 and "not running" in result.stdout


def test_readiness_timeout_stops_with_the_rest_untouched(rolling):
    # web-a's config names a port it never listens on.
    rolling.write(listen_args={"web-a": ""})
    rolling.start_all()
    wait_for(lambda: rolling.events("web-b", "LISTENING"), "web-b to listen")
    before = rolling.pids()
    env = dict(os.environ, JABBERD_BIN_DIR=str(rolling.bin))
    started = time.monotonic()
    proc = subprocess.Popen([str(SCRIPT), "upgrade", "c2s", "--no-build", "--timeout", "3",
                             "-f", str(rolling.xml)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # While the upgrade waits for web-a, the supervisor still restarts what crashes.
        wait_for(lambda: len(rolling.events("web-a", "START")) == 2, "web-a to be restarted")
        os.kill(before["other"], signal.SIGKILL)
        wait_for(lambda: rolling.pids()["other"] not in (None, before["other"]),
                 "the supervisor to restart the killed process")
        assert proc.poll() is None, "the upgrade ended before its timeout"
        # One rolling restart at a time.
        second = rolling.jabberd("restart", "web-b", "--rolling")
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"another rolling restart or upgrade is running (pid {proc.pid})" in second.stderr
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    assert time.monotonic() - started >= 3
    port = rolling.ports["web-a"]
    assert f"web-a (1/2) did not serve again within 3 s: not accepting connections on 127.0.0.1:{port}" in err
    assert "stopped there: web-b not restarted" in err
    assert rolling.untouched("web-b", before["web-b"])
    assert rolling.pids()["web-a"] not in (None, before["web-a"])  # restarted, left running


def test_new_executable_that_exits_stops_the_upgrade(rolling):
    rolling.start_all()
    before = rolling.pids()
    # The "new build" of c2s exits at once (the running ones are the old build).
    (rolling.bin / "c2s").write_text("#!/bin/sh\nexit 3\n")
    result = rolling.jabberd("upgrade", "c2s", "--no-build")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "web-a (1/2): exited with code 3 before serving again" in result.stderr
    assert "web-b not restarted" in result.stderr
    assert rolling.untouched("web-b", before["web-b"])


def test_upgrade_builds_first_and_a_failed_build_touches_nothing(rolling):
    rolling.start_all()
    before = rolling.pids()
    # A copy of the script in a fake repository with a Cargo.toml, and a fake cargo.
    repo = rolling.root / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "Cargo.toml").write_text("[workspace]\n")
    script = repo / "scripts" / "jabberd"
    shutil.copy(SCRIPT, script)
    tools = rolling.root / "tools"
    tools.mkdir()
    cargo = tools / "cargo"
    cargo.write_text('#!/bin/sh\necho "$*" >> "$CARGO_LOG"\nexit "$CARGO_EXIT"\n')
    cargo.chmod(0o755)
    cargo_log = rolling.root / "cargo.log"
    extra = {"PATH": f"{tools}:{os.environ['PATH']}", "CARGO_LOG": str(cargo_log)}

    failed = rolling.jabberd("upgrade", "c2s", script=script, extra_env=dict(extra, CARGO_EXIT="101"))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "cargo build --release failed (exit code 101); nothing was restarted" in failed.stderr
    assert rolling.pids() == before and not rolling.events("web-a", "TERM")

    (rolling.bin / "c2s").rename(rolling.bin / "c2s.gone")
    missing = rolling.jabberd("upgrade", "c2s", script=script, extra_env=dict(extra, CARGO_EXIT="0"))
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert f"missing executable {rolling.bin / 'c2s'}; nothing was restarted" in missing.stderr
    assert rolling.pids() == before and not rolling.events("web-a", "TERM")
    (rolling.bin / "c2s.gone").rename(rolling.bin / "c2s")

    built = rolling.jabberd("upgrade", "c2s", script=script, extra_env=dict(extra, CARGO_EXIT="0"))
    assert built.returncode == 0, built.stdout + built.stderr
    assert cargo_log.read_text().splitlines() == ["build --release"] * 3
    assert len(progress_lines(built.stdout)) == 2
    after = rolling.pids()
    assert after["web-a"] != before["web-a"] and after["web-b"] != before["web-b"]


# -- the whole server: c2s upgraded under clients with stream management ---------------

NS_SM = "urn:xmpp:sm:3"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def supervised_with_two_c2s(tmp_path):
    """The whole server under the supervisor with two c2s processes of one domain: c2s
    (its ports server.starttls_port, server.tls_port) and c2s-b (program c2s, component
    name c2s-2, ports server.starttls_port2, server.tls_port2)."""
    if binaries_missing():
        pytest.skip(f"binaries not built in {bin_dir()}")
    server = Server(tmp_path, c2s_extra="<stream-management hibernate='60' ack-every='5'/>")
    server.port, server.starttls_port, server.tls_port = free_port(), free_port(), free_port()
    server.starttls_port2, server.tls_port2 = free_port(), free_port()
    (tmp_path / "log").mkdir()
    server.write_configs()
    second = server.c2s_config(server.starttls_port2, server.tls_port2)
    (tmp_path / "c2s-b.xml").write_text(second.replace("name='c2s'", "name='c2s-2'"))

    def process(name, program, wait=""):
        return (f"<process name='{name}' program='{program}' "
                f"config={quoteattr(str(tmp_path / (name + '.xml')))}{wait}/>")

    processes = (process("router", "router", f" wait-for='127.0.0.1:{server.port}'")
                 + "".join(process(n, n) for n in ("xdb-file", "sm", "c2s"))
                 + process("c2s-b", "c2s"))
    xml = tmp_path / "supervisor.xml"
    xml.write_text(f"<supervisor><run-dir>{tmp_path / 'run'}</run-dir>"
                   f"<log-dir>{tmp_path / 'log'}</log-dir>{processes}</supervisor>")
    return server, xml


def run_jabberd(xml, *args, timeout=60):
    env = dict(os.environ, JABBERD_BIN_DIR=str(bin_dir()))
    return subprocess.run([str(SCRIPT), *args, "-f", str(xml)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def two_c2s(request, tmp_path):
    if RawClient is None:
        pytest.skip("pyOpenSSL is not installed")
    server, xml = supervised_with_two_c2s(tmp_path)
    started = run_jabberd(xml, "start", "--daemon", "--no-build")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        ports = (server.starttls_port, server.tls_port, server.starttls_port2, server.tls_port2)
        wait_for(lambda: all(accepts(p) for p in ports), "both c2s to listen", timeout=15)
        wait_for(lambda: all("connected to the router" in server.log(n)
                             for n in ("xdb-file", "sm", "c2s", "c2s-b")),
                 "every component to connect", timeout=15)
        server.addusers({f"{u}@localhost": p for u, p in USERS.items()})
        yield server, xml
    finally:
        stopped = run_jabberd(xml, "stop")
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            names = ["supervisor", "router", "sm", "c2s", "c2s-b"]
            report.sections.append(("server logs", "\n".join(
                f"===== {n}.log =====\n" + "\n".join(server.log(n).splitlines()[-150:])
                for n in names)))
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


class SmClient:
    """A client that keeps its session through c2s restarts with XEP-0198: it counts
    the stanzas it handled (h), answers <r/>, keeps what it sent until the server
    acknowledges it, and when its connection ends (<system-shutdown/>) authenticates
    on a c2s that accepts and sends <resume previd h/>; after <resumed h/> it sends
    again what the server had not handled. It never binds a second time."""

    def __init__(self, user, resource, ports):
        self.user, self.ports = user, ports
        self.conn = login(ports[0], user, USERS[user], resource=resource)
        self.jid = self.conn.jid
        self.port = ports[0]
        self.auths = 1  # SASL authentications
        self.binds = 1
        self.conn.send(f"<enable xmlns='{NS_SM}' resume='true'/>")
        enabled = self.conn.expect("enabled", NS_SM)
        self.previd = enabled.get("id")
        self.h_in = 0  # stanzas received and handled
        self.handled_by_server = 0  # of those we sent
        self.unacked = []  # sent, not acknowledged yet, in order
        self.got = []  # numbers of the chat messages received, in order
        self.resumes = []  # (port, stream error that ended the old connection)
        self.last_error = None

    def send(self, xml):
        self.unacked.append(xml)
        if self.conn is not None:
            self.conn.send(xml)  # if the write fails, it is sent again after resuming

    def acknowledged(self, h):
        assert h - self.handled_by_server <= len(self.unacked), (self.user, h, self.handled_by_server)
        while self.handled_by_server < h:
            self.unacked.pop(0)
            self.handled_by_server += 1

    def pump(self, timeout=0.005):
        """Handles what arrived within `timeout`; False once the connection is gone."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                e = self.conn.next(max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                return True
            except StreamClosed:
                self.conn.close()
                self.conn = None
                return False
            name = local(e)
            if e.tag == f"{{{NS_SM}}}r":
                self.conn.send(f"<a xmlns='{NS_SM}' h='{self.h_in}'/>")
            elif e.tag == f"{{{NS_SM}}}a":
                self.acknowledged(int(e.get("h")))
            elif name in ("message", "presence", "iq"):
                self.h_in += 1
                body = e.findtext("{jabber:client}body")
                if name == "message" and body is not None:
                    self.got.append(int(body))
            elif name == "error":
                self.last_error = stream_error_condition(e)

    def resume(self, timeout=20.0):
        """Resumes on the first c2s that accepts, the one it was on last."""
        deadline = time.monotonic() + timeout
        problem = None
        while True:
            for port in sorted(self.ports, key=lambda p: p == self.port):
                try:
                    c = RawClient.connect(port, mode="starttls")
                    c.open_stream()
                    c.starttls()
                    c.open_stream()
                    outcome, _ = c.scram(self.user, USERS[self.user], "SCRAM-SHA-256")
                except Exception as e:  # that c2s is stopping or not up yet
                    problem = f"port {port}: {e!r}"
                    continue
                assert local(outcome) == "success", to_xml(outcome)
                self.auths += 1
                c.open_stream()
                c.send(f"<resume xmlns='{NS_SM}' previd='{self.previd}' h='{self.h_in}'/>")
                answer = c.next(10.0, what="<resumed/>")
                assert answer.tag == f"{{{NS_SM}}}resumed", \
                    f"{self.user} could not resume on port {port}: {to_xml(answer)}"
                assert answer.get("previd") == self.previd
                self.acknowledged(int(answer.get("h")))
                self.resumes.append((port, self.last_error))
                self.conn, self.port, self.last_error = c, port, None
                for xml in self.unacked:
                    c.send(xml)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.user} found no c2s to resume on within {timeout} s "
                                     f"(last: {problem})")
            time.sleep(0.05)

    def step(self):
        if self.conn is None or not self.pump():
            self.resume()


def test_upgrade_c2s_clients_resume_and_lose_nothing(two_c2s):
    server, xml = two_c2s
    ports = [server.starttls_port, server.starttls_port2]
    # alice on c2s, bob on c2s-b: each instance holds a session when it stops.
    alice = SmClient("alice", "a", ports)
    bob = SmClient("bob", "b", ports[::-1])
    pair = ((alice, bob), (bob, alice))
    for c in (alice, bob):
        c.send("<presence/>")
    sent = {alice.user: 0, bob.user: 0}

    def chat():
        for frm, to in pair:
            sent[frm.user] += 1
            n = sent[frm.user]
            frm.send(f"<message to='{to.jid}' type='chat' id='{frm.user}-{n}'><body>{n}</body></message>")
        for c in (alice, bob):
            c.step()

    before = {n: p for n, p in _pids(xml).items() if n.startswith("c2s")}
    upgrade = subprocess.Popen(
        [str(SCRIPT), "upgrade", "c2s", "--no-build", "--timeout", "20", "-f", str(xml)],
        env=dict(os.environ, JABBERD_BIN_DIR=str(bin_dir())),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while upgrade.poll() is None:
            assert time.monotonic() < deadline, "the upgrade took over 60 s"
            chat()
        during = sent["alice"]
        for _ in range(20):  # and on after it
            chat()
        out, err = upgrade.communicate(timeout=5)
    finally:
        if upgrade.poll() is None:
            upgrade.kill()
            upgrade.communicate()
    assert upgrade.returncode == 0, out + err
    assert [line.split()[1] for line in progress_lines(out)] == ["c2s", "c2s-b"], out
    after = _pids(xml)
    assert after["c2s"] != before["c2s"] and after["c2s-b"] != before["c2s-b"]
    # Serving again meant: both listeners accept and the router link is up.
    for name in ("c2s", "c2s-b"):
        assert re.search(rf"{name} \(pid {after[name]}\) serves \(accepting on 127\.0\.0\.1:\d+, "
                         r"accepting on 127\.0\.0\.1:\d+, router link up\)", server.log("supervisor"))

    # Everything arrives, each message once and in order.
    deadline = time.monotonic() + 15
    while (len(bob.got) < sent["alice"] or len(alice.got) < sent["bob"]) and time.monotonic() < deadline:
        for c in (alice, bob):
            c.step()
    for c in (alice, bob):
        c.step()  # late duplicates would show here
    for receiver, sender in ((bob, alice), (alice, bob)):
        expected = list(range(1, sent[sender.user] + 1))
        missing = sorted(set(expected) - set(receiver.got))
        dupes = sorted({n for n in receiver.got if receiver.got.count(n) > 1})
        assert not missing and not dupes, \
            f"{receiver.user} got {len(receiver.got)} of {len(expected)}: missing {missing}, twice {dupes}"
        assert receiver.got == expected, f"{receiver.user} got them out of order: {receiver.got}"
    # Each resumed (alice twice: her c2s stopped, then the one she resumed on), on the
    # other instance or the restarted one, after <system-shutdown/>; no new session.
    assert len(alice.resumes) >= 2 and len(bob.resumes) >= 1, (alice.resumes, bob.resumes)
    for c in (alice, bob):
        assert c.binds == 1 and c.auths == 1 + len(c.resumes)
        assert all(error == "system-shutdown" for _, error in c.resumes), c.resumes
    assert during >= 30, f"only {during} messages each way during the upgrade"


def _pids(xml):
    """Process name -> pid, from `jabberd status`."""
    found = {}
    for line in run_jabberd(xml, "status").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found
