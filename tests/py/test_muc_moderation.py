"""End-to-end tests of XEP-0425 moderation (retracting a message) in the group chat
service, through router, c2s, sm, xdb-file and muc, with scram_client.py's raw client.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_muc_moderation.py -q
"""

import pytest

pytest.importorskip("OpenSSL")

from scram_client import local, login, stanza_error_condition, to_xml, until  # noqa: E402
from serverproc import MUC_SERVICE, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}
NS_MUC = "http://jabber.org/protocol/muc"
NS_OWNER = NS_MUC + "#owner"
NS_INFO = "http://jabber.org/protocol/disco#info"
NS_DATA = "jabber:x:data"
NS_MAM = "urn:xmpp:mam:2"
NS_MODERATE = "urn:xmpp:message-moderate:1"
NS_RETRACT = "urn:xmpp:message-retract:1"
NS_SID = "urn:xmpp:sid:0"
NS_OID = "urn:xmpp:occupant-id:0"
ROOM = f"room@{MUC_SERVICE}"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS, muc=True) as s:
        yield s


def connect(server, user):
    return login(server.starttls_port, user, USERS[user], resource="r")


def q(ns, name):
    return f"{{{ns}}}{name}"


def body_of(e):
    b = e.find("{jabber:client}body")
    return None if b is None else b.text


def is_subject(e):
    return local(e) == "message" and e.find("{jabber:client}subject") is not None


def join(c, nick):
    c.send(f"<presence to='{ROOM}/{nick}'><x xmlns='{NS_MUC}'/></presence>")
    return until(c, lambda e: is_subject(e) or e.get("type") == "error", f"joining as {nick}")


def configure(c, fields=""):
    form = f"<x xmlns='{NS_DATA}' type='submit'>{fields}</x>"
    r = c.iq("set", f"<query xmlns='{NS_OWNER}'>{form}</query>", to=ROOM)
    assert r.get("type") == "result", to_xml(r)


def say(sender, body, listeners):
    """Sends a groupchat message; returns its stanza-id once every listener has it."""
    sender.send(f"<message to='{ROOM}' type='groupchat'><body>{body}</body></message>")
    ids = set()
    for c in listeners:
        m = until(c, lambda e: local(e) == "message" and body_of(e) == body, f"'{body}'")[-1]
        ids.add(m.find(q(NS_SID, "stanza-id")).get("id"))
    assert len(ids) == 1
    return ids.pop()


def moderate(c, stanza_id, reason="spam"):
    return c.iq("set", f"<moderate id='{stanza_id}' xmlns='{NS_MODERATE}'>"
                       f"<retract xmlns='{NS_RETRACT}'/><reason>{reason}</reason></moderate>", to=ROOM)


def is_retraction(e):
    return local(e) == "message" and e.find(q(NS_RETRACT, "retract")) is not None


def archive(c):
    """The room's whole archive: (result id, forwarded message) pairs."""
    c.send(f"<iq type='set' id='mam' to='{ROOM}'><query xmlns='{NS_MAM}' queryid='f'/></iq>")
    got = until(c, lambda e: local(e) == "iq" and e.get("id") == "mam", "the archive")
    assert got[-1].get("type") == "result", to_xml(got[-1])
    out = []
    for e in got:
        r = e.find(q(NS_MAM, "result"))
        if r is not None:
            out.append((r.get("id"), r.find(f"{{urn:xmpp:forward:0}}forwarded/{{jabber:client}}message")))
    return out


