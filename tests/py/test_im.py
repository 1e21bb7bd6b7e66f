"""End-to-end tests of instant messaging through sm (RFC 6121 and the IQ services),
with clients logged in through c2s: subscriptions and presence, message routing by
priority, offline storage with XEP-0203 delay, roster pushes, IQ answers, and an sm
killed with SIGKILL and restarted.

Each test starts a whole server (tests/py/serverproc.py) in tmp_path.  slixmpp is the
independent client where its plugins fit (roster, presence, delay); scram_client.py's
raw client where a test needs exact stanzas.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_im.py -q
"""

import asyncio
import signal
import time

import pytest

pytest.importorskip("OpenSSL")
pytest.importorskip("slixmpp")

from scram_client import StreamClosed, local, login, stanza_error_condition, to_xml  # noqa: E402
from serverproc import run_clients, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
NS_DELAY = "urn:xmpp:delay"
NS_ROSTER = "jabber:iq:roster"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


def received(client):
    return client.received.decode(errors="replace")


def raw_login(server, user, resource, mode="starttls"):
    port = server.starttls_port if mode == "starttls" else server.tls_port
    return login(port, user, USERS[user], mode=mode, resource=resource)


def expect_stanza(client, name, predicate=lambda e: True, what=None, timeout=5.0):
    """The first top-level element `name` that satisfies predicate; others that come
    first are kept in client.other."""
    deadline = time.monotonic() + timeout
    for e in list(client.other):
        if local(e) == name and predicate(e):
            client.other.remove(e)
            return e
    while True:
        left = deadline - time.monotonic()
        e = client.next(max(0.0, left), what=what or f"<{name}/>")
        if local(e) == name and predicate(e):
            return e
        client.other.append(e)


def wait_offline_stored(server, user):
    """Waits until storage has written an offline message for `user` (xdb-file logs
    each done request at debug level)."""
    needle = f'op="append" owner={user}@localhost ns="urn:jabberd-rs:offline:0"'
    server.wait_for(lambda: needle in server.log("xdb-file"),
                    f"an offline message for {user} in storage", timeout=5.0)


# -- subscriptions and presence (slixmpp) ----------------------------------------------

def test_mutual_subscription_then_presence(server):
    async def test(clients):
        alice = clients.make("alice@localhost/home", USERS["alice"])
        bob = clients.make("bob@localhost/work", USERS["bob"])
        for c in (alice, bob):
            await c.start()
            await c.get_roster(timeout=5)
            c.send_presence()
            # Our own initial presence is echoed to us.
            await c.expect("own presence echo", lambda s, c=c: s.name == "presence"
                           and s["from"] == c.boundjid and s["type"] == "available")

        # alice asks bob; bob approves explicitly.
        alice.send_presence(pto="bob@localhost", ptype="subscribe")
        req = await bob.expect("alice's subscription request", lambda s: s.name == "presence"
                               and s["type"] == "subscribe")
        assert str(req["from"]) == "alice@localhost"
        bob.send_presence(pto="alice@localhost", ptype="subscribed")
        ok = await alice.expect("bob's approval", lambda s: s.name == "presence"
                                and s["type"] == "subscribed")
        assert str(ok["from"]) == "bob@localhost"
        # With the subscription granted, bob's presence reaches alice.
        await alice.expect("bob's presence", lambda s: s.name == "presence"
                           and str(s["from"]) == "bob@localhost/work" and s["type"] == "available")

        # And the other way round.
        bob.send_presence(pto="alice@localhost", ptype="subscribe")
        await alice.expect("bob's subscription request", lambda s: s.name == "presence"
                           and s["type"] == "subscribe" and str(s["from"]) == "bob@localhost")
        alice.send_presence(pto="bob@localhost", ptype="subscribed")
        await bob.expect("alice's approval", lambda s: s.name == "presence"
                         and s["type"] == "subscribed" and str(s["from"]) == "alice@localhost")
        await bob.expect("alice's presence", lambda s: s.name == "presence"
                         and str(s["from"]) == "alice@localhost/home" and s["type"] == "available")

        # Both rosters say both (pushed).
        await asyncio.sleep(0)  # let slixmpp apply the pushes it received
        for c, contact in ((alice, "bob@localhost"), (bob, "alice@localhost")):
            roster = await c.get_roster(timeout=5)
            items = {str(jid): item for jid, item in roster["roster"]["items"].items()}
            assert contact in items, f"{c.boundjid}: roster {items}"
            assert items[contact]["subscription"] == "both", f"{c.boundjid}: {roster}"

        # Presence updates now flow both ways.
        alice.send_presence(pstatus="lunch", pshow="away")
        got = await bob.expect("alice's away presence", lambda s: s.name == "presence"
                               and str(s["from"]) == "alice@localhost/home" and s["status"] == "lunch")
        assert got["show"] == "away"
        bob.send_presence(pstatus="busy", pshow="dnd")
        got = await alice.expect("bob's dnd presence", lambda s: s.name == "presence"
                                 and str(s["from"]) == "bob@localhost/work" and s["status"] == "busy")
        assert got["show"] == "dnd"

        # Logging out sends unavailable presence to the contact.
        await bob.stop()
        await alice.expect("bob's unavailable presence", lambda s: s.name == "presence"
                           and str(s["from"]) == "bob@localhost/work" and s["type"] == "unavailable")

    run_clients(test, server.starttls_port, server.tls_port)


