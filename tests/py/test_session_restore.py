"""Sessions survive an sm or router restart (issue 13): the whole server runs under the
supervisor (scripts/jabberd), a process is SIGKILLed and the supervisor restarts it; the
clients stay connected (no stream error), c2s restores their sessions at the new sm
(`<session type='restore'>`, docs/protocol.md "Sessions"), and messages, carbons and
presence flow again within seconds. What was sent to a user while sm was down reaches
the user's live client after the restore.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_session_restore.py -q
"""

import hashlib
import os
import re
import signal
import socket
import time

import pytest

pytest.importorskip("OpenSSL")

from scram_client import local, login, to_xml  # noqa: E402
from test_supervised import pids, poll, supervised_server  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
SENDER = ("sender.localhost", "sender-secret")
NS_CARBONS = "urn:xmpp:carbons:2"


@pytest.fixture
def supervised(tmp_path):
    # A grace period longer than a restart: what the router holds for sm is replayed.
    with supervised_server(tmp_path, USERS, grace_seconds=10,
                           users_extra=f"<component name='{SENDER[0]}' secret='{SENDER[1]}'/>"
                           ) as running:
        yield running


def wait_for(client, predicate, what, timeout=10.0):
    """The next element `predicate` accepts (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        e = client.next(max(0.0, deadline - time.monotonic()), what=what)
        if predicate(e):
            return e


def wait_any(clients, predicate, what, timeout=10.0):
    """The first element `predicate` accepts at any of `clients`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in clients:
            try:
                e = c.next(0.05, what=what)
            except TimeoutError:
                continue
            if predicate(e):
                return e
    raise AssertionError(f"timed out waiting for {what}")


def message_with(mid):
    """A message with id `mid`, or a carbon of one."""
    return lambda e: local(e) == "message" and (e.get("id") == mid or f"id=\"{mid}\"" in to_xml(e)
                                                 or f"id='{mid}'" in to_xml(e))


def presence_from(jid, show=None):
    def match(e):
        if local(e) != "presence" or e.get("from") != jid or e.get("type") is not None:
            return False
        return show is None or e.findtext("{jabber:client}show") == show
    return match


def connected(client):
    return not client.closed and not client.stream_closed and client.stream_error is None


def online(server):
    """alice (a) and bob (b1, b2, carbons on both), subscribed to each other, available."""
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    bob1 = login(server.starttls_port, "bob", USERS["bob"], resource="b1")
    bob2 = login(server.tls_port, "bob", USERS["bob"], mode="tls", resource="b2")
    for b in (bob1, bob2):
        assert b.iq("set", f"<enable xmlns='{NS_CARBONS}'/>").get("type") == "result"
    for c in (alice, bob1, bob2):
        c.send("<presence/>")
    alice.send("<presence to='bob@localhost' type='subscribe'/>")
    wait_for(bob1, lambda e: local(e) == "presence" and e.get("type") == "subscribe", "subscribe")
    bob1.send("<presence to='alice@localhost' type='subscribed'/>")
    bob1.send("<presence to='alice@localhost' type='subscribe'/>")
    wait_for(alice, lambda e: local(e) == "presence" and e.get("type") == "subscribe", "subscribe")
    alice.send("<presence to='bob@localhost' type='subscribed'/>")
    wait_for(bob1, lambda e: local(e) == "presence" and e.get("type") == "subscribed", "subscribed")
    # Subscribed both ways now: presence again, so that each sees the other's.
    for c in (alice, bob1):
        c.send("<presence/>")
    wait_for(alice, presence_from("bob@localhost/b1"), "bob's presence")
    wait_for(bob1, presence_from("alice@localhost/a"), "alice's presence")
    return alice, bob1, bob2


def restarted(supervisor_xml, name, old):
    return poll(lambda: pids(supervisor_xml).get(name) not in (None, old) and pids(supervisor_xml)[name],
                f"the supervisor to restart {name}")


def restored(server, count, offset=0):
    """c2s logged `count` more "session restored" lines than at `offset`."""
    return lambda: server.log("c2s")[offset:].count("session restored") >= count


def check_flow(server, alice, bob1, bob2, tag):
    """Messages, carbons and presence work again."""
    alice.send(f"<message to='bob@localhost' type='chat' id='{tag}-1'><body>to bob</body></message>")
    got = wait_for(bob1, message_with(f"{tag}-1"), "alice's message at bob's b1")
    assert got.get("from") == "alice@localhost/a", to_xml(got)
    wait_for(bob2, message_with(f"{tag}-1"), "alice's message (or its carbon) at bob's b2")
    # bob's message to alice: a sent carbon reaches his other resource.
    bob1.send(f"<message to='alice@localhost/a' type='chat' id='{tag}-2'><body>to alice</body></message>")
    wait_for(alice, message_with(f"{tag}-2"), "bob's message at alice")
    carbon = wait_for(bob2, message_with(f"{tag}-2"), "the sent carbon at bob's b2")
    assert carbon.find(f"{{{NS_CARBONS}}}sent") is not None, to_xml(carbon)
    # Presence: bob goes away, alice sees it.
    bob1.send(f"<presence><show>away</show><status>{tag}</status></presence>")
    wait_for(alice, presence_from("bob@localhost/b1", "away"), "bob's new presence at alice")
    bob1.send("<presence/>")
    wait_for(alice, presence_from("bob@localhost/b1", None), "bob's presence at alice")


