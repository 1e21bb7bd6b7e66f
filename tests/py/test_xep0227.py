"""Migration with XEP-0227 files (docs/migration.md): `jabberctl import` of what Prosody
and ejabberd from Debian export, then logging in with the old passwords and finding the
rosters, vCards and the rest; and `jabberctl export` of our server imported into another
one (on PostgreSQL) giving the same file.

The export files are made in the test by the real tools, on data made the way users
make it:

- Prosody (Debian's `prosody`, 0.12): a throwaway Prosody with Debian's default modules
  (vCards in PEP through mod_vcard4/mod_vcard_legacy) plus mod_mam, users registered with
  prosodyctl (internal_hashed: SCRAM-SHA-1 keys), their rosters, vCard with a photo,
  private XML, a PEP node and archived chats made by clients (tests/py/scram_client.py);
  then `prosody-migrator` from `internal` to `xep0227`. Prosody 0.12's
  mod_storage_xep0227 writes its files into Prosody's data directory, which the
  migrator takes from its built-in CFG_DATADIR: the migrator is run through a few lines
  of Lua that set that variable to the test's directory and run /usr/bin/prosody-migrator
  unchanged.
- ejabberd (Debian's `ejabberd`, 23.01): a throwaway node (own spool, config and epmd
  port; as the `ejabberd` user, in a directory of its own under /tmp) with
  `auth_password_format: scram`, data made with `ejabberdctl` (register, roster items,
  vCard, private XML, privacy list, an offline message, a subscription request), one
  user registered after the config switched to SCRAM-SHA-256; then `ejabberdctl
  export_piefxis`.

Fails (does not skip) when prosody or ejabberd are missing (`.ci/run` installs them),
and ejabberdctl needs root (it runs the node as the `ejabberd` user).

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_xep0227.py -q
"""

import base64
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("OpenSSL")

from scram_client import local, login, to_xml  # noqa: E402
from s2s_servers import make_cert  # noqa: E402
from serverproc import accepts, bin_dir, free_port, serving  # noqa: E402

PROSODY = shutil.which("prosody")
PROSODYCTL = shutil.which("prosodyctl")
PROSODY_MIGRATOR = shutil.which("prosody-migrator")
EJABBERDCTL = shutil.which("ejabberdctl") or (
    "/usr/sbin/ejabberdctl" if os.path.exists("/usr/sbin/ejabberdctl") else None)

NS_ROSTER = "jabber:iq:roster"
NS_VCARD = "vcard-temp"
NS_PRIVATE = "jabber:iq:private"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_MAM = "urn:xmpp:mam:2"
NS_BLOCKING = "urn:xmpp:blocking"
NS_DELAY = "urn:xmpp:delay"
NS_CLIENT = "jabber:client"

# Prosody's users (SCRAM-SHA-1 keys, 10000 iterations) and ejabberd's (SCRAM-SHA-1 and,
# for edave, SCRAM-SHA-256; keys encoded twice in its export, as ejabberd does).
PROSODY_USERS = {"palice": "palice-Pw-1", "pbob": "pbob-Pw-2", "pcarol": "pcarol-Pw-3"}
EJABBERD_USERS = {"ealice": "ealice-Pw-1", "ebob": "ebob-Pw-2"}
EJABBERD_SHA256_USERS = {"edave": "edave-Pw-4"}
# A photo's bytes (any bytes do: nothing decodes them).
PHOTO = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(64))).decode()
NOTES_NODE = "urn:example:notes"


def q(ns, name):
    return f"{{{ns}}}{name}"


# -- Prosody ---------------------------------------------------------------------------------

def prosody_config(d, port, cert, key):
    """Debian's default module list (prosody.cfg.lua as shipped), without the network
    services the test does not use, plus mod_mam and mod_offline."""
    return f"""
run_as_root = true
prosody_user = "root"
prosody_group = "root"
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{d}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
s2s_direct_tls_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ }}
modules_enabled = {{
  "disco", "roster", "saslauth", "tls", "blocklist", "bookmarks", "carbons", "pep",
  "private", "smacks", "vcard4", "vcard_legacy", "csi_simple", "ping", "register",
  "time", "uptime", "version", "mam", "offline"
}}
modules_disabled = {{ "s2s_bidi", "posix" }}
authentication = "internal_hashed"
storage = "internal"
archive_expires_after = "never"
c2s_require_encryption = true
VirtualHost "localhost"
  ssl = {{ certificate = "{cert}", key = "{key}" }}
"""


