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

USERS = {"alice": "alice-pw"}
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


async def login(b):
    """Session request, SASL PLAIN, restart, bind: the full JID."""
    created = await b.send(to="localhost", wait="2", hold="1", ver="1.6",
                           **{"xml:lang": "en", "xmpp:version": "1.0"})
    b.sid = created.get("sid")
    assert b.sid and created.get("requests") and created.get("wait") == "2", ET.tostring(created)
    assert created.get(f"{{{NS_XBOSH}}}version") == "1.0", ET.tostring(created)
    features = created.find(f"{{{NS_STREAMS}}}features")
    assert features is not None, ET.tostring(created)
    assert "PLAIN" in [m.text for m in features.iter(f"{{{NS_SASL}}}mechanism")]
    token = base64.b64encode(b"\0alice\0alice-pw").decode()
    got = await b.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
    assert got.find(f"{{{NS_SASL}}}success") is not None, ET.tostring(got)
    got = await b.send(to="localhost", **{"xmpp:restart": "true"})
    assert got.find(f"{{{NS_STREAMS}}}features/{{{NS_BIND}}}bind") is not None, ET.tostring(got)
    got = await b.send(f"<iq xmlns='{NS_CLIENT}' type='set' id='b1'>"
                       f"<bind xmlns='{NS_BIND}'><resource>bosh</resource></bind></iq>")
    return got.find(f".//{{{NS_BIND}}}jid").text


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
