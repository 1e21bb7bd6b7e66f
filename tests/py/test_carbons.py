"""End-to-end tests of XEP-0280 Message Carbons in sm, with slixmpp (plugin xep_0280)
as the independent client: which resources get <received/> and <sent/> copies, what is
never copied (<private/>, <no-copy/>, groupchat, headline), <disable/>, and resources
that never enabled carbons.  Also: a module left out of sm.xml's <modules> (carbons and
mam here) is not advertised and its requests get service-unavailable.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_carbons.py -q
"""

import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("OpenSSL")
pytest.importorskip("slixmpp")

from serverproc import ROOT, Server, finish_server, run_clients, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
NS_CLIENT = "jabber:client"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_HINTS = "urn:xmpp:hints"
NS_MAM = "urn:xmpp:mam:2"
PLUGINS = ("xep_0030", "xep_0199", "xep_0203", "xep_0297", "xep_0280")


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


# -- helpers -------------------------------------------------------------------------------

def make(clients, jid, plugins=PLUGINS):
    """A slixmpp client that records every message, also those without a <body/> of
    their own (carbons, errors), which slixmpp's 'message' event leaves out."""
    user = jid.split("@")[0]
    c = clients.make(jid, USERS[user], plugins=plugins, record_bodyless=True)
    return c


def forwarded(stanza, wrapper):
    """The message inside <wrapper xmlns=carbons><forwarded> of `stanza`, or None."""
    return stanza.xml.find(f"{{{NS_CARBONS}}}{wrapper}/{{{NS_FORWARD}}}forwarded/{{{NS_CLIENT}}}message")


def body_of(element):
    return element.findtext(f"{{{NS_CLIENT}}}body") if element is not None else None


def is_carbon(wrapper, body):
    def check(s):
        return s.name == "message" and body_of(forwarded(s, wrapper)) == body
    return check


def carbons_of(c, body):
    """Every recorded carbon copy (either wrapper) of a message with `body`."""
    return [s for s in c.stanzas if s.name == "message"
            and body in (body_of(forwarded(s, "received")), body_of(forwarded(s, "sent")))]


def direct(c, body):
    """Recorded messages with `body` that are not carbons."""
    return [s for s in c.stanzas if s.name == "message" and s["body"] == body
            and forwarded(s, "received") is None and forwarded(s, "sent") is None]


def show(c):
    return "\n  ".join(str(s) for s in c.stanzas) or "(nothing)"


def check_wrapper(copy, to, kind):
    """XEP-0280 sections 6 and 7: from the user's bare JID, to the receiving
    resource's full JID, the same type as the original."""
    assert str(copy["from"]) == "alice@localhost", str(copy)
    assert str(copy["to"]) == to, str(copy)
    assert copy.xml.get("type") == kind, str(copy)


def chat(sender, to, body, *extra, mtype="chat"):
    """Sends a message with `body` and extra child elements (XML text)."""
    msg = sender.make_message(mto=to, mbody=body, mtype=mtype)
    for x in extra:
        msg.append(ET.fromstring(x))
    msg.send()


# -- carbons -------------------------------------------------------------------------------

