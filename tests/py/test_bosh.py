"""BOSH (XEP-0124, XEP-0206) on c2s's HTTP listener (`/http-bind`), driven with raw
HTTP requests (aiohttp) so that rids, holds and terminations are exact.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_bosh.py -q
"""

import asyncio
import base64
import xml.etree.ElementTree as ET

import aiohttp
import pytest

from serverproc import accepts, free_port, serving

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
NS_HTTPBIND = "http://jabber.org/protocol/httpbind"
NS_XBOSH = "urn:xmpp:xbosh"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_CLIENT = "jabber:client"


@pytest.fixture
def server(request, tmp_path):
    http = free_port()
    extra = f"<listen address='127.0.0.1' port='{http}' mode='http' secure='true'/>"
    with serving(request, tmp_path, USERS, c2s_extra=extra) as s:
        s.url = f"http://127.0.0.1:{http}/http-bind"
        s.wait_for(lambda: accepts(http), "the web listener", watch=["c2s"])
        yield s


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Bosh:
    def __init__(self, http, url):
        self.http, self.url, self.rid, self.sid = http, url, 4000, None

    def body(self, content="", **attrs):
        self.rid += 1
        attrs = {"rid": str(self.rid), **({"sid": self.sid} if self.sid else {}), **attrs}
        text = " ".join(f"{k}='{v}'" for k, v in attrs.items())
        return (f"<body xmlns='{NS_HTTPBIND}' xmlns:xmpp='{NS_XBOSH}' {text}>{content}</body>",
                self.rid)

    async def post(self, text, status=200):
        async with self.http.post(self.url, data=text,
                                  headers={"Content-Type": "text/xml; charset=utf-8"}) as r:
            assert r.status == status, (r.status, await r.text())
            return ET.fromstring(await r.text())

    async def send(self, content="", **attrs):
        return await self.post(self.body(content, **attrs)[0])

    async def until(self, predicate, polls=5):
        """Polls (empty requests) until an answer holds an element that satisfies
        predicate; returns it."""
        for _ in range(polls):
            got = await self.send()
            for e in got:
                if predicate(e):
                    return e
        raise AssertionError("not received")


async def create(b, hold="1"):
    """The session request: the answer (sid, parameters, the stream's features)."""
    created = await b.send(to="localhost", wait="2", hold=hold, ver="1.6",
                           **{"xml:lang": "en", "xmpp:version": "1.0"})
    b.sid = created.get("sid")
    assert b.sid and created.get("requests") and created.get("wait") == "2", ET.tostring(created)
    assert created.get(f"{{{NS_XBOSH}}}version") == "1.0", ET.tostring(created)
    features = created.find(f"{{{NS_STREAMS}}}features")
    assert features is not None, ET.tostring(created)
    assert "PLAIN" in [m.text for m in features.iter(f"{{{NS_SASL}}}mechanism")]
    return created


async def login(b, user="alice"):
    """Session request, SASL PLAIN, restart, bind: the full JID."""
    created = await create(b)
    assert created.get("requests") == "2" and created.get("hold") == "1", ET.tostring(created)
    token = base64.b64encode(f"\0{user}\0{USERS[user]}".encode()).decode()
    got = await b.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
    assert got.find(f"{{{NS_SASL}}}success") is not None, ET.tostring(got)
    got = await b.send(to="localhost", **{"xmpp:restart": "true"})
    assert got.find(f"{{{NS_STREAMS}}}features/{{{NS_BIND}}}bind") is not None, ET.tostring(got)
    got = await b.send(f"<iq xmlns='{NS_CLIENT}' type='set' id='b1'>"
                       f"<bind xmlns='{NS_BIND}'><resource>bosh</resource></bind></iq>")
    return got.find(f".//{{{NS_BIND}}}jid").text


def is_policy_violation(body):
    return body.get("type") == "terminate" and body.get("condition") == "policy-violation"


def ping(i):
    return f"<iq xmlns='{NS_CLIENT}' type='get' id='ping{i}'><ping xmlns='urn:xmpp:ping'/></iq>"


