"""The web edge of c2s: XMPP over WebSocket (RFC 7395) on the HTTP listeners
(`<listen mode="http|https">`) and XEP-0156 discovery (host-meta), with aiohttp's
WebSocket client for exact framing and xmpp.js (@xmpp/client, tests/js/websocket.mjs)
as an independent client.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_websocket.py -q
"""

import asyncio
import base64
import json
import os
import shutil
import ssl
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import aiohttp
import pytest

from serverproc import ROOT, accepts, free_port, serving

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
NS_FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_CLIENT = "jabber:client"
GOOD_ORIGIN = "https://chat.example"
TIMEOUT = 5.0
JS_DIR = ROOT / "tests" / "js"


@pytest.fixture
def server(request, tmp_path):
    http, https = free_port(), free_port()
    extra = (f"<listen address='127.0.0.1' port='{http}' mode='http' secure='true'/>"
             f"<listen address='127.0.0.1' port='{https}' mode='https'/>"
             f"<web allowed-origins='{GOOD_ORIGIN}'/>")
    with serving(request, tmp_path, USERS, c2s_extra=extra) as s:
        s.http_port, s.https_port = http, https
        s.wait_for(lambda: accepts(http) and accepts(https), "the web listeners", watch=["c2s"])
        yield s


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def ws_url(server):
    return f"http://127.0.0.1:{server.http_port}/xmpp-websocket"


class WsClient:
    """A raw RFC 7395 client: one element per message, parsed for the assertions."""

    def __init__(self, ws):
        self.ws = ws

    async def send(self, text):
        await self.ws.send_str(text)

    async def next(self):
        msg = await asyncio.wait_for(self.ws.receive(), TIMEOUT)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return ET.fromstring(msg.data), msg.data

    async def open(self):
        await self.send(f"<open xmlns='{NS_FRAMING}' to='localhost' version='1.0'/>")
        opened, raw = await self.next()
        assert opened.tag == f"{{{NS_FRAMING}}}open", raw
        assert opened.get("from") == "localhost" and opened.get("id") and opened.get("version") == "1.0", raw
        features, raw = await self.next()
        assert features.tag == f"{{{NS_STREAMS}}}features", raw
        return features

    async def login(self, user):
        features = await self.open()
        mechanisms = [m.text for m in features.iter(f"{{{NS_SASL}}}mechanism")]
        assert "PLAIN" in mechanisms, ET.tostring(features)
        assert features.find(f"{{urn:ietf:params:xml:ns:xmpp-tls}}starttls") is None, \
            "no STARTTLS over WebSocket"
        token = base64.b64encode(f"\0{user}\0{USERS[user]}".encode()).decode()
        await self.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        success, raw = await self.next()
        assert success.tag == f"{{{NS_SASL}}}success", raw
        features = await self.open()  # the stream restarts with a new <open/>
        assert features.find(f"{{{NS_BIND}}}bind") is not None, ET.tostring(features)
        await self.send(f"<iq xmlns='{NS_CLIENT}' type='set' id='b1'>"
                        f"<bind xmlns='{NS_BIND}'><resource>web</resource></bind></iq>")
        bound, raw = await self.next()
        assert bound.get("type") == "result", raw
        return bound.find(f".//{{{NS_BIND}}}jid").text


