"""End-to-end tests of XEP-0191 Blocking Command in sm, with slixmpp (plugin xep_0191)
as the independent client: the blocklist and its pushes, what a blocked JID (bare, full
or its domain) can no longer send the user and what the user can no longer send it,
presence on block and unblock, and a blocklist that holds while the user is offline,
across logins and across a restart of sm.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_blocking.py -q
"""

import asyncio
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("OpenSSL")
pytest.importorskip("slixmpp")

from serverproc import run_clients, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
NS_CLIENT = "jabber:client"
NS_BLOCKING = "urn:xmpp:blocking"
NS_BLOCKING_ERRORS = "urn:xmpp:blocking:errors"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
PLUGINS = ("xep_0030", "xep_0199", "xep_0203", "xep_0191")


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


# -- helpers -------------------------------------------------------------------------------

def make(clients, jid):
    """A slixmpp client that records every message (also those without a <body/>) and
    the blocklist pushes it gets (answering them, RFC 6120 8.2.3)."""
    user = jid.split("@")[0]
    c = clients.make(jid, USERS[user], plugins=PLUGINS, record_bodyless=True)

    def record_push(iq):
        c._record(iq)
        iq.reply().send()

    c.add_event_handler("blocked", record_push)
    c.add_event_handler("unblocked", record_push)
    return c


def show(c):
    return "\n  ".join(str(s) for s in c.stanzas) or "(nothing)"


def error_condition(stanza):
    """(type, defined condition) of a stanza's <error/>."""
    error = stanza.xml.find(f"{{{NS_CLIENT}}}error")
    if error is None:
        return None
    for child in error:
        if child.tag.startswith(f"{{{NS_STANZAS}}}") and not child.tag.endswith("}text"):
            return error.get("type"), child.tag.split("}")[1]
    return error.get("type"), None


def send_message(sender, to, body, msg_id, mtype="chat"):
    msg = sender.make_message(mto=to, mbody=body, mtype=mtype)
    msg["id"] = msg_id
    msg.send()


def bounce_of(msg_id):
    return lambda s: s.name == "message" and s["type"] == "error" and s["id"] == msg_id


def push_items(stanza, kind):
    """The jids of a blocklist push of `kind` (block/unblock), or None if it is not one."""
    if stanza.name != "iq" or stanza["type"] != "set":
        return None
    element = stanza.xml.find(f"{{{NS_BLOCKING}}}{kind}")
    if element is None:
        return None
    return {i.get("jid") for i in element.findall(f"{{{NS_BLOCKING}}}item")}


def is_push(kind, jids):
    return lambda s: push_items(s, kind) == set(jids)


def pushes(c):
    return [s for s in c.stanzas if s.name == "iq"]


async def blocklist(c):
    return {str(j) for j in await c.plugin["xep_0191"].get_blocked_jids(timeout=5)}


async def raw_iq(c, kind, payload, to=None):
    """Sends an iq with `payload` (XML text); returns the answer, errors included."""
    from slixmpp.exceptions import IqError

    iq = c.Iq()
    iq["type"] = kind
    if to is not None:
        iq["to"] = to
    iq.append(ET.fromstring(payload))
    try:
        return await iq.send(timeout=5)
    except IqError as e:
        return e.iq


async def subscribe(contact, user):
    """`contact` subscribes to `user`'s presence (a one-way subscription), and waits
    for the user's presence that follows."""
    contact.send_presence(pto=user.boundjid.bare, ptype="subscribe")
    await user.expect("the subscription request", lambda s: s.name == "presence"
                      and s["type"] == "subscribe" and s["from"] == contact.boundjid.bare)
    user.send_presence(pto=contact.boundjid.bare, ptype="subscribed")
    await contact.expect("the approval", lambda s: s.name == "presence" and s["type"] == "subscribed")
    await contact.expect("the user's presence", lambda s: s.name == "presence"
                         and s["from"] == user.boundjid and s["type"] == "available")


# -- the blocklist and its pushes -------------------------------------------------------------

