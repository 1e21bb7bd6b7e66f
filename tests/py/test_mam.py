"""End-to-end tests of XEP-0313 Message Archive Management (with XEP-0359 stanza ids)
in sm, with slixmpp (plugins xep_0313, xep_0059, xep_0297, xep_0004) as the independent
client: both sides of a conversation archived, the stanza-id of a delivered message is
its archive id, queries by with/start/end/ids, RSM paging both ways with count and
flip-page, errors for unknown ids and fields, archive metadata, preferences and what is
never archived, an archive that survives SIGKILLed sm and xdb-file, and offline
messages that carry the archive's id.

Queries are built by hand (client.Iq()) where the exact <set/> or form matters, and
their <result/> messages are taken from what the client recorded, in arrival order.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_mam.py -q
"""

import asyncio
import signal
import itertools
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import pytest

pytest.importorskip("OpenSSL")
pytest.importorskip("slixmpp")

from serverproc import run_clients, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
NS_CLIENT = "jabber:client"
NS_MAM = "urn:xmpp:mam:2"
NS_SID = "urn:xmpp:sid:0"
NS_RSM = "http://jabber.org/protocol/rsm"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_DATA = "jabber:x:data"
NS_HINTS = "urn:xmpp:hints"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
PLUGINS = ("xep_0030", "xep_0199", "xep_0203", "xep_0297", "xep_0004", "xep_0059", "xep_0313")
QUERY_IDS = itertools.count(1)


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


# -- helpers -------------------------------------------------------------------------------

def make(clients, jid):
    """A slixmpp client that records every message, also those without a <body/> of
    their own (archive results), which slixmpp's 'message' event leaves out."""
    user = jid.split("@")[0]
    c = clients.make(jid, USERS[user], plugins=PLUGINS, record_bodyless=True)
    return c


def show(c):
    return "\n  ".join(str(s) for s in c.stanzas) or "(nothing)"


def stanza_ids(stanza):
    """{by: id} of the XEP-0359 <stanza-id/> elements of a received message."""
    return {e.get("by"): e.get("id") for e in stanza.xml.findall(f"{{{NS_SID}}}stanza-id")}


def error_condition(stanza):
    error = stanza.xml.find(f"{{{NS_CLIENT}}}error")
    if error is None:
        return None
    for child in error:
        if child.tag.startswith(f"{{{NS_STANZAS}}}") and not child.tag.endswith("}text"):
            return child.tag.split("}")[1]
    return None


class Item:
    """One <result/> of a query."""

    def __init__(self, stanza):
        self.stanza = stanza
        result = stanza.xml.find(f"{{{NS_MAM}}}result")
        self.id = result.get("id")
        self.queryid = result.get("queryid")
        forwarded = result.find(f"{{{NS_FORWARD}}}forwarded")
        assert forwarded is not None, str(stanza)
        delay = forwarded.find(f"{{{NS_DELAY}}}delay")
        assert delay is not None and delay.get("stamp"), f"no <delay stamp/> in {stanza}"
        self.stamp = delay.get("stamp")
        self.message = forwarded.find(f"{{{NS_CLIENT}}}message")
        assert self.message is not None, str(stanza)
        self.body = self.message.findtext(f"{{{NS_CLIENT}}}body")
        self.sender = self.message.get("from")
        self.to = self.message.get("to")

    def time(self):
        return datetime.fromisoformat(self.stamp.replace("Z", "+00:00"))

    def __repr__(self):
        return f"<{self.id} {self.sender}->{self.to} {self.body!r} {self.stamp}>"


