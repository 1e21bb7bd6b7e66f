"""End-to-end tests of the group chat service (muc, XEP-0045) behind the router, with
clients logged in through c2s and sm: scram_client.py's raw client where exact status
codes and the order of stanzas matter, slixmpp's xep_0045 plugin as an independent client.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_muc.py -q
"""

import asyncio
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

pytest.importorskip("OpenSSL")

from scram_client import local, login, stanza_error_condition, to_xml, until  # noqa: E402
from serverproc import (MUC_SERVICE, TIMEOUT, Server, accepts, bin_dir,  # noqa: E402
                        binaries_missing, free_port, run_clients, serving)

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
NS_MUC = "http://jabber.org/protocol/muc"
NS_USER = NS_MUC + "#user"
NS_OWNER = NS_MUC + "#owner"
NS_ADMIN = NS_MUC + "#admin"
NS_INFO = "http://jabber.org/protocol/disco#info"
NS_ITEMS = "http://jabber.org/protocol/disco#items"
NS_DATA = "jabber:x:data"
ROOM = f"room@{MUC_SERVICE}"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS, muc=True,
                 muc_extra="<rooms max-occupants='3' default-max-users='3'/>") as s:
        yield s


def connect(server, user, resource="r"):
    return login(server.starttls_port, user, USERS[user], resource=resource)


def q(ns, name):
    return f"{{{ns}}}{name}"


def codes(e):
    x = e.find(q(NS_USER, "x"))
    return [] if x is None else [s.get("code") for s in x.findall(q(NS_USER, "status"))]


def is_subject(e):
    return local(e) == "message" and e.find("{jabber:client}subject") is not None


def join(c, nick, room=ROOM, x=""):
    """Sends a join; returns what came up to the subject (or the error presence)."""
    c.send(f"<presence to='{room}/{nick}'><x xmlns='{NS_MUC}'>{x}</x></presence>")
    return until(c, lambda e: is_subject(e) or e.get("type") == "error", f"joining {room} as {nick}")


def error_of(e):
    return stanza_error_condition(e)[1]


def owner_submit(c, fields="", room=ROOM):
    form = f"<x xmlns='{NS_DATA}' type='submit'>{fields}</x>"
    return c.iq("set", f"<query xmlns='{NS_OWNER}'>{form}</query>", to=room)


def field(var, value):
    return f"<field var='{var}'><value>{value}</value></field>"


def body_of(e):
    b = e.find("{jabber:client}body")
    return None if b is None else b.text


def test_service_disco_and_domain_items(server):
    alice = connect(server, "alice")
    try:
        info = alice.iq("get", f"<query xmlns='{NS_INFO}'/>", to=MUC_SERVICE)
        assert info.get("type") == "result", to_xml(info)
        query = info.find(q(NS_INFO, "query"))
        identity = query.find(q(NS_INFO, "identity"))
        assert (identity.get("category"), identity.get("type")) == ("conference", "text")
        features = {f.get("var") for f in query.findall(q(NS_INFO, "feature"))}
        assert NS_MUC in features
        # sm lists the service among the domain's items (the router's notices).
        deadline = time.monotonic() + TIMEOUT
        while True:
            items = alice.iq("get", f"<query xmlns='{NS_ITEMS}'/>", to="localhost")
            jids = {i.get("jid") for i in items.iter(q(NS_ITEMS, "item"))}
            if MUC_SERVICE in jids:
                break
            assert time.monotonic() < deadline, f"{MUC_SERVICE} not in {jids}"
            time.sleep(0.05)
        # Unknown requests are answered, not dropped.
        r = alice.iq("get", "<query xmlns='jabber:iq:version'/>", to=MUC_SERVICE)
        assert error_of(r) == "service-unavailable"
        r = alice.iq("get", "<query xmlns='jabber:iq:version'/>", to=f"nowhere@{MUC_SERVICE}")
        assert error_of(r) == "item-not-found"
    finally:
        alice.close()