def test_login_chat_and_close_over_websocket(server):
    """A client logs in over WebSocket (open, SASL PLAIN, restart, bind), every message
    from the server is one element qualified on its own (stanzas in jabber:client,
    stream elements with the stream prefix declared), presence and a message to itself
    come back, and <close/> is answered with <close/> before the WebSocket closes."""
    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(ws_url(server), protocols=("xmpp",)) as ws:
                assert ws.protocol == "xmpp"
                c = WsClient(ws)
                jid = await c.login("alice")
                assert jid == "alice@localhost/web"
                await c.send(f"<presence xmlns='{NS_CLIENT}'/>")
                presence, raw = await c.next()
                assert presence.tag == f"{{{NS_CLIENT}}}presence" and presence.get("from") == jid, raw
                await c.send(f"<message xmlns='{NS_CLIENT}' to='{jid}' type='chat' id='m1'>"
                             "<body>to myself &amp; back</body></message>")
                while True:
                    message, raw = await c.next()
                    if message.tag == f"{{{NS_CLIENT}}}message":
                        break
                assert message.findtext(f"{{{NS_CLIENT}}}body") == "to myself & back", raw
                await c.send(f"<close xmlns='{NS_FRAMING}'/>")
                closed, raw = await c.next()
                assert closed.tag == f"{{{NS_FRAMING}}}close", raw
                msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    run(main())


def test_wss_and_the_stream_limits(server):
    """Over HTTPS (the hosts' certificate) the same stream is served; a stanza over the
    stanza limit ends it with a stream error and <close/>, as on TCP."""
    ctx = ssl.create_default_context(cafile=str(Path(server.dir) / "certs" / "localhost.crt"))

    async def main():
        async with aiohttp.ClientSession() as http:
            url = f"https://localhost:{server.https_port}/xmpp-websocket"
            async with http.ws_connect(url, protocols=("xmpp",), ssl=ctx) as ws:
                c = WsClient(ws)
                await c.login("bob")
                await c.send(f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><body>"
                             + "x" * 70000 + "</body></message>")
                error, raw = await c.next()
                assert error.tag == f"{{{NS_STREAMS}}}error", raw
                closed, raw = await c.next()
                assert closed.tag == f"{{{NS_FRAMING}}}close", raw
    run(main())


def test_handshake_rules_and_bad_framing(server):
    """The upgrade needs the `xmpp` subprotocol (400 without) and an allowed Origin (403
    from another page); a message that is not RFC 7395 framing gets a stream error and
    <close/>; unknown paths 404."""
    async def main():
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(ws_url(server))
            assert e.value.status == 400
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(ws_url(server), protocols=("xmpp",),
                                      origin="https://evil.example")
            assert e.value.status == 403
            async with http.ws_connect(ws_url(server), protocols=("xmpp",),
                                       origin=GOOD_ORIGIN) as ws:
                c = WsClient(ws)
                await c.open()
                await c.send("<stream:stream xmlns='jabber:client' "
                             f"xmlns:stream='{NS_STREAMS}' to='localhost'>")
                error, raw = await c.next()
                assert error.tag == f"{{{NS_STREAMS}}}error", raw
                assert error.find("{urn:ietf:params:xml:ns:xmpp-streams}invalid-xml") is not None, raw
                closed, raw = await c.next()
                assert closed.tag == f"{{{NS_FRAMING}}}close", raw
            async with http.get(f"http://127.0.0.1:{server.http_port}/nothing") as r:
                assert r.status == 404
    run(main())


def test_host_meta_lists_the_websocket_endpoint(server):
    """XEP-0156: host-meta (XRD) and host-meta.json name the WebSocket URL of the
    listener asked (from its Host header here), readable from any origin."""
    async def main():
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.http_port}"
            async with http.get(f"{base}/.well-known/host-meta") as r:
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == "*"
                xrd = ET.fromstring(await r.text())
            links = {l.get("rel"): l.get("href")
                     for l in xrd.iter("{http://docs.oasis-open.org/ns/xri/xrd-1.0}Link")}
            assert links["urn:xmpp:alt-connections:websocket"] == \
                f"ws://127.0.0.1:{server.http_port}/xmpp-websocket"
            assert links["urn:xmpp:alt-connections:xbosh"] == \
                f"http://127.0.0.1:{server.http_port}/http-bind"
            async with http.get(f"{base}/.well-known/host-meta.json") as r:
                assert r.status == 200 and r.headers["Content-Type"] == "application/json"
                doc = json.loads(await r.text())
            assert {"rel": "urn:xmpp:alt-connections:websocket",
                    "href": f"ws://127.0.0.1:{server.http_port}/xmpp-websocket"} in doc["links"]
    run(main())