class Page:
    """The answer to a query: its result items in arrival order and its <fin/>."""

    def __init__(self, iq, items):
        self.iq = iq
        self.items = items
        fin = iq.xml.find(f"{{{NS_MAM}}}fin")
        assert fin is not None, f"no <fin/> in {iq}"
        self.complete = fin.get("complete") in ("true", "1")
        rsm = fin.find(f"{{{NS_RSM}}}set")
        assert rsm is not None, f"no RSM <set/> in {iq}"
        first = rsm.find(f"{{{NS_RSM}}}first")
        self.first = first.text if first is not None else None
        self.first_index = int(first.get("index")) if first is not None and first.get("index") else None
        self.last = rsm.findtext(f"{{{NS_RSM}}}last")
        count = rsm.findtext(f"{{{NS_RSM}}}count")
        self.count = int(count) if count is not None else None

    @property
    def ids(self):
        return [i.id for i in self.items]

    @property
    def bodies(self):
        return [i.body for i in self.items]

    def __repr__(self):
        return (f"Page(complete={self.complete} first={self.first}@{self.first_index} "
                f"last={self.last} count={self.count} items={self.items})")


def query_element(queryid, fields=None, rsm=None, flip=False):
    """<query/> with a form of `fields` ({var: value or [values]}) and an RSM <set/>
    of `rsm` ([(name, text)], text None for an empty element)."""
    q = ET.Element(f"{{{NS_MAM}}}query", {"queryid": queryid})
    if fields:
        form = ET.SubElement(q, f"{{{NS_DATA}}}x", {"type": "submit"})
        ft = ET.SubElement(form, f"{{{NS_DATA}}}field", {"var": "FORM_TYPE", "type": "hidden"})
        ET.SubElement(ft, f"{{{NS_DATA}}}value").text = NS_MAM
        for var, value in fields.items():
            field = ET.SubElement(form, f"{{{NS_DATA}}}field", {"var": var})
            for v in value if isinstance(value, list) else [value]:
                ET.SubElement(field, f"{{{NS_DATA}}}value").text = v
    if rsm is not None:
        s = ET.SubElement(q, f"{{{NS_RSM}}}set")
        for name, text in rsm:
            ET.SubElement(s, f"{{{NS_RSM}}}{name}").text = text
    if flip:
        ET.SubElement(q, f"{{{NS_MAM}}}flip-page")
    return q


async def send_query(c, fields=None, rsm=None, flip=False, to=None):
    """Sends a query (to `to`, else without 'to'); returns (answer iq, its result
    items). The results come before the answer on the same stream, so they were all
    recorded when it arrives."""
    from slixmpp.exceptions import IqError

    queryid = f"q{next(QUERY_IDS)}"
    iq = c.Iq()
    iq["type"] = "set"
    if to is not None:
        iq["to"] = to
    iq.append(query_element(queryid, fields, rsm, flip))
    try:
        answer = await iq.send(timeout=5)
    except IqError as e:
        answer = e.iq
    mine = [s for s in c.stanzas if s.name == "message"
            and (r := s.xml.find(f"{{{NS_MAM}}}result")) is not None and r.get("queryid") == queryid]
    for s in mine:
        c.stanzas.remove(s)
    items = [Item(s) for s in mine]
    for item in items:
        assert str(item.stanza["from"]) in ("", c.boundjid.bare), f"result not from the archive: {item.stanza}"
        assert item.stanza["to"] == c.boundjid, str(item.stanza)
    return answer, items


async def query(c, fields=None, rsm=None, flip=False, to=None):
    """A query that must succeed: its Page."""
    answer, items = await send_query(c, fields, rsm, flip, to)
    assert answer["type"] == "result", f"query {fields} {rsm} refused: {answer}"
    return Page(answer, items)


async def query_error(c, fields=None, rsm=None):
    """A query that must fail: its error condition (and no results)."""
    answer, items = await send_query(c, fields, rsm)
    assert answer["type"] == "error", f"query {fields} {rsm} answered: {answer} {items}"
    assert not items, items
    return error_condition(answer)


async def everything(c, **fields):
    page = await query(c, fields or None, rsm=[("max", "250")])
    assert page.complete and page.count == len(page.items), page
    return page.items


async def converse(a, b, n, start=0):
    """n chat messages alternating a->b and b->a (a first), each awaited at its
    recipient. Returns [(sender, recipient, body, delivered stanza)]."""
    out = []
    for i in range(start, start + n):
        sender, recipient = (a, b) if i % 2 == 0 else (b, a)
        body = f"{sender.boundjid.user} says {i}"
        sender.send_message(mto=recipient.boundjid.bare, mbody=body, mtype="chat")
        got = await recipient.expect_message(body)
        out.append((sender, recipient, body, got))
    return out


