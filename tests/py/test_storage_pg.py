"""The whole server on xdb-pg, the PostgreSQL storage (docs/storage-pg.md), instead of
xdb-file: a throwaway PostgreSQL cluster from Debian's packages is made in a temporary
directory (initdb as `nobody` when run as root: initdb refuses root), and the server's
storage process is xdb-pg on it (serverproc's storage="pg"). Accounts, logins, rosters,
vCards, offline messages, MAM archives and account removal go through it; data
survives a restart of xdb-pg; a database that goes away is answered with errors and
reconnected to when it is back.

The cluster is tests/py/pgcluster.py's. Fails (does not skip) when the PostgreSQL
binaries are missing:
    apt-get install postgresql

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_storage_pg.py -q
"""

import time
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("OpenSSL")

from pgcluster import Cluster  # noqa: E402 (test_xep0227 imports it from here too)
from scram_client import login, to_xml  # noqa: E402
from serverproc import serving  # noqa: E402

NS_MAM = "urn:xmpp:mam:2"
NS_ROSTER = "jabber:iq:roster"
NS_VCARD = "vcard-temp"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


@pytest.fixture
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.destroy()


@pytest.fixture
def server(request, tmp_path, cluster):
    with serving(request, tmp_path, USERS, storage="pg", pg_url=cluster.url) as s:
        s.cluster = cluster
        yield s


def mam_bodies(client, **query_attrs):
    """The bodies of the archived messages a MAM query returns (in order), and its
    <fin/>."""
    client.other.clear()
    iq = client.iq("set", f"<query xmlns='{NS_MAM}' queryid='q1'/>")
    assert iq.get("type") == "result", to_xml(iq)
    bodies = [b.text for m in client.other
              for b in m.iter("{jabber:client}body")
              if m.find(f"{{{NS_MAM}}}result") is not None]
    return bodies, iq.find(f"{{{NS_MAM}}}fin")


def vcard_fn(client):
    iq = client.iq("get", f"<vCard xmlns='{NS_VCARD}'/>")
    assert iq.get("type") == "result", to_xml(iq)
    fn = iq.find(f"{{{NS_VCARD}}}vCard/{{{NS_VCARD}}}FN")
    return fn.text if fn is not None else None


def roster_jids(client):
    iq = client.iq("get", f"<query xmlns='{NS_ROSTER}'/>")
    assert iq.get("type") == "result", to_xml(iq)
    return sorted(i.get("jid") for i in iq.iter(f"{{{NS_ROSTER}}}item"))


def next_message_with_body(client, body, timeout=5.0):
    deadline = time.monotonic() + timeout
    for m in list(client.other):
        if any(b.text == body for b in m.iter("{jabber:client}body")):
            return m
    while time.monotonic() < deadline:
        m = client.next(max(0.0, deadline - time.monotonic()), what=f"a message '{body}'")
        if any(b.text == body for b in m.iter("{jabber:client}body")):
            return m
    raise AssertionError(f"no message '{body}'")


def test_server_on_postgresql(server):
    assert "xdb-pg starting" in server.log("xdb-file")
    # Accounts were made by jabberctl through xdb-pg: the logins read their credentials.
    alice = login(server.starttls_port, "alice", "alice-pw", resource="a")
    with pytest.raises(AssertionError):
        login(server.starttls_port, "alice", "wrong-pw", resource="x")

    # Roster and vCard.
    iq = alice.iq("set", f"<query xmlns='{NS_ROSTER}'><item jid='bob@localhost' name='Bob'/></query>")
    assert iq.get("type") == "result", to_xml(iq)
    iq = alice.iq("set", f"<vCard xmlns='{NS_VCARD}'><FN>Alice Liddell</FN></vCard>")
    assert iq.get("type") == "result", to_xml(iq)
    assert roster_jids(alice) == ["bob@localhost"]
    assert vcard_fn(alice) == "Alice Liddell"

    # bob is offline: stored offline, delivered at his available presence.
    alice.send("<message to='bob@localhost' type='chat'><body>while you were out</body></message>")
    alice.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    bob = login(server.starttls_port, "bob", "bob-pw", resource="b")
    bob.send("<presence/>")
    next_message_with_body(bob, "while you were out")

    # A chat while both are online, archived on both sides (archive-append/query).
    alice.send("<message to='bob@localhost/b' type='chat'><body>hello over postgres</body></message>")
    next_message_with_body(bob, "hello over postgres")
    server.wait_for(lambda: "hello over postgres" in mam_bodies(alice)[0],
                    "alice's archive to hold the chat", timeout=10)
    bodies, fin = mam_bodies(bob)
    assert "hello over postgres" in bodies, bodies
    assert fin is not None and fin.get("complete") == "true", to_xml(fin) if fin is not None else None
    alice.close()
    bob.close()

    # Everything survives a restart of xdb-pg.
    server.restart("xdb-file")
    alice = login(server.starttls_port, "alice", "alice-pw", resource="a2")
    assert roster_jids(alice) == ["bob@localhost"]
    assert vcard_fn(alice) == "Alice Liddell"
    assert "hello over postgres" in mam_bodies(alice)[0]
    # The offline message was taken once: not delivered again.
    alice.send("<presence/>")
    alice.close()
    bob = login(server.starttls_port, "bob", "bob-pw", resource="b2")
    bob.send("<presence/>")
    bob.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    assert not any("while you were out" in ET.tostring(m, encoding="unicode")
                   for m in bob.other), "offline message delivered twice"
    bob.close()

    # The user list, then account removal (delete ns='*') removes bob's data.
    assert sorted(server.ctl("users", "localhost").stdout.split()) == ["alice@localhost", "bob@localhost"]
    server.ctl("deluser", "bob@localhost")
    assert server.ctl("users", "localhost").stdout.split() == ["alice@localhost"]
    with pytest.raises(AssertionError):
        login(server.starttls_port, "bob", "bob-pw", resource="b3")
    # A new bob starts empty: no archive left from the old account.
    server.adduser("bob@localhost", "bob-pw2")
    bob = login(server.starttls_port, "bob", "bob-pw2", resource="b4")
    assert mam_bodies(bob)[0] == []
    assert roster_jids(bob) == []
    bob.close()


def test_database_down_is_answered_and_reconnected(server):
    alice = login(server.starttls_port, "alice", "alice-pw", resource="a")
    assert alice.iq("set", f"<vCard xmlns='{NS_VCARD}'><FN>Before</FN></vCard>").get("type") == "result"
    server.cluster.stop()
    iq = alice.iq("set", f"<vCard xmlns='{NS_VCARD}'><FN>During</FN></vCard>", timeout=40)
    assert iq.get("type") == "error", to_xml(iq)
    assert "the database is unavailable" in server.log("xdb-file"), server.log("xdb-file")
    server.cluster.start()
    # The next requests reconnect.
    deadline = time.monotonic() + 20
    while True:
        iq = alice.iq("set", f"<vCard xmlns='{NS_VCARD}'><FN>After</FN></vCard>", timeout=40)
        if iq.get("type") == "result" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert iq.get("type") == "result", to_xml(iq)
    assert vcard_fn(alice) == "After"
    assert "connected to the database" in server.log("xdb-file")
    alice.close()