# Runs /usr/bin/prosody-migrator with its data directory (where Prosody 0.12's
# mod_storage_xep0227 writes, whatever the output store's `path`) set to arg 1.
MIGRATOR_WRAPPER = """
local out = table.remove(arg, 1)
local f = assert(io.open(MIGRATOR))
local src = f:read("a")
f:close()
src = src:gsub("^#![^\\n]*\\n", "")
src = src:gsub("CFG_DATADIR='[^']*'", function() return ("CFG_DATADIR=%q"):format(out) end)
arg[0] = MIGRATOR
assert(load(src, "@" .. MIGRATOR))(table.unpack(arg))
"""


def ping(c):
    """A round trip to the server: what this session sent before is processed."""
    iq = c.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    assert iq.get("type") == "result", to_xml(iq)


def ok(c, kind, inner, to=None):
    iq = c.iq(kind, inner, to=to)
    assert iq.get("type") == "result", to_xml(iq)
    return iq


def publish(c, node, item_id, payload, options):
    fields = "".join(f"<field var='pubsub#{k}'><value>{v}</value></field>"
                     for k, v in options.items())
    ok(c, "set",
       f"<pubsub xmlns='{NS_PUBSUB}'><publish node='{node}'><item id='{item_id}'>{payload}</item>"
       f"</publish><publish-options><x xmlns='jabber:x:data' type='submit'>"
       f"<field var='FORM_TYPE' type='hidden'><value>{NS_PUBSUB}#publish-options</value></field>"
       f"{fields}</x></publish-options></pubsub>")


def make_prosody_data(port):
    """What users do in Prosody: rosters with a subscription both ways and a pending
    request, a vCard with a photo, private XML, PEP items, archived chats."""
    alice = login(port, "palice", PROSODY_USERS["palice"], mechanism="SCRAM-SHA-1",
                  resource="a")
    bob = login(port, "pbob", PROSODY_USERS["pbob"], mechanism="SCRAM-SHA-1", resource="b")
    carol = login(port, "pcarol", PROSODY_USERS["pcarol"], mechanism="SCRAM-SHA-1",
                  resource="c")
    clients = [alice, bob, carol]
    try:
        for c in clients:
            c.send("<presence/>")
            ping(c)
        ok(alice, "set", f"<query xmlns='{NS_ROSTER}'><item jid='pbob@localhost' name='Bobby'>"
                         "<group>Friends</group></item></query>")
        alice.send("<presence to='pbob@localhost' type='subscribe'/>")
        ping(alice)
        bob.send("<presence to='palice@localhost' type='subscribed'/>")
        bob.send("<presence to='palice@localhost' type='subscribe'/>")
        ping(bob)
        alice.send("<presence to='pbob@localhost' type='subscribed'/>")
        ping(alice)
        # carol asks; alice never answers.
        carol.send("<presence to='palice@localhost' type='subscribe'><status>it is carol</status>"
                   "</presence>")
        ping(carol)
        # vcard_legacy keeps it as PEP: urn:xmpp:vcard4 and the avatar nodes.
        ok(alice, "set", f"<vCard xmlns='{NS_VCARD}'><FN>Alice Liddell</FN>"
                         "<NICKNAME>ally</NICKNAME>"
                         f"<PHOTO><TYPE>image/png</TYPE><BINVAL>{PHOTO}</BINVAL></PHOTO></vCard>")
        ok(alice, "set", f"<query xmlns='{NS_PRIVATE}'><prefs xmlns='exodus:prefs'>"
                         "<defaultnick>Ally</defaultnick></prefs></query>")
        for i, text in ((1, "remember the milk"), (2, "and the eggs")):
            publish(alice, NOTES_NODE, f"n{i}", f"<note xmlns='{NOTES_NODE}'>{text}</note>",
                    {"access_model": "whitelist", "max_items": "10"})
        bob.send("<message to='palice@localhost' type='chat' id='m1'>"
                 "<body>hello palice</body></message>")
        ping(bob)
        time.sleep(1.1)  # archive stamps have whole seconds: keep the order visible
        alice.send("<message to='pbob@localhost' type='chat' id='m2'>"
                   "<body>hi pbob</body></message>")
        ping(alice)
        ping(bob)
    finally:
        for c in clients:
            c.close()