# -- message routing ---------------------------------------------------------------------

def test_bare_jid_message_goes_to_highest_priority(server):
    async def test(clients):
        high = clients.make("bob@localhost/high", USERS["bob"])
        low = clients.make("bob@localhost/low", USERS["bob"], direct_tls=True)
        alice = clients.make("alice@localhost/a", USERS["alice"])
        for c in (high, low, alice):
            await c.start()
        high.send_presence(ppriority=5)
        await high.expect("own presence echo", lambda s: s.name == "presence"
                          and str(s["from"]) == "bob@localhost/high")
        low.send_presence(ppriority=1)
        # Each resource sees the other's presence: sm has both priorities.
        await high.expect("the low resource's presence", lambda s: s.name == "presence"
                          and str(s["from"]) == "bob@localhost/low")
        await low.expect("the high resource's presence", lambda s: s.name == "presence"
                         and str(s["from"]) == "bob@localhost/high")

        alice.send_message(mto="bob@localhost", mbody="to the bare JID", mtype="chat")
        got = await high.expect_message("to the bare JID")
        assert str(got["from"]) == "alice@localhost/a"
        # A marker sent afterwards to the low resource's full JID: once it is there, the
        # bare-JID message would have been there too.
        alice.send_message(mto="bob@localhost/low", mbody="marker", mtype="chat")
        await low.expect_message("marker")
        assert "to the bare JID" not in low.received_bodies()

        # Priorities change: now low is the higher one.
        low.send_presence(ppriority=10)
        await high.expect("the low resource's new priority", lambda s: s.name == "presence"
                          and str(s["from"]) == "bob@localhost/low" and s["priority"] == 10)
        alice.send_message(mto="bob@localhost", mbody="second", mtype="chat")
        await low.expect_message("second")
        alice.send_message(mto="bob@localhost/high", mbody="marker 2", mtype="chat")
        await high.expect_message("marker 2")
        assert "second" not in high.received_bodies()

    run_clients(test, server.starttls_port, server.tls_port)


