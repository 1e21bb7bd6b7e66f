"""End-to-end tests of the upload component (XEP-0363 HTTP File Upload): slixmpp's
xep_0363 plugin finds the service in the domain's disco#items, asks for a slot and PUTs
the file over HTTPS; a second client downloads it with http.client (certificate checks
off: the test server's certificate is self-signed); limits, expiry, tampered URLs,
interrupted uploads and ranges.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_upload.py -q
"""

import http.client
import os
import re
import xml.etree.ElementTree as ET
import socket
import ssl
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("OpenSSL")
slixmpp = pytest.importorskip("slixmpp")
aiohttp = pytest.importorskip("aiohttp")
from slixmpp import JID  # noqa: E402
from slixmpp.exceptions import IqError  # noqa: E402

from serverproc import TIMEOUT, run_clients, serving  # noqa: E402

SERVICE = "upload.localhost"
NS = "urn:xmpp:http:upload:0"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
PLUGINS = ("xep_0030", "xep_0199", "xep_0363")
LIMITS = "<files max-size='1M'/><quota bytes='1536K' window='3600'/>"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS, upload=True, upload_extra=LIMITS) as s:
        yield s


@pytest.fixture(autouse=True)
def unverified_aiohttp(monkeypatch):
    """slixmpp's plugin PUTs with aiohttp, which checks certificates: not here."""
    from slixmpp.plugins.xep_0363 import http_upload

    def session(**kwargs):
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False), **kwargs)

    monkeypatch.setattr(http_upload, "ClientSession", session)


