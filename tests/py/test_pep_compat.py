"""End-to-end tests of the conversions that let old and new clients of one user see the
same data, with slixmpp as the independent client:

- bookmarks: XEP-0402 (PEP native bookmarks) <-> XEP-0048 bookmarks kept in XEP-0049
  private storage and in the PEP node `storage:bookmarks` (XEP-0402 5.3, the `bookmarks`
  module), both ways, with the XEP-0402 events;
- avatars: a XEP-0084 avatar in PEP <-> the vCard photo (XEP-0054) and the XEP-0153 hash
  sm puts in the user's presence (XEP-0398, the `avatars` module), both ways.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_pep_compat.py -q
"""

import base64
import hashlib
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("OpenSSL")
pytest.importorskip("slixmpp")

from serverproc import run_clients, serving  # noqa: E402
from test_pep import (  # noqa: E402
    AVATAR_META,
    BASE,
    NS_EVENT,
    NS_PUBSUB,
    USERS,
    befriend,
    is_event,
    items_xml,
    make,
    online,
    publish_xml,
    request,
)

NS_BM2 = "urn:xmpp:bookmarks:1"
NS_BM = "storage:bookmarks"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
AVATAR_DATA = "urn:xmpp:avatar:data"
NS_UPDATE = "vcard-temp:x:update"
# What XEP-0402 3.1 publishes with.
BM2_OPTIONS = {"max_items": "max", "access_model": "whitelist", "persist_items": "true",
               "send_last_published_item": "never"}
# An old client: XEP-0048 through XEP-0049 and XEP-0223.
OLD = BASE + ("xep_0045", "xep_0049", "xep_0060", "xep_0223", "xep_0048")
# A vCard-avatar client.
VCARD = BASE + ("xep_0054", "xep_0153")


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


async def account_features(c):
    answer = await request(c, "get", f"<query xmlns='{NS_DISCO_INFO}'/>", to=c.boundjid.bare)
    return {f.get("var") for f in answer.iter(f"{{{NS_DISCO_INFO}}}feature")}


def conference2(name, nick):
    return f"<conference xmlns='{NS_BM2}' name='{name}' autojoin='true'><nick>{nick}</nick></conference>"


def legacy_conferences(xml):
    """(jid, name, nick, autojoin) of each XEP-0048 conference under `xml`."""
    out = []
    for c in xml.iter(f"{{{NS_BM}}}conference"):
        nick = c.find(f"{{{NS_BM}}}nick")
        out.append((c.get("jid"), c.get("name"), nick.text if nick is not None else None,
                    c.get("autojoin") in ("1", "true")))
    return sorted(out)


def is_retract(node, item_id):
    def check(s):
        if s.name != "message":
            return False
        for items in s.xml.iter(f"{{{NS_EVENT}}}items"):
            if items.get("node") == node and any(
                    r.get("id") == item_id for r in items.iter(f"{{{NS_EVENT}}}retract")):
                return True
        return False
    return check


async def native_ids(c):
    answer = await request(c, "get", items_xml(NS_BM2))
    return sorted(i.get("id") for i in answer.iter(f"{{{NS_PUBSUB}}}item"))


def test_bookmarks2_and_private_storage_bookmarks_both_ways(server):
    async def test(clients):
        new = make(clients, "alice@localhost/new", interests=(NS_BM2,))
        old = make(clients, "alice@localhost/old", plugins=OLD)
        await online(new, old)
        features = await account_features(new)
        assert {f"{NS_BM2}#compat", f"{NS_BM2}#compat-pep"} <= features, features

        # A new client bookmarks a room: an old one finds it in private storage and in PEP.
        lounge = "lounge@conference.localhost"
        await request(new, "set", publish_xml(NS_BM2, lounge, conference2("Lounge", "al"), **BM2_OPTIONS))
        await new.expect("its own XEP-0402 event", is_event(NS_BM2, lounge))
        private = await old.plugin["xep_0048"].get_bookmarks(method="xep_0049")
        assert legacy_conferences(private.xml) == [(lounge, "Lounge", "al", True)], ET.tostring(private.xml)
        pep = await old.plugin["xep_0048"].get_bookmarks(method="xep_0223")
        assert legacy_conferences(pep.xml) == [(lounge, "Lounge", "al", True)], ET.tostring(pep.xml)

        # The old client stores its list in private storage, a room and a URL more: the
        # new room reaches the new client as a XEP-0402 item, with its event.
        from slixmpp.plugins.xep_0048 import Bookmarks
        dev = "dev@conference.localhost"
        both = Bookmarks()
        both.add_conference(lounge, "al", name="Lounge", autojoin=True)
        both.add_conference(dev, "alice", name="Dev")
        both.add_url("https://example.org/", name="Site")
        await old.plugin["xep_0048"].set_bookmarks(both, method="xep_0049")
        got = await new.expect("the old client's new room", is_event(NS_BM2, dev))
        conference = got.xml.find(f".//{{{NS_BM2}}}conference")
        assert conference.get("name") == "Dev" and conference.find(f"{{{NS_BM2}}}nick").text == "alice"
        assert await native_ids(new) == sorted([dev, lounge])

        # It drops a room: the new client gets the retraction.
        only_dev = Bookmarks()
        only_dev.add_conference(dev, "alice", name="Dev")
        only_dev.add_url("https://example.org/", name="Site")
        await old.plugin["xep_0048"].set_bookmarks(only_dev, method="xep_0049")
        await new.expect("the retraction of the dropped room", is_retract(NS_BM2, lounge))
        assert await native_ids(new) == [dev]

        # The new client retracts the other one: gone from both old forms, the URL stays.
        retract = (f"<pubsub xmlns='{NS_PUBSUB}'><retract node='{NS_BM2}' notify='true'>"
                   f"<item id='{dev}'/></retract></pubsub>")
        await request(new, "set", retract)
        private = await old.plugin["xep_0048"].get_bookmarks(method="xep_0049")
        assert legacy_conferences(private.xml) == [], ET.tostring(private.xml)
        assert private.xml.find(f".//{{{NS_BM}}}url").get("url") == "https://example.org/"
        pep = await old.plugin["xep_0048"].get_bookmarks(method="xep_0223")
        assert legacy_conferences(pep.xml) == [], ET.tostring(pep.xml)

        # An old client using PEP (XEP-0223): the room reaches XEP-0402 too.
        pep_list = Bookmarks()
        pep_list.add_conference("pep@conference.localhost", "al", name="Through PEP")
        await old.plugin["xep_0048"].set_bookmarks(pep_list, method="xep_0223")
        await new.expect("the room stored through PEP", is_event(NS_BM2, "pep@conference.localhost"))
        private = await old.plugin["xep_0048"].get_bookmarks(method="xep_0049")
        assert legacy_conferences(private.xml) == [("pep@conference.localhost", "Through PEP", "al", False)]

    run_clients(test, server.starttls_port, server.tls_port)