def test_offline_message_delivered_with_delay(server):
    async def test(clients):
        alice = clients.make("alice@localhost/a", USERS["alice"])
        await alice.start()
        msg = alice.make_message(mto="bob@localhost", mbody="while you were out", mtype="chat")
        msg["id"] = "offline-1"
        msg.send()
        await asyncio.get_running_loop().run_in_executor(None, wait_offline_stored, server, "bob")
        assert not [s for s in alice.stanzas if s.name == "message" and s["type"] == "error"], \
            f"the offline message bounced: {alice.stanzas}"

        bob = clients.make("bob@localhost/b", USERS["bob"])
        await bob.start()
        # Nothing before initial presence.
        await asyncio.sleep(0.2)
        assert bob.received_bodies() == [], "offline messages came before initial presence"
        bob.send_presence()
        got = await bob.expect_message("while you were out")
        assert str(got["from"]) == "alice@localhost/a"
        delay = got.xml.find(f"{{{NS_DELAY}}}delay")
        assert delay is not None, f"no urn:xmpp:delay element in {got}"
        stamp = delay.get("stamp") or ""
        assert len(stamp) == 20 and stamp.endswith("Z") and stamp[10] == "T", stamp
        assert delay.get("from") == "localhost", str(got)

        # Taken: a second login does not get it again.
        await bob.stop()
        again = clients.make("bob@localhost/b2", USERS["bob"])
        await again.start()
        again.send_presence()
        await again.expect("own presence echo", lambda s: s.name == "presence"
                           and str(s["from"]) == "bob@localhost/b2")
        # A message after it shows the queue was empty.
        alice.send_message(mto="bob@localhost/b2", mbody="live", mtype="chat")
        await again.expect_message("live")
        assert again.received_bodies() == [], again.received_bodies()

    run_clients(test, server.starttls_port, server.tls_port)


# -- rosters -----------------------------------------------------------------------------

def roster_items(iq):
    query = iq.find(f"{{{NS_ROSTER}}}query")
    assert query is not None, to_xml(iq)
    return {i.get("jid"): i for i in query.findall(f"{{{NS_ROSTER}}}item")}


def test_roster_set_is_pushed_to_other_resource(server):
    a1 = raw_login(server, "alice", "one")
    a2 = raw_login(server, "alice", "two", mode="tls")
    for c in (a1, a2):
        answer = c.iq("get", f"<query xmlns='{NS_ROSTER}'/>")
        assert answer.get("type") == "result", received(c)

    answer = a1.iq("set", f"<query xmlns='{NS_ROSTER}'><item jid='carol@localhost' name='Carol'>"
                          "<group>Friends</group></item></query>")
    assert answer.get("type") == "result", received(a1)

    def is_push(jid, **attrs):
        def check(e):
            if e.get("type") != "set":
                return False
            q = e.find(f"{{{NS_ROSTER}}}query")
            if q is None:
                return False
            items = roster_items(e)
            return jid in items and all(items[jid].get(k) == v for k, v in attrs.items())
        return check

    for c in (a2, a1):  # every interested resource, the one that made the change too
        push = expect_stanza(c, "iq", is_push("carol@localhost", name="Carol"), "the roster push")
        item = roster_items(push)["carol@localhost"]
        assert item.findtext(f"{{{NS_ROSTER}}}group") == "Friends", to_xml(push)
        assert item.get("subscription") in (None, "none"), to_xml(push)
        assert push.get("from") in (None, "alice@localhost"), to_xml(push)
        c.send(f"<iq type='result' id='{push.get('id')}'/>")

    # The roster holds it.
    answer = a2.iq("get", f"<query xmlns='{NS_ROSTER}'/>")
    assert "carol@localhost" in roster_items(answer), received(a2)

    # Removal is pushed too.
    answer = a2.iq("set", f"<query xmlns='{NS_ROSTER}'><item jid='carol@localhost' "
                          "subscription='remove'/></query>")
    assert answer.get("type") == "result", received(a2)
    for c in (a1, a2):
        expect_stanza(c, "iq", is_push("carol@localhost", subscription="remove"), "the removal push")

    # A resource that never asked for the roster gets no pushes.
    a3 = raw_login(server, "alice", "three")
    answer = a1.iq("set", f"<query xmlns='{NS_ROSTER}'><item jid='dave@localhost'/></query>")
    assert answer.get("type") == "result", received(a1)
    expect_stanza(a2, "iq", is_push("dave@localhost"), "the push of dave")
    ping = a3.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    assert ping.get("type") == "result"
    assert not [e for e in a3.other if local(e) == "iq"], received(a3)
    for c in (a1, a2, a3):
        c.close()


