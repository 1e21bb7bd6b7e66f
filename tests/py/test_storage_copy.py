"""Copying a whole store (docs/migration.md, "Copying a store"): `jabberctl dump` of a
server on xdb-file, `jabberctl restore` into a server on xdb-pg (a throwaway
PostgreSQL cluster, tests/py/pgcluster.py), and back into a fresh xdb-file server.

Data is made the way users make it (logins through c2s, tests/py/scram_client.py): a
roster, a vCard, private XML, chats archived by MAM, an offline message, a persistent
group chat room (muc: its configuration, archive and the service's room directory),
last activity; and, through a raw component link as any module would store it,
fragments of namespaces XEP-0227 has no place for, on a user and on the host itself.
After each restore: the dump of the new store is the same as the first (byte for
byte, the date aside), the user logs in with the old password and finds everything,
and a MAM query answers the same messages with the same ids.

Also: a server whose credentials and rosters are in a second store (storage routed by
namespace) is dumped whole (the router merges both stores' `list` answers), and a
dump cut short restores nothing that can log in.

Fails (does not skip) when the PostgreSQL binaries are missing:
    apt-get install postgresql

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_storage_copy.py -q
"""

import hashlib
import os
import re
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("OpenSSL")

from pgcluster import Cluster  # noqa: E402
from scram_client import local, login, to_xml, until  # noqa: E402
from serverproc import MUC_SERVICE, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
NS_ROSTER = "jabber:iq:roster"
NS_VCARD = "vcard-temp"
NS_PRIVATE = "jabber:iq:private"
NS_MAM = "urn:xmpp:mam:2"
NS_MUC = "http://jabber.org/protocol/muc"
NS_MUC_USER = "http://jabber.org/protocol/muc#user"
NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
ROOM = f"room@{MUC_SERVICE}"
HOSTS = ["--host", "localhost", "--host", MUC_SERVICE]

# Stored through a raw component link: namespaces no XEP-0227 file carries.
CUSTOM_USER = ("alice@localhost", "urn:example:custom",
               "<custom xmlns='urn:example:custom' n='1'>x &amp; y<![CDATA[<z/>]]></custom>"
               "<more xmlns='urn:example:custom'/>")
CUSTOM_HOST = ("localhost", "urn:example:host-data", "<h xmlns='urn:example:host-data'>host</h>")


# -- a raw storage link ------------------------------------------------------------------

class XdbLink:
    """A component link to the router as `admin-N` (trusted: may send storage
    requests), for requests written by hand."""

    def __init__(self, port):
        self.name = f"admin-{os.getpid()}{int(time.time() * 1000) % 100000}"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.sock.sendall(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
            f"xmlns:stream='http://etherx.jabber.org/streams' to='{self.name}'>".encode())
        head = self._until(rb"<stream:stream[^>]*>")
        stream_id = re.search(rb"id=['\"]([^'\"]+)['\"]", head.group(0)).group(1)
        digest = hashlib.sha1(stream_id + b"admin-secret").hexdigest()
        self.sock.sendall(f"<handshake>{digest}</handshake>".encode())
        self._until(rb"<handshake\s*/>|<handshake></handshake>")
        self.next_id = 0

    def _until(self, pattern):
        deadline = time.monotonic() + 10
        while True:
            m = re.search(pattern, self.buf, re.S)
            if m:
                self.buf = self.buf[m.end():]
                return m
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.buf!r}"
            data = self.sock.recv(65536)
            assert data, f"link closed waiting for {pattern!r}: {self.buf!r}"
            self.buf += data

    def ask(self, kind, owner, ns, content=""):
        """Sends a storage request; returns (type, content) of the answer."""
        self.next_id += 1
        rid = f"raw{self.next_id}"
        self.sock.sendall(
            f"<xdb xmlns='urn:jabberd-rs:xdb:0' type='{kind}' to='{owner}' from='{self.name}' "
            f"ns='{ns}' id='{rid}'>{content}</xdb>".encode())
        m = self._until(rb"<xdb [^>]*id='" + rid.encode()
                        + rb"'[^>]*?(?:/>|>(.*?)</xdb>)")
        kind = re.search(rb"type='([^']+)'", m.group(0)).group(1).decode()
        return kind, (m.group(1) or b"").decode()

    def close(self):
        self.sock.close()


def stored_raw(server, owner, ns):
    link = XdbLink(server.port)
    try:
        kind, content = link.ask("get", owner, ns)
        assert kind == "result", content
        return content
    finally:
        link.close()


