"""Federation interop with Prosody (Debian's package): one of our servers (localhost, with
s2s) and a Prosody (p.jrstest) on loopback. Users on each side subscribe to each other, see
each other's presence and exchange messages, over TLS with self-signed certificates
(dialback authenticates: s2s_secure_auth off on Prosody, accept-unverified on ours).

Prosody finds us as it would find any domain without SRV records: our domain is
localhost, which its resolver (libunbound) answers itself, and our s2s listens on
127.0.0.1:5269. (A made-up domain behind a fake DNS server did not work: libunbound
answers NXDOMAIN for it without asking.) Our s2s finds p.jrstest through its static map.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_s2s.py -q
"""

import asyncio

import pytest

pytest.importorskip("slixmpp")

from s2s_servers import PROSODY, PROSODYCTL, FakeDns, FedServer, Prosody  # noqa: E402
from serverproc import accepts, slixmpp_client_class  # noqa: E402

if not (PROSODY and PROSODYCTL):
    pytest.skip("prosody is not installed (apt-get install prosody)", allow_module_level=True)

# Our domain is localhost: Prosody's resolver (libunbound) answers it itself (no SRV,
# address 127.0.0.1), so Prosody reaches our s2s on 127.0.0.1:5269 by the ordinary
# fallback, with no DNS server involved. Prosody's domain reaches our s2s through its
# static map.
OURS, THEIRS = "localhost", "p.jrstest"


@pytest.fixture
def servers(request, tmp_path):
    prosody = Prosody(tmp_path / "prosody", THEIRS, dns_port=0)
    if accepts(5269):
        pytest.skip("port 5269 is taken: Prosody reaches our domain (localhost) there")
    ours = FedServer(
        tmp_path / "ours", OURS,
        s2s_extra=f"<route domain='{THEIRS}' address='127.0.0.1' port='{prosody.s2s_port}'/>"
                  "<queue timeout='10'/>")
    ours.s2s_port = 5269
    # Prosody still needs a resolver to forward to; nothing is asked of it.
    dns = FakeDns({})
    prosody.dns_port = dns.port
    try:
        ours.start()
        ours.adduser(f"alice@{OURS}", "alice-pw")
        prosody.start()
        prosody.register("peter", "peter-pw")
        yield ours, prosody
    finally:
        failed = getattr(request.node, "rep_call", None)
        ours.stop()
        prosody.stop()
        dns.close()
        if failed is not None and failed.failed:
            failed.sections.append(("our logs", ours.logs_text(tail_lines=200)))
            failed.sections.append(("prosody log", prosody.log()[-30000:]))
            failed.sections.append(("DNS queries", repr(dns.queries)))


def run(test):
    Client = slixmpp_client_class()
    clients = []

    def make(jid, password, port):
        c = Client(jid, password, port)
        clients.append(c)
        return c

    async def main():
        try:
            await test(make)
        finally:
            for c in clients:
                await c.stop()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def is_presence(frm, kind=None):
    def check(s):
        return (s.name == "presence" and s["from"].bare == frm
                and (s["type"] == kind if kind else s["type"] in ("available", "")))
    return check


def test_subscriptions_presence_and_messages_with_prosody(servers):
    ours, prosody = servers
    alice_jid, peter_jid = f"alice@{OURS}", f"peter@{THEIRS}"

    async def test(make):
        alice = await make(f"{alice_jid}/home", "alice-pw", ours.starttls_port).start()
        peter = await make(f"{peter_jid}/desk", "peter-pw", prosody.c2s_port).start()
        alice.send_presence()
        peter.send_presence()

        # alice -> peter: subscribe; peter approves; alice sees peter's presence.
        alice.send_presence(pto=peter_jid, ptype="subscribe")
        await peter.expect("subscribe from alice", is_presence(alice_jid, "subscribe"), timeout=20)
        peter.send_presence(pto=alice_jid, ptype="subscribed")
        await alice.expect("subscribed from peter", is_presence(peter_jid, "subscribed"), timeout=10)
        await alice.expect("peter's presence", is_presence(peter_jid), timeout=10)

        # peter -> alice: subscribe; alice approves; peter sees alice's presence.
        peter.send_presence(pto=alice_jid, ptype="subscribe")
        await alice.expect("subscribe from peter", is_presence(peter_jid, "subscribe"), timeout=10)
        alice.send_presence(pto=peter_jid, ptype="subscribed")
        await peter.expect("alice's presence", is_presence(alice_jid), timeout=10)

        # Messages both ways.
        alice.send_message(mto=f"{peter_jid}/desk", mbody="hello prosody", mtype="chat")
        await peter.expect_message("hello prosody", timeout=10)
        peter.send_message(mto=f"{alice_jid}/home", mbody="hello jabberd-rs", mtype="chat")
        await alice.expect_message("hello jabberd-rs", timeout=10)

    run(test)
    log = ours.log("s2s")
    assert "authenticated with dialback" in log
    assert "remote authenticated with dialback" in log
    assert "tls=true" in log
