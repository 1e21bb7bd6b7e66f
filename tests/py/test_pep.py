"""End-to-end tests of entity capabilities (XEP-0115) and personal eventing (XEP-0163,
XEP-0060 subset, XEP-0223 publish-options) in sm, with slixmpp as the independent
client (plugins xep_0115 for capabilities, xep_0163 for +notify interests, xep_0084
for avatars): notifications only where capabilities say +notify, the last item on
login, access models, publish-options conflicts, OMEMO device lists and bundles, and
one disco#info query per distinct capabilities hash.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_pep.py -q
"""

import asyncio
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("OpenSSL")
pytest.importorskip("slixmpp")

from serverproc import run_clients, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_EVENT = "http://jabber.org/protocol/pubsub#event"
NS_ERRORS = "http://jabber.org/protocol/pubsub#errors"
NS_DELAY = "urn:xmpp:delay"
AVATAR_META = "urn:xmpp:avatar:metadata"
DEVICELIST = "eu.siacs.conversations.axolotl.devicelist"
OMEMO2_DEVICES = "urn:xmpp:omemo:2:devices"
BASE = ("xep_0030", "xep_0199", "xep_0203", "xep_0004", "xep_0115", "xep_0163")


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


# -- helpers -------------------------------------------------------------------------------

def make(clients, jid, plugins=BASE, interests=()):
    """A client with capabilities; `interests` are nodes it wants (+notify)."""
    user = jid.split("@")[0]
    c = clients.make(jid, USERS[user], plugins=plugins, record_bodyless=True)
    c.interests = interests
    c.caps_queries = 0

    def count(iq):
        # The server's queries (slixmpp's own caps plugin queries its contacts too).
        if (iq["type"] == "get" and iq["from"] == "localhost"
                and iq.xml.find("{http://jabber.org/protocol/disco#info}query") is not None):
            c.caps_queries += 1

    from slixmpp.xmlstream.handler import Callback
    from slixmpp.xmlstream.matcher import MatchXPath
    c.register_handler(Callback("count disco#info", MatchXPath("{jabber:client}iq"), count))
    return c


def subscribed_to(contact):
    """A roster push saying the user now receives `contact`'s presence."""
    def check(s):
        if s.name != "iq":
            return False
        for item in s.xml.iter("{jabber:iq:roster}item"):
            if item.get("jid") == contact and item.get("subscription") in ("to", "both"):
                return True
        return False
    return check


async def befriend(a, b):
    """Mutual presence subscription between two available clients."""
    for x, y in ((a, b), (b, a)):
        x.send_presence(pto=y.boundjid.bare, ptype="subscribe")
        await y.expect("the subscription request", lambda s, x=x: s.name == "presence"
                       and s["type"] == "subscribe" and s["from"].bare == x.boundjid.bare)
        y.send_presence(pto=x.boundjid.bare, ptype="subscribed")
        await x.expect("the subscription approved", subscribed_to(y.boundjid.bare))


async def want(c):
    """Adds the client's +notify interests (after login: slixmpp hashes its capabilities
    right only then)."""
    for node in c.interests:
        c.plugin["xep_0163"].add_interest(node)
    await c.plugin["xep_0115"].update_caps(broadcast=False)


async def online(*clients):
    """Logs each client in, asks for its roster (for the pushes) and sends presence."""
    for c in clients:
        await c.start()
        await want(c)
        await c.get_roster(timeout=5)
        c.send_presence()
        await c.settle()


async def request(c, kind, payload, to=None):
    """Sends an IQ with a raw payload; returns the answer's XML or raises IqError."""
    iq = c.Iq()
    iq["type"] = kind
    if to:
        iq["to"] = to
    iq.xml.append(ET.fromstring(payload))
    answer = await iq.send(timeout=5)
    return answer.xml


