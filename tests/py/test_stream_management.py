"""End-to-end tests of XEP-0198 Stream Management, XEP-0352 Client State Indication
and clean shutdown, against a whole server (tests/py/serverproc.py).

The raw client (scram_client.py) counts exactly; slixmpp's xep_0198 plugin is the
independent implementation that resumes on its own after its connection is cut.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_stream_management.py -q
"""

import asyncio
import signal
import socket
import struct
import time

import pytest

pytest.importorskip("OpenSSL")

from scram_client import RawClient, local, login, to_xml  # noqa: E402
from serverproc import run_clients, serving  # noqa: E402

NS_SM = "urn:xmpp:sm:3"
NS_CSI = "urn:xmpp:csi:0"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
# Short waits for the tests: a hibernating session waits 30 s unless a test says less.
SM_CONFIG = "<stream-management hibernate='30' ack-every='3' ack-after='30'/>"


def sm_server(request, tmp_path, c2s_extra=SM_CONFIG, **options):
    """`with sm_server(...) as s:` a server with USERS and short XEP-0198 waits."""
    return serving(request, tmp_path, USERS, c2s_extra=c2s_extra, **options)


@pytest.fixture
def server(request, tmp_path):
    with sm_server(request, tmp_path) as s:
        yield s


def received(client):
    return client.received.decode(errors="replace")


def sm(client, name):
    """The next element, which must be the stream management element `name`."""
    return client.expect(name, NS_SM)


def enable(client, resume=True):
    attr = " resume='true'" if resume else ""
    client.send(f"<enable xmlns='{NS_SM}'{attr}/>")
    enabled = sm(client, "enabled")
    if resume:
        assert enabled.get("resume") in ("true", "1") and enabled.get("id"), to_xml(enabled)
    return enabled


def cut(client):
    """Drops the connection without closing the stream (a phone changing networks):
    no </stream:stream>, no TLS close, a TCP reset."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()
    client.closed = True


def authenticated(server, user, port=None):
    """A client through TLS and SASL with the post-auth features read (not bound)."""
    c = RawClient.connect(port or server.starttls_port, mode="starttls")
    c.open_stream()
    c.starttls()
    c.open_stream()
    outcome, _ = c.scram(user, USERS[user], "SCRAM-SHA-256")
    assert local(outcome) == "success", received(c)
    c.open_stream()
    return c


def resume(server, user, previd, h, port=None):
    c = authenticated(server, user, port)
    c.send(f"<resume xmlns='{NS_SM}' previd='{previd}' h='{h}'/>")
    return c


def chat(sender, to, body):
    sender.send(f"<message to='{to}' type='chat' id='{body}'><body>{body}</body></message>")


def bodies(elements):
    """The bodies of the messages among `elements` (messages without one left out)."""
    return [b for e in elements if local(e) == "message"
            if (b := e.findtext("{jabber:client}body")) is not None]


def next_message(client, timeout=5.0):
    """The next <message/>, answering the server's <r/> meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        e = client.next(max(0.0, deadline - time.monotonic()), what="a message")
        if local(e) == "message":
            return e
        client.other.append(e)


def messages(client, n, timeout=5.0):
    return [next_message(client, timeout) for _ in range(n)]


def presence(client, frm, kind=None, timeout=5.0):
    """The next presence from `frm` (of type `kind`); others are kept in .other."""
    deadline = time.monotonic() + timeout
    while True:
        e = client.next(max(0.0, deadline - time.monotonic()), what=f"presence from {frm}")
        if local(e) == "presence" and e.get("from") == frm and e.get("type") == kind:
            return e
        client.other.append(e)


def subscribed(server):
    """alice and bob in each other's rosters with subscription both (RFC 6121 3.1)."""
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="setup")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="setup")
    # Subscription requests go to available resources (RFC 6121 3.1.3).
    for c in (alice, bob):
        c.send("<presence priority='-1'/>")
        c.expect("presence")
    for (a, a_jid), (b, b_jid) in (((alice, "alice@localhost"), (bob, "bob@localhost")),
                                   ((bob, "bob@localhost"), (alice, "alice@localhost"))):
        a.send(f"<presence to='{b_jid}' type='subscribe'/>")
        request = b.expect("presence")
        while request.get("type") != "subscribe":
            request = b.expect("presence")
        b.send(f"<presence to='{a_jid}' type='subscribed'/>")
    # Both rosters say both once the last approval went through.
    alice.iq("get", "<query xmlns='jabber:iq:roster'/>")
    bob.iq("get", "<query xmlns='jabber:iq:roster'/>")
    alice.close()
    bob.close()