def https(server, method, url, body=None, headers=None):
    """One request to the upload service; returns (status, headers, body)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", server.upload_port, context=ctx,
                                       timeout=TIMEOUT)
    try:
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


async def slot(client, name, size, content_type):
    iq = await client.plugin["xep_0363"].request_slot(
        JID(SERVICE), name, size, content_type, timeout=TIMEOUT)
    s = iq["http_upload_slot"]
    return s["put"]["url"], s["get"]["url"]


def test_upload_is_discovered_and_files_download_byte_identical(server, tmp_path):
    data = os.urandom(300_000)
    path = tmp_path / "holiday photo.png"
    path.write_bytes(data)

    async def test(clients):
        alice = clients.make("alice@localhost/a", "alice-pw", plugins=PLUGINS)
        await alice.start()
        items = await alice.plugin["xep_0030"].get_items(jid="localhost", timeout=TIMEOUT)
        assert SERVICE in {str(j) for j, _n, _m in items["disco_items"]["items"]}
        info = await alice.plugin["xep_0030"].get_info(jid=SERVICE, timeout=TIMEOUT)
        assert NS in info["disco_info"]["features"]
        url = await alice.plugin["xep_0363"].upload_file(path, timeout=TIMEOUT)
        assert alice.plugin["xep_0363"].max_file_size == 1024 * 1024
        assert url.startswith(f"https://localhost:{server.upload_port}/")
        assert url.endswith("/holiday_photo.png")
        return url

    urls = []

    async def run(clients):
        urls.append(await test(clients))

    run_clients(run, server.starttls_port, server.tls_port)
    url = urls[0]
    # Anyone with the URL downloads it: a second client, no XMPP needed.
    status, headers, body = https(server, "GET", url)
    assert status == 200
    assert body == data
    assert headers["content-type"] == "image/png"
    assert headers["content-length"] == str(len(data))
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["content-disposition"].startswith("inline")
    status, headers, body = https(server, "HEAD", url)
    assert (status, body, headers["content-length"]) == (200, b"", str(len(data)))
    # Ranges.
    status, headers, body = https(server, "GET", url, headers={"Range": "bytes=1000-1999"})
    assert status == 206 and body == data[1000:2000]
    assert headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    status, _h, body = https(server, "GET", url, headers={"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:]
    status, headers, _b = https(server, "GET", url, headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
    # CORS preflight.
    status, headers, _b = https(server, "OPTIONS", url)
    assert status == 204 and "PUT" in headers["access-control-allow-methods"]


def test_active_content_is_an_attachment_and_a_slot_is_used_once(server):
    async def test(clients):
        bob = clients.make("bob@localhost/b", "bob-pw", plugins=PLUGINS)
        await bob.start()
        put, get = await slot(bob, "page.html", 12, "text/html")
        headers = {"Content-Type": "text/html", "Content-Length": "12"}
        assert https(server, "PUT", put, b"<b>hello</b>", headers)[0] == 201
        status, h, body = https(server, "GET", get)
        assert (status, body) == (200, b"<b>hello</b>")
        assert h["content-type"] == "text/html"
        assert h["content-disposition"].startswith("attachment")
        assert h["x-content-type-options"] == "nosniff"
        # The slot is spent.
        assert https(server, "PUT", put, b"<b>HELLO</b>", headers)[0] == 409
        assert https(server, "GET", get)[2] == b"<b>hello</b>"

    run_clients(test, server.starttls_port, server.tls_port)


def test_oversize_and_over_quota_are_refused(server):
    async def test(clients):
        alice = clients.make("alice@localhost/a", "alice-pw", plugins=PLUGINS)
        await alice.start()
        with pytest.raises(IqError) as e:
            await slot(alice, "big.bin", 2 * 1024 * 1024, "application/octet-stream")
        assert e.value.iq["error"]["condition"] == "not-acceptable"
        too_large = e.value.iq.xml.find(f".//{{{NS}}}file-too-large/{{{NS}}}max-file-size")
        assert too_large is not None and too_large.text == str(1024 * 1024)
        # The quota (1.5 MiB per hour) counts the slots granted.
        await slot(alice, "one.bin", 1024 * 1024, "application/octet-stream")
        with pytest.raises(IqError) as e:
            await slot(alice, "two.bin", 1024 * 1024, "application/octet-stream")
        assert e.value.iq["error"]["condition"] == "resource-constraint"
        assert e.value.iq["error"]["type"] == "wait"
        # ... saying when to retry (XEP-0363 4): when the first slot leaves the hour.
        retry = e.value.iq.xml.find(f".//{{{NS}}}retry")
        assert retry is not None, e.value.iq
        stamp = retry.get("stamp")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp), stamp
        when = time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert 3500 < when - time.time() < 3700, stamp
        # ... per user.
        bob = clients.make("bob@localhost/b", "bob-pw", plugins=PLUGINS)
        await bob.start()
        await slot(bob, "two.bin", 1024 * 1024, "application/octet-stream")

    run_clients(test, server.starttls_port, server.tls_port)


def test_content_type_of_puts(server):
    async def test(clients):
        alice = clients.make("alice@localhost/a", "alice-pw", plugins=PLUGINS)
        await alice.start()
        # Only the media type counts, in any case; parameters are ignored.
        put, get = await slot(alice, "a.txt", 5, "text/plain")
        assert https(server, "PUT", put, b"hello", {"Content-Type": "Text/Plain; charset=utf-8",
                                                   "Content-Length": "5"})[0] == 201
        status, h, _b = https(server, "GET", get)
        assert (status, h["content-type"]) == (200, "text/plain")
        # No Content-Type at all: fine (served with the signed type).
        put, get = await slot(alice, "b.png", 4, "image/png")
        assert https(server, "PUT", put, b"\x89PNG", {"Content-Length": "4"})[0] == 201
        assert https(server, "GET", get)[1]["content-type"] == "image/png"
        # A slot asked for without a type takes any, served as application/octet-stream.
        iq = alice.make_iq_get(ito=SERVICE)
        iq.append(ET.fromstring(f"<request xmlns='{NS}' filename='c.html' size='4'/>"))
        reply = await iq.send(timeout=TIMEOUT)
        put = reply["http_upload_slot"]["put"]["url"]
        get = reply["http_upload_slot"]["get"]["url"]
        assert https(server, "PUT", put, b"<b/>", {"Content-Type": "text/html",
                                                   "Content-Length": "4"})[0] == 201
        status, h, body = https(server, "GET", get)
        assert (status, body) == (200, b"<b/>")
        assert h["content-type"] == "application/octet-stream"
        assert h["content-disposition"].startswith("attachment")

    run_clients(test, server.starttls_port, server.tls_port)


def tls_connection(server, source="127.0.0.1"):
    """A TLS connection to the upload service from `source`; None when it is closed
    (refused) instead of completing the handshake."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", server.upload_port), timeout=TIMEOUT,
                                   source_address=(source, 0))
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, OSError):
        raw.close()
        return None


