"""The whole server under the supervisor (scripts/jabberd), as an operator runs it: sm is
killed in the middle of a conversation and the supervisor, not the test, restarts it.
The connected user's session is restored at the new sm (no new login,
tests/py/test_session_restore.py has more), another user logs in and they chat, and a
message stored for an offline user before the kill is delivered afterwards.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_supervised.py -q
"""

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

pytest.importorskip("OpenSSL")

from scram_client import local, login  # noqa: E402
from serverproc import Server, accepts, bin_dir, binaries_missing, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
JABBERD = ROOT / "scripts" / "jabberd"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def jabberd(supervisor_xml, *args, timeout=60):
    env = dict(os.environ, JABBERD_BIN_DIR=str(bin_dir()))
    return subprocess.run([str(JABBERD), *args, "-f", str(supervisor_xml)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def pids(supervisor_xml):
    """Process name -> pid, from `jabberd status`."""
    out = jabberd(supervisor_xml, "status").stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found


def poll(condition, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def next_named(client, name, predicate=lambda e: True, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        e = client.next(max(0.0, deadline - time.monotonic()), what=f"<{name}/>")
        if local(e) == name and predicate(e):
            return e


@contextlib.contextmanager
def supervised_server(tmp_path, users, **server_options):
    """The whole server (router, xdb-file, sm, c2s) run by the supervisor, with `users`
    ({name: password} at localhost) added: yields (Server, supervisor.xml). serverproc
    writes the configuration of a whole installation; the supervisor runs it."""
    if binaries_missing():
        pytest.skip(f"binaries not built in {bin_dir()}")
    server = Server(tmp_path, **server_options)
    server.port, server.starttls_port, server.tls_port = free_port(), free_port(), free_port()
    (tmp_path / "log").mkdir()
    server.write_configs()
    processes = "".join(
        f"<process name='{name}' program='{name}' config={quoteattr(str(tmp_path / (name + '.xml')))}"
        + (f" wait-for='127.0.0.1:{server.port}'" if name == "router" else "") + "/>"
        for name in ("router", "xdb-file", "sm", "c2s"))
    supervisor_xml = tmp_path / "supervisor.xml"
    supervisor_xml.write_text(
        f"<supervisor><run-dir>{tmp_path / 'run'}</run-dir><log-dir>{tmp_path / 'log'}</log-dir>"
        f"{processes}</supervisor>")
    started = jabberd(supervisor_xml, "start", "--daemon", "--no-build")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        poll(lambda: accepts(server.starttls_port), "c2s to listen")
        poll(lambda: "connected to the router" in server.log("sm")
             and "connected to the router" in server.log("xdb-file"), "sm and storage to connect")
        server.addusers({f"{u}@localhost": p for u, p in users.items()})
        yield server, supervisor_xml
    finally:
        stopped = jabberd(supervisor_xml, "stop")
        if stopped.returncode != 0:
            print(stopped.stdout, stopped.stderr)


@pytest.fixture
def supervised(tmp_path):
    with supervised_server(tmp_path, USERS) as running:
        yield running


def test_sm_killed_then_restarted_by_the_supervisor(supervised):
    server, supervisor_xml = supervised
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    alice.send("<presence/>")
    next_named(alice, "presence")
    # bob is offline: the message is stored before the crash.
    alice.send("<message to='bob@localhost' type='chat' id='before'><body>sent before the crash</body></message>")
    poll(lambda: re.search(r'op="append" owner=bob@localhost', server.log("xdb-file")), "the offline message stored")

    old = pids(supervisor_xml)["sm"]
    offset = len(server.log("c2s"))
    os.kill(old, signal.SIGKILL)
    new = poll(lambda: pids(supervisor_xml).get("sm") not in (None, old) and pids(supervisor_xml)["sm"],
               "the supervisor to restart sm")
    assert new != old
    # c2s hears sm's link drop and restores alice's session at the new sm: she stays.
    poll(lambda: "session restored" in server.log("c2s")[offset:], "c2s to restore alice's session")
    assert not alice.closed and not alice.stream_closed, alice.received.decode(errors="replace")

    # No manual step: log in (retrying while the new sm connects) and chat.
    def logged_in(user, resource, mode):
        try:
            return login(server.starttls_port if mode == "starttls" else server.tls_port,
                         user, USERS[user], mode=mode, resource=resource)
        except Exception:
            return None

    bob = poll(lambda: logged_in("bob", "b", "tls"), "bob to log in")
    bob.send("<presence/>")
    offline = next_named(bob, "message", lambda e: e.get("id") == "before")
    assert offline.findtext("{jabber:client}body") == "sent before the crash"
    assert offline.find("{urn:xmpp:delay}delay") is not None
    alice.send(f"<message to='{bob.jid}' type='chat' id='after'><body>hello again</body></message>")
    assert next_named(bob, "message", lambda e: e.get("id") == "after").get("from") == alice.jid
    bob.send(f"<message to='{alice.jid}' type='chat' id='reply'><body>hi</body></message>")
    assert next_named(alice, "message", lambda e: e.get("id") == "reply").get("from") == bob.jid
    alice.close()
    bob.close()


def test_two_c2s_instances_serve_one_domain(supervised):
    """A second c2s (its own component name c2s-2 and its own ports) started beside the
    supervised one: users on different instances chat, and each instance only holds its
    own clients' sessions."""
    server, _ = supervised
    config = (server.dir / "c2s.xml").read_text()
    second = {"starttls": free_port(), "tls": free_port()}
    config = config.replace(f"port='{server.starttls_port}'", f"port='{second['starttls']}'")
    config = config.replace(f"port='{server.tls_port}'", f"port='{second['tls']}'")
    config = config.replace("name='c2s'", "name='c2s-2'")
    (server.dir / "c2s-2.xml").write_text(config)
    log = open(server.dir / "log" / "c2s-2.log", "ab")
    proc = subprocess.Popen([str(bin_dir() / "c2s"), "-c", str(server.dir / "c2s-2.xml")],
                            cwd=server.dir, stdout=log, stderr=log)
    try:
        poll(lambda: accepts(second["starttls"]), "the second c2s to listen")
        poll(lambda: "connected to the router" in (server.dir / "log" / "c2s-2.log").read_text(),
             "the second c2s to connect")
        alice = login(server.starttls_port, "alice", USERS["alice"], resource="one")
        bob = login(second["starttls"], "bob", USERS["bob"], resource="two")
        alice.send("<presence/>")
        bob.send("<presence/>")
        alice.send(f"<message to='{bob.jid}' type='chat' id='x1'><body>across instances</body></message>")
        assert next_named(bob, "message", lambda e: e.get("id") == "x1").get("from") == alice.jid
        bob.send(f"<message to='{alice.jid}' type='chat' id='x2'><body>and back</body></message>")
        assert next_named(alice, "message", lambda e: e.get("id") == "x2").get("from") == bob.jid
        alice.close()
        bob.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