def stamp(dt):
    """XEP-0082 DateTime with microseconds."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- archiving and stanza ids -----------------------------------------------------------------

def test_conversation_archived_on_both_sides_with_stanza_ids(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        await alice.online()
        await bob.online()

        info = await alice.plugin["xep_0030"].get_info(jid="alice@localhost", timeout=5)
        features = info["disco_info"]["features"]
        for feature in (NS_MAM, f"{NS_MAM}#extended", NS_SID):
            assert feature in features, f"{feature} not advertised: {features}"

        talk = await converse(alice, bob, 20)
        for sender, recipient, body, got in talk:
            ids = stanza_ids(got)
            assert list(ids) == [recipient.boundjid.bare], f"{body}: {got}"

        for me, other in ((alice, bob), (bob, alice)):
            items = await everything(me)
            assert [i.body for i in items] == [t[2] for t in talk], items
            assert len(set(i.id for i in items)) == 20, items
            times = [i.time() for i in items]
            assert times == sorted(times), items
            for item, (sender, recipient, body, got) in zip(items, talk):
                if sender is me:
                    # As sent: from the sending resource, to the bare JID it was sent to.
                    assert item.sender == str(me.boundjid), item
                    assert item.to == other.boundjid.bare, item
                else:
                    # As received, with the stanza-id it was delivered with.
                    assert item.sender == str(other.boundjid), item
                    assert stanza_ids(got)[me.boundjid.bare] == item.id, f"{item} vs {got}"
                assert item.message.get("type") == "chat", item

        # Addressed to the own bare JID (the archive's address), the same answer.
        page = await query(alice, rsm=[("max", "50")], to="alice@localhost")
        assert page.ids == [i.id for i in await everything(alice)] and page.complete, page
        assert str(page.iq["from"]) in ("", "alice@localhost"), str(page.iq)
        # Someone else's archive is not readable (XEP-0313 9.1: an error, SHOULD be
        # forbidden); no result leaks.
        answer, leaked = await send_query(bob, rsm=[("max", "50")], to="alice@localhost")
        assert answer["type"] == "error" and not leaked, f"{answer} {leaked}"
        assert error_condition(answer) in ("forbidden", "service-unavailable"), str(answer)

        # slixmpp's own MAM client reads the same archive.
        result = await alice.plugin["xep_0313"].retrieve(rsm={"max": 50}, timeout=5)
        got = [m["mam_result"]["forwarded"]["stanza"]["body"] for m in result["mam"]["results"]]
        assert got == [t[2] for t in talk], got
        assert [m["mam_result"]["id"] for m in result["mam"]["results"]] == \
            [i.id for i in await everything(alice)]

    run_clients(test, server.starttls_port, server.tls_port)


def test_forged_stanza_ids_are_removed(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        await alice.online()
        await bob.online()
        msg = alice.make_message(mto="bob@localhost", mbody="forged", mtype="chat")
        msg.append(ET.fromstring(f"<stanza-id xmlns='{NS_SID}' by='bob@localhost' id='forged-id'/>"))
        msg.append(ET.fromstring(f"<stanza-id xmlns='{NS_SID}' by='example.org' id='kept'/>"))
        msg.send()
        got = await bob.expect_message("forged")
        ids = stanza_ids(got)
        assert ids.get("bob@localhost") not in (None, "forged-id"), str(got)
        assert ids.get("example.org") == "kept", str(got)
        assert len(got.xml.findall(f"{{{NS_SID}}}stanza-id")) == 2, str(got)
        items = await everything(bob)
        assert [i.id for i in items] == [ids["bob@localhost"]], items

    run_clients(test, server.starttls_port, server.tls_port)


# -- filters ---------------------------------------------------------------------------------

def test_filter_with_start_end(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        carol = make(clients, "carol@localhost/c")
        for c in (alice, bob, carol):
            await c.online()
        talk = await converse(alice, bob, 6)
        talk += await converse(alice, carol, 4, start=6)
        talk += await converse(alice, bob, 4, start=10)
        everything_ = await everything(alice)
        assert [i.body for i in everything_] == [t[2] for t in talk]

        with_bob = await everything(alice, **{"with": "bob@localhost"})
        assert [i.body for i in with_bob] == [t[2] for t in talk if bob in (t[0], t[1])], with_bob
        with_carol = await everything(alice, **{"with": "carol@localhost"})
        assert [i.body for i in with_carol] == [t[2] for t in talk if carol in (t[0], t[1])], with_carol
        # A full JID matches only that full JID (XEP-0313 4.1.1): what came from bob's
        # resource, not what alice sent to his bare JID.
        with_full = await everything(alice, **{"with": "bob@localhost/b"})
        assert [i.body for i in with_full] == [t[2] for t in talk if t[0] is bob], with_full
        assert await everything(alice, **{"with": "nobody@localhost"}) == []

        # start/end are inclusive; the stamps have microseconds.
        assert all("." in i.stamp for i in everything_), everything_
        times = [i.stamp for i in everything_]
        got = await everything(alice, start=times[5])
        assert [i.id for i in got] == [i.id for i in everything_[5:]], got
        got = await everything(alice, end=times[8])
        assert [i.id for i in got] == [i.id for i in everything_[:9]], got
        got = await everything(alice, start=times[3], end=times[11])
        assert [i.id for i in got] == [i.id for i in everything_[3:12]], got
        # Between two items: a microsecond after one, a microsecond before the next.
        from datetime import timedelta
        micro = timedelta(microseconds=1)
        got = await everything(alice, start=stamp(everything_[3].time() + micro),
                               end=stamp(everything_[11].time() - micro))
        assert [i.id for i in got] == [i.id for i in everything_[4:11]], got
        # Combined with 'with', and in another time zone's notation.
        t = everything_[7].time()
        got = await everything(alice, **{"with": "bob@localhost",
                                         "start": t.astimezone(timezone(timedelta(hours=2))).isoformat()})
        assert [i.body for i in got] == [x[2] for x in talk[7:] if bob in (x[0], x[1])], got
        # Nothing in the future.
        assert await everything(alice, start="2999-01-01T00:00:00Z") == []
        # A bad stamp: bad-request.
        assert await query_error(alice, {"start": "yesterday"}) == "bad-request"

    run_clients(test, server.starttls_port, server.tls_port)


# -- paging -----------------------------------------------------------------------------------

def test_paging_forwards_backwards_count_and_flip(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        await alice.online()
        await bob.online()
        talk = await converse(alice, bob, 20)
        bodies = [t[2] for t in talk]
        all_ids = [i.id for i in await everything(alice)]

        # Forwards, 5 at a time.
        seen, pages = [], []
        rsm = [("max", "5")]
        while True:
            page = await query(alice, rsm=rsm)
            pages.append(page)
            assert len(page.items) == 5, page
            assert page.count == 20, page
            assert (page.first, page.last) == (page.ids[0], page.ids[-1]), page
            assert page.first_index == len(seen), page
            seen += page.items
            if page.complete:
                break
            assert len(pages) < 5, f"no complete='true' after 20 items: {pages}"
            rsm = [("max", "5"), ("after", page.last)]
        assert len(pages) == 4, pages
        assert [i.id for i in seen] == all_ids and [i.body for i in seen] == bodies
        assert not any(p.complete for p in pages[:-1]), pages

        # Backwards from the end (<before/> empty), each page still in chronological order.
        seen, pages = [], []
        rsm = [("max", "5"), ("before", None)]
        while True:
            page = await query(alice, rsm=rsm)
            pages.append(page)
            assert len(page.items) == 5 and page.count == 20, page
            assert (page.first, page.last) == (page.ids[0], page.ids[-1]), page
            seen = page.items + seen
            assert page.first_index == 20 - len(seen), page
            if page.complete:
                break
            assert len(pages) < 5, f"no complete='true' at the beginning: {pages}"
            rsm = [("max", "5"), ("before", page.first)]
        assert len(pages) == 4, pages
        assert [i.id for i in seen] == all_ids and [i.body for i in seen] == bodies
        assert not any(p.complete for p in pages[:-1]), pages
        assert pages[0].ids == all_ids[15:] and pages[-1].ids == all_ids[:5]

        # A page that is not full at the end is complete too.
        page = await query(alice, rsm=[("max", "8"), ("after", all_ids[14])])
        assert page.ids == all_ids[15:] and page.complete, page

        # The count alone (XEP-0059 2.7: max 0).
        page = await query(alice, rsm=[("max", "0")])
        assert page.items == [] and page.count == 20, page
        page = await query(alice, {"with": "bob@localhost"}, rsm=[("max", "0")])
        assert page.count == 20, page

        # Flipped: the same page, newest first.
        plain = await query(alice, rsm=[("max", "5"), ("before", all_ids[12])])
        flipped = await query(alice, rsm=[("max", "5"), ("before", all_ids[12])], flip=True)
        assert plain.ids == all_ids[7:12], plain
        assert flipped.ids == list(reversed(plain.ids)), flipped
        assert (flipped.count, flipped.complete) == (plain.count, plain.complete), flipped
        assert {flipped.first, flipped.last} == {plain.first, plain.last}, flipped
        flipped = await query(alice, rsm=[("max", "3"), ("after", all_ids[2])], flip=True)
        assert flipped.ids == list(reversed(all_ids[3:6])), flipped

        # The plugin's iterator pages through it all as well.
        got = [m["mam_result"]["id"] async for m in alice.plugin["xep_0313"].iterate(rsm={"max": 6})]
        assert got == all_ids, got

    run_clients(test, server.starttls_port, server.tls_port)


def test_ids_after_before_id_and_errors(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        await alice.online()
        await bob.online()
        await converse(alice, bob, 10)
        items = await everything(alice)
        ids = [i.id for i in items]

        # ids: exactly those, in archive order.
        page = await query(alice, {"ids": [ids[7], ids[2], ids[5]]})
        assert page.ids == [ids[2], ids[5], ids[7]], page
        assert [i.body for i in page.items] == [items[n].body for n in (2, 5, 7)]
        page = await query(alice, {"ids": ids[4]})
        assert page.ids == [ids[4]] and page.complete, page

        # after-id / before-id: exclusive bounds, paging forwards within them.
        page = await query(alice, {"after-id": ids[2], "before-id": ids[7]})
        assert page.ids == ids[3:7] and page.complete, page
        page = await query(alice, {"after-id": ids[6]})
        assert page.ids == ids[7:], page
        page = await query(alice, {"before-id": ids[3]})
        assert page.ids == ids[:3], page
        page = await query(alice, {"after-id": ids[2], "before-id": ids[7]}, rsm=[("max", "2")])
        assert page.ids == ids[3:5] and not page.complete and page.count == 4, page

        # Unknown ids: item-not-found, wherever they are.
        assert await query_error(alice, rsm=[("max", "5"), ("after", "no-such-id")]) == "item-not-found"
        assert await query_error(alice, rsm=[("max", "5"), ("before", "no-such-id")]) == "item-not-found"
        assert await query_error(alice, {"after-id": "no-such-id"}) == "item-not-found"
        assert await query_error(alice, {"before-id": "no-such-id"}) == "item-not-found"
        assert await query_error(alice, {"ids": [ids[1], "no-such-id"]}) == "item-not-found"
        # An unknown field: feature-not-implemented.
        assert await query_error(alice, {"{urn:example}full-text": "hello"}) == "feature-not-implemented"
        assert await query_error(alice, {"include-everything": "true"}) == "feature-not-implemented"

    run_clients(test, server.starttls_port, server.tls_port)


def test_query_form_lists_the_fields(server):
    """XEP-0313 4.1.5: <iq type='get'><query xmlns='urn:xmpp:mam:2'/></iq> is answered
    with the form inside <query xmlns='urn:xmpp:mam:2'>, #extended's fields included."""
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        await alice.online()
        iq = alice.Iq()
        iq["type"] = "get"
        iq.append(ET.fromstring(f"<query xmlns='{NS_MAM}'/>"))
        answer = await iq.send(timeout=5)
        form = answer.xml.find(f"{{{NS_MAM}}}query/{{{NS_DATA}}}x")
        assert form is not None, f"no <query xmlns='{NS_MAM}'><x xmlns='{NS_DATA}'/></query> in {answer}"
        assert form.get("type") == "form", str(answer)
        fields = {f.get("var"): f for f in form.findall(f"{{{NS_DATA}}}field")}
        assert fields["FORM_TYPE"].findtext(f"{{{NS_DATA}}}value") == NS_MAM, str(answer)
        assert {"with", "start", "end", "before-id", "after-id", "ids"} <= set(fields), str(answer)
        assert fields["with"].get("type") == "jid-single", str(answer)
        assert fields["ids"].get("type") == "list-multi", str(answer)
        assert fields["ids"].find("{http://jabber.org/protocol/xdata-validate}validate/"
                                  "{http://jabber.org/protocol/xdata-validate}open") is not None, str(answer)
        assert not [f for f in fields.values() if f.find(f"{{{NS_DATA}}}required") is not None], str(answer)
        # And through slixmpp's API.
        got = await alice.plugin["xep_0313"].get_fields(timeout=5)
        assert {"with", "start", "end", "ids"} <= set(got.get_fields()), str(got)

    run_clients(test, server.starttls_port, server.tls_port)