# Not real pictures: what matters is the bytes.
IMAGE = bytes.fromhex("89504e470d0a1a0a") + b"alice's avatar"
IMAGE2 = bytes.fromhex("89504e470d0a1a0a") + b"bob's avatar"


def photo_hash(stanza):
    """The XEP-0153 hash in a presence: None without <x/>, '' for <photo/>."""
    x = stanza.xml.find(f"{{{NS_UPDATE}}}x")
    if x is None:
        return None
    photo = x.find(f"{{{NS_UPDATE}}}photo")
    return None if photo is None else (photo.text or "")


def presence_of(jid, photo):
    return lambda s: s.name == "presence" and s["from"].bare == jid and photo_hash(s) == photo


def test_avatar_published_in_pep_appears_as_vcard_photo_and_hash_and_the_other_way(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/phone", interests=(AVATAR_META,))  # PEP avatars
        bob = make(clients, "bob@localhost/pc", plugins=VCARD)  # vCard avatars
        await online(alice, bob)
        await befriend(alice, bob)
        assert "urn:xmpp:pep-vcard-conversion:0" in await account_features(alice)
        # No avatar yet: presence says so.
        await bob.expect("alice's presence without an avatar", presence_of("alice@localhost", ""))

        # alice publishes an avatar in PEP (XEP-0084).
        sha = hashlib.sha1(IMAGE).hexdigest()
        b64 = base64.b64encode(IMAGE).decode()
        # (Public, as Conversations publishes it: only a public avatar goes to the vCard.)
        await request(alice, "set", publish_xml(AVATAR_DATA, sha, f"<data xmlns='{AVATAR_DATA}'>{b64}</data>",
                                                access_model="open"))
        meta = (f"<metadata xmlns='{AVATAR_META}'><info id='{sha}' bytes='{len(IMAGE)}' "
                "type='image/png'/></metadata>")
        await request(alice, "set", publish_xml(AVATAR_META, sha, meta, access_model="open"))
        # bob's client sees the hash change in her presence and reads her vCard.
        await bob.expect("alice's presence with the avatar hash", presence_of("alice@localhost", sha))
        vcard = await bob.plugin["xep_0054"].get_vcard("alice@localhost", cached=False)
        photo = vcard.xml.find(".//{vcard-temp}PHOTO")
        assert photo is not None, ET.tostring(vcard.xml)
        assert photo.find("{vcard-temp}TYPE").text == "image/png"
        assert base64.b64decode(photo.find("{vcard-temp}BINVAL").text) == IMAGE

        # The other way: bob sets a vCard with a photo.
        from slixmpp.plugins.xep_0054 import VCardTemp
        card = VCardTemp()
        card["FN"] = "Bob"
        card["PHOTO"]["TYPE"] = "image/png"
        card["PHOTO"]["BINVAL"] = IMAGE2
        await bob.plugin["xep_0054"].publish_vcard(card)
        sha2 = hashlib.sha1(IMAGE2).hexdigest()
        # alice's client (PEP avatars) gets the metadata event, then the data.
        event = await alice.expect("bob's avatar metadata", is_event(AVATAR_META, sha2))
        info = event.xml.find(f".//{{{AVATAR_META}}}info")
        assert (info.get("id"), info.get("bytes"), info.get("type")) == (sha2, str(len(IMAGE2)), "image/png")
        data = await request(alice, "get", items_xml(AVATAR_DATA), to="bob@localhost")
        item = data.find(f".//{{{NS_PUBSUB}}}item")
        assert item.get("id") == sha2
        assert base64.b64decode(item.find(f"{{{AVATAR_DATA}}}data").text) == IMAGE2
        # and bob's presence carries the hash.
        await alice.expect("bob's presence with the avatar hash", presence_of("bob@localhost", sha2))

        # alice removes her avatar (metadata without <info/>): the vCard photo goes too.
        await request(alice, "set", publish_xml(AVATAR_META, "none", f"<metadata xmlns='{AVATAR_META}'/>"))
        await bob.expect("alice's presence without an avatar again", presence_of("alice@localhost", ""))
        vcard = await bob.plugin["xep_0054"].get_vcard("alice@localhost", cached=False)
        assert vcard.xml.find(".//{vcard-temp}PHOTO") is None, ET.tostring(vcard.xml)

    run_clients(test, server.starttls_port, server.tls_port)
