"""jabberctl sessions, stats, announce and kick against a server with two sm instances
(alice's sessions on `sm`, bob's on `sm-2`, as the router's hashing places them):
every instance is asked and the answers merged (docs/operations.md, "Who is online")."""

import pytest

from scram_client import NS_STREAMS_ERR, StreamClosed, login, tag, until
from serverproc import serving

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
NS_SM = "urn:xmpp:sm:3"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        (s.dir / "sm-2.xml").write_text((s.dir / "sm.xml").read_text())
        offset = s.log_size("sm-2")
        s.spawn("sm-2", binary="sm", extra=["--instance", "2"])
        s._wait_connected("sm-2", offset)
        yield s


def online(server, user, resource, available=True):
    c = login(server.starttls_port, user, USERS[user], resource=resource)
    if available:
        c.send("<presence/>")
        until(c, lambda e: e.tag.endswith("presence"), "our own presence")
    return c


def test_sessions_stats_announce_and_kick_across_sm_instances(server):
    phone = online(server, "alice", "phone")
    laptop = online(server, "alice", "laptop", available=False)
    bob = online(server, "bob", "desk")
    # A hibernating session (XEP-0198): bob's tablet vanishes.
    tablet = login(server.starttls_port, "bob", "bob-pw", resource="tablet")
    tablet.send(f"<enable xmlns='{NS_SM}' resume='true'/>")
    tablet.expect("enabled", NS_SM)
    tablet.sock.close()
    server.wait_for(lambda: "session hibernating" in server.log("sm-2"),
                    "bob's tablet to hibernate", watch=["sm-2"])

    out = server.ctl("sessions", "localhost").stdout.splitlines()
    rows = {line.split("\t")[0]: line.split("\t") for line in out}
    assert set(rows) == {"alice@localhost/phone", "alice@localhost/laptop",
                         "bob@localhost/desk", "bob@localhost/tablet"}, out
    assert rows["alice@localhost/phone"][1:] == ["c2s", "sm", "live", "available (0)"]
    assert rows["alice@localhost/laptop"][4] == "unavailable"
    assert rows["bob@localhost/desk"][2] == "sm-2"
    assert rows["bob@localhost/tablet"][3] == "hibernating"

    stats = server.ctl("stats").stdout
    assert "total: 2 user(s) online, 3 session(s) live, 1 hibernating, 2 available, " \
           "2 sm instance(s)" in stats, stats

    done = server.ctl("announce", "localhost", "--subject", "Maintenance",
                      "--message", "down at 5 <for> 10 min").stdout
    assert "sent to 2 available session(s)" in done, done
    for c in (phone, bob):
        m = until(c, lambda e: e.tag.endswith("message"), "the announcement")[-1]
        assert m.get("type") == "headline" and m.get("from") == "localhost"
        assert m.findtext("{jabber:client}body") == "down at 5 <for> 10 min"
        assert m.findtext("{jabber:client}subject") == "Maintenance"

    done = server.ctl("kick", "alice@localhost/phone").stdout
    assert "1 session(s) of alice@localhost/phone ended" in done, done
    with pytest.raises(StreamClosed):
        until(phone, lambda e: False, "the end of the kicked stream")
    assert phone.stream_error is not None
    assert phone.stream_error.find(tag(NS_STREAMS_ERR, "policy-violation")) is not None
    # The other session of the account goes on.
    assert laptop.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost").get("type") == "result"
    out = server.ctl("sessions").stdout
    assert "alice@localhost/phone" not in out and "alice@localhost/laptop" in out

    bad = server.ctl("kick", "localhost", check=False)
    assert bad.returncode != 0 and "not a user's JID" in bad.stderr
    for c in (laptop, bob):
        c.close()