def test_instant_room_chat_nick_history_and_leave(server):
    alice, bob, carol = connect(server, "alice"), connect(server, "bob"), connect(server, "carol")
    bob2 = connect(server, "bob", "other")
    try:
        got = join(alice, "Alice")
        assert codes(got[0]) == ["110", "170", "201"], to_xml(got[0])
        assert got[1].find("{jabber:client}subject").text is None
        # Locked until the owner accepts the default configuration (XEP-0045 10.1.2).
        got = join(bob, "Bob")
        assert error_of(got[-1]) == "item-not-found"
        assert owner_submit(alice).get("type") == "result"

        got = join(bob, "Bob")
        assert [e.get("from") for e in got] == [f"{ROOM}/Alice", f"{ROOM}/Bob", ROOM]
        assert codes(got[1]) == ["110", "170"], "170: the room is archived"
        item = got[0].find(f"{q(NS_USER, 'x')}/{q(NS_USER, 'item')}")
        assert (item.get("affiliation"), item.get("role"), item.get("jid")) == ("owner", "moderator", None)
        seen = until(alice, lambda e: e.get("from") == f"{ROOM}/Bob", "Bob's presence")[-1]
        assert seen.find(f"{q(NS_USER, 'x')}/{q(NS_USER, 'item')}").get("jid") == bob.jid, \
            "moderators see real JIDs in semi-anonymous rooms"

        assert error_of(join(carol, "Bob")[-1]) == "conflict"

        alice.send(f"<message to='{ROOM}' type='groupchat' id='m1'><body>hello</body></message>")
        for c in (alice, bob):
            m = until(c, lambda e: local(e) == "message" and body_of(e) == "hello", "the room message")[-1]
            assert m.get("from") == f"{ROOM}/Alice" and m.get("id") == "m1"
            sid = m.find("{urn:xmpp:sid:0}stanza-id")
            assert sid is not None and sid.get("by") == ROOM and sid.get("id")
            assert m.find("{urn:xmpp:occupant-id:0}occupant-id") is not None
        # Subject: owners (moderators) may; participants may not by default.
        bob.send(f"<message to='{ROOM}' type='groupchat'><subject>no</subject></message>")
        e = until(bob, lambda e: e.get("type") == "error", "the refused subject")[-1]
        assert error_of(e) == "forbidden"
        alice.send(f"<message to='{ROOM}' type='groupchat'><subject>Topic</subject></message>")
        until(bob, is_subject, "the new subject")

        # Private message, delivered to the occupant's full JID.
        bob.send(f"<message to='{ROOM}/Alice' type='chat'><body>psst</body></message>")
        m = until(alice, lambda e: body_of(e) == "psst", "the private message")[-1]
        assert m.get("from") == f"{ROOM}/Bob" and m.find(q(NS_USER, "x")) is not None

        # An IQ to an occupant is relayed to its session under an id of the room's, and
        # its answer back under the asker's id.
        bob.send(f"<iq to='{ROOM}/Alice' type='get' id='t1'><time xmlns='urn:xmpp:time'/></iq>")
        asked = until(alice, lambda e: local(e) == "iq" and e.get("from") == f"{ROOM}/Bob",
                      "the relayed IQ")[-1]
        assert asked.get("type") == "get" and asked.get("id") != "t1"
        alice.send(f"<iq to='{ROOM}/Bob' type='result' id='{asked.get('id')}'>"
                   "<time xmlns='urn:xmpp:time'><tzo>Z</tzo></time></iq>")
        answer = until(bob, lambda e: local(e) == "iq" and e.get("id") == "t1", "the relayed answer")[-1]
        assert answer.get("from") == f"{ROOM}/Alice" and answer.get("type") == "result"
        # vCard requests go to the account (sm answers for it), not to the session.
        bob.send(f"<iq to='{ROOM}/Alice' type='get' id='vc1'><vCard xmlns='vcard-temp'/></iq>")
        answer = until(bob, lambda e: local(e) == "iq" and e.get("id") == "vc1", "the vCard answer")[-1]
        assert answer.get("from") == f"{ROOM}/Alice"
        assert not [e for e in alice.other if local(e) == "iq" and e.get("from") == f"{ROOM}/Bob"]

        # A child whose prefix is declared on the stanza's own tag reaches everyone
        # well-formed (declared again on the child), live and in history.
        alice.send(f"<message xmlns:a='urn:x' to='{ROOM}' type='groupchat'><body>hi</body><a:b/></message>")
        for c in (alice, bob):
            m = until(c, lambda e: local(e) == "message" and body_of(e) == "hi", "the prefixed message")[-1]
            assert m.find("{urn:x}b") is not None, to_xml(m)

                # Self-ping (XEP-0410): joined answers result; another session of bob is not joined.
        ping = "<ping xmlns='urn:xmpp:ping'/>"
        assert bob.iq("get", ping, to=f"{ROOM}/Bob").get("type") == "result"
        assert error_of(bob2.iq("get", ping, to=f"{ROOM}/Bob")) == "not-acceptable"

        # Nick change: 303 with the new nick, then the new presence.
        bob.send(f"<presence to='{ROOM}/Robert'/>")
        got = until(bob, lambda e: e.get("from") == f"{ROOM}/Robert", "the renamed presence")
        gone = [e for e in got if e.get("type") == "unavailable"][-1]
        assert codes(gone) == ["110", "303"]
        assert gone.find(f"{q(NS_USER, 'x')}/{q(NS_USER, 'item')}").get("nick") == "Robert"
        assert codes(got[-1]) == ["110"]

        # History on join: the last message only, with a delay; the subject last.
        alice.send(f"<message to='{ROOM}' type='groupchat'><body>second</body></message>")
        until(bob, lambda e: body_of(e) == "second", "the second message")
        got = join(carol, "Carol", x="<history maxstanzas='1'/>")
        history = [e for e in got if local(e) == "message" and body_of(e)]
        assert [body_of(e) for e in history] == ["second"]
        assert history[0].find("{urn:xmpp:delay}delay") is not None
        assert got[-1].find("{jabber:client}subject").text == "Topic"

        # Leaving: unavailable to everyone, 110 to the leaver.
        bob.send(f"<presence to='{ROOM}/Robert' type='unavailable'/>")
        e = until(bob, lambda e: e.get("type") == "unavailable", "the leave")[-1]
        assert codes(e) == ["110"]
        until(carol, lambda e: e.get("from") == f"{ROOM}/Robert" and e.get("type") == "unavailable",
              "bob's leave")

        # A client that disconnects without leaving: sm sends the room its unavailable
        # presence (directed presence, RFC 6121 4.6), so no ghost stays.
        join(bob2, "Ghost")
        bob2.close()
        until(carol, lambda e: e.get("from") == f"{ROOM}/Ghost" and e.get("type") == "unavailable",
              "the ghost's leave")
    finally:
        for c in (alice, bob, carol, bob2):
            c.close()


