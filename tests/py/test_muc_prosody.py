"""The muc binary as a plain XEP-0114 external component of Prosody (Debian's package):
Prosody serves its own users and routes conference.p.jrstest to our muc, which connects
with nothing but the component's name and secret (no bind extension, rooms in memory).
Two Prosody users (slixmpp, xep_0045) create a room, join it and chat.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_muc_prosody.py -q
"""

import asyncio
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("slixmpp")

from s2s_servers import PROSODY, PROSODYCTL, FakeDns, Prosody  # noqa: E402
from serverproc import TIMEOUT, bin_dir, free_port, run_clients  # noqa: E402

if not (PROSODY and PROSODYCTL):
    pytest.skip("prosody is not installed (apt-get install prosody)", allow_module_level=True)
if not (bin_dir() / "muc").exists():
    pytest.skip(f"muc is not built in {bin_dir()}", allow_module_level=True)

DOMAIN = "p.jrstest"
SERVICE = f"conference.{DOMAIN}"
SECRET = "muc-component-secret"
ROOM = f"lounge@{SERVICE}"
NS_OWNER = "http://jabber.org/protocol/muc#owner"


class ProsodyWithComponent(Prosody):
    """Prosody with a component port and our service declared as an external component."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.component_port = free_port()

    def write_config(self):
        super().write_config()
        text = self.config.read_text()
        text = text.replace("component_ports = { }", f"component_ports = {{ {self.component_port} }}\n"
                            "component_interfaces = { \"127.0.0.1\" }")
        assert str(self.component_port) in text
        text += f'\nComponent "{SERVICE}"\n  component_secret = "{SECRET}"\n'
        self.config.write_text(text)


@pytest.fixture
def prosody(request, tmp_path):
    dns = FakeDns({})
    server = ProsodyWithComponent(tmp_path / "prosody", DOMAIN, dns_port=dns.port)
    muc_log = tmp_path / "muc.log"
    muc = None
    try:
        server.start()
        for user in ("alice", "bob"):
            server.register(user, f"{user}-pw")
        (tmp_path / "muc.xml").write_text(
            "<muc>\n"
            f"  <router address='127.0.0.1' port='{server.component_port}' name='{SERVICE}' "
            f"secret='{SECRET}' reconnect='0.05'/>\n"
            f"  <service>{SERVICE}</service>\n"
            "  <plain/>\n"
            "  <storage>memory</storage>\n"
            "  <log level='debug'/>\n"
            "</muc>\n")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        with open(muc_log, "ab") as log:
            muc = subprocess.Popen([str(bin_dir() / "muc"), "-c", str(tmp_path / "muc.xml")],
                                   cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   env=env)
        server.wait_connected = lambda: "connected to the router" in muc_log.read_text(errors="replace")
        yield server
    finally:
        failed = getattr(request.node, "rep_call", None)
        if muc is not None:
            muc.terminate()
            try:
                muc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                muc.kill()
                muc.wait()
        server.stop()
        dns.close()
        if failed is not None and failed.failed:
            failed.sections.append(("muc log", muc_log.read_text(errors="replace")[-20000:]))
            failed.sections.append(("prosody log", server.log()[-30000:]))


def test_prosody_users_chat_in_a_room_of_our_muc(prosody):
    async def test(clients):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not prosody.wait_connected():
            assert loop.time() < deadline, "muc did not connect to Prosody"
            await asyncio.sleep(0.05)
        alice = clients.make(f"alice@{DOMAIN}/s", "alice-pw")
        bob = clients.make(f"bob@{DOMAIN}/s", "bob-pw")
        for c in (alice, bob):
            c.register_plugin("xep_0045")
            await c.start()
        info = await alice.plugin["xep_0030"].get_info(jid=SERVICE, timeout=TIMEOUT)
        assert "http://jabber.org/protocol/muc" in info["disco_info"]["features"]
        got = asyncio.Queue()
        bob.add_event_handler("groupchat_message", lambda m: got.put_nowait(m) if m["body"] else None)
        await asyncio.wait_for(alice.plugin["xep_0045"].join_muc_wait(ROOM, "Alice", maxstanzas=0), TIMEOUT)
        r = alice.make_iq_set(ito=ROOM)
        r.append(ET.fromstring(f"<query xmlns='{NS_OWNER}'><x xmlns='jabber:x:data' type='submit'/></query>"))
        await r.send(timeout=TIMEOUT)
        await asyncio.wait_for(bob.plugin["xep_0045"].join_muc_wait(ROOM, "Bob", maxstanzas=0), TIMEOUT)
        assert set(bob.plugin["xep_0045"].get_roster(ROOM)) >= {"Alice", "Bob"}
        alice.send_message(mto=ROOM, mbody="hello from prosody", mtype="groupchat")
        m = await asyncio.wait_for(got.get(), TIMEOUT)
        assert m["body"] == "hello from prosody" and m["mucnick"] == "Alice"
        assert m.xml.find("{urn:xmpp:sid:0}stanza-id").get("by") == ROOM

    run_clients(test, prosody.c2s_port)
