"""End-to-end tests of fan-out (docs/protocol.md, "Fan-out"): a group chat room's
broadcast crosses each link once as a `<fanout>` packet, the router splits it per sm
instance (and bounces what it cannot route, one copy per recipient), sm hands room
broadcasts straight to live sessions (`<session type='fanout'>` to c2s) and sends
everyone else through the user's task, and c2s gives each session its own addressed copy.

Raw clients (scram_client.py) see the exact stanzas; a raw XEP-0114 component sends
hand-made fan-out packets to the router.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_muc_fanout.py -q
"""

import hashlib
import re
import socket
import struct
import time

import pytest

pytest.importorskip("OpenSSL")

from scram_client import (RawClient, local, login, stanza_error_condition,  # noqa: E402
                          to_xml, until)
from serverproc import MUC_SERVICE, TIMEOUT, serving  # noqa: E402

# With two sm instances ("sm", "sm-2") the router's rendezvous hash of the bare JIDs puts
# alice, carol and dave on sm, bob and eve on sm-2 (checked in the test from the logs).
USERS = {u: f"{u}-pw" for u in ("alice", "bob", "carol", "dave", "eve")}
NS_MUC = "http://jabber.org/protocol/muc"
NS_USER = NS_MUC + "#user"
NS_OWNER = NS_MUC + "#owner"
NS_DATA = "jabber:x:data"
NS_SM = "urn:xmpp:sm:3"
NS_BLOCKING = "urn:xmpp:blocking"
NS_CLIENT = "jabber:client"
NS_ACCEPT = "jabber:component:accept"
NS_STREAM = "http://etherx.jabber.org/streams"
ROOM = f"room@{MUC_SERVICE}"
# XEP-0198 with resumption; hibernating sessions wait 30 s (far longer than any test).
SM_CONFIG = "<stream-management hibernate='30' ack-every='100' ack-after='30'/>"
# A third-party component of etc/router-users.xml (the fixture does not run upload).
COMPONENT, COMPONENT_SECRET = "upload.localhost", "upload-secret"
BROADCAST = re.compile(r"room broadcast\S*\s+recipients=(\d+)\s+shortcut=(\d+)")


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS, muc=True, c2s_extra=SM_CONFIG) as s:
        yield s


# -- helpers ------------------------------------------------------------------------------

def connect(server, user, resource="r"):
    return login(server.starttls_port, user, USERS[user], resource=resource)


def q(ns, name):
    return f"{{{ns}}}{name}"


def settle(client):
    """Everything sm sent this session before now, read: the answer to a ping to the own
    bare JID comes through the user's task after everything it handled before. Returns
    what came meanwhile (kept ones first)."""
    iq_id = client.next_id()
    bare = client.jid.split("/")[0]
    client.send(f"<iq type='get' id='{iq_id}' to='{bare}'><ping xmlns='urn:xmpp:ping'/></iq>")
    got = until(client, lambda e: local(e) == "iq" and e.get("id") == iq_id, "the own ping's answer")
    assert got[-1].get("type") == "result", to_xml(got[-1])
    return got[:-1]


def body_of(e):
    return e.findtext(q(NS_CLIENT, "body"))


def is_subject(e):
    return local(e) == "message" and e.find(q(NS_CLIENT, "subject")) is not None


def join(c, nick, room=ROOM):
    """Joins without history; returns what came up to the subject."""
    c.send(f"<presence to='{room}/{nick}'><x xmlns='{NS_MUC}'><history maxstanzas='0'/></x></presence>")
    got = until(c, lambda e: is_subject(e) or e.get("type") == "error", f"joining {room} as {nick}")
    assert got[-1].get("type") != "error", to_xml(got[-1])
    return got