def test_reserved_room_password_members_ban_full_and_destroy(server):
    alice, bob, carol = connect(server, "alice"), connect(server, "bob"), connect(server, "carol")
    alice2 = connect(server, "alice", "two")
    try:
        join(alice, "Alice")
        form = alice.iq("get", f"<query xmlns='{NS_OWNER}'/>", to=ROOM)
        fields = {f.get("var") for f in form.iter(q(NS_DATA, "field"))}
        for var in ["muc#roomconfig_roomname", "muc#roomconfig_persistentroom",
                    "muc#roomconfig_membersonly", "muc#roomconfig_moderatedroom",
                    "muc#roomconfig_passwordprotectedroom", "muc#roomconfig_roomsecret",
                    "muc#roomconfig_whois", "muc#roomconfig_maxusers", "muc#roomconfig_allowpm"]:
            assert var in fields, var
        assert error_of(bob.iq("get", f"<query xmlns='{NS_OWNER}'/>", to=ROOM)) == "forbidden"
        r = owner_submit(alice, field("muc#roomconfig_passwordprotectedroom", 1)
                         + field("muc#roomconfig_roomsecret", "pw")
                         + field("muc#roomconfig_whois", "anyone"))
        assert r.get("type") == "result", to_xml(r)

        assert error_of(join(bob, "Bob")[-1]) == "not-authorized"
        got = join(bob, "Bob", x="<password>pw</password>")
        assert codes(got[-2]) == ["110", "100", "170"], "status 100: the room is non-anonymous"

        # Two sessions of one user share a nick and count once.
        got = join(alice2, "Alice")
        assert codes(got[-2])[0] == "110"
        # Max users is 3 (muc.xml): carol is the third, then nobody.
        join(carol, "Carol", x="<password>pw</password>")
        r = alice.iq("set", f"<query xmlns='{NS_ADMIN}'><item affiliation='member' jid='bob@localhost'/></query>", to=ROOM)
        assert r.get("type") == "result", to_xml(r)

        # Ban: carol leaves with 301 and cannot come back.
        r = alice.iq("set", f"<query xmlns='{NS_ADMIN}'><item affiliation='outcast' jid='carol@localhost'/></query>", to=ROOM)
        assert r.get("type") == "result", to_xml(r)
        e = until(carol, lambda e: e.get("type") == "unavailable" and e.get("from") == f"{ROOM}/Carol",
                  "the ban")[-1]
        assert codes(e) == ["110", "301"]
        assert error_of(join(carol, "Carol", x="<password>pw</password>")[-1]) == "forbidden"
        outcasts = alice.iq("get", f"<query xmlns='{NS_ADMIN}'><item affiliation='outcast'/></query>", to=ROOM)
        assert [i.get("jid") for i in outcasts.iter(q(NS_ADMIN, "item"))] == ["carol@localhost"]

        # Members only: carol (now no longer banned, not a member) needs registration.
        alice.iq("set", f"<query xmlns='{NS_ADMIN}'><item affiliation='none' jid='carol@localhost'/></query>", to=ROOM)
        r = owner_submit(alice, field("muc#roomconfig_membersonly", 1))
        assert r.get("type") == "result"
        assert error_of(join(carol, "Carol", x="<password>pw</password>")[-1]) == "registration-required"

        # Full: with max-users 2 and two occupants, a third (a member) is refused.
        r = owner_submit(alice, field("muc#roomconfig_maxusers", 2))
        assert r.get("type") == "result", to_xml(r)
        # A mediated invitation makes carol a member of the members-only room.
        carol.send("<presence/>")  # available: a message to her bare JID reaches this session
        alice.send(f"<message to='{ROOM}'><x xmlns='{NS_USER}'><invite to='carol@localhost'>"
                   "<reason>come</reason></invite></x></message>")
        m = until(carol, lambda e: e.find(f"{q(NS_USER, 'x')}/{q(NS_USER, 'invite')}") is not None,
                  "the invitation")[-1]
        x = m.find(q(NS_USER, "x"))
        assert m.get("from") == ROOM and x.find(q(NS_USER, "invite")).get("from") == alice.jid
        assert x.findtext(q(NS_USER, "password")) == "pw"
        assert error_of(join(carol, "Carol", x="<password>pw</password>")[-1]) == "service-unavailable"

        alice.send(f"<message to='{ROOM}' type='groupchat'><body>before</body></message>")
        until(bob, lambda e: body_of(e) == "before", "a message to archive")

        # Destroy with an alternate venue: every occupant is told.
        r = alice.iq("set", f"<query xmlns='{NS_OWNER}'><destroy jid='new@{MUC_SERVICE}'>"
                            "<reason>moved</reason></destroy></query>", to=ROOM)
        assert r.get("type") == "result", to_xml(r)
        e = until(bob, lambda e: e.find(f"{q(NS_USER, 'x')}/{q(NS_USER, 'destroy')}") is not None,
                  "the destruction")[-1]
        assert e.get("type") == "unavailable"
        destroy = e.find(f"{q(NS_USER, 'x')}/{q(NS_USER, 'destroy')}")
        assert destroy.get("jid") == f"new@{MUC_SERVICE}"
        assert destroy.find(q(NS_USER, "reason")).text == "moved"
        info = carol.iq("get", f"<query xmlns='{NS_INFO}'/>", to=ROOM)
        assert error_of(info) == "item-not-found"
        # A new room of the same name starts with an empty archive.
        assert codes(join(carol, "Carol")[0]) == ["110", "170", "201"]
        page = carol.iq("set", "<query xmlns='urn:xmpp:mam:2'/>", to=ROOM)
        fin = page.find("{urn:xmpp:mam:2}fin")
        assert fin.findtext("{http://jabber.org/protocol/rsm}set/{http://jabber.org/protocol/rsm}count") == "0"
    finally:
        for c in (alice, bob, carol, alice2):
            c.close()