def test_connections_per_address_are_limited_without_blocking_others(request, tmp_path):
    with serving(request, tmp_path, {"alice": "alice-pw"}, upload=True,
                 upload_extra="<connections per-address='2'/>") as server:
        first = tls_connection(server)
        second = tls_connection(server)
        assert first is not None and second is not None
        # A third from the same address is closed at once ...
        started = time.monotonic()
        assert tls_connection(server) is None
        assert time.monotonic() - started < 2
        # ... while another address is served.
        other = tls_connection(server, source="127.0.0.2")
        assert other is not None
        other.sendall(b"OPTIONS / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert other.recv(100).startswith(b"HTTP/1.1 204")
        other.close()
        # A place freed is taken again.
        first.close()
        deadline = time.monotonic() + TIMEOUT
        while True:
            third = tls_connection(server)
            if third is not None:
                break
            assert time.monotonic() < deadline, "the place was not freed"
            time.sleep(0.1)
        third.close()
        second.close()


def test_tampered_urls_and_hostile_puts_are_refused(server):
    async def test(clients):
        alice = clients.make("alice@localhost/a", "alice-pw", plugins=PLUGINS)
        await alice.start()
        put, get = await slot(alice, "notes.txt", 5, "text/plain")
        ok = {"Content-Type": "text/plain", "Content-Length": "5"}
        # A signed size changed: bad signature.
        assert https(server, "PUT", put.replace("size=5", "size=50"), b"x" * 50,
                     {"Content-Type": "text/plain", "Content-Length": "50"})[0] == 403
        assert https(server, "PUT", put.replace("type=text%2Fplain", "type=text%2Fhtml"),
                     b"<b/>1", {"Content-Type": "text/html", "Content-Length": "5"})[0] == 403
        assert https(server, "PUT", put[:-3] + "AAA", b"hello", ok)[0] == 403
        assert https(server, "PUT", put.split("?")[0], b"hello", ok)[0] == 403
        # The signed URL with other headers.
        assert https(server, "PUT", put, b"hello!", {**ok, "Content-Length": "6"})[0] == 413
        assert https(server, "PUT", put, b"hell", {**ok, "Content-Length": "4"})[0] == 400
        assert https(server, "PUT", put, b"hello",
                     {**ok, "Content-Type": "text/html"})[0] == 400
        # Nothing was stored by any of those.
        assert https(server, "GET", get)[0] == 404
        assert https(server, "PUT", put, b"hello", ok)[0] == 201
        # The file under another name, slot or tag: bad signature.
        assert https(server, "GET", get.replace("notes.txt", "notes.html"))[0] == 403
        slot_id, tag, name = urlsplit(get).path.split("/")[1:]
        other = "A" * 22
        assert https(server, "GET", f"/{other}/{tag}/{name}")[0] == 403
        assert https(server, "GET", f"/{slot_id}/{'B' * 22}/{name}")[0] == 403
        assert https(server, "GET", "/../../etc/passwd")[0] == 404
        assert https(server, "GET", f"/{slot_id}/../{name}")[0] == 403
        assert https(server, "DELETE", get)[0] == 405
        assert https(server, "GET", get)[2] == b"hello"

    run_clients(test, server.starttls_port, server.tls_port)


def test_an_interrupted_upload_leaves_nothing_served(server):
    async def test(clients):
        alice = clients.make("alice@localhost/a", "alice-pw", plugins=PLUGINS)
        await alice.start()
        size = 200_000
        data = os.urandom(size)
        put, get = await slot(alice, "half.bin", size, "application/octet-stream")
        parts = urlsplit(put)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", server.upload_port), timeout=TIMEOUT) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall((f"PUT {parts.path}?{parts.query} HTTP/1.1\r\n"
                             f"Host: localhost\r\nContent-Length: {size}\r\n"
                             "Content-Type: application/octet-stream\r\n\r\n").encode())
                tls.sendall(data[: size // 2])
                # While the upload runs, nothing is served.
                time.sleep(0.3)
                assert https(server, "GET", get)[0] == 404
        # The connection dropped halfway: still nothing, and the slot can be used again.
        deadline = time.monotonic() + TIMEOUT
        while not list((server.dir / "upload").glob("*/data.part")) == []:
            assert time.monotonic() < deadline, "the part was not removed"
            time.sleep(0.05)
        assert https(server, "GET", get)[0] == 404
        assert https(server, "PUT", put, data,
                     {"Content-Type": "application/octet-stream",
                      "Content-Length": str(size)})[0] == 201
        status, _h, body = https(server, "GET", get)
        assert status == 200 and body == data

    run_clients(test, server.starttls_port, server.tls_port)


def test_expired_slots_and_files_are_refused_and_removed(request, tmp_path):
    with serving(request, tmp_path, {"alice": "alice-pw"}, upload=True,
                 upload_extra="<files slot-lifetime='2' lifetime='1' sweep='0.3'/>") as server:
        async def test(clients):
            alice = clients.make("alice@localhost/a", "alice-pw", plugins=PLUGINS)
            await alice.start()
            ok = {"Content-Type": "text/plain", "Content-Length": "4"}
            put, get = await slot(alice, "soon.txt", 4, "text/plain")
            assert https(server, "PUT", put, b"soon", ok)[0] == 201
            assert https(server, "GET", get)[2] == b"soon"
            late_put, late_get = await slot(alice, "late.txt", 4, "text/plain")
            time.sleep(3.2)
            # The slot's PUT URL expired ...
            status, _h, body = https(server, "PUT", late_put, b"late", ok)
            assert status == 403 and b"expired" in body
            assert https(server, "GET", late_get)[0] == 404
            # ... and the file uploaded before lived its second and was swept away.
            assert https(server, "GET", get)[0] == 404
            slot_dir = server.dir / "upload" / urlsplit(get).path.split("/")[1]
            assert not slot_dir.exists()

        run_clients(test, server.starttls_port, server.tls_port)