# -- metadata and preferences ---------------------------------------------------------------------

def test_metadata(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        await alice.online()
        await bob.online()

        def bounds(iq):
            meta = iq.xml.find(f"{{{NS_MAM}}}metadata")
            assert meta is not None, str(iq)
            out = {}
            for name in ("start", "end"):
                e = meta.find(f"{{{NS_MAM}}}{name}")
                out[name] = None if e is None else (e.get("id"), e.get("timestamp"))
            return out

        iq = await alice.plugin["xep_0313"].get_archive_metadata(timeout=5)
        assert bounds(iq) == {"start": None, "end": None}, f"an empty archive: {iq}"

        await converse(alice, bob, 7)
        items = await everything(alice)
        iq = await alice.plugin["xep_0313"].get_archive_metadata(timeout=5)
        got = bounds(iq)
        assert got["start"] == (items[0].id, items[0].stamp), f"{iq} vs {items[0]}"
        assert got["end"] == (items[-1].id, items[-1].stamp), f"{iq} vs {items[-1]}"

    run_clients(test, server.starttls_port, server.tls_port)


def prefs_of(iq):
    prefs = iq.xml.find(f"{{{NS_MAM}}}prefs")
    assert prefs is not None, str(iq)
    lists = {}
    for name in ("always", "never"):
        e = prefs.find(f"{{{NS_MAM}}}{name}")
        lists[name] = sorted(j.text for j in e.findall(f"{{{NS_MAM}}}jid")) if e is not None else []
    return prefs.get("default"), lists["always"], lists["never"]


async def prefs_iq(c, kind, payload=None):
    iq = c.Iq()
    iq["type"] = kind
    iq.append(ET.fromstring(payload or f"<prefs xmlns='{NS_MAM}'/>"))
    answer = await iq.send(timeout=5)
    assert answer["type"] == "result", str(answer)
    return answer


def test_preferences_and_what_is_never_archived(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        carol = make(clients, "carol@localhost/c")
        for c in (alice, bob, carol):
            await c.online()

        # The configured default.
        assert prefs_of(await prefs_iq(alice, "get")) == ("always", [], [])
        await converse(alice, bob, 2)

        # default='never': later messages either way stay out of alice's archive and
        # reach her without a stanza-id; bob still archives his side.
        answer = await prefs_iq(alice, "set", f"<prefs xmlns='{NS_MAM}' default='never'/>")
        assert prefs_of(answer)[0] == "never", str(answer)
        assert prefs_of(await prefs_iq(alice, "get")) == ("never", [], [])
        talk = await converse(alice, bob, 4, start=2)
        for sender, recipient, body, got in talk:
            ids = stanza_ids(got)
            if recipient is alice:
                assert ids == {}, f"a stanza-id though alice archives nothing: {got}"
            else:
                assert list(ids) == ["bob@localhost"], str(got)
        assert [i.body for i in await everything(alice)] == ["alice says 0", "bob says 1"]
        assert [i.body for i in await everything(bob)] == [f"{'bob' if n % 2 else 'alice'} says {n}"
                                                          for n in range(6)]

        # Lists: never for carol, always for bob, default never: only bob's archived.
        answer = await prefs_iq(alice, "set", f"<prefs xmlns='{NS_MAM}' default='always'>"
                                              "<always><jid>bob@localhost</jid></always>"
                                              "<never><jid>carol@localhost</jid></never></prefs>")
        assert prefs_of(answer) == ("always", ["bob@localhost"], ["carol@localhost"]), str(answer)
        assert prefs_of(await prefs_iq(alice, "get")) == ("always", ["bob@localhost"], ["carol@localhost"])
        await converse(alice, carol, 2, start=6)
        await converse(alice, bob, 2, start=8)
        assert [i.body for i in await everything(alice)] == ["alice says 0", "bob says 1",
                                                            "alice says 8", "bob says 9"]
        assert len(await everything(carol)) == 2  # carol's own archive has them

        # Never archived: <no-store/>, chat states alone.
        msg = bob.make_message(mto="alice@localhost", mbody="do not keep", mtype="chat")
        msg.append(ET.fromstring(f"<no-store xmlns='{NS_HINTS}'/>"))
        msg.send()
        got = await alice.expect_message("do not keep")
        assert stanza_ids(got) == {}, str(got)
        msg = alice.make_message(mto="bob@localhost", mbody="do not keep either", mtype="chat")
        msg.append(ET.fromstring(f"<no-store xmlns='{NS_HINTS}'/>"))
        msg.send()
        got = await bob.expect_message("do not keep either")
        assert stanza_ids(got) == {}, str(got)
        for sender, recipient in ((bob, alice), (alice, bob)):
            msg = sender.make_message(mto=recipient.boundjid.bare, mtype="chat")
            msg.append(ET.fromstring("<composing xmlns='http://jabber.org/protocol/chatstates'/>"))
            msg["id"] = f"state-{sender.boundjid.user}"
            msg.send()
            state = await recipient.expect("the chat state", lambda s, i=msg["id"]: s.name == "message"
                                           and s["id"] == i)
            assert stanza_ids(state) == {}, str(state)
        for c in (alice, bob):
            bodies = [i.body for i in await everything(c)]
            assert "do not keep" not in bodies and "do not keep either" not in bodies, bodies
        assert len(await everything(alice)) == 4
        assert len(await everything(bob)) == 8

        # Back to always: archived again.
        await prefs_iq(alice, "set", f"<prefs xmlns='{NS_MAM}' default='always'/>")
        talk = await converse(alice, carol, 2, start=10)
        assert stanza_ids(talk[1][3]) != {}
        assert [i.body for i in await everything(alice)][-2:] == ["alice says 10", "carol says 11"]

    run_clients(test, server.starttls_port, server.tls_port)


def test_refused_messages_are_not_archived(server):
    """XEP-0313 6.1: what the server refuses for a user is not in her archive: neither
    a message from a JID she blocked (XEP-0191) nor one she sent to it."""
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        await alice.online()
        await bob.online()
        await converse(alice, bob, 2)
        iq = alice.Iq()
        iq["type"] = "set"
        iq.append(ET.fromstring("<block xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></block>"))
        await iq.send(timeout=5)
        bob.send_message(mto="alice@localhost", mbody="blocked in", mtype="chat")
        await bob.expect("the bounce", lambda s: s.name == "message" and s["type"] == "error")
        alice.send_message(mto="bob@localhost", mbody="blocked out", mtype="chat")
        await alice.expect("the error", lambda s: s.name == "message" and s["type"] == "error")
        assert [i.body for i in await everything(alice)] == ["alice says 0", "bob says 1"]

    run_clients(test, server.starttls_port, server.tls_port)


# -- restarts and offline messages ----------------------------------------------------------------

def test_archive_survives_sm_and_xdb_file_kill(server):
    async def test(clients):
        loop = asyncio.get_running_loop()
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        await alice.online()
        await bob.online()
        talk = await converse(alice, bob, 8)
        before = {c.boundjid.bare: [(i.id, i.body, i.stamp) for i in await everything(c)]
                  for c in (alice, bob)}
        assert [b for _, b, _ in before["alice@localhost"]] == [t[2] for t in talk]

        async def check_again(tag):
            a = make(clients, f"alice@localhost/{tag}")
            b = make(clients, f"bob@localhost/{tag}")
            await a.online()
            await b.online()
            for c in (a, b):
                got = [(i.id, i.body, i.stamp) for i in await everything(c)]
                assert got == before[c.boundjid.bare], f"after {tag}: {got}\nbefore: {before[c.boundjid.bare]}"
            return a, b

        server.kill("sm")
        # alice and bob stay connected (c2s restores their sessions at the new sm).
        await loop.run_in_executor(None, server.restart, "sm")
        alice, bob = await check_again("after-sm")

        server.kill("xdb-file")
        await loop.run_in_executor(None, server.restart, "xdb-file")
        alice, bob = await check_again("after-xdb")

        # New messages get later ids than every old one, on both sides.
        talk = await converse(alice, bob, 2, start=8)
        for c in (alice, bob):
            items = await everything(c)
            assert [(i.id, i.body, i.stamp) for i in items[:8]] == before[c.boundjid.bare]
            assert [i.body for i in items[8:]] == [t[2] for t in talk]
            assert all(i.time() >= items[7].time() for i in items[8:]), items
            by_body = {i.body: i.id for i in items}
            for sender, recipient, body, got in talk:
                if recipient is c:
                    assert stanza_ids(got) == {c.boundjid.bare: by_body[body]}, str(got)

    run_clients(test, server.starttls_port, server.tls_port)


def test_archive_copies_kept_when_sm_and_storage_stop(server):
    """sm sends archive copies in batches a few milliseconds later, and storage answers
    them before they are on disk (flush='later'): stopping sm (SIGTERM) right after a
    message sends its batch first, and stopping xdb-file puts it on disk first."""
    async def test(clients):
        loop = asyncio.get_running_loop()
        alice = make(clients, "alice@localhost/a")
        bob = make(clients, "bob@localhost/b")
        await alice.online()
        await bob.online()
        talk = await converse(alice, bob, 1)
        server.kill("sm", signal.SIGTERM)
        await loop.run_in_executor(None, server.restart, "sm")
        talk += await converse(alice, bob, 1, start=1)
        server.kill("xdb-file", signal.SIGTERM)
        await loop.run_in_executor(None, server.restart, "xdb-file")
        for c in (alice, bob):
            got = [i.body for i in await everything(c)]
            assert got == [t[2] for t in talk], got

    run_clients(test, server.starttls_port, server.tls_port)


def wait_offline_stored(server, user):
    needle = f'op="append" owner={user}@localhost ns="urn:jabberd-rs:offline:0"'
    server.wait_for(lambda: needle in server.log("xdb-file"),
                    f"an offline message for {user} in storage", timeout=5.0)


def test_offline_message_archived_with_the_same_stanza_id(server):
    async def test(clients):
        alice = make(clients, "alice@localhost/a")
        await alice.online()
        alice.send_message(mto="bob@localhost", mbody="while you were out", mtype="chat")
        await asyncio.get_running_loop().run_in_executor(None, wait_offline_stored, server, "bob")

        bob = make(clients, "bob@localhost/b")
        await bob.start()
        # Queried before the offline message is delivered: already archived.
        items = await everything(bob)
        assert [i.body for i in items] == ["while you were out"], items
        assert items[0].sender == "alice@localhost/a"
        bob.send_presence()
        got = await bob.expect_message("while you were out")
        assert got.xml.find(f"{{{NS_DELAY}}}delay") is not None, str(got)
        assert stanza_ids(got) == {"bob@localhost": items[0].id}, f"{got} vs archive item {items[0]}"
        # The sender's archive has it too.
        assert [i.body for i in await everything(alice)] == ["while you were out"]

    run_clients(test, server.starttls_port, server.tls_port)