def test_login_chat_and_terminate(server):
    """A BOSH client creates a session (sid, wait, requests and the stream features in
    the answer), authenticates, restarts the stream, binds, gets its own presence and a
    message to itself through polls, and terminates the session."""
    async def main():
        async with aiohttp.ClientSession() as http:
            b = Bosh(http, server.url)
            jid = await login(b)
            assert jid == "alice@localhost/bosh"
            got = await b.send(f"<presence xmlns='{NS_CLIENT}'/>"
                               f"<message xmlns='{NS_CLIENT}' to='{jid}' type='chat'>"
                               "<body>over BOSH</body></message>")
            found = [e for e in got if e.tag == f"{{{NS_CLIENT}}}message"]
            if not found:
                found = [await b.until(lambda e: e.tag == f"{{{NS_CLIENT}}}message")]
            assert found[0].findtext(f"{{{NS_CLIENT}}}body") == "over BOSH"
            got = await b.send(f"<presence xmlns='{NS_CLIENT}' type='unavailable'/>",
                               type="terminate")
            assert got.get("type") == "terminate", ET.tostring(got)
            # The session is gone.
            got = await b.post(b.body()[0], status=404)
            assert got.get("type") == "terminate" and got.get("condition") == "item-not-found"
    run(main())


def test_rids_out_of_order_holds_and_errors(server):
    """A request ahead of its turn waits for the one before it; an empty poll is held
    up to `wait` and answered empty; a request with a rid far outside the window ends
    the session (item-not-found, 404); an unknown sid gets 404; CORS preflight works;
    a body that is not a BOSH body is a bad-request."""
    async def main():
        async with aiohttp.ClientSession() as http:
            b = Bosh(http, server.url)
            await login(b)
            first, rid1 = b.body(f"<iq xmlns='{NS_CLIENT}' type='get' id='p1'>"
                                 "<ping xmlns='urn:xmpp:ping'/></iq>")
            second, rid2 = b.body()
            # The second first: it waits for the first, then the ping's answer comes.
            later = asyncio.ensure_future(b.post(second))
            await asyncio.sleep(0.1)
            got_first = await b.post(first)
            got_second = await later
            answers = [e for e in list(got_first) + list(got_second) if e.get("id") == "p1"]
            assert answers and answers[0].get("type") == "result", \
                (ET.tostring(got_first), ET.tostring(got_second))
            # An idle poll comes back empty after `wait` (2 s).
            loop = asyncio.get_running_loop()
            start = loop.time()
            got = await b.send()
            assert len(got) == 0 and loop.time() - start >= 1.5, ET.tostring(got)
            b.rid += 100
            got = await b.post(b.body()[0], status=404)
            assert got.get("condition") == "item-not-found"
            got = await b.post(f"<body xmlns='{NS_HTTPBIND}' rid='1' sid='nope'/>", status=404)
            assert got.get("type") == "terminate"
            got = await b.post("<html/>")
            assert got.get("condition") == "bad-request"
            async with http.options(server.url, headers={"Origin": "https://chat.example",
                                                         "Access-Control-Request-Method": "POST"}) as r:
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
                assert "POST" in r.headers["Access-Control-Allow-Methods"]
    run(main())


def test_too_many_simultaneous_requests_is_a_policy_violation(server):
    """XEP-0124 11: a client with more requests out than `requests` (2) that the
    connection manager has not answered, the last one not a terminate, gets its session
    ended with a `policy-violation` terminate body (HTTP 200), on that request and on
    the ones still out. What the session took in before reaches its recipient, and
    other sessions go on."""
    async def main():
        async with aiohttp.ClientSession() as http:
            bob = Bosh(http, server.url)
            bob_jid = await login(bob, "bob")
            alice = Bosh(http, server.url)
            await login(alice)
            # r (a message for bob, held: nothing comes back for it), then r+2 ahead of
            # its turn (it waits for r+1), then r+1: three out, none answered.
            r, _ = alice.body(f"<message xmlns='{NS_CLIENT}' to='{bob_jid}' type='chat'>"
                              "<body>before the flood</body></message>")
            r1, _ = alice.body(ping(1))
            r2, _ = alice.body(ping(2))
            held = asyncio.ensure_future(alice.post(r))
            await asyncio.sleep(0.2)
            ahead = asyncio.ensure_future(alice.post(r2))
            await asyncio.sleep(0.2)
            assert not held.done() and not ahead.done()
            got = await alice.post(r1)
            assert is_policy_violation(got), ET.tostring(got)
            for earlier in (await held, await ahead):
                assert is_policy_violation(earlier), ET.tostring(earlier)
            # The session is gone.
            got = await alice.post(alice.body()[0], status=404)
            assert got.get("condition") == "item-not-found", ET.tostring(got)
            # The message taken in before reached bob, whose session goes on.
            message = await bob.until(lambda e: e.tag == f"{{{NS_CLIENT}}}message")
            assert message.findtext(f"{{{NS_CLIENT}}}body") == "before the flood"
            got = await bob.send(ping(3))
            answers = [e for e in got if e.get("id") == "ping3"]
            if not answers:
                answers = [await bob.until(lambda e: e.get("id") == "ping3")]
            assert answers[0].get("type") == "result", ET.tostring(got)
            got = await bob.send(type="terminate")
            assert got.get("type") == "terminate" and got.get("condition") is None
    run(main())