def test_persistent_room_survives_a_muc_restart(server):
    alice, bob = connect(server, "alice"), connect(server, "bob")
    try:
        join(alice, "Alice")
        r = owner_submit(alice, field("muc#roomconfig_persistentroom", 1)
                         + field("muc#roomconfig_roomname", "Kept")
                         + field("muc#roomconfig_roomdesc", "A kept room"))
        assert r.get("type") == "result", to_xml(r)
        alice.send(f"<message to='{ROOM}' type='groupchat'><subject>Still here</subject></message>")
        until(alice, is_subject, "the subject")
        for n in range(3):
            alice.send(f"<message to='{ROOM}' type='groupchat'><body>kept {n}</body></message>")
            until(alice, lambda e: body_of(e) == f"kept {n}", "the echo")
        r = alice.iq("set", f"<query xmlns='{NS_ADMIN}'><item affiliation='outcast' jid='carol@localhost'/></query>", to=ROOM)
        assert r.get("type") == "result"
        # Storage has it before the restart.
        stored = lambda: "".join(  # noqa: E731
            p.read_text(errors="replace") for p in (server.dir / "spool").rglob("*") if p.is_file())
        server.wait_for(lambda: "Still here" in stored() and "kept 2" in stored(),
                        "the room and its archive in storage")

        server.kill("muc")  # SIGKILL: nothing is saved on the way out
        server.restart("muc")
        # The client's self-ping tells it the occupant is gone; it rejoins.
        ping = "<ping xmlns='urn:xmpp:ping'/>"
        assert error_of(alice.iq("get", ping, to=f"{ROOM}/Alice")) == "not-acceptable"
        got = join(alice, "Alice", x="<history maxstanzas='2'/>")
        # The ban's answer may come a second time: a packet muc handled but had not
        # acknowledged when it was SIGKILLed is delivered again (at least once,
        # docs/protocol.md "Acknowledged links"), and clients ignore a repeated result.
        got = [e for e in got if local(e) != "iq"]
        assert codes(got[0]) == ["110", "170"], "no 201: the room existed"
        # The history comes back from the room's archive.
        assert [body_of(e) for e in got if local(e) == "message" and body_of(e)] == ["kept 1", "kept 2"]
        assert got[-1].find("{jabber:client}subject").text == "Still here"
        item = got[0].find(f"{q(NS_USER, 'x')}/{q(NS_USER, 'item')}")
        assert item.get("affiliation") == "owner"

        # XEP-0313 on the room: the last two messages, paged.
        bob.send(f"<iq type='set' id='mam1' to='{ROOM}'><query xmlns='urn:xmpp:mam:2' queryid='f1'>"
                 "<set xmlns='http://jabber.org/protocol/rsm'><max>2</max><before/></set></query></iq>")
        got = until(bob, lambda e: local(e) == "iq" and e.get("id") == "mam1", "the archive page")
        results = [e for e in got if e.find("{urn:xmpp:mam:2}result") is not None]
        bodies = [r.find(".//{jabber:client}body").text for r in results]
        assert bodies == ["kept 1", "kept 2"]
        result = results[0].find("{urn:xmpp:mam:2}result")
        assert result.get("queryid") == "f1" and result.get("id")
        forwarded = result.find("{urn:xmpp:forward:0}forwarded")
        assert forwarded.find("{urn:xmpp:delay}delay") is not None
        assert forwarded.find("{jabber:client}message").get("from") == f"{ROOM}/Alice"
        fin = got[-1].find("{urn:xmpp:mam:2}fin")
        assert fin.findtext("{http://jabber.org/protocol/rsm}set/{http://jabber.org/protocol/rsm}count") == "3"

        info = bob.iq("get", f"<query xmlns='{NS_INFO}'/>", to=ROOM)
        query = info.find(q(NS_INFO, "query"))
        features = {f.get("var") for f in query.findall(q(NS_INFO, "feature"))}
        assert {"muc_persistent", "muc_public", "muc_open"} <= features
        values = {f.get("var"): f.findtext(q(NS_DATA, "value")) for f in query.iter(q(NS_DATA, "field"))}
        assert values["muc#roominfo_description"] == "A kept room"
        assert values["muc#roominfo_occupants"] == "1"
        items = bob.iq("get", f"<query xmlns='{NS_ITEMS}'/>", to=MUC_SERVICE)
        assert [(i.get("jid"), i.get("name")) for i in items.iter(q(NS_ITEMS, "item"))] == [(ROOM, "Kept")]
    finally:
        for c in (alice, bob):
            c.close()

    carol = connect(server, "carol")
    try:
        assert error_of(join(carol, "Carol")[-1]) == "forbidden", "the ban was kept"
    finally:
        carol.close()


