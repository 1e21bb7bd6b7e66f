"""End-to-end tests of several muc instances serving one service (the router gives each
room to one of them by hashing the room's JID): the room directory (disco#items of the
service) and `max-rooms-per-user` are shared through the directory's log in storage
(muc/src/directory.rs, docs/muc.md "Several instances").

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_muc_instances.py -q
"""

import time

import pytest

pytest.importorskip("OpenSSL")

from scram_client import login, stanza_error_condition, to_xml  # noqa: E402
from serverproc import MUC_SERVICE, TIMEOUT, serving  # noqa: E402
from test_muc import NS_INFO, NS_ITEMS, NS_OWNER, field, join, owner_submit, q  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
# The directory's read of the log serves this long (directory::CACHE).
CACHE = 2.0


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS, muc=True) as s:
        yield s


@pytest.fixture
def limited(request, tmp_path):
    with serving(request, tmp_path, USERS, muc=True,
                 muc_extra="<rooms max-rooms-per-user='2'/>") as s:
        yield s


def connect(server, user):
    return login(server.starttls_port, user, USERS[user], resource="r")


def start_second(server):
    """A second instance, muc-2, with muc's configuration."""
    (server.dir / "muc-2.xml").write_text((server.dir / "muc.xml").read_text())
    offset = server.log_size("muc-2")
    server.spawn("muc-2", binary="muc", extra=["--instance", "2"])
    server._wait_connected("muc-2", offset)


def restart(server, name):
    """Kills an instance (SIGKILL: nothing saved on the way out) and starts it again."""
    server.kill(name)
    if name == "muc":
        server.restart("muc")
    else:
        start_second(server)


def instance_of(server, room):
    """The instance that served `room` (its task's log span names the room)."""
    found = [n for n in ("muc", "muc-2") if f"room{{room={room}}}" in server.log(n)]
    assert len(found) == 1, (room, found)
    return found[0]


def directory(client):
    r = client.iq("get", f"<query xmlns='{NS_ITEMS}'/>", to=MUC_SERVICE)
    assert r.get("type") == "result", to_xml(r)
    return {i.get("jid"): i.get("name") for i in r.iter(q(NS_ITEMS, "item"))}


def wait_directory(client, expected, what, timeout=TIMEOUT + 2 * CACHE):
    """Polls the directory until `expected(listing)` holds; returns the listing."""
    deadline = time.monotonic() + timeout
    while True:
        listing = directory(client)
        if expected(listing):
            return listing
        assert time.monotonic() < deadline, f"{what}: {listing}"
        time.sleep(0.2)


def create(client, room, nick, fields=""):
    """Creates `room` (the first join) and submits its configuration; returns the
    error condition of the join, or None when created."""
    got = join(client, nick, room=room)
    if got[-1].get("type") == "error":
        return stanza_error_condition(got[-1])[1]
    r = owner_submit(client, fields, room=room)
    assert r.get("type") == "result", to_xml(r)
    return None


def persistent(name):
    return (field("muc#roomconfig_persistentroom", 1) + field("muc#roomconfig_publicroom", 1)
            + field("muc#roomconfig_roomname", name))


def test_the_directory_lists_the_rooms_of_every_instance(server):
    start_second(server)
    alice, bob = connect(server, "alice"), connect(server, "bob")
    try:
        kept = {f"kept{i}@{MUC_SERVICE}": f"Kept {i}" for i in range(8)}
        for room, name in kept.items():
            assert create(alice, room, "Alice", persistent(name)) is None
        served = {room: instance_of(server, room) for room in kept}
        assert set(served.values()) == {"muc", "muc-2"}, served
        # Temporary public rooms (Bob stays in them): listed too, while they live.
        temporary = [f"temp{i}@{MUC_SERVICE}" for i in range(6)]
        for room in temporary:
            assert create(bob, room, "Bob") is None
        on = {room: instance_of(server, room) for room in temporary}
        assert set(on.values()) == {"muc", "muc-2"}, on

        every = set(kept) | set(temporary)
        listing = wait_directory(alice, lambda listing: every <= set(listing),
                                 "every room in the directory")
        assert all(listing[room] == name for room, name in kept.items()), listing

        for name in ("muc", "muc-2"):
            # While it is down the other instance answers the service (and holds its
            # rooms): the persistent rooms of both are still listed.
            server.kill(name)
            listing = wait_directory(alice, lambda listing: set(kept) <= set(listing),
                                     f"the directory while {name} is down")
            restart(server, name)
            # The temporary rooms of the instance that restarted ended with it; the
            # other's are still there.
            died = {room for room in temporary if on[room] == name}
            alive = set(temporary) - died
            listing = wait_directory(
                alice, lambda listing: set(kept) | alive <= set(listing) and not died & set(listing),
                f"the directory after {name} restarted")
            temporary = sorted(alive)
    finally:
        alice.close()
        bob.close()