def test_too_frequent_empty_requests_are_a_policy_violation(server):
    """XEP-0124 11: with one request held, an empty one less than `polling` (1 s) after
    it ends the session (`policy-violation`); XEP-0124 12: in a polling session
    (`hold='0'`: answered `hold='0'`, `requests='1'`), two empty requests in a row
    within `polling`, the first answered with nothing, end it too."""
    async def main():
        async with aiohttp.ClientSession() as http:
            alice = Bosh(http, server.url)
            await login(alice)
            held = asyncio.ensure_future(alice.send())
            await asyncio.sleep(0.1)
            got = await alice.send()
            assert is_policy_violation(got), ET.tostring(got)
            assert is_policy_violation(await held)
            # A polling session.
            poller = Bosh(http, server.url)
            created = await create(poller, hold="0")
            assert (created.get("hold"), created.get("requests"), created.get("polling")) \
                == ("0", "1", "1"), ET.tostring(created)
            loop = asyncio.get_running_loop()
            start = loop.time()
            got = await poller.send()
            # Answered at once (nothing is held), with nothing.
            assert len(got) == 0 and got.get("type") is None and loop.time() - start < 1
            got = await poller.send()
            assert is_policy_violation(got), ET.tostring(got)
            await poller.post(poller.body()[0], status=404)
    run(main())


def test_compliant_client_is_never_terminated(server):
    """A client that keeps at most `requests` (2) out is never taken as overactive: a
    held poll and a request sending something, two requests at once in either rid
    order, repeatedly; a terminate as one request more than `requests` (XEP-0124 11
    allows it); a polling session polling every `polling` seconds, and sooner after an
    answer that carried something or a request that sent something."""
    async def main():
        async with aiohttp.ClientSession() as http:
            alice = Bosh(http, server.url)
            await login(alice)
            for i in range(5):
                # A held poll, then a request with a ping: the poll comes back empty.
                poll = asyncio.ensure_future(alice.send())
                await asyncio.sleep(0.05)
                sent = asyncio.ensure_future(alice.send(ping(i)))
                got = await poll
                assert len(got) == 0 and got.get("type") is None, ET.tostring(got)
                got = await sent
                assert got.get("type") is None, ET.tostring(got)
                if not [e for e in got if e.get("id") == f"ping{i}"]:
                    await alice.until(lambda e: e.get("id") == f"ping{i}")
                # Two at once, the later rid first.
                first, _ = alice.body(ping(f"{i}a"))
                second, _ = alice.body(ping(f"{i}b"))
                later = asyncio.ensure_future(alice.post(second))
                await asyncio.sleep(0.05)
                answers = [await alice.post(first), await later]
                assert all(a.get("type") is None for a in answers), \
                    [ET.tostring(a) for a in answers]
                ids = {e.get("id") for a in answers for e in a}
                while not {f"ping{i}a", f"ping{i}b"} <= ids:
                    got = await alice.send()
                    assert got.get("type") is None, ET.tostring(got)
                    ids |= {e.get("id") for e in got}
            # Two out (a held poll, a request ahead of its turn) and a terminate: three.
            r, _ = alice.body()
            r1, _ = alice.body(f"<presence xmlns='{NS_CLIENT}' type='unavailable'/>",
                               type="terminate")
            r2, _ = alice.body(ping(9))
            held = asyncio.ensure_future(alice.post(r))
            await asyncio.sleep(0.05)
            ahead = asyncio.ensure_future(alice.post(r2))
            await asyncio.sleep(0.2)
            got = await alice.post(r1)
            assert got.get("type") == "terminate" and got.get("condition") is None, \
                ET.tostring(got)
            for other in (await held, await ahead):
                assert other.get("condition") is None, ET.tostring(other)
            # A polling session that keeps to `polling`.
            poller = Bosh(http, server.url)
            await create(poller, hold="0")
            for _ in range(2):
                got = await poller.send()
                assert got.get("type") is None, ET.tostring(got)
                await asyncio.sleep(1.1)
            # Right after a request that sent something, an empty one may follow.
            token = base64.b64encode(b"\0alice\0alice-pw").decode()
            got = await poller.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
            assert got.get("type") is None, ET.tostring(got)
            got = await poller.send()
            assert got.get("type") is None, ET.tostring(got)
            got = await poller.send(type="terminate")
            assert got.get("type") == "terminate" and got.get("condition") is None
    run(main())
