"""Storage routed by namespace (docs/protocol.md, "Storage routed by namespace"): two
xdb-file instances with two spools, the second binding only the credentials and
rosters of localhost (`<namespace>`), the first the rest. Logins, roster changes,
vCards and offline messages each land in the right one; account removal and the user
list reach both; a restart of the credentials store holds only its own requests.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_xdb_namespaces.py -q
"""

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("OpenSSL")

from scram_client import login  # noqa: E402
from serverproc import serving  # noqa: E402

NS_AUTH = "urn:jabberd-rs:auth:0"
NS_ROSTER = "jabber:iq:roster"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path) as s:
        spool2 = Path(s.dir) / "spool-accounts"
        (Path(s.dir) / "xdb-file-2.xml").write_text(
            "<xdb-file>\n"
            f"  {s.router_element('xdb-file')}\n"
            "  <host>localhost</host>\n"
            f"  <namespace>{NS_AUTH}</namespace>\n"
            f"  <namespace>{NS_ROSTER}</namespace>\n"
            f"  <spool dir='{spool2}'/>\n"
            "  <log level='debug'/>\n"
            "</xdb-file>\n")
        offset = s.log_size("xdb-file-2")
        s.spawn("xdb-file-2", binary="xdb-file", extra=["--instance", "2"])
        s._wait_connected("xdb-file-2", offset)
        s.spool1, s.spool2 = Path(s.dir) / "spool", spool2
        yield s


def files(spool, user):
    d = spool / "localhost" / user
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_each_namespace_lands_in_its_store(server):
    """Credentials and rosters go to the accounts store, vCards and offline messages to
    the default one; a login reads its credentials from the accounts store; the user
    list and account removal reach both stores."""
    server.addusers({"alice@localhost": "alice-pw", "bob@localhost": "bob-pw"})
    assert any("auth" in f for f in files(server.spool2, "alice")), files(server.spool2, "alice")
    assert not any("auth" in f for f in files(server.spool1, "alice")), files(server.spool1, "alice")

    alice = login(server.starttls_port, "alice", "alice-pw", resource="a")
    alice.iq("set", f"<query xmlns='{NS_ROSTER}'><item jid='bob@localhost' name='Bob'/></query>")
    alice.iq("set", "<vCard xmlns='vcard-temp'><FN>Alice</FN></vCard>")
    # bob is offline: a message for him is stored offline (the default store).
    alice.send("<message to='bob@localhost' type='chat'><body>while you were out</body></message>")
    alice.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    server.wait_for(lambda: any("offline" in f for f in files(server.spool1, "bob")),
                    "bob's offline message in the default store")
    roster = [f for f in files(server.spool2, "alice") if "roster" in f]
    vcard = [f for f in files(server.spool1, "alice") if "vcard" in f.lower()]
    assert roster and vcard, (files(server.spool1, "alice"), files(server.spool2, "alice"))
    assert not [f for f in files(server.spool1, "alice") if "roster" in f]
    assert not any("offline" in f for f in files(server.spool2, "bob"))
    alice.close()

    # The user list is gathered from both stores (bob has data in each).
    listed = server.ctl("users", "localhost").stdout.split()
    assert sorted(listed) == ["alice@localhost", "bob@localhost"], listed

    # Removing an account removes its data in both stores, answered once.
    server.ctl("deluser", "bob@localhost")
    assert files(server.spool1, "bob") == [] and files(server.spool2, "bob") == []
    assert server.ctl("users", "localhost").stdout.split() == ["alice@localhost"]


def test_a_restart_of_one_store_holds_only_its_requests(server):
    """While the accounts store is down, a login waits for it (the router holds its
    credentials request through the grace period) and completes when it is back; the
    default store keeps answering meanwhile (a vCard is stored at once)."""
    server.addusers({"alice@localhost": "alice-pw"})
    alice = login(server.starttls_port, "alice", "alice-pw", resource="a")
    server.kill("xdb-file-2")
    started = time.monotonic()
    alice.iq("set", "<vCard xmlns='vcard-temp'><FN>Alice again</FN></vCard>")
    assert time.monotonic() - started < 2, "the default store answered at once"
    result = {}

    def second_login():
        result["client"] = login(server.starttls_port, "alice", "alice-pw", resource="b")

    t = threading.Thread(target=second_login)
    t.start()
    # No event to wait for: the login's credentials request reaches the router and is
    # held there; give it the time to get that far.
    time.sleep(0.3)
    assert "client" not in result, "logged in without its credentials store"
    offset = server.log_size("xdb-file-2")
    server.spawn("xdb-file-2", binary="xdb-file", extra=["--instance", "2"])
    t.join(10)
    assert result.get("client") is not None and result["client"].jid == "alice@localhost/b"
    assert "delivering packets held during the grace period" in server.log("router")
    server._wait_connected("xdb-file-2", offset)
    alice.close()
    result["client"].close()


def test_a_restart_of_the_default_store_holds_only_its_requests(server):
    """While the default store is down, logins still work at once (the credentials are
    in the accounts store) and a vCard update waits for the default store, completing
    when it is back."""
    server.addusers({"alice@localhost": "alice-pw"})
    server.kill("xdb-file")
    alice = login(server.starttls_port, "alice", "alice-pw", resource="a")
    result = {}

    def set_vcard():
        result["iq"] = alice.iq("set", "<vCard xmlns='vcard-temp'><FN>Alice</FN></vCard>")

    t = threading.Thread(target=set_vcard)
    t.start()
    time.sleep(0.3)  # no event to wait for: the request reaches the router and is held
    assert "iq" not in result, "stored without the default store"
    offset = server.log_size("xdb-file")
    server.spawn("xdb-file")
    t.join(10)
    assert result.get("iq") is not None and result["iq"].get("type") == "result"
    server._wait_connected("xdb-file", offset)
    alice.close()