# -- what users see ----------------------------------------------------------------------

def ok(c, kind, inner, to=None):
    iq = c.iq(kind, inner, to=to)
    assert iq.get("type") == "result", to_xml(iq)
    return iq


def roster(c):
    iq = ok(c, "get", f"<query xmlns='{NS_ROSTER}'/>")
    return sorted((i.get("jid"), i.get("name")) for i in iq.iter(f"{{{NS_ROSTER}}}item"))


def vcard_fn(c):
    iq = ok(c, "get", f"<vCard xmlns='{NS_VCARD}'/>")
    fn = iq.find(f"{{{NS_VCARD}}}vCard/{{{NS_VCARD}}}FN")
    return fn.text if fn is not None else None


def private(c):
    iq = ok(c, "get", f"<query xmlns='{NS_PRIVATE}'><prefs xmlns='urn:example:prefs'/></query>")
    e = iq.find(f"{{{NS_PRIVATE}}}query/{{urn:example:prefs}}prefs")
    return None if e is None else e.get("theme")


def mam(c, to=None):
    """(id, body) of every archived message a MAM query returns, in order."""
    c.other.clear()
    ok(c, "set", f"<query xmlns='{NS_MAM}' queryid='q1'/>", to=to)
    out = []
    for m in c.other:
        r = m.find(f"{{{NS_MAM}}}result")
        if r is None:
            continue
        body = next((b.text for b in m.iter("{jabber:client}body")), None)
        out.append((r.get("id"), body))
    return out


def body_of(e):
    b = e.find("{jabber:client}body")
    return None if b is None else b.text


def is_subject(e):
    return local(e) == "message" and e.find("{jabber:client}subject") is not None


def join(c, nick):
    c.send(f"<presence to='{ROOM}/{nick}'><x xmlns='{NS_MUC}'><history maxstanzas='10'/></x></presence>")
    return until(c, lambda e: is_subject(e) or e.get("type") == "error", f"joining {ROOM}")


def self_presence(got, nick="Alice"):
    return next(e for e in got if local(e) == "presence" and e.get("from") == f"{ROOM}/{nick}")


def status_codes(e):
    x = e.find(f"{{{NS_MUC_USER}}}x")
    return [] if x is None else [s.get("code") for s in x.findall(f"{{{NS_MUC_USER}}}status")]


def field(var, value):
    return f"<field var='{var}'><value>{value}</value></field>"


# -- the data ----------------------------------------------------------------------------

def populate(server):
    """Makes the data; returns alice's MAM (id, body) list."""
    alice = login(server.starttls_port, "alice", "alice-pw", resource="a")
    bob = login(server.starttls_port, "bob", "bob-pw", resource="b")
    try:
        ok(alice, "set", f"<query xmlns='{NS_ROSTER}'><item jid='bob@localhost' name='Bob'/></query>")
        ok(alice, "set", f"<vCard xmlns='{NS_VCARD}'><FN>Alice Liddell</FN></vCard>")
        ok(alice, "set", f"<query xmlns='{NS_PRIVATE}'><prefs xmlns='urn:example:prefs' theme='dark'/></query>")
        alice.send("<presence/>")
        bob.send("<presence/>")
        for n in range(3):
            alice.send(f"<message to='bob@localhost/b' type='chat' id='c{n}'><body>chat {n}</body></message>")
            until(bob, lambda e, n=n: body_of(e) == f"chat {n}", f"chat {n}")
        deadline = time.monotonic() + 10
        while len(mam(alice)) < 3:
            assert time.monotonic() < deadline, "alice's archive never held the chats"
            time.sleep(0.1)
        # A persistent room with a subject and archived messages.
        got = join(alice, "Alice")
        assert "201" in status_codes(self_presence(got)), "a new room"
        form = (f"<x xmlns='jabber:x:data' type='submit'>"
                + field("muc#roomconfig_persistentroom", 1)
                + field("muc#roomconfig_roomname", "Kept") + "</x>")
        ok(alice, "set", f"<query xmlns='{NS_MUC_OWNER}'>{form}</query>", to=ROOM)
        alice.send(f"<message to='{ROOM}' type='groupchat'><subject>Still here</subject></message>")
        until(alice, is_subject, "the subject")
        for n in range(2):
            alice.send(f"<message to='{ROOM}' type='groupchat'><body>room {n}</body></message>")
            until(alice, lambda e, n=n: body_of(e) == f"room {n}", "the echo")
        alice.send(f"<presence to='{ROOM}/Alice' type='unavailable'/>")
        bob.close()
        bob = None
        # bob is away: an offline message.
        alice.send("<message to='bob@localhost' type='chat'><body>while you were out</body></message>")
        alice.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
        deadline = time.monotonic() + 10
        while len(archived := mam(alice)) < 4:
            assert time.monotonic() < deadline, "alice's archive never held the message"
            time.sleep(0.1)
    finally:
        alice.close()
        if bob is not None:
            bob.close()
    link = XdbLink(server.port)
    try:
        for owner, ns, content in (CUSTOM_USER, CUSTOM_HOST):
            assert link.ask("set", owner, ns, content)[0] == "result"
    finally:
        link.close()
    return archived