def probe(server, client, room):
    """The instance that serves `room`, found without creating it: a disco#info query
    starts its task (answered item-not-found)."""
    r = client.iq("get", f"<query xmlns='{NS_INFO}'/>", to=room)
    assert stanza_error_condition(r)[1] == "item-not-found", to_xml(r)
    return server.wait_for(
        lambda: [n for n in ("muc", "muc-2") if f"room{{room={room}}}" in server.log(n)],
        f"the instance of {room}")[0]


def test_rooms_per_user_count_on_every_instance(limited):
    server = limited
    start_second(server)
    alice, carol = connect(server, "alice"), connect(server, "carol")
    try:
        # Two room names on each instance.
        on = {"muc": [], "muc-2": []}
        for i in range(64):
            room = f"r{i}@{MUC_SERVICE}"
            names = on[probe(server, alice, room)]
            if len(names) < 2:
                names.append(room)
            if all(len(n) == 2 for n in on.values()):
                break
        assert all(len(n) == 2 for n in on.values()), on

        # Alice (at most 2 rooms) creates one room on each instance.
        first, second = on["muc"][0], on["muc-2"][0]
        assert create(alice, first, "Alice", persistent("First")) is None
        assert create(alice, second, "Alice", persistent("Second")) is None
        # A third is refused on either instance (once their reads of the directory
        # are older than the cache: a creation within it may go one over).
        time.sleep(CACHE + 0.2)
        for name in ("muc", "muc-2"):
            got = join(alice, "Alice", room=on[name][1])
            assert stanza_error_condition(got[-1])[1] == "not-allowed", to_xml(got[-1])

        # Her persistent rooms still count after both instances restarted.
        restart(server, "muc")
        restart(server, "muc-2")
        for name in ("muc", "muc-2"):
            got = join(alice, "Alice", room=on[name][1])
            assert stanza_error_condition(got[-1])[1] == "not-allowed", to_xml(got[-1])
        # Carol has created nothing: she may.
        assert create(carol, on["muc"][1], "Carol") is None

        # Alice destroys her room on muc-2: she may create one again (on muc).
        r = alice.iq("set", f"<query xmlns='{NS_OWNER}'><destroy/></query>", to=second)
        assert r.get("type") == "result", to_xml(r)
        time.sleep(CACHE + 0.2)
        assert create(alice, on["muc-2"][1], "Alice") is None
    finally:
        alice.close()
        carol.close()


def test_the_list_of_an_earlier_version_is_migrated(server):
    """The single record of earlier versions (urn:jabberd-rs:muc:rooms:0) is moved
    into the log on start."""
    host = server.dir / "spool" / MUC_SERVICE / "@host"
    server.kill("muc")
    server.kill("xdb-file")
    host.mkdir(parents=True, exist_ok=True)
    old = host / "urn%3Ajabberd-rs%3Amuc%3Arooms%3A0.xml"
    old.write_text("<stored><rooms xmlns='urn:jabberd-rs:muc:rooms:0'>"
                   f"<room jid='old@{MUC_SERVICE}' name='Old' public='true'/>"
                   f"<room jid='hidden@{MUC_SERVICE}' name='Hidden' public='false'/>"
                   "</rooms></stored>")
    server.restart("xdb-file")
    server.restart("muc")
    alice = connect(server, "alice")
    try:
        listing = wait_directory(alice, lambda listing: f"old@{MUC_SERVICE}" in listing,
                                 "the migrated room")
        assert listing == {f"old@{MUC_SERVICE}": "Old"}
        server.wait_for(lambda: not old.exists(), "the old record to be deleted")
        assert (host / "urn%3Ajabberd-rs%3Amuc%3Arooms%3A1.xml").exists()
    finally:
        alice.close()
