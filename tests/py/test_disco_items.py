"""End-to-end test of the server's service discovery items: a third-party XEP-0114
component (slixmpp's ComponentXMPP) connected to the router under a subdomain is listed
in the disco#items of the domain while it is connected, and no longer once it goes; a
client (slixmpp) asks.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_disco_items.py -q
"""

import asyncio

import pytest

pytest.importorskip("OpenSSL")
slixmpp = pytest.importorskip("slixmpp")
from slixmpp.componentxmpp import ComponentXMPP  # noqa: E402

from serverproc import TIMEOUT, run_clients, serving  # noqa: E402

COMPONENT = "conference.localhost"
SECRET = "conference-secret"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, {"alice": "alice-pw"},
                 users_extra=f"<component name='{COMPONENT}' secret='{SECRET}'/>") as s:
        yield s


async def items(client):
    result = await client.plugin["xep_0030"].get_items(jid="localhost", timeout=TIMEOUT)
    return {str(jid) for jid, _node, _name in result["disco_items"]["items"]}


async def until(what, check, timeout=TIMEOUT):
    """Asks `check()` again until it is true (the router's notice reaches sm a moment
    after the component's handshake)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_connected_components_are_listed_while_they_are_connected(server):
    async def test(clients):
        alice = clients.make("alice@localhost/a", "alice-pw")
        await alice.start()
        assert COMPONENT not in await items(alice)

        comp = ComponentXMPP(COMPONENT, SECRET, "127.0.0.1", server.port)
        started, gone = asyncio.Event(), asyncio.Event()
        comp.add_event_handler("session_start", lambda _e: started.set())
        comp.add_event_handler("disconnected", lambda _e: gone.set())
        comp.connect("127.0.0.1", server.port)
        try:
            await asyncio.wait_for(started.wait(), TIMEOUT)

            async def listed():
                return COMPONENT in await items(alice)

            await until(f"{COMPONENT} in the server's disco#items", listed)
        finally:
            comp.disconnect(wait=1.0)
            await asyncio.wait_for(gone.wait(), TIMEOUT)

        async def gone_from_list():
            return COMPONENT not in await items(alice)

        await until(f"{COMPONENT} gone from the server's disco#items", gone_from_list)

    run_clients(test, server.starttls_port, server.tls_port)