# -- IQ services ---------------------------------------------------------------------------

IQS = [
    # (name, type, to, payload, must be result)
    ("disco#info server", "get", "localhost",
     "<query xmlns='http://jabber.org/protocol/disco#info'/>", True),
    ("disco#items server", "get", "localhost",
     "<query xmlns='http://jabber.org/protocol/disco#items'/>", True),
    ("disco#info own account", "get", "alice@localhost",
     "<query xmlns='http://jabber.org/protocol/disco#info'/>", True),
    ("disco#items own account", "get", "alice@localhost",
     "<query xmlns='http://jabber.org/protocol/disco#items'/>", True),
    ("disco#info other account", "get", "bob@localhost",
     "<query xmlns='http://jabber.org/protocol/disco#info'/>", True),
    ("disco#items other account", "get", "bob@localhost",
     "<query xmlns='http://jabber.org/protocol/disco#items'/>", True),
    ("disco#info nobody", "get", "nobody@localhost",
     "<query xmlns='http://jabber.org/protocol/disco#info'/>", False),
    ("ping server", "get", "localhost", "<ping xmlns='urn:xmpp:ping'/>", True),
    ("ping own account", "get", "alice@localhost", "<ping xmlns='urn:xmpp:ping'/>", True),
    ("ping no to", "get", None, "<ping xmlns='urn:xmpp:ping'/>", True),
    ("version server", "get", "localhost", "<query xmlns='jabber:iq:version'/>", True),
    ("version no to", "get", None, "<query xmlns='jabber:iq:version'/>", True),
    ("time server", "get", "localhost", "<time xmlns='urn:xmpp:time'/>", True),
    ("time no to", "get", None, "<time xmlns='urn:xmpp:time'/>", True),
    ("last server", "get", "localhost", "<query xmlns='jabber:iq:last'/>", True),
    ("last own account", "get", None, "<query xmlns='jabber:iq:last'/>", True),
    ("last other account (no subscription)", "get", "bob@localhost",
     "<query xmlns='jabber:iq:last'/>", False),
    ("vcard set", "set", None,
     "<vCard xmlns='vcard-temp'><FN>Alice Example</FN><NICKNAME>al</NICKNAME></vCard>", True),
    ("vcard get own", "get", None, "<vCard xmlns='vcard-temp'/>", True),
    ("vcard get own bare", "get", "alice@localhost", "<vCard xmlns='vcard-temp'/>", True),
    ("vcard get other", "get", "bob@localhost", "<vCard xmlns='vcard-temp'/>", True),
    ("vcard set other", "set", "bob@localhost",
     "<vCard xmlns='vcard-temp'><FN>Mallory</FN></vCard>", False),
    ("vcard get server", "get", "localhost", "<vCard xmlns='vcard-temp'/>", True),
    ("private set", "set", None,
     "<query xmlns='jabber:iq:private'><exodus xmlns='exodus:prefs'>"
     "<defaultnick>Hamlet</defaultnick></exodus></query>", True),
    ("private get", "get", None,
     "<query xmlns='jabber:iq:private'><exodus xmlns='exodus:prefs'/></query>", True),
    ("private get missing", "get", None,
     "<query xmlns='jabber:iq:private'><none xmlns='nothing:here'/></query>", True),
    ("private set jabber ns", "set", None,
     "<query xmlns='jabber:iq:private'><query xmlns='jabber:iq:roster'/></query>", False),
    ("private other account", "get", "bob@localhost",
     "<query xmlns='jabber:iq:private'><exodus xmlns='exodus:prefs'/></query>", False),
    ("roster", "get", None, "<query xmlns='jabber:iq:roster'/>", True),
    ("unknown namespace server", "get", "localhost", "<query xmlns='urn:example:nothing'/>", False),
    ("unknown namespace account", "get", "bob@localhost", "<query xmlns='urn:example:nothing'/>", False),
    ("register (disabled)", "get", None, "<query xmlns='jabber:iq:register'/>", False),
]