def test_xmppjs_over_ws_and_wss(server):
    """xmpp.js logs one user in over ws:// and one over wss:// (SASL, bind and stream
    management as it negotiates them) and they chat."""
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "@xmpp" / "client").is_dir():
        pytest.fail("node and tests/js/node_modules are needed (scripts/test installs them)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    flags = ["--experimental-websocket"] if int(version.lstrip("v").split(".")[0]) < 22 else []
    env = dict(os.environ, WS_PASSWORD_A=USERS["alice"], WS_PASSWORD_B=USERS["bob"],
               NODE_EXTRA_CA_CERTS=str(Path(server.dir) / "certs" / "localhost.crt"))
    env.pop("NODE_TLS_REJECT_UNAUTHORIZED", None)
    result = subprocess.run(
        [node, *flags, str(JS_DIR / "websocket.mjs"),
         "--ws", ws_url(server).replace("http://", "ws://"),
         "--wss", f"wss://localhost:{server.https_port}/xmpp-websocket"],
        cwd=JS_DIR, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=30)
    output = f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    summary = json.loads(result.stdout)
    assert summary["ok"] is True, output
    # The resource the client asked for (Bind2 adds a suffix of its own to it).
    assert summary["jids"]["a"].startswith("alice@localhost/web"), output
    assert summary["jids"]["b"].startswith("bob@localhost/secure-web"), output
    assert summary["sm"] == {"a": True, "b": True}, output


@pytest.fixture
def proxied(request, tmp_path):
    """An http listener behind a 'proxy' on 127.0.0.1 (trusted for X-Forwarded-For),
    at most 2 connections per address."""
    http = free_port()
    extra = (f"<listen address='127.0.0.1' port='{http}' mode='http' secure='true'/>"
             "<web trusted-proxies='127.0.0.1' max-connections-per-address='2'/>")
    with serving(request, tmp_path, USERS, c2s_extra=extra) as s:
        s.http_port = http
        s.wait_for(lambda: accepts(http), "the web listener", watch=["c2s"])
        yield s


def test_forwarded_client_address_and_connections_per_address(proxied):
    """Behind a trusted proxy the client's address is the one X-Forwarded-For names
    (c2s logs the login from it, and counts its connections by it): a third WebSocket
    of one forwarded address gets 503 while two are open, another address is not
    affected, and one is let in again once one of the two closed."""
    url = f"http://127.0.0.1:{proxied.http_port}/xmpp-websocket"

    def via(address):
        return {"X-Forwarded-For": address}

    async def main():
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(url, protocols=("xmpp",), headers=via("203.0.113.7"))
            await WsClient(first).login("alice")
            proxied.wait_for(lambda: "authenticated peer=203.0.113.7 user=alice@localhost"
                             in proxied.log("c2s"), "the login logged from the forwarded address")
            b1 = await http.ws_connect(url, protocols=("xmpp",), headers=via("198.51.100.9"))
            b2 = await http.ws_connect(url, protocols=("xmpp",), headers=via("198.51.100.9"))
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(url, protocols=("xmpp",), headers=via("198.51.100.9"))
            assert e.value.status == 503
            # Another client behind the same proxy is let in.
            other = await http.ws_connect(url, protocols=("xmpp",), headers=via("192.0.2.44"))
            await other.close()
            await b1.close()
            # The slot frees once the server has seen the close.
            for _ in range(50):
                try:
                    b3 = await http.ws_connect(url, protocols=("xmpp",), headers=via("198.51.100.9"))
                except aiohttp.WSServerHandshakeError:
                    await asyncio.sleep(0.05)
                    continue
                await b3.close()
                break
            else:
                raise AssertionError("no connection let in after one closed")
            await b2.close()
            await first.close()
    run(main())