def test_moderators_retract_messages(server):
    alice, bob, carol, dave = (connect(server, u) for u in ("alice", "bob", "carol", "dave"))
    try:
        got = join(alice, "Alice")
        configure(alice)
        alice_oid = got[0].find(q(NS_OID, "occupant-id")).get("id")
        join(bob, "Bob")
        join(carol, "Carol")
        everyone = (alice, bob, carol)
        say(bob, "good 1", everyone)
        spam = say(bob, "buy pills", everyone)
        say(bob, "good 2", everyone)

        info = carol.iq("get", f"<query xmlns='{NS_INFO}'/>", to=ROOM)
        features = {f.get("var") for f in info.iter(q(NS_INFO, "feature"))}
        assert NS_MODERATE in features

        # Participants may not; unknown ids are item-not-found.
        assert stanza_error_condition(moderate(bob, spam))[1] == "forbidden"
        assert stanza_error_condition(moderate(alice, "no-such-id"))[1] == "item-not-found"

        r = moderate(alice, spam)
        assert r.get("type") == "result", to_xml(r)
        retraction_ids = set()
        for c in everyone:
            m = until(c, is_retraction, "the retraction")[-1]
            assert (m.get("from"), m.get("type")) == (ROOM, "groupchat"), to_xml(m)
            retract = m.find(q(NS_RETRACT, "retract"))
            assert retract.get("id") == spam
            moderated = retract.find(q(NS_MODERATE, "moderated"))
            assert moderated.get("by") == f"{ROOM}/Alice"
            assert moderated.find(q(NS_OID, "occupant-id")).get("id") == alice_oid
            assert retract.findtext(q(NS_RETRACT, "reason")) == "spam"
            sid = m.find(q(NS_SID, "stanza-id"))
            assert sid.get("by") == ROOM
            retraction_ids.add(sid.get("id"))
        assert len(retraction_ids) == 1

        # The archive holds the tombstone in the message's place, then the retraction.
        items = archive(alice)
        assert [i for i, _ in items][1] == spam
        assert [body_of(m) for _, m in items] == ["good 1", None, "good 2", None]
        tomb = items[1][1]
        assert tomb.get("from") == f"{ROOM}/Bob" and tomb.get("type") == "groupchat"
        assert "buy pills" not in to_xml(tomb)
        retracted = tomb.find(q(NS_RETRACT, "retracted"))
        assert retracted is not None and retracted.get("stamp"), to_xml(tomb)
        moderated = retracted.find(q(NS_MODERATE, "moderated"))
        assert moderated.get("by") == f"{ROOM}/Alice"
        assert moderated.find(q(NS_OID, "occupant-id")).get("id") == alice_oid
        assert retracted.findtext(q(NS_RETRACT, "reason")) == "spam"
        assert tomb.find(q(NS_OID, "occupant-id")) is not None, "the author's occupant id stays"
        assert items[3][0] == retraction_ids.pop()
        assert items[3][1].find(q(NS_RETRACT, "retract")).get("id") == spam

        # A newcomer's history lacks it.
        got = join(dave, "Dave")
        history = [e for e in got if local(e) == "message" and not is_subject(e)]
        assert [body_of(e) for e in history] == ["good 1", "good 2"], [to_xml(e) for e in history]
    finally:
        for c in (alice, bob, carol, dave):
            c.close()


def test_history_read_back_from_the_archive_lacks_retracted_messages(server):
    alice, bob = connect(server, "alice"), connect(server, "bob")
    try:
        join(alice, "Alice")
        configure(alice, "<field var='muc#roomconfig_persistentroom'><value>1</value></field>")
        say(alice, "kept", [alice])
        spam = say(alice, "oops", [alice])
        assert moderate(alice, spam).get("type") == "result"
        until(alice, is_retraction, "the retraction")

        server.kill("muc")
        server.restart("muc")
        got = join(bob, "Bob")
        history = [e for e in got if local(e) == "message" and not is_subject(e)]
        assert [body_of(e) for e in history] == ["kept"], [to_xml(e) for e in history]
        # Retracting it again (the tombstone is still in the archive) is harmless.
        join(alice, "Alice")
        assert moderate(alice, spam).get("type") == "result"
        until(bob, is_retraction, "the second retraction")
        assert [body_of(m) for _, m in archive(bob)] == ["kept", None, None, None]
    finally:
        alice.close()
        bob.close()