def test_slixmpp_clients_chat_in_a_room(server):
    pytest.importorskip("slixmpp")

    async def test(clients):
        alice = clients.make("alice@localhost/s", USERS["alice"])
        bob = clients.make("bob@localhost/s", USERS["bob"])
        for c in (alice, bob):
            c.register_plugin("xep_0045")
            await c.start()
        got = asyncio.Queue()
        bob.add_event_handler("groupchat_message", lambda m: got.put_nowait(m) if m["body"] else None)
        await asyncio.wait_for(alice.plugin["xep_0045"].join_muc_wait(ROOM, "Alice", maxstanzas=0), TIMEOUT)
        # Accept the default configuration (instant room).
        r = alice.make_iq_set(ito=ROOM)
        r.append(ET.fromstring(f"<query xmlns='{NS_OWNER}'><x xmlns='{NS_DATA}' type='submit'/></query>"))
        await r.send(timeout=TIMEOUT)
        await asyncio.wait_for(bob.plugin["xep_0045"].join_muc_wait(ROOM, "Bob", maxstanzas=0), TIMEOUT)
        assert set(bob.plugin["xep_0045"].get_roster(ROOM)) >= {"Alice", "Bob"}
        alice.send_message(mto=ROOM, mbody="hi bob", mtype="groupchat")
        m = await asyncio.wait_for(got.get(), TIMEOUT)
        assert m["body"] == "hi bob" and m["mucnick"] == "Alice"

    run_clients(test, server.starttls_port, server.tls_port)