def room_with(occupants, room=ROOM):
    """[(client, nick)]: the first creates the room (instant room), then everyone joins
    (two sessions of a user may share a nick); returns once every session saw every
    occupant's presence and has read everything sm sent it so far."""
    first, nick = occupants[0]
    seen = {id(c): [] for c, _ in occupants}
    seen[id(first)] += join(first, nick, room)
    answer = first.iq("set", f"<query xmlns='{NS_OWNER}'><x xmlns='{NS_DATA}' type='submit'/></query>",
                      to=room)
    assert answer.get("type") == "result", to_xml(answer)
    for c, nick in occupants[1:]:
        seen[id(c)] += join(c, nick, room)
    everyone = {f"{room}/{nick}" for _, nick in occupants}
    for c, _ in occupants:
        got = {e.get("from") for e in seen[id(c)] if local(e) == "presence"}
        while not everyone <= got:
            e = until(c, lambda e: local(e) == "presence", f"the presences of {everyone - got}")[-1]
            got.add(e.get("from"))
    for c, _ in occupants:
        settle(c)
        c.other = []


def offsets(server, names):
    return {n: server.log_size(n) for n in names}


def log_since(server, name, offset):
    return server.log_path(name).read_bytes()[offset:].decode(errors="replace")


def assert_broadcasts(seen, expected, senders=0):
    """seen: (recipients, shortcut) pairs from broadcasts(); expected: the pairs when
    every idle recipient takes the shortcut. A recipient that sent the stanza itself may
    miss it (by microseconds its task may still count the event it just sent, when the
    broadcast comes back), so up to `senders` fewer shortcuts are allowed."""
    ok = len(seen) == len(expected) and all(
        r == er and ek - senders <= k <= ek for (r, k), (er, ek) in zip(seen, expected))
    assert ok, f"room broadcasts logged: {seen}, expected {expected}"


def broadcasts(server, name, offset, n=1):
    """(recipients, shortcut) of every `room broadcast` line sm `name` logged since offset,
    once there are at least n (the line is written as the packet is sent on: a client may
    have its copy a moment before the log has the line)."""
    def lines():
        found = BROADCAST.finditer(log_since(server, name, offset))
        return [(int(m.group(1)), int(m.group(2))) for m in found]
    server.wait_for(lambda: len(lines()) >= n, f"{n} room broadcast lines in {name}'s log", timeout=TIMEOUT)
    return lines()


# XEP-0198 (copied from test_stream_management.py)

def enable(client):
    client.send(f"<enable xmlns='{NS_SM}' resume='true'/>")
    enabled = client.expect("enabled", NS_SM)
    assert enabled.get("resume") in ("true", "1") and enabled.get("id"), to_xml(enabled)
    return enabled


def cut(client):
    """Drops the connection without closing the stream: no </stream:stream>, a TCP reset."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()
    client.closed = True


def resume(server, user, previd, h):
    c = RawClient.connect(server.starttls_port, mode="starttls")
    c.open_stream()
    c.starttls()
    c.open_stream()
    outcome, _ = c.scram(user, USERS[user], "SCRAM-SHA-256")
    assert local(outcome) == "success", c.received.decode(errors="replace")
    c.open_stream()
    c.send(f"<resume xmlns='{NS_SM}' previd='{previd}' h='{h}'/>")
    return c


def stanzas(elements):
    return sum(1 for e in elements if local(e) in ("message", "presence", "iq"))


# A raw XEP-0114 component

def component(server, name=COMPONENT, secret=COMPONENT_SECRET):
    """A RawClient (no TLS) on the router, handshake done as `name`."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    c = RawClient(sock, domain=name)
    c.send(f"<?xml version='1.0'?><stream:stream xmlns='{NS_ACCEPT}' xmlns:stream='{NS_STREAM}' "
           f"to='{name}'>")
    deadline = time.monotonic() + TIMEOUT
    while c.stream_header is None:
        assert time.monotonic() < deadline, f"no stream header: {c.received!r}"
        assert not c.closed, f"the router closed the stream: {c.received!r}"
        c._read_some(0.1)
    stream_id = c.stream_header["id"]
    digest = hashlib.sha1((stream_id + secret).encode()).hexdigest()
    c.send(f"<handshake>{digest}</handshake>")
    c.expect("handshake")
    return c