def test_every_iq_is_answered(server):
    alice = raw_login(server, "alice", "desk")
    bob = raw_login(server, "bob", "b")  # online, so "other account" has a session too
    for c in (alice, bob):
        c.send("<presence/>")
        expect_stanza(c, "presence", lambda e, c=c: e.get("from") == c.jid, "own presence")
    answers = {}
    silent = []
    for name, kind, to, payload, _ in IQS:
        try:
            answers[name] = alice.iq(kind, payload, to=to, timeout=3.0)
        except TimeoutError:
            silent.append(name)
        except StreamClosed as e:
            pytest.fail(f"the stream closed at IQ {name!r}: {e}")
    problems = [f"no answer within 3 s: {name}" for name in silent]
    for name, kind, to, payload, must_succeed in IQS:
        iq = answers.get(name)
        if iq is None:
            continue
        if iq.get("type") not in ("result", "error"):
            problems.append(f"{name}: answered with type {iq.get('type')!r}: {to_xml(iq)}")
        elif must_succeed and iq.get("type") != "result":
            problems.append(f"{name}: expected a result, got {to_xml(iq)}")
        elif not must_succeed and iq.get("type") != "error":
            problems.append(f"{name}: expected an error, got {to_xml(iq)}")
        if iq.get("type") == "error" and stanza_error_condition(iq) in (None, (None, None)):
            problems.append(f"{name}: error without a defined condition: {to_xml(iq)}")
        expected_from = to if to else None
        if expected_from is not None and iq.get("from") not in (expected_from,):
            problems.append(f"{name}: answer from {iq.get('from')!r}, expected {expected_from!r}")

    def child(name, path):
        iq = answers.get(name)
        return None if iq is None else iq.find(path)

    # Content checks (each one a problem line, so all show at once).
    info = child("disco#info server", "{http://jabber.org/protocol/disco#info}query")
    if info is not None:
        ids = [(i.get("category"), i.get("type")) for i in info.findall(
            "{http://jabber.org/protocol/disco#info}identity")]
        feats = {f.get("var") for f in info.findall("{http://jabber.org/protocol/disco#info}feature")}
        if ("server", "im") not in ids:
            problems.append(f"disco#info server: no server/im identity: {ids}")
        for feature in ("http://jabber.org/protocol/disco#info", "urn:xmpp:ping", "jabber:iq:version",
                        "urn:xmpp:time", "jabber:iq:last", "vcard-temp"):
            if feature not in feats:
                problems.append(f"disco#info server: feature {feature} missing: {sorted(feats)}")
    info = child("disco#info other account", "{http://jabber.org/protocol/disco#info}query")
    if info is not None:
        ids = [(i.get("category"), i.get("type")) for i in info.findall(
            "{http://jabber.org/protocol/disco#info}identity")]
        if ("account", "registered") not in ids:
            problems.append(f"disco#info other account: no account/registered identity: {ids}")
    version = child("version server", "{jabber:iq:version}query")
    if version is not None and not version.findtext("{jabber:iq:version}name"):
        problems.append("version server: no <name/>")
    t = child("time server", "{urn:xmpp:time}time")
    if t is not None and not (t.findtext("{urn:xmpp:time}utc") or "").endswith("Z"):
        problems.append(f"time server: <utc/> not in UTC: {to_xml(t)}")
    last = child("last server", "{jabber:iq:last}query")
    if last is not None and not (last.get("seconds") or "").isdigit():
        problems.append(f"last server: seconds={last.get('seconds')!r}")
    for name in ("vcard get own", "vcard get own bare"):
        vcard = child(name, "{vcard-temp}vCard")
        if answers.get(name) is not None and (vcard is None or vcard.findtext("{vcard-temp}FN") != "Alice Example"):
            problems.append(f"{name}: the vCard set before is not returned: {to_xml(answers[name])}")
    if answers.get("vcard get other") is not None:
        vcard = child("vcard get other", "{vcard-temp}vCard")
        if vcard is None or vcard.findtext("{vcard-temp}FN") == "Mallory":
            problems.append(f"vcard get other: {to_xml(answers['vcard get other'])}")
    prefs = child("private get", "{jabber:iq:private}query/{exodus:prefs}exodus")
    if answers.get("private get") is not None and (
            prefs is None or prefs.findtext("{exodus:prefs}defaultnick") != "Hamlet"):
        problems.append(f"private get: the stored element is not returned: {to_xml(answers['private get'])}")
    missing = child("private get missing", "{jabber:iq:private}query/{nothing:here}none")
    if answers.get("private get missing") is not None and missing is None:
        problems.append(f"private get missing: the requested element is not echoed empty: "
                        f"{to_xml(answers['private get missing'])}")
    for name, condition in (("unknown namespace server", "service-unavailable"),
                            ("unknown namespace account", "service-unavailable"),
                            ("private set jabber ns", "not-acceptable"),
                            ("vcard set other", "forbidden"),
                            ("last other account (no subscription)", "forbidden")):
        iq = answers.get(name)
        if iq is not None and iq.get("type") == "error" and stanza_error_condition(iq)[1] != condition:
            problems.append(f"{name}: expected {condition}, got {to_xml(iq)}")

    # Nothing but the answers arrived (no stray errors or duplicates).
    stray = [to_xml(e) for e in alice.other if local(e) == "iq"]
    if stray:
        problems.append(f"unexpected iqs: {stray}")
    assert not problems, "\n".join(problems)
    alice.close()
    bob.close()


