"""End-to-end tests of local delivery (sm/src/host/local.rs, docs/sm.md "Local
delivery"): a stanza between two users of a domain one sm instance serves alone goes
from the sender's task to the recipient's without the router's round trip, in order,
with the same errors; with `<delivery local='false'/>`, or while a second sm instance
shares the domain, everything goes through the router; when that instance leaves, the
remaining one delivers locally again.

The router's `jabberd_router_packets_in_total{type="normal"}` counts what it routed, sm's
`jabberd_sm_local_stanzas_total` what it handed over itself.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_local_delivery.py -q
"""

import re

import pytest

pytest.importorskip("OpenSSL")
pytest.importorskip("prometheus_client.parser")

from scram_client import login, stanza_error_condition  # noqa: E402
from serverproc import TIMEOUT, serving  # noqa: E402
from test_metrics import scrape, value  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
COUNT = 40


def routed(server):
    """Normal packets the router has read so far."""
    return value(scrape(server.metrics_ports["router"]),
                 "jabberd_router_packets_in_total", type="normal") or 0


def local(server):
    """Stanzas sm has handed over without the router so far."""
    return value(scrape(server.metrics_ports["sm"]), "jabberd_sm_local_stanzas_total") or 0


ALONE = "served by this instance alone"


def settled(server, name="sm", since=0):
    """Waits until sm `name` confirmed it serves localhost alone (after `since` bytes of
    its log): from then on it delivers locally."""
    server.wait_for(lambda: ALONE in server.log(name)[since:], f"{name} to deliver locally",
                    watch=[name])


def connect(server, user):
    c = login(server.starttls_port, user, USERS[user], resource="r")
    c.send("<presence/>")
    return c


def chat(sender, to, body):
    sender.send(f"<message to='{to}' type='chat' id='{body}'><body>{body}</body></message>")


def bodies(client, n, skip=None):
    """The bodies of the next `n` chat messages `client` receives (other stanzas, and
    bodies starting with `skip`, skipped)."""
    got = []
    while len(got) < n:
        element = client.next(TIMEOUT, what=f"message {len(got) + 1} of {n}")
        body = element.find("{jabber:client}body")
        if element.tag == "{jabber:client}message" and body is not None:
            if skip is None or not body.text.startswith(skip):
                got.append(body.text)
    return got


def test_messages_between_users_of_one_sm_do_not_cross_the_router(request, tmp_path):
    with serving(request, tmp_path, USERS, metrics=True) as server:
        settled(server)
        alice, bob = connect(server, "alice"), connect(server, "bob")
        before_routed, before_local = routed(server), local(server)
        sent = [f"m{i}" for i in range(COUNT)]
        for i, body in enumerate(sent):
            # Bare and full JID, as clients address a contact.
            chat(alice, "bob@localhost" if i % 2 else "bob@localhost/r", body)
        assert bodies(bob, COUNT) == sent, "in the order sent"
        chat(bob, "alice@localhost/r", "back")
        assert bodies(alice, 1) == ["back"]
        # An error sm makes for the recipient (no such resource) comes back the same way.
        alice.send("<iq type='get' id='p1' to='bob@localhost/gone'>"
                   "<ping xmlns='urn:xmpp:ping'/></iq>")
        reply = alice.next(TIMEOUT, what="the ping's error")
        while reply.tag != "{jabber:client}iq":
            reply = alice.next(TIMEOUT, what="the ping's error")
        assert reply.get("id") == "p1" and reply.get("type") == "error"
        assert stanza_error_condition(reply) == ("cancel", "service-unavailable")

        assert local(server) - before_local >= COUNT + 2
        # Nothing of it reached the router (presence probes and the like may).
        assert routed(server) - before_routed < COUNT
        alice.close()
        bob.close()


def test_local_delivery_can_be_turned_off(request, tmp_path):
    with serving(request, tmp_path, USERS, metrics=True,
                 sm_extra="<delivery local='false'/>") as server:
        alice, bob = connect(server, "alice"), connect(server, "bob")
        before = routed(server)
        sent = [f"m{i}" for i in range(COUNT)]
        for body in sent:
            chat(alice, "bob@localhost", body)
        assert bodies(bob, COUNT) == sent
        assert routed(server) - before >= COUNT
        assert local(server) == 0
        assert ALONE not in server.log("sm")
        alice.close()
        bob.close()


def start_second_sm(server):
    """sm-2: sm's configuration, without a metrics listener of its own."""
    text = re.sub(r"\s*<metrics [^>]*/>", "", (server.dir / "sm.xml").read_text())
    (server.dir / "sm-2.xml").write_text(text)
    offset = server.log_size("sm-2")
    server.spawn("sm-2", binary="sm", extra=["--instance", "2"])
    server._wait_connected("sm-2", offset)


def test_a_shared_domain_goes_through_the_router_until_one_instance_is_left(request, tmp_path):
    with serving(request, tmp_path, USERS, metrics=True) as server:
        start_second_sm(server)
        server.wait_for(lambda: re.search(r"link notice: bound.*component=sm-2", server.log("sm")),
                        "sm to hear of sm-2", watch=["sm"])
        assert "another component serves the domain now" in server.log("sm") \
            or ALONE not in server.log("sm")
        clients = {u: connect(server, u) for u in USERS}
        before_routed, before_local = routed(server), local(server)
        ring = [("alice", "bob"), ("bob", "carol"), ("carol", "alice")]
        for sender, to in ring:
            chat(clients[sender], f"{to}@localhost", f"shared-{sender}")
        for sender, to in ring:
            assert bodies(clients[to], 1) == [f"shared-{sender}"]
        assert routed(server) - before_routed >= len(ring)
        assert local(server) == before_local, "two instances: the router chooses"

        # sm-2 goes: its users' sessions are restored on sm, which serves alone again
        # once it confirmed so through the router.
        offset = len(server.log("sm"))
        server.kill("sm-2")
        settled(server, since=offset)
        before_local = local(server)
        for sender, to in ring:
            chat(clients[sender], f"{to}@localhost", f"alone-{sender}")
        for sender, to in ring:
            # What the router had not seen sm-2 acknowledge goes to sm again (links
            # deliver at least once, docs/protocol.md "Acknowledged links"): a message
            # of the first round may come twice.
            assert bodies(clients[to], 1, skip="shared-") == [f"alone-{sender}"]
        assert local(server) - before_local >= len(ring)
        for c in clients.values():
            c.close()