def nothing_more(client, predicate, what):
    """After a settle, nothing that satisfies predicate came (or is kept)."""
    got = client.other + settle(client)
    client.other = []
    bad = [to_xml(e) for e in got if predicate(e)]
    assert not bad, f"{client.jid} got {what}: {bad}"


# -- tests ----------------------------------------------------------------------------

def test_room_broadcasts_reach_every_session_once_over_two_sm_instances(server):
    """With two sm instances the router splits a room's fan-out packet by instance; each
    sm takes the shortcut for its live sessions; c2s addresses each copy. A groupchat
    message and an occupant's presence change reach every session (alice's two sessions
    under one nick included) exactly once, with `to` that session's full JID."""
    (server.dir / "sm-2.xml").write_text((server.dir / "sm.xml").read_text())
    offset = server.log_size("sm-2")
    server.spawn("sm-2", binary="sm", extra=["--instance", "2"])
    server._wait_connected("sm-2", offset)
    names = {"alice": "Alice", "bob": "Bob", "carol": "Carol", "dave": "Dave", "eve": "Eve"}
    clients = {u: connect(server, u) for u in names}
    alice2 = connect(server, "alice", "two")
    sessions = list(clients.values()) + [alice2]
    try:
        room_with([(clients[u], nick) for u, nick in names.items()] + [(alice2, "Alice")])
        # Each instance serves its users: their tasks' spans name them in its log only.
        for user, instance, other in (("alice", "sm", "sm-2"), ("carol", "sm", "sm-2"),
                                      ("dave", "sm", "sm-2"), ("bob", "sm-2", "sm"),
                                      ("eve", "sm-2", "sm")):
            jid = f"{user}@localhost"
            assert jid in server.log(instance) and jid not in server.log(other), \
                f"{jid} should be served by {instance} only"

        logs = offsets(server, ["sm", "sm-2"])
        clients["bob"].send(f"<message to='{ROOM}' type='groupchat' id='g1'><body>hello all</body></message>")
        for c in sessions:
            m = until(c, lambda e: local(e) == "message" and body_of(e) == "hello all", "bob's message")[-1]
            assert m.get("to") == c.jid and m.get("from") == f"{ROOM}/Bob" and m.get("id") == "g1", to_xml(m)
            assert m.get("type") == "groupchat"
        for c in sessions:
            nothing_more(c, lambda e: body_of(e) == "hello all", "bob's message twice")
        # The router sent each instance one packet for its recipients; both took the shortcut.
        seen = {n: broadcasts(server, n, logs[n]) for n in ("sm", "sm-2")}
        assert_broadcasts(seen["sm"], [(4, 4)])  # alice (2 sessions), carol, dave
        assert_broadcasts(seen["sm-2"], [(2, 2)], senders=1)  # bob, eve

        # An occupant's presence change reaches everyone, once, addressed.
        logs = offsets(server, ["sm", "sm-2"])
        clients["carol"].send(f"<presence to='{ROOM}/Carol'><show>away</show></presence>")
        for c in sessions:
            p = until(c, lambda e: local(e) == "presence" and e.get("from") == f"{ROOM}/Carol",
                      "carol's presence change")[-1]
            assert p.get("to") == c.jid and p.findtext(q(NS_CLIENT, "show")) == "away", to_xml(p)
            assert p.find(q(NS_USER, "x")) is not None, to_xml(p)
        for c in sessions:
            nothing_more(c, lambda e: local(e) == "presence" and e.get("from") == f"{ROOM}/Carol",
                         "carol's presence twice")
        seen = {n: broadcasts(server, n, logs[n]) for n in ("sm", "sm-2")}
        # The room sends moderators (alice's two sessions) the presence with carol's real
        # JID, carol her own (status 110), the others another: on sm only alice's two
        # sessions share a packet (dave's copy comes alone, as a plain stanza).
        assert seen == {"sm": [(2, 2)], "sm-2": [(2, 2)]}, seen
    finally:
        for c in sessions:
            c.close()