def publish_xml(node, item_id, payload, **options):
    form = ""
    if options:
        fields = "".join(f"<field var='pubsub#{k}'><value>{v}</value></field>" for k, v in options.items())
        form = ("<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
                f"<value>{NS_PUBSUB}#publish-options</value></field>{fields}</x></publish-options>")
    return (f"<pubsub xmlns='{NS_PUBSUB}'><publish node='{node}'><item id='{item_id}'>{payload}</item>"
            f"</publish>{form}</pubsub>")


def items_xml(node):
    return f"<pubsub xmlns='{NS_PUBSUB}'><items node='{node}'/></pubsub>"


def event_of(stanza, node):
    """The <items/> of a pubsub event about `node` in `stanza`, or None."""
    if stanza.name != "message":
        return None
    for items in stanza.xml.iter(f"{{{NS_EVENT}}}items"):
        if items.get("node") == node:
            return items
    return None


def is_event(node, item_id=None):
    def check(s):
        items = event_of(s, node)
        if items is None:
            return False
        return item_id is None or any(i.get("id") == item_id for i in items.iter(f"{{{NS_EVENT}}}item"))
    return check


def error_of(exc):
    return exc.iq["error"]["condition"], [child.tag for child in exc.iq.xml.find("{jabber:client}error")]


META = f"<metadata xmlns='{AVATAR_META}'><info id='{{id}}' bytes='100' type='image/png' height='32' width='32'/></metadata>"


# -- tests ----------------------------------------------------------------------------------