def test_blocklist_block_unblock_and_pushes(server):
    async def test(clients):
        one = make(clients, "alice@localhost/one")
        two = make(clients, "alice@localhost/two")
        three = make(clients, "alice@localhost/three")  # never asks for the list
        for c in (one, two, three):
            await c.online()

        info = await one.plugin["xep_0030"].get_info(jid="localhost", timeout=5)
        assert NS_BLOCKING in info["disco_info"]["features"], str(info)

        answer = await one.plugin["xep_0191"].get_blocked(timeout=5)
        assert answer["type"] == "result" and answer.xml.find(f"{{{NS_BLOCKING}}}blocklist") is not None, \
            str(answer)
        assert await blocklist(one) == set()
        assert await blocklist(two) == set()

        # Block one JID: both resources that asked for the list get the push.
        answer = await one.plugin["xep_0191"].block("carol@localhost", timeout=5)
        assert answer["type"] == "result", str(answer)
        for c in (one, two):
            push = await c.expect("the block push", is_push("block", ["carol@localhost"]))
            assert push["from"] in ("", "alice@localhost"), str(push)
            assert push["to"] == c.boundjid, str(push)
        assert await blocklist(two) == {"carol@localhost"}

        # Several at once: a bare JID, a full JID, a domain.
        several = ["dave@localhost", "mallory@localhost/evil", "spam.example"]
        await two.plugin["xep_0191"].block(several, timeout=5)
        for c in (one, two):
            await c.expect("the push of three items", is_push("block", several))
        assert await blocklist(one) == {"carol@localhost", *several}

        # Unblock one.
        await one.plugin["xep_0191"].unblock("dave@localhost", timeout=5)
        for c in (one, two):
            await c.expect("the unblock push", is_push("unblock", ["dave@localhost"]))
        assert await blocklist(one) == {"carol@localhost", "mallory@localhost/evil", "spam.example"}

        # <block/> without items: bad-request, nothing changes.
        answer = await raw_iq(one, "set", f"<block xmlns='{NS_BLOCKING}'/>")
        assert answer["type"] == "error" and error_condition(answer)[1] == "bad-request", str(answer)

        # Unblock everything: an empty <unblock/>, pushed as such.
        answer = await raw_iq(two, "set", f"<unblock xmlns='{NS_BLOCKING}'/>")
        assert answer["type"] == "result", str(answer)
        for c in (one, two):
            push = await c.expect("the unblock-all push", is_push("unblock", []))
            assert push.xml.find(f"{{{NS_BLOCKING}}}unblock") is not None
        assert await blocklist(one) == set()

        # No stray pushes (the bad request made none), and none for the third resource.
        for c in (one, two, three):
            await c.settle()
        assert not pushes(one) and not pushes(two), f"{show(one)}\n{show(two)}"
        assert not pushes(three), f"a push to a resource that never asked for the list:\n  {show(three)}"

    run_clients(test, server.starttls_port, server.tls_port)


# -- inbound from a blocked JID ---------------------------------------------------------------