# -- enabling and counting -----------------------------------------------------------

def test_enable_and_counting_both_ways(server):
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    features = alice.features
    assert features.find(f"{{{NS_SM}}}sm") is not None, to_xml(features)
    assert features.find(f"{{{NS_CSI}}}csi") is not None, to_xml(features)
    enabled = enable(alice)
    assert int(enabled.get("max")) == 30, to_xml(enabled)
    stanzas = 0  # what the server sent alice since <enabled/>
    asked = 0  # the server's <r/>s

    def read():
        nonlocal stanzas, asked
        e = alice.next()
        if local(e) in ("message", "presence", "iq"):
            stanzas += 1
        elif local(e) == "r":
            asked += 1
        return e

    # The client's count: three stanzas, then <r/> answered with h=3.
    alice.send("<presence/>")
    alice.send("<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    alice.send("<message to='bob@localhost/b' type='chat'><body>x</body></message>")
    alice.send(f"<r xmlns='{NS_SM}'/>")
    while local(a := read()) != "a":
        pass
    assert a.get("h") == "3", to_xml(a)
    # The server's count: it asks after every 3 stanzas (ack-every) it sent.
    for i in range(5):
        chat(bob, "alice@localhost/a", f"m{i}")
    got = []
    while "m4" not in bodies(got):
        got.append(read())
    assert bodies(got)[-5:] == ["m0", "m1", "m2", "m3", "m4"], [to_xml(e) for e in got]
    # Its <r/> follows the burst it counted in.
    while asked == 0:
        read()
    alice.send(f"<a xmlns='{NS_SM}' h='{stanzas}'/>")
    # Once acknowledged it asks again after 3 more.
    asked = 0
    for i in range(3):
        chat(bob, "alice@localhost/a", f"n{i}")
    while asked == 0:
        read()
    # Acknowledging more than was sent ends the stream (XEP-0198 handled-count-too-high).
    alice.send(f"<a xmlns='{NS_SM}' h='{stanzas + 10}'/>")
    assert alice.wait_stream_error() == "undefined-condition", received(alice)
    assert b"handled-count-too-high" in alice.received
    bob.close()


def test_enable_twice_and_before_bind(server):
    c = authenticated(server, "carol")
    c.send(f"<enable xmlns='{NS_SM}'/>")
    failed = sm(c, "failed")
    assert failed.find(f"{{{NS_STANZAS}}}unexpected-request") is not None, to_xml(failed)
    assert c.bind("r").get("type") == "result"
    enable(c, resume=False)
    c.send(f"<enable xmlns='{NS_SM}'/>")
    failed = sm(c, "failed")
    assert failed.find(f"{{{NS_STANZAS}}}unexpected-request") is not None, to_xml(failed)
    c.close()


# -- resumption ----------------------------------------------------------------------

def test_resume_after_the_connection_is_cut(server):
    subscribed(server)
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    bob.send("<presence/>")
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    previd = enable(alice).get("id")
    alice.send("<presence/>")
    # bob sees alice come online.
    presence(bob, "alice@localhost/a")
    for i in range(3):
        chat(bob, "alice@localhost/a", f"before{i}")
    # The stanzas alice was sent up to before2, counted as XEP-0198 counts them (her own
    # presence and bob's among them, in whichever order they came).
    seen = []
    while "before2" not in bodies(seen):
        e = alice.next(what="before2")
        if local(e) in ("message", "presence", "iq"):
            seen.append(e)
    assert bodies(seen) == ["before0", "before1", "before2"], [to_xml(e) for e in seen]
    # Mid-conversation the connection drops, and the last message never reached her.
    cut(alice)
    for i in range(2):
        chat(bob, "alice@localhost/a", f"away{i}")
    # The session resumes: what alice had not acknowledged comes again, in order, once.
    # She says she handled everything before before2.
    again = resume(server, "alice", previd, h=len(seen) - 1)
    resumed = sm(again, "resumed")
    assert resumed.get("previd") == previd, to_xml(resumed)
    assert resumed.get("h") == "1", to_xml(resumed)  # alice had sent one stanza
    got = messages(again, 3)
    assert bodies(got) == ["before2", "away0", "away1"], [to_xml(e) for e in got]
    # And it goes on: both ways.
    chat(bob, "alice@localhost/a", "after")
    assert bodies([next_message(again)]) == ["after"]
    chat(again, "bob@localhost/b", "back")
    assert bodies([next_message(bob)]) == ["back"]
    # bob never saw alice go away.
    bob._read_some(0.1)
    # (Her available presence may come twice: broadcast, and as the answer to bob's
    # probe when both logged in at once.)
    gone = [e for e in bob.other + bob._pending
            if local(e) == "presence" and e.get("from") == "alice@localhost/a"
            and e.get("type") == "unavailable"]
    assert not gone, [to_xml(e) for e in gone]
    again.close()
    bob.close()


def test_resume_on_the_second_c2s(server):
    server.start_second_c2s()
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    previd = enable(alice).get("id")
    chat(bob, "alice@localhost/a", "one")
    assert bodies([next_message(alice)]) == ["one"]
    cut(alice)
    chat(bob, "alice@localhost/a", "two")
    again = resume(server, "alice", previd, h=0, port=server.starttls_port2)
    assert sm(again, "resumed").get("previd") == previd
    assert bodies(messages(again, 2)) == ["one", "two"]
    chat(bob, "alice@localhost/a", "three")
    assert bodies([next_message(again)]) == ["three"]
    again.close()
    bob.close()


def test_resume_takes_the_session_from_a_connection_that_seems_alive(server):
    """The old connection is still open (the phone's old network path is half dead):
    resuming moves the session and closes the old stream."""
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    previd = enable(alice).get("id")
    chat(bob, "alice@localhost/a", "one")
    assert bodies([next_message(alice)]) == ["one"]
    again = resume(server, "alice", previd, h=1)
    assert sm(again, "resumed").get("previd") == previd
    assert alice.wait_stream_error() == "conflict", received(alice)
    chat(bob, "alice@localhost/a", "two")
    assert bodies([next_message(again)]) == ["two"]
    again.close()
    bob.close()


def test_failed_resume_then_bind(server):
    c = resume(server, "alice", "no-such-session", h=0)
    failed = sm(c, "failed")
    assert failed.find(f"{{{NS_STANZAS}}}item-not-found") is not None, to_xml(failed)
    assert c.bind("r").get("type") == "result", received(c)
    c.close()
    # Another user's token is no better than a made-up one.
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    previd = enable(alice).get("id")
    mallory = resume(server, "carol", previd, h=0)
    assert sm(mallory, "failed").find(f"{{{NS_STANZAS}}}item-not-found") is not None
    alice.close()
    mallory.close()


def test_a_client_silent_past_the_idle_timeout_hibernates(request, tmp_path):
    # A phone that vanished without its connection breaking: c2s gives up on the
    # stream (connection-timeout), but the session waits for the client to resume.
    with sm_server(request, tmp_path, timeouts=(1, 30)) as s:
        alice = login(s.starttls_port, "alice", USERS["alice"], resource="a")
        previd = enable(alice).get("id")
        assert alice.wait_stream_error() == "connection-timeout", received(alice)
        # (bob logs in now: he would time out too while waiting.)
        bob = login(s.starttls_port, "bob", USERS["bob"], resource="b")
        chat(bob, "alice@localhost/a", "while-away")
        again = resume(s, "alice", previd, h=0)
        assert sm(again, "resumed").get("previd") == previd, received(again)
        assert bodies([next_message(again)]) == ["while-away"]
        again.close()
        bob.close()


def test_hibernation_timeout_sends_what_was_queued_to_offline_storage(request, tmp_path):
    with sm_server(request, tmp_path,
                   c2s_extra="<stream-management hibernate='1' ack-every='100'/>") as s:
        subscribed(s)
        bob = login(s.starttls_port, "bob", USERS["bob"], resource="b")
        bob.send("<presence/>")
        alice = login(s.starttls_port, "alice", USERS["alice"], resource="a")
        enable(alice)
        alice.send("<presence/>")
        presence(bob, "alice@localhost/a")
        for i in range(2):
            chat(bob, "alice@localhost/a", f"unacked{i}")
        assert bodies(messages(alice, 2)) == ["unacked0", "unacked1"]
        cut(alice)
        chat(bob, "alice@localhost", "queued")
        # Past the wait, alice's session ends: bob sees her go.
        presence(bob, "alice@localhost/a", "unavailable")
        # At her next login everything comes from offline storage, once.
        alice = login(s.starttls_port, "alice", USERS["alice"], resource="phone")
        alice.send("<presence/>")
        got = messages(alice, 3)
        assert sorted(bodies(got)) == ["queued", "unacked0", "unacked1"], [to_xml(e) for e in got]
        alice.close()
        alice = login(s.starttls_port, "alice", USERS["alice"], resource="phone")
        alice.send("<presence/>")
        alice.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
        assert not bodies(alice.other), [to_xml(e) for e in alice.other]
        alice.close()
        bob.close()


def test_offline_messages_leave_storage_only_when_acknowledged(server):
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    for i in range(3):
        chat(bob, "alice@localhost", f"offline{i}")
    bob.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    enable(alice, resume=False)
    alice.send("<presence/>")
    assert bodies(messages(alice, 3)) == ["offline0", "offline1", "offline2"]
    # She acknowledges the first one (h counts every stanza: her own presence came back
    # first), then her connection drops without resumption.
    got = 0
    alice.send(f"<r xmlns='{NS_SM}'/>")
    alice.send(f"<a xmlns='{NS_SM}' h='2'/>")
    alice.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    cut(alice)
    # The two she did not acknowledge are still stored; the first is not.
    deadline = time.monotonic() + 5
    while True:
        alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
        alice.send("<presence/>")
        alice.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
        got = bodies(alice.other)
        if got or time.monotonic() > deadline:
            break
        alice.close()
    assert got == ["offline1", "offline2"], [to_xml(e) for e in alice.other]
    alice.close()
    bob.close()


def test_slixmpp_resumes_after_its_connection_is_cut(server):
    async def test(clients):
        alice = clients.make("alice@localhost/laptop", USERS["alice"], plugins=["xep_0030", "xep_0199", "xep_0203", "xep_0198"])
        await alice.start()
        bob = await clients.make("bob@localhost/b", USERS["bob"]).start()
        await alice.settle()
        assert alice.plugin["xep_0198"].sm_id, "slixmpp did not get a resumption id"
        resumed = asyncio.Event()
        alice.add_event_handler("session_resumed", lambda _: resumed.set())
        bob.send_message(mto="alice@localhost/laptop", mbody="first", mtype="chat")
        await alice.expect_message("first")
        # Cut the TCP connection under slixmpp; it connects again and resumes.
        alice.gone.clear()
        alice.transport.abort()
        await asyncio.wait_for(alice.gone.wait(), 5)
        bob.send_message(mto="alice@localhost/laptop", mbody="second", mtype="chat")
        alice.connect("127.0.0.1", alice.port)
        await asyncio.wait_for(resumed.wait(), 10)
        await alice.expect_message("second")
        bob.send_message(mto="alice@localhost/laptop", mbody="third", mtype="chat")
        await alice.expect_message("third")
        # Each came once: nothing is left over after taking them.
        await alice.settle()
        assert not {"first", "second", "third"} & set(alice.received_bodies()), \
            alice.received_bodies()

    run_clients(test, server.starttls_port)


# -- client state indication ---------------------------------------------------------

def test_csi_holds_presence_and_flushes_on_a_message(server):
    subscribed(server)
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    alice.send("<presence/>")
    alice.expect("presence")  # her own, back
    alice.send(f"<inactive xmlns='{NS_CSI}'/>")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    bob.send("<presence><show>away</show></presence>")
    bob.send("<presence><show>xa</show></presence>")
    bob.send("<message to='alice@localhost/a' type='chat'>"
             "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
    # Everything bob sends alice takes one path in order: when the message with a body
    # arrives, the rest came before it and was held: bob's latest presence only (away
    # was replaced by xa), the chat state, then the message.
    chat(bob, "alice@localhost/a", "wake up")
    got = []
    while "wake up" not in bodies(got):
        got.append(alice.next())
    # (The answer to alice's probe, from bob's bare JID while he was away, may be
    # among them: a contact of its own.)
    kinds = [(local(e), e.findtext("{jabber:client}show")) for e in got
             if e.get("from") != "bob@localhost"]
    assert kinds == [("presence", "xa"), ("message", None), ("message", None)], \
        [to_xml(e) for e in got]
    # <active/> flushes too.
    alice.send(f"<inactive xmlns='{NS_CSI}'/>")
    bob.send("<presence><show>dnd</show></presence>")
    bob.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    time.sleep(0.3)  # for the presence to reach alice's c2s: it must not come through
    alice._read_some(0.1)
    assert not [e for e in alice._pending if local(e) == "presence"], received(alice)
    alice.send(f"<active xmlns='{NS_CSI}'/>")
    p = alice.expect("presence")
    assert p.findtext("{jabber:client}show") == "dnd", to_xml(p)
    alice.close()
    bob.close()


def test_csi_and_stream_management_count_held_stanzas_when_sent(server):
    subscribed(server)
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    enable(alice, resume=False)
    alice.send("<presence/>")  # her own presence comes back: stanza 1
    alice.send(f"<inactive xmlns='{NS_CSI}'/>")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    bob.send("<presence/>")
    bob.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    # Held, so not yet sent: the server may only count what it sent. (Bob's presence
    # may reach alice's c2s before or after <active/>: it takes a path of its own
    # through alice's sm task, so the test acknowledges what it actually received.)
    alice.send(f"<active xmlns='{NS_CSI}'/>")
    got = [alice.expect("presence")]
    while not any(e.get("from") == "bob@localhost/b" for e in got):
        got.append(alice.next(what="bob's presence"))
    sent = [e for e in got if local(e) in ("message", "presence", "iq")]
    alice.send(f"<a xmlns='{NS_SM}' h='{len(sent)}'/>")  # own presence + bob's
    alice.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    assert alice.stream_error is None, received(alice)
    alice.close()
    bob.close()


# -- shutdown ------------------------------------------------------------------------

def test_sigterm_sends_system_shutdown_and_the_session_resumes_after(server):
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    previd = enable(alice).get("id")
    chat(bob, "alice@localhost/a", "before")
    assert bodies([next_message(alice)]) == ["before"]
    start = time.monotonic()
    code = server.kill("c2s", signal.SIGTERM, timeout=10)
    assert code == 0, server.log("c2s")[-2000:]
    assert time.monotonic() - start < 6, "c2s took longer than its stop timeout"
    assert alice.wait_stream_error() == "system-shutdown", received(alice)
    assert bob.wait_stream_error() == "system-shutdown", received(bob)
    server.restart("c2s")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    chat(bob, "alice@localhost/a", "while down")
    again = resume(server, "alice", previd, h=1)
    assert sm(again, "resumed").get("previd") == previd, received(again)
    assert bodies([next_message(again)]) == ["while down"]
    again.close()
    bob.close()


def test_two_instances_share_their_ports_and_one_stopping_hands_over(server):
    """Two c2s instances of one configuration (`instances="2"`) listen on the same
    ports; when one stops (SIGTERM, as a rolling upgrade does), it closes its listeners,
    so its clients reconnect to the same address, reach the other, and resume."""
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    previd = enable(alice).get("id")
    # The second instance, with the same file: same ports.
    (server.dir / "c2s-2.xml").write_text((server.dir / "c2s.xml").read_text())
    offset = server.log_size("c2s-2")
    server.spawn("c2s-2", binary="c2s", extra=["--instance", "2"])
    server._wait_connected("c2s-2", offset)
    assert "Address already in use" not in server.log("c2s-2")
    chat(bob, "alice@localhost/a", "one")
    assert bodies([next_message(alice)]) == ["one"]
    # bob and alice are on the first instance (it was alone when they came): it stops.
    server.kill("c2s", signal.SIGTERM, timeout=10)
    assert alice.wait_stream_error() == "system-shutdown", received(alice)
    server.wait_for(lambda: "stopped listening" in server.log("c2s"), "c2s to close its listeners")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b2")
    chat(bob, "alice@localhost/a", "two")
    again = resume(server, "alice", previd, h=1)
    assert sm(again, "resumed").get("previd") == previd, received(again)
    assert bodies([next_message(again)]) == ["two"]
    again.close()
    bob.close()