def dump(server, path, hosts=HOSTS):
    r = server.ctl("dump", str(path), *hosts, timeout=60)
    assert not path.with_name(path.name + ".partial").exists()
    return r


def records(path):
    """The dump's content, its date aside."""
    return re.sub(r"created='[^']*'", "created=''", path.read_text())


def settled_dump(server, path, hosts=HOSTS):
    """A dump once the server stopped writing (last activity, offline storage and the
    room's state are written after the clients are gone)."""
    previous = None
    for _ in range(40):
        dump(server, path, hosts)
        now = records(path)
        if now == previous:
            return now
        previous = now
        time.sleep(0.25)
    raise AssertionError("the store kept changing")


def check(server, archived, room_archive):
    """What alice and bob find after a restore."""
    # The host's own data and the raw namespaces, byte for byte.
    for owner, ns, content in (CUSTOM_USER, CUSTOM_HOST):
        assert stored_raw(server, owner, ns) == content
    alice = login(server.starttls_port, "alice", "alice-pw", resource="a2")
    try:
        assert roster(alice) == [("bob@localhost", "Bob")]
        assert vcard_fn(alice) == "Alice Liddell"
        assert private(alice) == "dark"
        # The same messages with the same ids.
        assert mam(alice) == archived
        assert mam(alice, to=ROOM) == room_archive
        got = join(alice, "Alice")
        assert "201" not in status_codes(self_presence(got)), "the room existed"
        assert got[-1].find("{jabber:client}subject").text == "Still here"
        assert [body_of(e) for e in got if body_of(e)] == ["room 0", "room 1"]
    finally:
        alice.close()
    with pytest.raises(AssertionError):
        login(server.starttls_port, "alice", "wrong-pw", resource="x")
    bob = login(server.starttls_port, "bob", "bob-pw", resource="b2")
    try:
        bob.send("<presence/>")
        until(bob, lambda e: body_of(e) == "while you were out", "the offline message")
    finally:
        bob.close()


def test_xdb_file_to_postgresql_and_back(request, tmp_path):
    first, second, third = (tmp_path / f"{n}.xml" for n in ("first", "second", "third"))
    with serving(request, tmp_path / "a", USERS, muc=True) as a:
        archived = populate(a)
        assert [b for _, b in archived] == ["chat 0", "chat 1", "chat 2", "while you were out"]
        alice = login(a.starttls_port, "alice", "alice-pw", resource="m")
        try:
            room_archive = mam(alice, to=ROOM)
        finally:
            alice.close()
        assert [b for _, b in room_archive] == ["room 0", "room 1"]
        original = settled_dump(a, first)
        r = dump(a, first)
        assert re.search(r"\d+ owner\(s\), \d+ fragment\(s\), \d+ archived item\(s\) dumped", r.stderr), r.stderr
    # Everything is there, the namespaces XEP-0227 does not know included.
    for needle in ["<set to='localhost' ns='urn:example:host-data'>",
                   "<set to='alice@localhost' ns='urn:example:custom'>",
                   "<set to='alice@localhost' ns='jabber:iq:last'>",
                   f"<set to='{MUC_SERVICE}' ns='urn:jabberd-rs:muc:rooms:1'>",
                   f"<set to='{ROOM}' ns='urn:jabberd-rs:muc:room:0'>",
                   f"<archive-append to='{ROOM}' ns='urn:xmpp:mam:2'>",
                   "<archive-append to='alice@localhost' ns='urn:xmpp:mam:2'>",
                   "<set to='bob@localhost' ns='urn:jabberd-rs:offline:0'>"]:
        assert needle in original, needle
    # Credentials come last among an owner's records.
    alice_records = re.findall(r"^<(?:set|archive-append) to='alice@localhost' ns='([^']*)'",
                               original, re.M)
    assert alice_records[-1] == "urn:jabberd-rs:auth:0", alice_records
    assert CUSTOM_USER[2] in original

    cluster = Cluster()
    try:
        with serving(request, tmp_path / "pg", storage="pg", pg_url=cluster.url, muc=True) as b:
            r = b.ctl("restore", str(first), timeout=60)
            assert "owner(s)" in r.stderr and "restored" in r.stderr, r.stderr
            assert settled_dump(b, second) == original
            # A second restore finds the owners there: refused, nothing changed.
            r = b.ctl("restore", str(first), check=False, timeout=60)
            assert r.returncode == 1, r.stdout + r.stderr
            assert "alice@localhost: not restored: it has data already" in r.stderr
            dump(b, second)
            assert records(second) == original
            check(b, archived, room_archive)
            # --replace puts the dump's data back over what the logins changed (bob's
            # offline message was delivered: it is back).
            r = b.ctl("restore", "--replace", "--host", "localhost", str(first), timeout=60)
            assert "bob@localhost: " in r.stdout and MUC_SERVICE not in r.stdout, r.stdout
            assert "while you were out" in stored_raw(b, "bob@localhost", "urn:jabberd-rs:offline:0")
    finally:
        cluster.destroy()

    # And back to xdb-file.
    with serving(request, tmp_path / "c", muc=True) as c:
        c.ctl("restore", str(second), timeout=60)
        assert settled_dump(c, third) == original
        check(c, archived, room_archive)


