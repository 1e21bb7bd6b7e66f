"""End-to-end tests of proxy65 (XEP-0065 SOCKS5 bytestreams): two slixmpp clients with
the xep_0065 plugin find the proxy through the domain's disco#items, negotiate a stream
through it and transfer 10 MB byte-identically; a user's bandwidth limit paces a
transfer; strangers and unknown streams are refused.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_proxy65.py -q
"""

import asyncio
import hashlib
import os
import socket
import time

import pytest

pytest.importorskip("OpenSSL")
slixmpp = pytest.importorskip("slixmpp")
from slixmpp.exceptions import IqError  # noqa: E402

from serverproc import TIMEOUT, run_clients, serving  # noqa: E402

PROXY = "proxy.localhost"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
PLUGINS = ("xep_0030", "xep_0199", "xep_0065")
CHUNK = 64 * 1024


async def transfer(clients, data, sid):
    """alice sends `data` to bob through the proxy; returns what bob received and the
    seconds it took."""
    alice = clients.make("alice@localhost/a", "alice-pw", plugins=PLUGINS)
    bob = clients.make("bob@localhost/b", "bob-pw", plugins=PLUGINS)
    await alice.start()
    await bob.start()
    bob.plugin["xep_0065"].auto_accept = True
    received = bytearray()
    done, closed = asyncio.Event(), asyncio.Event()

    def on_data(chunk):
        received.extend(chunk)
        if len(received) >= len(data):
            done.set()

    bob.add_event_handler("socks5_data", on_data)
    bob.add_event_handler("socks5_closed", lambda _e: closed.set())
    started = time.monotonic()
    sock = await alice.plugin["xep_0065"].handshake(bob.boundjid.full, sid=sid,
                                                    timeout=TIMEOUT)
    assert sock is not None, "no stream through the proxy"
    assert PROXY in {str(j) for j in alice.plugin["xep_0065"]._proxies}
    for i in range(0, len(data), CHUNK):
        await sock.write(data[i:i + CHUNK])
    await asyncio.wait_for(done.wait(), 60)
    elapsed = time.monotonic() - started
    sock.transport.close()
    # The proxy closes bob's side when alice's closes.
    await asyncio.wait_for(closed.wait(), TIMEOUT)
    return bytes(received), elapsed


def test_ten_megabytes_through_the_proxy_byte_identical(request, tmp_path):
    data = os.urandom(10 * 1024 * 1024)
    with serving(request, tmp_path, USERS, proxy65=True,
                 proxy65_extra="<relay bandwidth='0'/>") as server:
        results = []

        async def test(clients):
            results.append(await transfer(clients, data, "sid-10mb"))

        run_clients(test, server.starttls_port, server.tls_port)
    received, _elapsed = results[0]
    assert len(received) == len(data)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_bandwidth_is_limited_per_user(request, tmp_path):
    # 1 MiB/s, a bucket of one second: 3 MiB take about 2 s.
    data = os.urandom(3 * 1024 * 1024)
    with serving(request, tmp_path, USERS, proxy65=True,
                 proxy65_extra="<relay bandwidth='1M'/>") as server:
        results = []

        async def test(clients):
            results.append(await transfer(clients, data, "sid-slow"))

        run_clients(test, server.starttls_port, server.tls_port)
    received, elapsed = results[0]
    assert received == data
    assert elapsed > 1.5, f"3 MiB at 1 MiB/s took only {elapsed:.2f} s"


def test_unknown_streams_are_not_activated(request, tmp_path):
    with serving(request, tmp_path, USERS, proxy65=True) as server:
        async def test(clients):
            alice = clients.make("alice@localhost/a", "alice-pw", plugins=PLUGINS)
            await alice.start()
            info = await alice.plugin["xep_0030"].get_info(jid=PROXY, timeout=TIMEOUT)
            assert ("proxy", "bytestreams") in {(i[0], i[1]) for i in
                                                info["disco_info"]["identities"]}
            address = await alice.plugin["xep_0065"].get_network_address(PROXY,
                                                                         timeout=TIMEOUT)
            assert int(address["socks"]["streamhost"]["port"]) == server.proxy65_port
            with pytest.raises(IqError) as e:
                await alice.plugin["xep_0065"].activate(PROXY, "nope", "bob@localhost/b",
                                                        timeout=TIMEOUT)
            assert e.value.iq["error"]["condition"] == "item-not-found"

        run_clients(test, server.starttls_port, server.tls_port)


def socks(port, addr=None, source="127.0.0.1"):
    """A connection to the proxy from `source`; with `addr`, the SOCKS5 handshake for
    it: returns (socket, reply code)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                 source_address=(source, 0))
    if addr is None:
        return s, None
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(addr)]) + addr.encode() + b"\x00\x00")
    reply = b""
    while len(reply) < 47:
        chunk = s.recv(47 - len(reply))
        assert chunk, "closed during the handshake"
        reply += chunk
    return s, reply[1]


def is_closed(s, within):
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_connection_limits_and_a_third_connection_for_a_stream(request, tmp_path):
    with serving(request, tmp_path, USERS, proxy65=True,
                 proxy65_extra="<relay per-address='3' handshake='1'/>") as server:
        port = server.proxy65_port
        addr = hashlib.sha1(b"sid" + b"alice@localhost/a" + b"bob@localhost/b").hexdigest()
        target, code = socks(port, addr)
        assert code == 0
        initiator, code = socks(port, addr)
        assert code == 0
        # A third connection for the stream is refused (02), never told SUCCEEDED.
        third, code = socks(port, addr, source="127.0.0.2")
        assert code == 2
        assert is_closed(third, 2)
        # Three places per address: the fourth from 127.0.0.1 is closed at once.
        silent, _ = socks(port)
        over, _ = socks(port)
        assert is_closed(over, 1)
        # A connection silent through the handshake time is closed.
        started = time.monotonic()
        assert is_closed(silent, 5)
        assert 0.5 < time.monotonic() - started < 3
        for s in (target, initiator, third, silent, over):
            s.close()