def test_sm_killed_sessions_restored(supervised):
    server, supervisor_xml = supervised
    alice, bob1, bob2 = online(server)
    offset = len(server.log("c2s"))
    old = pids(supervisor_xml)["sm"]
    os.kill(old, signal.SIGKILL)
    # Once c2s knows (before, the router may still write it to the dying sm's socket,
    # where it is lost: links do not acknowledge what they receive yet).
    poll(lambda: "went away" in server.log("c2s")[offset:], "c2s to hear that sm went away")
    # Sent while sm is down: c2s holds it for alice's session and sends it after the restore.
    alice.send("<message to='bob@localhost' type='chat' id='held'><body>while sm was down</body></message>")
    restarted(supervisor_xml, "sm", old)
    poll(restored(server, 3, offset), "c2s to restore the three sessions", timeout=10)
    got = wait_for(bob1, message_with("held"), "the message alice sent while sm was down")
    assert got.get("from") == "alice@localhost/a"
    check_flow(server, alice, bob1, bob2, "sm")
    for c in (alice, bob1, bob2):
        assert connected(c), c.received.decode(errors="replace")
    assert "not restored" not in server.log("c2s")[offset:]
    assert "no session manager restored" not in server.log("c2s")[offset:]


def test_router_killed_sessions_restored(supervised):
    server, supervisor_xml = supervised
    alice, bob1, bob2 = online(server)
    offset = len(server.log("c2s"))
    old = pids(supervisor_xml)["router"]
    os.kill(old, signal.SIGKILL)
    poll(lambda: "router link lost" in server.log("c2s")[offset:], "c2s to notice the router went away")
    alice.send("<message to='bob@localhost' type='chat' id='held'><body>while the router was down</body></message>")
    restarted(supervisor_xml, "router", old)
    poll(restored(server, 3, offset), "c2s to restore the three sessions", timeout=20)
    wait_for(bob1, message_with("held"), "the message alice sent while the router was down")
    check_flow(server, alice, bob1, bob2, "router")
    for c in (alice, bob1, bob2):
        assert connected(c), c.received.decode(errors="replace")


class Component:
    """A minimal XEP-0114 component (sender.localhost)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        name, secret = SENDER
        self.sock.sendall(
            f"<stream:stream xmlns='jabber:component:accept' "
            f"xmlns:stream='http://etherx.jabber.org/streams' to='{name}'>".encode())
        head = self._read_until(b">")
        sid = re.search(rb"id=['\"]([^'\"]+)['\"]", head).group(1).decode()
        digest = hashlib.sha1((sid + secret).encode()).hexdigest()
        self.sock.sendall(f"<handshake>{digest}</handshake>".encode())
        self._read_until(b"<handshake")

    def _read_until(self, marker):
        data = b""
        while marker not in data or not data.rstrip().endswith(b">"):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"component stream closed: {data!r}")
            data += chunk
        return data

    def send(self, xml):
        self.sock.sendall(xml.encode())

    def close(self):
        self.sock.close()


def test_message_sent_while_sm_down_reaches_the_live_client(supervised):
    server, supervisor_xml = supervised
    alice, bob1, bob2 = online(server)
    component = Component(server.port)
    try:
        offset = len(server.log("c2s"))
        old = pids(supervisor_xml)["sm"]
        os.kill(old, signal.SIGKILL)
        poll(lambda: "went away" in server.log("c2s")[offset:], "c2s to hear that sm went away")
        # Through the router while sm is down: held there (grace period), replayed to the
        # new sm before c2s restored bob's sessions, so stored offline, then delivered to
        # the first of bob's sessions restored.
        component.send(f"<message from='{SENDER[0]}' to='bob@localhost' type='chat' id='down'>"
                       "<body>sent while sm was down</body></message>")
        restarted(supervisor_xml, "sm", old)
        poll(restored(server, 3, offset), "c2s to restore the three sessions", timeout=10)
        got = wait_any((bob1, bob2), message_with("down"), "the message sent while sm was down")
        assert got.findtext("{jabber:client}body") == "sent while sm was down"
        for c in (alice, bob1, bob2):
            assert connected(c), c.received.decode(errors="replace")
    finally:
        component.close()