@pytest.fixture(scope="module")
def prosody_export(tmp_path_factory):
    """The XEP-0227 files Prosody's migrator makes (one per user)."""
    for tool in (PROSODY, PROSODYCTL, PROSODY_MIGRATOR):
        if tool is None:
            pytest.fail("Prosody is not installed (apt-get install prosody); this test needs it")
    d = tmp_path_factory.mktemp("prosody")
    (d / "data").mkdir()
    port = free_port()
    cert, key = make_cert(d, "localhost")
    config = d / "prosody.cfg.lua"
    config.write_text(prosody_config(d, port, cert, key))
    for user, password in PROSODY_USERS.items():
        r = subprocess.run([PROSODYCTL, "--config", str(config), "register", user, "localhost",
                            password], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"prosodyctl register: {r.stdout}{r.stderr}"
    log = open(d / "prosody.out", "ab")
    proc = subprocess.Popen([PROSODY, "--config", str(config), "-F"], cwd=d,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while not accepts(port):
            assert proc.poll() is None, f"prosody exited:\n{(d / 'prosody.log').read_text()}"
            assert time.monotonic() < deadline, "prosody does not listen"
            time.sleep(0.05)
        make_prosody_data(port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    out = d / "export"
    out.mkdir()
    stores = ", ".join(f'"{s}"' for s in
                       ("accounts", "roster", "vcard", "private", "pep-pubsub", "archive-archive"))
    migrator_cfg = d / "migrator.cfg.lua"
    migrator_cfg.write_text(f"""
input {{ type = "internal"; path = "{d}/data"; hosts = {{ ["localhost"] = {{ {stores} }} }} }}
output {{ type = "xep0227"; path = "{out}" }}
""")
    wrapper = d / "migrator.lua"
    wrapper.write_text(f"local MIGRATOR = {PROSODY_MIGRATOR!r}\n" + MIGRATOR_WRAPPER)
    r = subprocess.run(["lua5.4", str(wrapper), str(out), "--root", "--config", str(migrator_cfg)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "Done!" in r.stderr, f"prosody-migrator:\n{r.stdout}{r.stderr}"
    files = sorted(out.glob("*@localhost.xml"))
    assert [f.name for f in files] == [f"{u}@localhost.xml" for u in sorted(PROSODY_USERS)]
    # The data is in Prosody's forms (else the test would not test the import).
    alice = (out / "palice@localhost.xml").read_text()
    # (Prosody writes attributes in any order.)
    for expected in ("urn:xmpp:pie:0#scram", "mechanism='SCRAM-SHA-1'", "subscription='both'",
                     "urn:xmpp:vcard4", "urn:xmpp:avatar:data", NOTES_NODE, "urn:xmpp:pie:0#mam",
                     "from='pcarol@localhost'"):
        assert expected in alice, f"{expected!r} not in Prosody's export:\n{alice}"
    assert "vcard-temp" not in alice  # Prosody keeps vCards in PEP: import converts
    return files


# -- ejabberd --------------------------------------------------------------------------------

EJABBERD_CONFIG = """
hosts:
  - localhost
loglevel: info
auth_method: internal
auth_password_format: scram
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
modules:
  mod_roster: {}
  mod_vcard: {}
  mod_private: {}
  mod_offline: {}
  mod_privacy: {}
  mod_blocking: {}
  mod_admin_extra: {}
"""


class Ejabberd:
    """A throwaway ejabberd node: config, spool and logs in a directory the `ejabberd`
    user owns, its own node name and epmd port (the epmd it starts is stopped after)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="jrs-xep0227-ejabberd-"))
        for sub in ("conf", "spool", "logs", "export"):
            (self.dir / sub).mkdir()
        (self.dir / "conf" / "ejabberd.yml").write_text(EJABBERD_CONFIG)
        (self.dir / "conf" / "inetrc").write_text("")
        self.chown()
        self.node = f"jrs{os.getpid()}@localhost"
        self.env = dict(os.environ, ERL_EPMD_PORT=str(free_port()))

    def chown(self):
        os.chmod(self.dir, 0o755)
        subprocess.run(["chown", "-R", "ejabberd:ejabberd", str(self.dir)], check=True)

    def ctl(self, *args, check=True):
        r = subprocess.run(
            [EJABBERDCTL, "--config-dir", str(self.dir / "conf"),
             "--spool", str(self.dir / "spool"), "--logs", str(self.dir / "logs"),
             "--node", self.node, *args],
            capture_output=True, text=True, timeout=60, env=self.env, cwd=self.dir,
            stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, f"ejabberdctl {' '.join(args)} ({r.returncode}):\n" \
                                      f"{r.stdout}{r.stderr}\n{self.log()}"
        return r

    def log(self):
        try:
            return (self.dir / "logs" / "ejabberd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self):
        self.ctl("start")
        self.ctl("started")

    def stop(self):
        self.ctl("stop", check=False)
        self.ctl("stopped", check=False)
        subprocess.run(["epmd", "-port", self.env["ERL_EPMD_PORT"], "-kill"],
                       capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_ejabberd_data(e):
    for user, password in EJABBERD_USERS.items():
        e.ctl("register", user, "localhost", password)
    e.ctl("add_rosteritem", "ealice", "localhost", "ebob", "localhost", "Bobby", "Friends", "both")
    e.ctl("add_rosteritem", "ebob", "localhost", "ealice", "localhost", "Alice", "Friends", "both")
    e.ctl("set_vcard", "ealice", "localhost", "FN", "Alice Liddell")
    e.ctl("set_vcard", "ealice", "localhost", "NICKNAME", "ally")
    e.ctl("set_vcard2", "ealice", "localhost", "EMAIL", "USERID", "ealice@example.com")
    e.ctl("private_set", "ealice", "localhost",
          "<storage xmlns='storage:bookmarks'><conference jid='room@conference.localhost' "
          "name='The room' autojoin='true'/></storage>")
    # XEP-0191 blocking is a privacy list in ejabberd.
    e.ctl("privacy_set", "ealice", "localhost",
          "<query xmlns='jabber:iq:privacy'><list name='Blocked contacts'><item type='jid' "
          "value='spam@evil.example' action='deny' order='1'/></list></query>")
    e.ctl("privacy_set", "ealice", "localhost",
          "<query xmlns='jabber:iq:privacy'><default name='Blocked contacts'/></query>")
    e.ctl("send_message", "chat", "ebob@localhost", "ealice@localhost", "", "hello while offline")
    e.ctl("send_stanza", "ecarol@localhost", "ealice@localhost",
          "<presence type='subscribe' from='ecarol@localhost' to='ealice@localhost'>"
          "<status>it is carol</status></presence>")
    # Accounts made from now on get SCRAM-SHA-256 keys (auth_scram_hash is read when a
    # password is set).
    (e.dir / "conf" / "ejabberd.yml").write_text(EJABBERD_CONFIG + "auth_scram_hash: sha256\n")
    e.chown()
    e.ctl("reload_config")
    for user, password in EJABBERD_SHA256_USERS.items():
        e.ctl("register", user, "localhost", password)
    e.ctl("set_vcard", "edave", "localhost", "FN", "Dave")


@pytest.fixture(scope="module")
def ejabberd_export(tmp_path_factory):
    """ejabberd's export: the main file (it includes the host's file)."""
    if EJABBERDCTL is None:
        pytest.fail("ejabberd is not installed (apt-get install ejabberd); this test needs it")
    if os.geteuid() != 0:
        pytest.fail("ejabberdctl must run as root (it runs the node as the ejabberd user)")
    e = Ejabberd()
    try:
        e.start()
        make_ejabberd_data(e)
        e.ctl("export_piefxis", str(e.dir / "export"))
        out = tmp_path_factory.mktemp("ejabberd")
        for f in (e.dir / "export").iterdir():
            shutil.copy(f, out / f.name)
    finally:
        e.stop()
    host_files = [f for f in out.iterdir() if f.name.endswith("_localhost.xml")]
    main = [f for f in out.iterdir() if f not in host_files]
    assert len(main) == 1 and len(host_files) == 1, sorted(out.iterdir())
    text = host_files[0].read_text()
    for expected in ("mechanism='SCRAM-SHA-1'", "mechanism='SCRAM-SHA-256'", "<offline-messages>",
                     "jabber:iq:privacy", "it is carol", "storage:bookmarks"):
        assert expected in text, f"{expected!r} not in ejabberd's export:\n{text}"
    assert f"href='{host_files[0].name}'" in main[0].read_text()
    return main[0]


# -- checks on our server ----------------------------------------------------------------

def roster_items(c):
    iq = ok(c, "get", f"<query xmlns='{NS_ROSTER}'/>")
    return {i.get("jid"): (i.get("name"), i.get("subscription"),
                           sorted(g.text for g in i.iter(q(NS_ROSTER, "group"))))
            for i in iq.iter(q(NS_ROSTER, "item"))}


def vcard(c):
    iq = ok(c, "get", f"<vCard xmlns='{NS_VCARD}'/>")
    return iq.find(q(NS_VCARD, "vCard"))


def vcard_text(v, *path):
    e = v.find("/".join(q(NS_VCARD, p) for p in path))
    return e.text if e is not None else None


def mam_bodies(c):
    c.other.clear()
    ok(c, "set", f"<query xmlns='{NS_MAM}' queryid='q1'/>")
    return [b.text for m in c.other if m.find(q(NS_MAM, "result")) is not None
            for b in m.iter(q(NS_CLIENT, "body"))]


def wait_for(c, predicate, what, timeout=5.0):
    for e in list(c.other):
        if predicate(e):
            c.other.remove(e)
            return e
    deadline = time.monotonic() + timeout
    while True:
        e = c.next(max(0.0, deadline - time.monotonic()), what=what)
        if predicate(e):
            return e
        c.other.append(e)


def refused(port, user, password, mechanism):
    with pytest.raises(AssertionError, match="login of .* failed"):
        login(port, user, password, mechanism=mechanism)


def check_prosody_users(port):
    # SCRAM-SHA-1 keys carried over: SCRAM-SHA-1 and PLAIN (checked against them) work;
    # SCRAM-SHA-256 cannot (docs/migration.md, "Passwords").
    alice = login(port, "palice", PROSODY_USERS["palice"], mechanism="SCRAM-SHA-1", resource="a")
    login(port, "palice", PROSODY_USERS["palice"], mechanism="PLAIN").close()
    refused(port, "palice", PROSODY_USERS["palice"], "SCRAM-SHA-256")
    refused(port, "palice", "wrong", "SCRAM-SHA-1")
    refused(port, "palice", "wrong", "PLAIN")
    try:
        assert roster_items(alice) == {"pbob@localhost": ("Bobby", "both", ["Friends"])}
        v = vcard(alice)  # made from Prosody's vcard4 and avatar PEP nodes
        assert vcard_text(v, "FN") == "Alice Liddell"
        assert vcard_text(v, "NICKNAME") == "ally"
        assert vcard_text(v, "PHOTO", "TYPE") == "image/png"
        assert vcard_text(v, "PHOTO", "BINVAL") == PHOTO
        iq = ok(alice, "get", f"<query xmlns='{NS_PRIVATE}'><prefs xmlns='exodus:prefs'/></query>")
        assert iq.find(f".//{q('exodus:prefs', 'defaultnick')}").text == "Ally"
        iq = ok(alice, "get", f"<pubsub xmlns='{NS_PUBSUB}'><items node='{NOTES_NODE}'/></pubsub>")
        notes = sorted((i.get("id"), i.find(q(NOTES_NODE, "note")).text)
                       for i in iq.iter(q(NS_PUBSUB, "item")))
        assert notes == [("n1", "remember the milk"), ("n2", "and the eggs")]
        iq = ok(alice, "get",
                f"<pubsub xmlns='{NS_PUBSUB}'><items node='urn:xmpp:vcard4'/></pubsub>")
        assert iq.find(f".//{q('urn:ietf:params:xml:ns:vcard-4.0', 'vcard')}") is not None
        assert mam_bodies(alice) == ["hello palice", "hi pbob"]
        # carol's unanswered request comes again at the first available presence.
        alice.send("<presence/>")
        p = wait_for(alice, lambda e: local(e) == "presence" and e.get("type") == "subscribe",
                     "carol's subscription request")
        assert p.get("from") == "pcarol@localhost"  # (Prosody keeps no status with it)
    finally:
        alice.close()
    bob = login(port, "pbob", PROSODY_USERS["pbob"], mechanism="SCRAM-SHA-1")
    try:
        assert roster_items(bob) == {"palice@localhost": (None, "both", [])}
        assert mam_bodies(bob) == ["hello palice", "hi pbob"]
    finally:
        bob.close()
    login(port, "pcarol", PROSODY_USERS["pcarol"], mechanism="SCRAM-SHA-1").close()


def check_ejabberd_users(port):
    alice = login(port, "ealice", EJABBERD_USERS["ealice"], mechanism="SCRAM-SHA-1", resource="a")
    refused(port, "ealice", EJABBERD_USERS["ealice"], "SCRAM-SHA-256")
    refused(port, "ealice", "wrong", "SCRAM-SHA-1")
    try:
        assert roster_items(alice) == {"ebob@localhost": ("Bobby", "both", ["Friends"])}
        v = vcard(alice)
        assert vcard_text(v, "FN") == "Alice Liddell"
        assert vcard_text(v, "NICKNAME") == "ally"
        assert vcard_text(v, "EMAIL", "USERID") == "ealice@example.com"
        iq = ok(alice, "get",
                f"<query xmlns='{NS_PRIVATE}'><storage xmlns='storage:bookmarks'/></query>")
        conf = iq.find(f".//{q('storage:bookmarks', 'conference')}")
        assert conf is not None and conf.get("jid") == "room@conference.localhost", to_xml(iq)
        iq = ok(alice, "get", f"<blocklist xmlns='{NS_BLOCKING}'/>")
        assert [i.get("jid") for i in iq.iter(q(NS_BLOCKING, "item"))] == ["spam@evil.example"]
        alice.send("<presence/>")
        m = wait_for(alice, lambda e: local(e) == "message", "the offline message")
        assert m.find(q(NS_CLIENT, "body")).text == "hello while offline"
        assert m.get("from") == "ebob@localhost"
        assert m.find(q(NS_DELAY, "delay")) is not None
        p = wait_for(alice, lambda e: local(e) == "presence" and e.get("type") == "subscribe",
                     "carol's subscription request")
        assert p.get("from") == "ecarol@localhost"
    finally:
        alice.close()
    # SCRAM-SHA-256 keys: SCRAM-SHA-256 and PLAIN, not SCRAM-SHA-1.
    dave = login(port, "edave", EJABBERD_SHA256_USERS["edave"], mechanism="SCRAM-SHA-256")
    try:
        assert vcard_text(vcard(dave), "FN") == "Dave"
    finally:
        dave.close()
    login(port, "edave", EJABBERD_SHA256_USERS["edave"], mechanism="PLAIN").close()
    refused(port, "edave", EJABBERD_SHA256_USERS["edave"], "SCRAM-SHA-1")
    bob = login(port, "ebob", EJABBERD_USERS["ebob"], mechanism="SCRAM-SHA-1")
    try:
        assert roster_items(bob) == {"ealice@localhost": ("Alice", "both", ["Friends"])}
    finally:
        bob.close()


# The checks try wrong passwords and refused mechanisms on purpose: more than c2s's
# default limit of failed logins from one address allows.
LENIENT = {"auth_failures": (100, 60)}


def imported(result):
    """The accounts a `jabberctl import` run names as imported."""
    return sorted(line.split(":")[0] for line in result.stdout.splitlines()
                  if line and not line.startswith(" "))


# -- tests -----------------------------------------------------------------------------------

def test_import_from_prosody(request, tmp_path, prosody_export):
    with serving(request, tmp_path, **LENIENT) as server:
        r = server.ctl("import", *map(str, prosody_export))
        assert imported(r) == [f"{u}@localhost" for u in sorted(PROSODY_USERS)], r.stdout
        assert "palice@localhost: SCRAM-SHA-1 keys, roster 1, vCard, private 1" in r.stdout
        check_prosody_users(server.starttls_port)


def test_import_from_ejabberd(request, tmp_path, ejabberd_export):
    with serving(request, tmp_path, **LENIENT) as server:
        r = server.ctl("import", str(ejabberd_export))
        assert imported(r) == ["ealice@localhost", "ebob@localhost", "edave@localhost"], r.stdout
        assert "edave@localhost: SCRAM-SHA-256 keys" in r.stdout
        users = server.ctl("users", "localhost").stdout.split()
        assert users == ["ealice@localhost", "ebob@localhost", "edave@localhost"]
        check_ejabberd_users(server.starttls_port)


def test_export_round_trip_to_postgresql(request, tmp_path, prosody_export, ejabberd_export):
    """Everything imported from both, exported, imported into a server on xdb-pg and
    exported again: the same file, and the same logins, rosters and vCards there."""
    from test_storage_pg import Cluster

    first, second = tmp_path / "first.xml", tmp_path / "second.xml"
    with serving(request, tmp_path / "file", **LENIENT) as a:
        a.ctl("import", *map(str, prosody_export), str(ejabberd_export))
        r = a.ctl("export", "localhost", "-o", str(first))
        assert "6 account(s) exported" in r.stderr
    cluster = Cluster()
    try:
        with serving(request, tmp_path / "pg", storage="pg", pg_url=cluster.url,
                     **LENIENT) as b:
            r = b.ctl("import", str(first))
            assert "not carried over" not in r.stdout, r.stdout
            b.ctl("export", "localhost", "-o", str(second))
            assert second.read_text() == first.read_text()
            check_prosody_users(b.starttls_port)
            check_ejabberd_users(b.starttls_port)
    finally:
        cluster.destroy()


def test_existing_accounts_are_kept_unless_replaced(request, tmp_path, prosody_export):
    palice = [f for f in prosody_export if f.name.startswith("palice@")]
    with serving(request, tmp_path, {"palice": "a-new-password"}, **LENIENT) as server:
        r = server.ctl("import", *map(str, palice), check=False)
        assert r.returncode == 1
        assert "palice@localhost: not imported: the account exists already" in r.stderr
        login(server.starttls_port, "palice", "a-new-password", mechanism="SCRAM-SHA-256").close()
        server.ctl("import", "--replace", *map(str, palice))
        refused(server.starttls_port, "palice", "a-new-password", "SCRAM-SHA-256")
        c = login(server.starttls_port, "palice", PROSODY_USERS["palice"], mechanism="SCRAM-SHA-1")
        try:
            assert roster_items(c) == {"pbob@localhost": ("Bobby", "both", ["Friends"])}
        finally:
            c.close()


def test_dry_run_needs_no_server(tmp_path, ejabberd_export):
    r = subprocess.run([str(bin_dir() / "jabberctl"), "-c", str(tmp_path / "missing.xml"),
                        "import", "--dry-run", str(ejabberd_export)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert imported(r) == ["ealice@localhost", "ebob@localhost", "edave@localhost"]
    assert ("ealice@localhost: SCRAM-SHA-1 keys, roster 1, vCard, private 1, offline 1, "
            "blocklist 1") in r.stdout
    bad = tmp_path / "bad.xml"
    bad.write_text("<server-data xmlns='urn:example'/>")
    r = subprocess.run([str(bin_dir() / "jabberctl"), "import", "--dry-run", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "not a XEP-0227 file" in r.stderr
