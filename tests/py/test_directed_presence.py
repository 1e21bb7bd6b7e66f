"""End-to-end test of directed presence without initial presence (RFC 6121 4.6): a
client joins a "room" of a third-party XEP-0114 component (slixmpp's ComponentXMPP, as
a MUC service or an IRC gateway such as biboumi would be) without ever sending initial
presence, then its connection ends: the component must get unavailable presence, or the
user stays in the room as a ghost. Once with a clean close, once with the connection
cut.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_directed_presence.py -q
"""

import asyncio

import pytest

pytest.importorskip("OpenSSL")
slixmpp = pytest.importorskip("slixmpp")
from slixmpp.componentxmpp import ComponentXMPP  # noqa: E402

from serverproc import TIMEOUT, run_clients, serving  # noqa: E402

ROOMS = "rooms.localhost"
SECRET = "rooms-secret"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, {"alice": "alice-pw"},
                 users_extra=f"<component name='{ROOMS}' secret='{SECRET}'/>") as s:
        yield s


class Rooms(ComponentXMPP):
    """Records every presence it receives."""

    def __init__(self, port):
        super().__init__(ROOMS, SECRET, "127.0.0.1", port)
        self.started = asyncio.Event()
        self.presences = asyncio.Queue()
        self.add_event_handler("session_start", lambda _e: self.started.set())
        self.add_event_handler("presence", lambda p: self.presences.put_nowait(p))


@pytest.mark.parametrize("ending", ["close", "cut"])
def test_leaving_without_initial_presence_tells_the_room(server, ending):
    async def test(clients):
        rooms = Rooms(server.port)
        rooms.connect("127.0.0.1", server.port)
        await asyncio.wait_for(rooms.started.wait(), TIMEOUT)
        try:
            alice = clients.make("alice@localhost/phone", "alice-pw")
            await alice.start()
            # Straight into the room: no initial presence first.
            alice.send_presence(pto=f"lobby@{ROOMS}/alice")
            joined = await asyncio.wait_for(rooms.presences.get(), TIMEOUT)
            assert joined["type"] == "available", joined
            assert str(joined["from"]) == "alice@localhost/phone"
            if ending == "close":
                await alice.stop()
            else:
                alice.abort()
            left = await asyncio.wait_for(rooms.presences.get(), TIMEOUT)
            assert left["type"] == "unavailable", left
            assert str(left["from"]) == "alice@localhost/phone"
            assert str(left["to"]) == f"lobby@{ROOMS}/alice"
        finally:
            rooms.disconnect(wait=1.0)

    run_clients(test, server.starttls_port, server.tls_port)