def test_a_join_from_a_joined_session_replays_the_join(server):
    """A client that resends its join (after its link flapped) gets the whole join again,
    to that session only, as Prosody does; the others see nothing new."""
    alice, bob = connect(server, "alice"), connect(server, "bob")
    room = f"again@{MUC_SERVICE}"
    try:
        join(alice, "Alice", room=room)
        assert owner_submit(alice, room=room).get("type") == "result"
        join(bob, "Bob", room=room)
        until(alice, lambda e: e.get("from") == f"{room}/Bob", "Bob's presence")
        alice.send(f"<message to='{room}' type='groupchat'><body>before</body></message>")
        until(bob, lambda e: body_of(e) == "before", "the message")
        until(alice, lambda e: body_of(e) == "before", "the message")
        got = join(bob, "Bob", room=room, x="<history maxstanzas='5'/>")
        assert [e.get("from") for e in got] == [f"{room}/Alice", f"{room}/Bob", f"{room}/Alice", room]
        assert codes(got[1]) == ["110", "170"]
        assert body_of(got[2]) == "before" and got[2].find("{urn:xmpp:delay}delay") is not None
        assert is_subject(got[3])
        # Alice sees nothing of it (the same presence): her own message comes next.
        alice.send(f"<message to='{room}' type='groupchat'><body>after</body></message>")
        got = until(alice, lambda e: body_of(e) == "after", "her own message")
        assert not [e for e in got if local(e) == "presence"], [to_xml(e) for e in got]
    finally:
        alice.close()
        bob.close()


def test_two_instances_share_the_rooms(server):
    """A second muc (muc-2) binds the same service: the router gives each room to one of
    them by hashing the room's JID, and rooms on both work."""
    (server.dir / "muc-2.xml").write_text((server.dir / "muc.xml").read_text())
    offset = server.log_size("muc-2")
    server.spawn("muc-2", binary="muc", extra=["--instance", "2"])
    server._wait_connected("muc-2", offset)
    alice, bob = connect(server, "alice"), connect(server, "bob")
    rooms = [f"r{i}@{MUC_SERVICE}" for i in range(8)]
    try:
        for room in rooms:
            join(alice, "Alice", room=room)
            assert owner_submit(alice, room=room).get("type") == "result"
            join(bob, "Bob", room=room)
            alice.send(f"<message to='{room}' type='groupchat'><body>in {room}</body></message>")
            m = until(bob, lambda e: body_of(e) == f"in {room}", f"the message in {room}")[-1]
            assert m.get("from") == f"{room}/Alice"
        served = {name: {r for r in rooms if f"room{{room={r}}}" in server.log(name)}
                  for name in ("muc", "muc-2")}
        assert served["muc"] and served["muc-2"], served
        assert not served["muc"] & served["muc-2"], served
    finally:
        alice.close()
        bob.close()