def test_notifications_follow_capabilities_and_the_last_item_comes_on_login(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/phone", interests=(AVATAR_META,))
        bob = make(clients, "bob@localhost/phone", interests=(AVATAR_META,))
        carol = make(clients, "carol@localhost/phone")
        await online(alice, bob, carol)
        await befriend(alice, bob)
        await befriend(alice, carol)
        await request(alice, "set", publish_xml(AVATAR_META, "av1", META.format(id="av1")))
        got = await bob.expect("alice's avatar metadata", is_event(AVATAR_META, "av1"))
        assert got["from"] == "alice@localhost"
        await alice.expect("her own notification", is_event(AVATAR_META, "av1"))
        # carol's client does not want avatars: nothing for her.
        await carol.settle()
        await alice.settle()
        assert not any(event_of(s, AVATAR_META) is not None for s in carol.stanzas), carol.stanzas

        # bob logs in on a second device: the last item comes with a delay stamp.
        tablet = make(clients, "bob@localhost/tablet", interests=(AVATAR_META,))
        await tablet.start()
        await want(tablet)
        tablet.send_presence()
        last = await tablet.expect("the last item on login", is_event(AVATAR_META, "av1"))
        assert last.xml.find(f"{{{NS_DELAY}}}delay") is not None, last

        # Two distinct capabilities (those that want avatars, carol's): two queries in
        # all, whatever the number of logins.
        total = sum(c.caps_queries for c in (alice, bob, carol, tablet))
        assert total == 2, [(str(c.boundjid), c.caps_queries) for c in (alice, bob, carol, tablet)]

    run_clients(test, server.starttls_port, server.tls_port)


def test_access_models_and_publish_options(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/phone")
        bob = make(clients, "bob@localhost/phone")
        dave = make(clients, "dave@localhost/phone")
        await online(alice, bob, dave)
        await befriend(alice, bob)
        payload = "<note xmlns='urn:example:note'>hi</note>"
        await request(alice, "set", publish_xml("urn:example:secret", "1", payload, access_model="whitelist"))
        await request(alice, "set", publish_xml("urn:example:presence", "1", payload))
        await request(alice, "set", publish_xml("urn:example:open", "1", payload, access_model="open"))

        from slixmpp.exceptions import IqError
        # The presence node: bob (subscribed) reads it, dave (not subscribed) may not.
        answer = await request(bob, "get", items_xml("urn:example:presence"), to="alice@localhost")
        assert answer.find(f".//{{urn:example:note}}note") is not None
        with pytest.raises(IqError) as e:
            await request(dave, "get", items_xml("urn:example:presence"), to="alice@localhost")
        condition, children = error_of(e.value)
        assert condition == "not-authorized" and f"{{{NS_ERRORS}}}presence-subscription-required" in children
        # The whitelist node: nobody but alice.
        with pytest.raises(IqError) as e:
            await request(bob, "get", items_xml("urn:example:secret"), to="alice@localhost")
        condition, children = error_of(e.value)
        assert condition == "not-allowed" and f"{{{NS_ERRORS}}}closed-node" in children
        mine = await request(alice, "get", items_xml("urn:example:secret"))
        assert mine.find(f".//{{urn:example:note}}note") is not None
        # The open node: anyone.
        answer = await request(dave, "get", items_xml("urn:example:open"), to="alice@localhost")
        assert answer.find(f".//{{urn:example:note}}note") is not None
        # A contact may not publish to alice's nodes.
        with pytest.raises(IqError) as e:
            await request(bob, "set", publish_xml("urn:example:open", "2", payload), to="alice@localhost")
        assert error_of(e.value)[0] == "forbidden"

        # publish-options that match the node pass, others conflict.
        await request(alice, "set", publish_xml("urn:example:open", "2", payload, access_model="open"))
        with pytest.raises(IqError) as e:
            await request(alice, "set", publish_xml("urn:example:open", "3", payload, access_model="presence"))
        condition, children = error_of(e.value)
        assert condition == "conflict" and f"{{{NS_ERRORS}}}precondition-not-met" in children

    run_clients(test, server.starttls_port, server.tls_port)


def test_omemo_device_lists_and_bundles(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/phone")
        bob = make(clients, "bob@localhost/phone", interests=(DEVICELIST, OMEMO2_DEVICES))
        dave = make(clients, "dave@localhost/phone")
        await online(alice, bob, dave)
        await befriend(alice, bob)
        # Legacy OMEMO (what Conversations, Dino and Gajim publish).
        devices = "<list xmlns='eu.siacs.conversations.axolotl'><device id='4223'/></list>"
        await request(alice, "set", publish_xml(DEVICELIST, "current", devices, access_model="open"))
        bundle = ("<bundle xmlns='eu.siacs.conversations.axolotl'><signedPreKeyPublic signedPreKeyId='1'>"
                  "AAAA</signedPreKeyPublic><signedPreKeySignature>BBBB</signedPreKeySignature>"
                  "<identityKey>CCCC</identityKey><prekeys><preKeyPublic preKeyId='1'>DDDD</preKeyPublic>"
                  "</prekeys></bundle>")
        await request(alice, "set", publish_xml("eu.siacs.conversations.axolotl.bundles:4223", "current",
                                                bundle, access_model="open", persist_items="true"))
        got = await bob.expect("alice's device list", is_event(DEVICELIST, "current"))
        assert got.xml.find(".//{eu.siacs.conversations.axolotl}device").get("id") == "4223"
        # Anyone may fetch the bundle (open access) to start a session.
        for who in (bob, dave):
            answer = await request(who, "get", items_xml("eu.siacs.conversations.axolotl.bundles:4223"),
                                   to="alice@localhost")
            assert answer.find(".//{eu.siacs.conversations.axolotl}identityKey").text == "CCCC"
        # OMEMO 2: the device list, bundles with max_items=max, one item per device.
        devices2 = "<devices xmlns='urn:xmpp:omemo:2'><device id='7'/></devices>"
        await request(alice, "set", publish_xml(OMEMO2_DEVICES, "current", devices2, access_model="open"))
        await bob.expect("alice's OMEMO 2 device list", is_event(OMEMO2_DEVICES, "current"))
        for device in ("7", "8"):
            bundle2 = f"<bundle xmlns='urn:xmpp:omemo:2'><ik>{device}</ik></bundle>"
            await request(alice, "set", publish_xml("urn:xmpp:omemo:2:bundles", device, bundle2,
                                                    access_model="open", max_items="max"))
        answer = await request(dave, "get", items_xml("urn:xmpp:omemo:2:bundles"), to="alice@localhost")
        ids = sorted(i.get("id") for i in answer.iter(f"{{{NS_PUBSUB}}}item"))
        assert ids == ["7", "8"], ET.tostring(answer)

    run_clients(test, server.starttls_port, server.tls_port)


def caps_ver(info):
    """XEP-0115 5.1 over a disco#info <query/> (ElementTree), SHA-1, base64."""
    import base64
    import hashlib
    ns = "{http://jabber.org/protocol/disco#info}"
    ids = sorted("/".join((i.get("category"), i.get("type"),
                           i.get("{http://www.w3.org/XML/1998/namespace}lang", ""), i.get("name", "")))
                 for i in info.iter(ns + "identity"))
    s = "".join(i + "<" for i in ids)
    s += "".join(f + "<" for f in sorted(f.get("var") for f in info.iter(ns + "feature")))
    forms = []
    for x in info.iter("{jabber:x:data}x"):
        fields = {f.get("var"): sorted(v.text or "" for v in f.iter("{jabber:x:data}value"))
                  for f in x.iter("{jabber:x:data}field")}
        form_type = fields.pop("FORM_TYPE")[0]
        forms.append(form_type + "<" + "".join(var + "<" + "".join(v + "<" for v in vals)
                                               for var, vals in sorted(fields.items())))
    s += "".join(sorted(forms))
    return base64.b64encode(hashlib.sha1(s.encode()).digest()).decode()


def ecaps2_hash(info):
    """XEP-0390 4.1 over a disco#info <query/> without forms, SHA-256, base64."""
    import base64
    import hashlib
    ns = "{http://jabber.org/protocol/disco#info}"
    features = b"".join(sorted(f.get("var").encode() + b"\x1f" for f in info.iter(ns + "feature"))) + b"\x1c"
    identities = b"".join(sorted(
        b"".join(v.encode() + b"\x1f" for v in (i.get("category"), i.get("type"),
                                                i.get("{http://www.w3.org/XML/1998/namespace}lang", ""),
                                                i.get("name", ""))) + b"\x1e"
        for i in info.iter(ns + "identity"))) + b"\x1c"
    assert info.find("{jabber:x:data}x") is None, "forms are not hashed by this helper"
    return base64.b64encode(hashlib.sha256(features + identities + b"\x1c").digest()).decode()


def test_the_server_offers_its_own_capabilities_in_the_stream_features(server):
    import re
    import socket
    import ssl

    def features():
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.tls_port), timeout=5)) as sock:
            sock.sendall(b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' "
                         b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
            data = b""
            while b"</stream:features>" not in data:
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
            return data.decode()

    # c2s asks sm's disco#info when its router link comes up: wait until it is offered.
    server.wait_for(lambda: "server capabilities offered" in server.log("c2s"),
                    "c2s to learn the server's capabilities")
    offered = features()
    c = re.search(r"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='([^']*)' ver='([^']*)'/>",
                  offered)
    assert c, offered
    node, ver = c.groups()
    c2 = re.search(r"<c xmlns='urn:xmpp:caps'><hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>([^<]*)</hash></c>",
                   offered)
    assert c2, offered

    async def test(clients):
        alice = make(clients, "alice@localhost/phone")
        await alice.start()
        info = await request(alice, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>",
                             to="localhost")
        assert caps_ver(info.find("{http://jabber.org/protocol/disco#info}query")) == ver
        assert ecaps2_hash(info.find("{http://jabber.org/protocol/disco#info}query")) == c2.group(1)
        # The node#ver query is answered the same (XEP-0115 6.2).
        info = await request(alice, "get", f"<query xmlns='http://jabber.org/protocol/disco#info' "
                                           f"node='{node}#{ver}'/>", to="localhost")
        assert caps_ver(info.find("{http://jabber.org/protocol/disco#info}query")) == ver

    run_clients(test, server.starttls_port, server.tls_port)