def test_stores_routed_by_namespace_are_dumped_whole(request, tmp_path):
    """With credentials and rosters in a second xdb-file (docs/protocol.md, "Storage
    routed by namespace"), `list` with ns='*' reaches both stores and the router merges
    their answers: the dump holds both stores' namespaces, and restores into a server
    with one store where the account logs in with its roster."""
    dumped = tmp_path / "routed.xml"
    with serving(request, tmp_path / "a") as a:
        spool2 = Path(a.dir) / "spool-accounts"
        (Path(a.dir) / "xdb-file-2.xml").write_text(
            "<xdb-file>\n"
            f"  {a.router_element('xdb-file')}\n"
            "  <host>localhost</host>\n"
            "  <namespace>urn:jabberd-rs:auth:0</namespace>\n"
            f"  <namespace>{NS_ROSTER}</namespace>\n"
            f"  <spool dir='{spool2}'/>\n"
            "</xdb-file>\n")
        offset = a.log_size("xdb-file-2")
        a.spawn("xdb-file-2", binary="xdb-file", extra=["--instance", "2"])
        a._wait_connected("xdb-file-2", offset)
        a.adduser("alice@localhost", "alice-pw")
        alice = login(a.starttls_port, "alice", "alice-pw", resource="a")
        try:
            ok(alice, "set", f"<query xmlns='{NS_ROSTER}'><item jid='bob@localhost' name='Bob'/></query>")
            ok(alice, "set", f"<vCard xmlns='{NS_VCARD}'><FN>Alice Liddell</FN></vCard>")
        finally:
            alice.close()
        assert (spool2 / "localhost" / "alice").is_dir()
        text = settled_dump(a, dumped, ["--host", "localhost"])
    for ns in ["urn:jabberd-rs:auth:0", NS_ROSTER, NS_VCARD]:
        assert f"<set to='alice@localhost' ns='{ns}'>" in text, ns
    # A copy cut short before alice's credentials: what was read is stored, but she
    # cannot log in; the whole file restores over it with --replace.
    cut = tmp_path / "cut.xml"
    cut.write_text(text[:text.index("<set to='alice@localhost' ns='urn:jabberd-rs:auth:0'>")])
    with serving(request, tmp_path / "b") as b:
        r = b.ctl("restore", str(cut), check=False)
        assert r.returncode == 1 and "incomplete" in r.stderr, r.stderr
        with pytest.raises(AssertionError):
            login(b.starttls_port, "alice", "alice-pw", resource="x")
        r = b.ctl("restore", str(dumped), check=False)
        assert r.returncode == 1 and "it has data already" in r.stderr, r.stderr
        b.ctl("restore", "--replace", str(dumped))
        alice = login(b.starttls_port, "alice", "alice-pw", resource="a")
        try:
            assert roster(alice) == [("bob@localhost", "Bob")]
            assert vcard_fn(alice) == "Alice Liddell"
        finally:
            alice.close()