JABBERD = Path(__file__).resolve().parents[2] / "scripts" / "jabberd"


def jabberd(supervisor_xml, *args):
    env = dict(os.environ, JABBERD_BIN_DIR=str(bin_dir()))
    return subprocess.run([str(JABBERD), *args, "-f", str(supervisor_xml)], env=env,
                          capture_output=True, text=True, timeout=60)


def supervised_pid(supervisor_xml, name):
    for line in jabberd(supervisor_xml, "status").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name and parts[1].isdigit():
            return int(parts[1])
    return None


def test_muc_killed_and_restarted_by_the_supervisor(request, tmp_path):
    """muc is killed (SIGKILL) while a room is active; the supervisor, not the test,
    starts it again; the persistent room is back and its occupants rejoin."""
    if binaries_missing():
        pytest.skip(f"binaries not built in {bin_dir()}")
    server = Server(tmp_path, muc=True)
    server.port, server.starttls_port, server.tls_port = free_port(), free_port(), free_port()
    (tmp_path / "log").mkdir()
    server.write_configs()
    processes = "".join(
        f"<process name='{name}' program='{name}' config={quoteattr(str(tmp_path / (name + '.xml')))}"
        + (f" wait-for='127.0.0.1:{server.port}'" if name == "router" else "") + "/>"
        for name in ("router", "xdb-file", "sm", "muc", "c2s"))
    supervisor_xml = tmp_path / "supervisor.xml"
    supervisor_xml.write_text(
        f"<supervisor><run-dir>{tmp_path / 'run'}</run-dir><log-dir>{tmp_path / 'log'}</log-dir>"
        f"{processes}</supervisor>")
    started = jabberd(supervisor_xml, "start", "--daemon", "--no-build")
    assert started.returncode == 0, started.stdout + started.stderr
    clients = []
    try:
        connected = lambda name: server.log(name).count("connected to the router")  # noqa: E731
        server.wait_for(lambda: accepts(server.starttls_port) and connected("muc") and connected("sm"),
                        "the server to start")
        server.addusers({f"{u}@localhost": p for u, p in USERS.items()})
        alice, bob = connect(server, "alice"), connect(server, "bob")
        clients = [alice, bob]
        join(alice, "Alice")
        assert owner_submit(alice, field("muc#roomconfig_persistentroom", 1)).get("type") == "result"
        join(bob, "Bob")
        server.wait_for(lambda: any((server.dir / "spool").rglob("*muc*")) or "muc:room" in
                        server.log("xdb-file"), "the room in storage")

        pid = supervised_pid(supervisor_xml, "muc")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        server.wait_for(lambda: connected("muc") >= 2, "the supervisor to restart muc", timeout=15)

        ping = "<ping xmlns='urn:xmpp:ping'/>"
        assert error_of(bob.iq("get", ping, to=f"{ROOM}/Bob")) == "not-acceptable"
        got = join(alice, "Alice")
        assert codes(got[-2]) == ["110", "170"], "the room was kept: no 201"
        join(bob, "Bob")
        alice.send(f"<message to='{ROOM}' type='groupchat'><body>back</body></message>")
        until(bob, lambda e: body_of(e) == "back", "a message after the restart")
    finally:
        for c in clients:
            c.close()
        stopped = jabberd(supervisor_xml, "stop")
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            report.sections.append(("server logs", server.logs_text(tail_lines=200)))
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_occupants_are_told_when_the_service_stops(server):
    """SIGTERM to muc: each occupant's session gets its unavailable presence with status
    110 and 332 (XEP-0045: removed because the service goes down) before muc exits."""
    alice = connect(server, "alice")
    try:
        join(alice, "Alice")
        assert owner_submit(alice).get("type") == "result"
        server.kill("muc", signal.SIGTERM)
        got = until(alice, lambda e: local(e) == "presence" and e.get("type") == "unavailable",
                    "the service's shutdown presence")
        assert sorted(codes(got[-1])) == ["110", "332"], to_xml(got[-1])
    finally:
        alice.close()