def test_inbound_from_blocked_jid_bare_full_and_domain(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        bob2 = make(clients, "bob@localhost/other")
        for c in (alice, bob, bob2):
            await c.online()

        async def refused_from(sender, what, subscription=True):
            """sender's messages, presence (a subscription request if `subscription`)
            and IQs reach nobody; the messages and IQs come back service-unavailable."""
            send_message(sender, "alice@localhost", f"{what} to bare", f"{what}-1")
            bounce = await sender.expect(f"the bounce of {what}-1", bounce_of(f"{what}-1"))
            assert error_condition(bounce)[1] == "service-unavailable", str(bounce)
            send_message(sender, "alice@localhost/a", f"{what} to full", f"{what}-2")
            bounce = await sender.expect(f"the bounce of {what}-2", bounce_of(f"{what}-2"))
            assert error_condition(bounce)[1] == "service-unavailable", str(bounce)
            if subscription:
                sender.send_presence(pto="alice@localhost", ptype="subscribe")
            sender.send_presence(pto="alice@localhost/a", pstatus=f"{what} directed")
            for kind, payload, to in (("get", "<ping xmlns='urn:xmpp:ping'/>", "alice@localhost/a"),
                                      ("get", "<vCard xmlns='vcard-temp'/>", "alice@localhost"),
                                      ("set", "<query xmlns='jabber:iq:last'/>", "alice@localhost/a")):
                answer = await raw_iq(sender, kind, payload, to)
                assert answer["type"] == "error", f"{what}: {payload} to {to}: {answer}"
                assert error_condition(answer)[1] == "service-unavailable", f"{what}: {answer}"
            # The presence was dropped without a word (presence errors would come
            # before the IQ answers, which took the same way).
            assert not [s for s in sender.stanzas if s.name == "presence" and s["type"] == "error"], \
                show(sender)

        def nothing_from(who):
            return [s for s in alice.stanzas if str(s["from"]).startswith(who)
                    and s.name in ("message", "presence") and s["type"] != "unavailable"]

        # The bare JID blocked: every resource of bob.
        await alice.plugin["xep_0191"].block("bob@localhost", timeout=5)
        await refused_from(bob, "bare")
        await refused_from(bob2, "bare2")
        await alice.settle()
        assert not nothing_from("bob@localhost"), show(alice)

        # A full JID blocked: only that resource.
        await alice.plugin["xep_0191"].unblock("bob@localhost", timeout=5)
        await alice.plugin["xep_0191"].block("bob@localhost/b", timeout=5)
        # (Subscription requests come from the bare JID, RFC 6121 3.1.2, which is not
        # blocked now.)
        await refused_from(bob, "full", subscription=False)
        send_message(bob2, "alice@localhost/a", "from the other resource", "ok-1")
        got = await alice.expect_message("from the other resource")
        assert got["from"] == bob2.boundjid
        await alice.settle()
        assert not nothing_from("bob@localhost/b"), show(alice)

        # The domain blocked: everyone there (everyone here is at localhost).
        answer = await raw_iq(alice, "set", f"<unblock xmlns='{NS_BLOCKING}'/>")
        assert answer["type"] == "result", str(answer)
        answer = await raw_iq(alice, "set", f"<block xmlns='{NS_BLOCKING}'><item jid='localhost'/></block>")
        assert answer["type"] == "result", str(answer)
        await refused_from(bob2, "domain")
        answer = await raw_iq(alice, "set", f"<unblock xmlns='{NS_BLOCKING}'><item jid='localhost'/></unblock>")
        assert answer["type"] == "result", str(answer)
        # A message after the unblock arrives; nothing from before it did.
        send_message(bob2, "alice@localhost/a", "after the unblock", "ok-2")
        await alice.expect_message("after the unblock")
        assert not nothing_from("bob@localhost"), show(alice)
        assert alice.received_bodies() == [], show(alice)

    run_clients(test, server.starttls_port, server.tls_port)


# -- outbound to a blocked JID ------------------------------------------------------------------

def test_outbound_to_blocked_jid_is_refused(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        for c in (alice, bob):
            await c.online()
        await alice.plugin["xep_0191"].block("bob@localhost", timeout=5)

        def check_blocked_error(stanza):
            assert stanza["type"] == "error", str(stanza)
            assert error_condition(stanza)[1] == "not-acceptable", str(stanza)
            error = stanza.xml.find(f"{{{NS_CLIENT}}}error")
            assert error.find(f"{{{NS_BLOCKING_ERRORS}}}blocked") is not None, \
                f"no <blocked xmlns='{NS_BLOCKING_ERRORS}'/> in {stanza}"

        for to, msg_id in (("bob@localhost", "out-1"), ("bob@localhost/b", "out-2")):
            send_message(alice, to, f"to {to}", msg_id)
            check_blocked_error(await alice.expect(f"the error for {msg_id}", bounce_of(msg_id)))
        answer = await raw_iq(alice, "get", "<ping xmlns='urn:xmpp:ping'/>", "bob@localhost/b")
        check_blocked_error(answer)
        answer = await raw_iq(alice, "get", "<vCard xmlns='vcard-temp'/>", "bob@localhost")
        check_blocked_error(answer)

        # Presence too (XEP-0191 3.6: any stanza the client sends).
        alice.send_presence(pto="bob@localhost/b", pstatus="directed to bob")
        bounce = await alice.expect("the error for the directed presence", lambda s: s.name == "presence"
                                    and s["type"] == "error" and s["from"].bare == "bob@localhost")
        check_blocked_error(bounce)

        await bob.settle()
        assert not [s for s in bob.stanzas if s.name == "message"
                    or (s.name == "presence" and s["from"].bare == "alice@localhost")], show(bob)

        # Unblocked, the same message goes through.
        await alice.plugin["xep_0191"].unblock("bob@localhost", timeout=5)
        send_message(alice, "bob@localhost", "now it goes", "out-3")
        got = await bob.expect_message("now it goes")
        assert got["from"] == alice.boundjid
        assert bob.received_bodies() == [], show(bob)

    run_clients(test, server.starttls_port, server.tls_port)


# -- presence on block and unblock -------------------------------------------------------------

def test_block_sends_unavailable_and_unblock_sends_current_presence(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        carol = make(clients, "carol@localhost/c")
        await alice.online(status="here")
        await bob.online()
        await carol.online()
        await subscribe(bob, alice)
        await subscribe(carol, alice)

        await alice.plugin["xep_0191"].block("bob@localhost", timeout=5)
        gone = await bob.expect("alice's unavailable presence", lambda s: s.name == "presence"
                                and s["from"] == alice.boundjid and s["type"] == "unavailable")
        assert gone["to"].bare == "bob@localhost", str(gone)

        # While blocked, presence updates do not reach bob; carol gets them.
        alice.send_presence(pstatus="busy now", pshow="dnd")
        await carol.expect("alice's update", lambda s: s.name == "presence"
                           and s["from"] == alice.boundjid and s["status"] == "busy now")
        await alice.settle()
        await bob.settle()
        assert not [s for s in bob.stanzas if s.name == "presence" and s["from"].bare == "alice@localhost"], \
            show(bob)
        assert not [s for s in carol.stanzas if s.name == "presence" and s["type"] == "unavailable"], \
            f"carol was sent unavailable presence though not blocked:\n  {show(carol)}"

        # Unblocked: bob gets alice's current presence.
        await alice.plugin["xep_0191"].unblock("bob@localhost", timeout=5)
        back = await bob.expect("alice's current presence", lambda s: s.name == "presence"
                                and s["from"] == alice.boundjid and s["type"] != "unavailable")
        assert back["status"] == "busy now" and back["show"] == "dnd", str(back)

        # Presence flows again.
        alice.send_presence(pstatus="back")
        await bob.expect("alice's next update", lambda s: s.name == "presence"
                         and s["from"] == alice.boundjid and s["status"] == "back")

    run_clients(test, server.starttls_port, server.tls_port)


# -- persistence ----------------------------------------------------------------------------------

def wait_offline_stored(server, user, count=1):
    """Waits until storage has written `count` offline messages for `user` (xdb-file logs
    each done request at debug level)."""
    needle = f'op="append" owner={user}@localhost ns="urn:jabberd-rs:offline:0"'
    server.wait_for(lambda: server.log("xdb-file").count(needle) >= count,
                    f"{count} offline message(s) for {user} in storage", timeout=5.0)


def test_blocklist_kept_across_logins_and_applied_offline(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        await alice.online()
        await blocklist(alice)
        await alice.plugin["xep_0191"].block("bob@localhost", timeout=5)
        await alice.stop()

        # alice offline: bob's message is refused, not stored; carol's is stored.
        bob = make(clients, "bob@localhost/b")
        carol = make(clients, "carol@localhost/c")
        await bob.online()
        await carol.online()
        send_message(bob, "alice@localhost", "from bob while away", "away-1")
        bounce = await bob.expect("the bounce of away-1", bounce_of("away-1"))
        assert error_condition(bounce)[1] == "service-unavailable", str(bounce)
        bob.send_presence(pto="alice@localhost", ptype="subscribe")
        send_message(carol, "alice@localhost", "from carol while away", "away-2")
        await asyncio.get_running_loop().run_in_executor(None, wait_offline_stored, server, "alice")
        await bob.settle()
        assert not [s for s in bob.stanzas if s["type"] == "error" and s["id"] != "away-1"], show(bob)

        # Back: the list is still there, carol's message arrives, bob's does not, nor
        # his subscription request.
        again = make(clients, "alice@localhost/again")
        await again.start()
        assert await blocklist(again) == {"bob@localhost"}
        again.send_presence()
        await again.expect_message("from carol while away")
        await again.settle()
        assert again.received_bodies() == [], show(again)
        assert not [s for s in again.stanzas if s["from"].bare == "bob@localhost"], show(again)

        # And it still applies.
        send_message(bob, "alice@localhost", "still blocked", "away-3")
        bounce = await bob.expect("the bounce of away-3", bounce_of("away-3"))
        assert error_condition(bounce)[1] == "service-unavailable", str(bounce)

    run_clients(test, server.starttls_port, server.tls_port)


def test_blocklist_survives_sm_restart(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        await alice.online()
        await alice.plugin["xep_0191"].block(["bob@localhost", "spam.example"], timeout=5)

        offset = len(server.log("c2s"))
        server.kill("sm")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, server.restart, "sm")
        # c2s restores alice's session at the new sm: she stays connected.
        await loop.run_in_executor(None, lambda: server.wait_for(
            lambda: "session restored" in server.log("c2s")[offset:], "alice's session restored"))
        assert not alice.gone.is_set()

        bob = make(clients, "bob@localhost/b")
        await bob.online()
        assert await blocklist(alice) == {"bob@localhost", "spam.example"}
        send_message(bob, "alice@localhost", "after the restart", "r-1")
        bounce = await bob.expect("the bounce of r-1", bounce_of("r-1"))
        assert error_condition(bounce)[1] == "service-unavailable", str(bounce)
        send_message(alice, "bob@localhost", "to bob", "r-2")
        bounce = await alice.expect("the error for r-2", bounce_of("r-2"))
        assert error_condition(bounce)[1] == "not-acceptable", str(bounce)
        await alice.settle()
        await bob.settle()
        assert alice.received_bodies() == [] and bob.received_bodies() == [], f"{show(alice)}\n{show(bob)}"

    run_clients(test, server.starttls_port, server.tls_port)