def test_the_blocklist_still_applies_to_room_broadcasts(server):
    """bob blocks carol's occupant JID (XEP-0191): her presence change in the room does not
    reach him (dropped without a word), while alice's next message does; dave, who
    blocks nobody, gets both."""
    alice, bob, carol, dave = (connect(server, u) for u in ("alice", "bob", "carol", "dave"))
    try:
        room_with([(alice, "Alice"), (bob, "Bob"), (carol, "Carol"), (dave, "Dave")])
        answer = bob.iq("set", f"<block xmlns='{NS_BLOCKING}'><item jid='{ROOM}/Carol'/></block>")
        assert answer.get("type") == "result", to_xml(answer)
        settle(bob)
        bob.other = []

        logs = offsets(server, ["sm"])
        carol.send(f"<presence to='{ROOM}/Carol'><show>away</show></presence>")
        # Carol's change went out before alice's message (dave saw it).
        until(dave, lambda e: local(e) == "presence" and e.get("from") == f"{ROOM}/Carol"
              and e.findtext(q(NS_CLIENT, "show")) == "away", "carol's presence change")
        alice.send(f"<message to='{ROOM}' type='groupchat'><body>after the block</body></message>")
        for c in (bob, dave):
            m = until(c, lambda e: local(e) == "message" and body_of(e) == "after the block",
                      "alice's message")[-1]
            assert m.get("to") == c.jid and m.get("from") == f"{ROOM}/Alice", to_xml(m)
        # sm sent bob's copy of carol's presence (bob and dave get the same one; alice,
        # the moderator, one with carol's real JID) through his task, which dropped it;
        # dave's took the shortcut, and so did everyone's copy of alice's message.
        seen = broadcasts(server, "sm", logs["sm"], n=2)
        assert_broadcasts(seen[:1], [(2, 1)])
        assert_broadcasts(seen[1:], [(4, 4)], senders=1)  # alice sent it
        # Nothing of carol's change reached bob, before or after alice's message.
        received = bob.received.decode(errors="replace")
        assert "<show>away</show>" not in received, received
        nothing_more(bob, lambda e: local(e) == "presence" and e.get("from") == f"{ROOM}/Carol"
                     and e.findtext(q(NS_CLIENT, "show")) == "away", "carol's blocked presence")
    finally:
        for c in (alice, bob, carol, dave):
            c.close()