def test_carbons_advertised_and_copies_both_ways(server):
    async def test(clients):
        desk = make(clients, "alice@localhost/desk")
        phone = make(clients, "alice@localhost/phone")
        bob = make(clients, "bob@localhost/b")
        await desk.online(5)
        await phone.online(1)
        await bob.online()

        info = await desk.plugin["xep_0030"].get_info(jid="localhost", timeout=5)
        assert NS_CARBONS in info["disco_info"]["features"], str(info)

        for c in (desk, phone):
            answer = await c.plugin["xep_0280"].enable(timeout=5)
            assert answer["type"] == "result", str(answer)
        # slixmpp's own events fire too.
        events = {"carbon_received": [], "carbon_sent": []}
        for name, got in events.items():
            phone.add_event_handler(name, got.append)
            desk.add_event_handler(name, got.append)

        # bob -> alice's bare JID: the highest priority resource gets the original, the
        # other one a <received/> copy.
        chat(bob, "alice@localhost", "hello alice")
        got = await desk.expect_message("hello alice")
        assert str(got["from"]) == "bob@localhost/b"
        copy = await phone.expect("a <received/> copy", is_carbon("received", "hello alice"))
        check_wrapper(copy, "alice@localhost/phone", "chat")
        inner = forwarded(copy, "received")
        assert inner.get("from") == "bob@localhost/b", str(copy)
        assert inner.get("to") in ("alice@localhost", "alice@localhost/desk"), str(copy)
        assert inner.get("type") == "chat", str(copy)
        for c in (desk, phone):
            await c.settle()
        assert not direct(phone, "hello alice"), show(phone)
        assert not carbons_of(desk, "hello alice"), show(desk)
        assert len(events["carbon_received"]) == 1 and not events["carbon_sent"], events

        # To a full JID (the lower priority one): the others get the copy (section 6:
        # "addressed to a client JID (either bare or full)").
        chat(bob, "alice@localhost/phone", "to the phone")
        await phone.expect_message("to the phone")
        copy = await desk.expect("a <received/> copy on the desk", is_carbon("received", "to the phone"))
        check_wrapper(copy, "alice@localhost/desk", "chat")
        await phone.settle()
        assert not carbons_of(phone, "to the phone"), show(phone)

        # alice's phone -> bob: a <sent/> copy to the desk, none to the phone.
        chat(phone, "bob@localhost", "from the phone")
        got = await bob.expect_message("from the phone")
        assert str(got["from"]) == "alice@localhost/phone"
        copy = await desk.expect("a <sent/> copy", is_carbon("sent", "from the phone"))
        check_wrapper(copy, "alice@localhost/desk", "chat")
        inner = forwarded(copy, "sent")
        assert inner.get("from") == "alice@localhost/phone", str(copy)
        assert inner.get("to") == "bob@localhost", str(copy)
        await phone.settle()
        assert not carbons_of(phone, "from the phone"), show(phone)
        assert len(events["carbon_sent"]) == 1, events

        # A normal message with a body is copied too.
        chat(bob, "alice@localhost", "a normal one", mtype="normal")
        await desk.expect_message("a normal one")
        copy = await phone.expect("a copy of the normal message", is_carbon("received", "a normal one"))
        assert copy.xml.get("type") in (None, "normal"), str(copy)

    run_clients(test, server.starttls_port, server.tls_port)