# -- sm killed and restarted -----------------------------------------------------------

def test_sm_killed_and_restarted(server):
    alice = raw_login(server, "alice", "a")
    alice.send("<presence/>")
    expect_stanza(alice, "presence", lambda e: e.get("from") == "alice@localhost/a", "own presence")
    # bob is offline: the message is stored.
    alice.send("<message to='bob@localhost' type='chat' id='before-kill'>"
               "<body>sent before the crash</body></message>")
    wait_offline_stored(server, "bob")

    offset = len(server.log("c2s"))
    server.kill("sm", signal.SIGKILL)
    server.restart("sm")
    # c2s hears that sm's link dropped and restores alice's session at the new sm once
    # it is back: alice stays connected (tests/py/test_session_restore.py).
    server.wait_for(lambda: "session restored" in server.log("c2s")[offset:],
                    "c2s to restore alice's session")
    assert not alice.closed and not alice.stream_closed, received(alice)[-1500:]
    bob = raw_login(server, "bob", "b", mode="tls")
    bob.send("<presence/>")
    msg = expect_stanza(bob, "message", what="the offline message after the restart")
    assert msg.findtext("{jabber:client}body") == "sent before the crash", received(bob)
    assert msg.get("from") == "alice@localhost/a"
    assert msg.find(f"{{{NS_DELAY}}}delay") is not None, received(bob)

    # And they chat.
    alice.send(f"<message to='{bob.jid}' type='chat'><body>hello again</body></message>")
    msg = expect_stanza(bob, "message", lambda e: e.findtext("{jabber:client}body") == "hello again")
    assert msg.get("from") == alice.jid
    bob.send(f"<message to='{alice.jid}' type='chat'><body>hi</body></message>")
    msg = expect_stanza(alice, "message", lambda e: e.findtext("{jabber:client}body") == "hi")
    assert msg.get("from") == bob.jid
    alice.close()
    bob.close()


def test_message_to_unknown_account_bounces(server):
    alice = raw_login(server, "alice", "a")
    alice.send("<message to='nobody@localhost' type='chat' id='m-x'><body>hello?</body></message>")
    bounce = expect_stanza(alice, "message", what="the bounce")
    assert bounce.get("type") == "error", received(alice)
    assert bounce.get("id") == "m-x"
    assert stanza_error_condition(bounce)[1] == "service-unavailable", received(alice)
    alice.close()