def test_a_hibernating_session_gets_room_messages_when_it_resumes(server):
    """alice's connection is cut (XEP-0198 resumption enabled): her session hibernates, so
    sm sends the room's message through her task to c2s, which keeps it; she resumes
    and gets it, once."""
    alice, bob = connect(server, "alice"), connect(server, "bob")
    again = None
    try:
        previd = enable(alice).get("id")
        count = 0
        alice.send(f"<presence to='{ROOM}/Alice'><x xmlns='{NS_MUC}'><history maxstanzas='0'/></x></presence>")
        count += stanzas(until(alice, is_subject, "the join"))
        answer = alice.iq("set", f"<query xmlns='{NS_OWNER}'><x xmlns='{NS_DATA}' type='submit'/></query>",
                          to=ROOM)
        assert answer.get("type") == "result", to_xml(answer)
        count += 1 + stanzas(alice.other)
        alice.other = []
        join(bob, "Bob")
        count += stanzas(until(alice, lambda e: e.get("from") == f"{ROOM}/Bob", "bob's presence"))
        count += 1 + stanzas(settle(alice))

        hibernating = server.log("sm").count("session hibernating")
        cut(alice)
        server.wait_for(lambda: server.log("sm").count("session hibernating") > hibernating,
                        "sm to learn that alice's session hibernates", timeout=TIMEOUT)
        logs = offsets(server, ["sm"])
        bob.send(f"<message to='{ROOM}' type='groupchat' id='g2'><body>while away</body></message>")
        until(bob, lambda e: body_of(e) == "while away", "the echo")
        # sm took the shortcut for bob only: alice's copy went through her task.
        assert_broadcasts(broadcasts(server, "sm", logs["sm"]), [(2, 1)], senders=1)

        again = resume(server, "alice", previd, count)
        resumed = again.expect("resumed", NS_SM)
        assert resumed.get("previd") == previd, to_xml(resumed)
        again.jid = alice.jid
        got = until(again, lambda e: local(e) == "message" and body_of(e) == "while away", "the message")
        # h acknowledged everything before the cut: nothing else is sent again.
        assert [local(e) for e in got if local(e) in ("message", "presence", "iq")] == ["message"], \
            [to_xml(e) for e in got]
        m = got[-1]
        assert m.get("to") == alice.jid and m.get("from") == f"{ROOM}/Bob" and m.get("id") == "g2", to_xml(m)
        nothing_more(again, lambda e: local(e) == "message" and body_of(e) == "while away",
                     "the message twice")
        # Live again: the next message takes the shortcut to her.
        logs = offsets(server, ["sm"])
        bob.send(f"<message to='{ROOM}' type='groupchat'><body>welcome back</body></message>")
        m = until(again, lambda e: body_of(e) == "welcome back", "the next message")[-1]
        assert m.get("to") == alice.jid
        assert_broadcasts(broadcasts(server, "sm", logs["sm"]), [(2, 2)], senders=1)
    finally:
        for c in (alice, bob, again):
            if c is not None:
                c.close()


def error_condition(e):
    cond = stanza_error_condition(e)
    return None if cond is None else cond[1]