def test_what_is_not_copied(server):
    async def test(clients):
        desk = make(clients, "alice@localhost/desk")
        phone = make(clients, "alice@localhost/phone")
        bob = make(clients, "bob@localhost/b")
        await desk.online(5)
        await phone.online(1)
        await bob.online()
        for c in (desk, phone):
            await c.plugin["xep_0280"].enable(timeout=5)

        # Inbound <private/>: delivered by RFC 6121 without the marker, no copies.
        chat(bob, "alice@localhost", "private in", f"<private xmlns='{NS_CARBONS}'/>")
        got = await desk.expect_message("private in")
        assert got.xml.find(f"{{{NS_CARBONS}}}private") is None, \
            f"the recipient's server keeps <private/>: {got}"
        # Outbound <private/>: no <sent/> copy; bob (a local user) gets it without the marker.
        chat(desk, "bob@localhost", "private out", f"<private xmlns='{NS_CARBONS}'/>")
        got = await bob.expect_message("private out")
        assert got.xml.find(f"{{{NS_CARBONS}}}private") is None, \
            f"the recipient's server keeps <private/>: {got}"

        # XEP-0334 <no-copy/> both ways.
        chat(bob, "alice@localhost", "no-copy in", f"<no-copy xmlns='{NS_HINTS}'/>")
        await desk.expect_message("no-copy in")
        chat(desk, "bob@localhost", "no-copy out", f"<no-copy xmlns='{NS_HINTS}'/>")
        await bob.expect_message("no-copy out")

        # Group chat (to a full JID, as a room would send it) and headlines, both ways.
        chat(bob, "alice@localhost/desk", "groupchat in", mtype="groupchat")
        await desk.expect_message("groupchat in")
        chat(desk, "bob@localhost/b", "groupchat out", mtype="groupchat")
        await bob.expect_message("groupchat out")
        # A headline to the bare JID goes to every resource (RFC 6121 8.5.2.1.1); neither
        # gets a copy besides.
        chat(bob, "alice@localhost", "headline in", mtype="headline")
        await desk.expect_message("headline in")
        await phone.expect_message("headline in")
        chat(desk, "bob@localhost", "headline out", mtype="headline")
        await bob.expect_message("headline out")

        for c in (desk, phone):
            await c.settle()
        for body in ("private in", "private out", "no-copy in", "no-copy out", "groupchat in",
                     "groupchat out", "headline in", "headline out"):
            for c in (desk, phone):
                assert not carbons_of(c, body), f"{c.boundjid}: {body!r} was copied:\n  {show(c)}"
        for body in ("private in", "no-copy in"):
            assert not direct(phone, body), f"{body!r} reached the phone:\n  {show(phone)}"

        # Control: a plain chat message is copied, so the above say something.
        chat(bob, "alice@localhost", "plain")
        await phone.expect("a copy of the plain message", is_carbon("received", "plain"))

    run_clients(test, server.starttls_port, server.tls_port)


def test_disable_and_resources_that_never_enabled(server):
    async def test(clients):
        desk = make(clients, "alice@localhost/desk")
        phone = make(clients, "alice@localhost/phone")
        never = make(clients, "alice@localhost/never")
        bob = make(clients, "bob@localhost/b")
        await desk.online(5)
        await phone.online(1)
        await never.online(0)
        await bob.online()
        await desk.plugin["xep_0280"].enable(timeout=5)
        await phone.plugin["xep_0280"].enable(timeout=5)
        # Enabling twice is no error (XEP-0280 10.1).
        answer = await phone.plugin["xep_0280"].enable(timeout=5)
        assert answer["type"] == "result"

        chat(bob, "alice@localhost", "one")
        await desk.expect_message("one")
        await phone.expect("a copy of one", is_carbon("received", "one"))
        # A resource that never enabled sends: the enabled ones get <sent/> copies
        # (section 7: whether or not the sender enabled carbons), it gets none.
        chat(never, "bob@localhost", "from never")
        await bob.expect_message("from never")
        await desk.expect("desk's copy of from never", is_carbon("sent", "from never"))
        await phone.expect("phone's copy of from never", is_carbon("sent", "from never"))
        chat(desk, "bob@localhost", "from desk")
        await bob.expect_message("from desk")
        await phone.expect("phone's copy of from desk", is_carbon("sent", "from desk"))
        await never.settle()
        assert not [s for s in never.stanzas if forwarded(s, "received") is not None
                    or forwarded(s, "sent") is not None], show(never)

        # The phone disables: no copies for it any more; the desk still gets them.
        answer = await phone.plugin["xep_0280"].disable(timeout=5)
        assert answer["type"] == "result", str(answer)
        chat(bob, "alice@localhost", "two")
        await desk.expect_message("two")
        chat(desk, "bob@localhost", "three")
        await bob.expect_message("three")
        chat(never, "bob@localhost", "four")
        await bob.expect_message("four")
        await desk.expect("desk's copy of four", is_carbon("sent", "four"))
        for c in (phone, never):
            await c.settle()
        for body in ("two", "three", "four"):
            assert not carbons_of(phone, body), f"{body!r} copied after <disable/>:\n  {show(phone)}"
            assert not carbons_of(never, body), show(never)

        # And enabled again, copies come back.
        await phone.plugin["xep_0280"].enable(timeout=5)
        chat(bob, "alice@localhost", "five")
        await phone.expect("a copy of five", is_carbon("received", "five"))

    run_clients(test, server.starttls_port, server.tls_port)


# -- modules left out of sm.xml ----------------------------------------------------------------

def modules_without(*names):
    """etc/sm.xml's <modules> list without `names`, as XML text."""
    modules = ET.parse(ROOT / "etc" / "sm.xml").getroot().find("modules")
    kept = [m.get("name") for m in modules.findall("module") if m.get("name") not in names]
    assert "carbons" not in kept and "disco" in kept, kept
    return "<modules>" + "".join(f"<module name='{n}'/>" for n in kept) + "</modules>"


class ServerWithout(Server):
    """A Server whose sm.xml loads etc/sm.xml's modules but `left_out`, and has no
    settings element for those (sm refuses settings of a module it does not load)."""

    def __init__(self, directory, left_out, **options):
        super().__init__(directory, sm_extra=modules_without(*left_out), **options)
        self.left_out = left_out

    def sm_config(self):
        root = ET.fromstring(super().sm_config())
        for name in self.left_out:
            for settings in root.findall(name):
                root.remove(settings)
        ET.indent(root)
        return ET.tostring(root, encoding="unicode") + "\n"


@pytest.fixture
def server_without(request, tmp_path):
    s = ServerWithout(tmp_path, ("carbons", "mam"))
    try:
        s.start()
        s.addusers({f"{user}@localhost": password for user, password in USERS.items()})
        yield s
    finally:
        finish_server(request, s)


def test_modules_left_out_are_not_advertised_and_refused(server_without):
    from slixmpp.exceptions import IqError

    server = server_without
    assert "carbons" not in (server.dir / "sm.xml").read_text()

    async def test(clients):
        alice = make(clients, "alice@localhost/a", plugins=PLUGINS + ("xep_0313",))
        await alice.online()
        info = await alice.plugin["xep_0030"].get_info(jid="localhost", timeout=5)
        features = info["disco_info"]["features"]
        assert NS_CARBONS not in features, features
        assert "urn:xmpp:blocking" in features, features  # still listed: disco works
        info = await alice.plugin["xep_0030"].get_info(jid="alice@localhost", timeout=5)
        features = info["disco_info"]["features"]
        assert not [f for f in features if f.startswith(NS_MAM)], features
        assert "urn:xmpp:sid:0" not in features, features

        with pytest.raises(IqError) as refused:
            await alice.plugin["xep_0280"].enable(timeout=5)
        assert refused.value.iq["error"]["condition"] == "service-unavailable", str(refused.value.iq)

        query = alice.Iq()
        query["type"] = "set"
        query.append(ET.fromstring(f"<query xmlns='{NS_MAM}' queryid='q1'/>"))
        with pytest.raises(IqError) as refused:
            await query.send(timeout=5)
        assert refused.value.iq["error"]["condition"] == "service-unavailable", str(refused.value.iq)
        for payload in (f"<metadata xmlns='{NS_MAM}'/>", f"<prefs xmlns='{NS_MAM}'/>"):
            iq = alice.Iq()
            iq["type"] = "get"
            iq.append(ET.fromstring(payload))
            with pytest.raises(IqError) as refused:
                await iq.send(timeout=5)
            assert refused.value.iq["error"]["condition"] == "service-unavailable", \
                str(refused.value.iq)

        # Messages still flow, without stanza-ids (nothing archives them).
        bob = make(clients, "bob@localhost/b")
        await bob.online()
        chat(bob, "alice@localhost", "no archive here")
        got = await alice.expect_message("no archive here")
        assert got.xml.find("{urn:xmpp:sid:0}stanza-id") is None, str(got)

    run_clients(test, server.starttls_port, server.tls_port)