def test_a_component_fanout_packet(server):
    """A third-party component's fan-out packets: delivered per recipient (through each
    user's task, it is not a room broadcast); a stanza from another domain than the packet
    refused with not-allowed, a malformed packet with bad-request, both on the
    component's link and delivered to nobody; a recipient outside the packet's domain
    bounced (bad-request) and one in a domain nobody serves bounced
    (remote-server-not-found), each from the recipient's JID."""
    alice, bob = connect(server, "alice"), connect(server, "bob")
    comp = component(server)
    try:
        # a. Delivered, each with its own `to`.
        logs = offsets(server, ["sm"])
        comp.send(f"<fanout from='{COMPONENT}' to='localhost'><r to='{alice.jid}'/><r to='{bob.jid}'/>"
                  f"<message from='{COMPONENT}' type='headline' id='h1'><body>hi</body></message></fanout>")
        for c in (alice, bob):
            m = until(c, lambda e: local(e) == "message" and body_of(e) == "hi", "the headline")[-1]
            assert (m.get("to"), m.get("from"), m.get("type"), m.get("id")) == \
                (c.jid, COMPONENT, "headline", "h1"), to_xml(m)
        for c in (alice, bob):
            nothing_more(c, lambda e: body_of(e) == "hi", "the headline twice")
        # Not a room broadcast: no shortcut, every copy through its user's task.
        assert "room broadcast" not in log_since(server, "sm", logs["sm"])

        # b. The stanza from another domain than the packet: refused, delivered to nobody.
        comp.send(f"<fanout from='{COMPONENT}' to='localhost'><r to='{alice.jid}'/>"
                  "<message from='localhost' type='headline'><body>forged</body></message></fanout>")
        e = comp.next(what="the refusal")
        assert local(e) == "fanout" and e.get("type") == "error", to_xml(e)
        assert (e.get("from"), e.get("to")) == ("localhost", COMPONENT), to_xml(e)
        assert error_condition(e) == "not-allowed", to_xml(e)

        # c. Malformed: two stanzas; a stanza with `to`. Refused with bad-request.
        comp.send(f"<fanout from='{COMPONENT}' to='localhost'><r to='{alice.jid}'/>"
                  f"<message from='{COMPONENT}'><body>two-1</body></message>"
                  f"<message from='{COMPONENT}'><body>two-2</body></message></fanout>")
        e = comp.next(what="the refusal of two stanzas")
        assert local(e) == "fanout" and e.get("type") == "error", to_xml(e)
        assert error_condition(e) == "bad-request", to_xml(e)
        comp.send(f"<fanout from='{COMPONENT}' to='localhost'><r to='{alice.jid}'/>"
                  f"<message from='{COMPONENT}' to='{bob.jid}'><body>with-to</body></message></fanout>")
        e = comp.next(what="the refusal of a stanza with 'to'")
        assert local(e) == "fanout" and e.get("type") == "error", to_xml(e)
        assert error_condition(e) == "bad-request", to_xml(e)
        # A namespace declared on <fanout> (it would not travel with the copies), no
        # recipient, a recipient listed twice: bad-request too.
        for packet in (
                f"<fanout xmlns:e='urn:x' from='{COMPONENT}' to='localhost'><r to='{alice.jid}'/>"
                f"<message from='{COMPONENT}'><e:x/><body>ns</body></message></fanout>",
                f"<fanout from='{COMPONENT}' to='localhost'>"
                f"<message from='{COMPONENT}'><body>nobody</body></message></fanout>",
                f"<fanout from='{COMPONENT}' to='localhost'><r to='{alice.jid}'/><r to='{alice.jid}'/>"
                f"<message from='{COMPONENT}'><body>twice</body></message></fanout>"):
            comp.send(packet)
            e = comp.next(what="the refusal of a malformed packet")
            assert local(e) == "fanout" and e.get("type") == "error", to_xml(e)
            assert error_condition(e) == "bad-request", to_xml(e)
        for c in (alice, bob):
            nothing_more(c, lambda e: body_of(e) in ("forged", "two-1", "two-2", "with-to",
                                                     "ns", "nobody", "twice"),
                         "a refused packet's stanza")

        # d. A recipient outside the packet's domain: bounced alone.
        other = "x@elsewhere.example/r"
        comp.send(f"<fanout from='{COMPONENT}' to='localhost'><r to='{other}'/><r to='{alice.jid}'/>"
                  f"<message from='{COMPONENT}' type='normal' id='d1'><body>mixed</body></message></fanout>")
        m = until(alice, lambda e: body_of(e) == "mixed", "her copy")[-1]
        assert m.get("to") == alice.jid, to_xml(m)
        e = comp.next(what="the bounce")
        assert local(e) == "message" and e.get("type") == "error", to_xml(e)
        assert (e.get("from"), e.get("to"), e.get("id")) == (other, COMPONENT, "d1"), to_xml(e)
        assert error_condition(e) == "bad-request", to_xml(e)

        # e. A domain nobody serves: one bounce per recipient, from each.
        nowhere = ["a@nowhere.example/1", "b@nowhere.example/2"]
        comp.send(f"<fanout from='{COMPONENT}' to='nowhere.example'>"
                  + "".join(f"<r to='{r}'/>" for r in nowhere)
                  + f"<message from='{COMPONENT}' id='e1'><body>lost</body></message></fanout>")
        got = [comp.next(what="a bounce") for _ in nowhere]
        assert sorted(e.get("from") for e in got) == nowhere, [to_xml(e) for e in got]
        for e in got:
            assert local(e) == "message" and e.get("type") == "error" and e.get("to") == COMPONENT, to_xml(e)
            assert error_condition(e) == "remote-server-not-found", to_xml(e)
        # Nothing else came back to the component.
        comp._read_some(0.2)
        assert not comp._pending, [to_xml(e) for e in comp._pending]
    finally:
        for c in (alice, bob, comp):
            c.close()
