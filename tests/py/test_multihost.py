"""The server spread over several hosts: network namespaces made by the test (one per
host, each with a veth into a bridge; the test's own namespace reaches them over the
bridge; addresses in 10.x.y.0/24, nothing routed off the machine), each host run by its
own `scripts/jabberd` with its own process list (docs/multihost.md):

    router  router (TLS listener for the others, client certificates from a test CA;
            a plain loopback listener in its own namespace for jabberctl)
    store   xdb-file, s2s
    sm1     sm-1          sm2   sm-2
    c2s1    c2s-1         c2s2  c2s-2

Clients on both c2s hosts chat; carbons and the archive work across them; a component
whose certificate does not verify is refused; the bare-JID hashing that picks an sm
instance normalises JIDs as sm does; and when one sm host's network is cut, the router
notices within its link timeout and c2s restores its users' sessions on the other sm:
their clients stay connected and chat on.

Needs root (ip netns), iproute2 and the debug build; fails, not skips, without them.
"""

import datetime
import os
import random
import re
import shutil
import subprocess
import time

import pytest

from scram_client import NS_STREAMS_ERR, StreamClosed, login, tag, to_xml, until
from serverproc import ROOT, SECRETS, Server, bin_dir

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NS_MAM = "urn:xmpp:mam:2"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
HOSTS = {"router": 1, "store": 2, "sm1": 3, "sm2": 4, "c2s1": 5, "c2s2": 6}
ROUTER_PORT = 5348  # TLS, for the other hosts
LOCAL_PORT = 5347  # plain, loopback of the router's namespace only (jabberctl)
C2S_PORT = 5222
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw",
         "ärger": "ärger-pw"}
SECRETS = dict(SECRETS, s2s="s2s-secret")


def run(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


# -- the router's rendezvous hashing, to pick users that show the normalisation --------

def fnv1a(data):
    h = 0xCBF29CE484222325
    for b in data:
        if 65 <= b <= 90:
            b += 32
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def mix(z):
    m = 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def owner(key, names=("sm-1", "sm-2")):
    k = fnv1a(key.encode())
    return max(names, key=lambda n: (mix(k ^ fnv1a(n.encode())), fnv1a(n.encode())))


# -- certificates -----------------------------------------------------------------------

class Ca:
    def __init__(self, name):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = subject
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def write(self, path):
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, directory, name):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(self.key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        crt, pem = directory / f"{name}.crt", directory / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return crt, pem


# -- the network ------------------------------------------------------------------------

class Network:
    """A bridge in the test's namespace and one namespace per host, each with a veth."""

    def __init__(self):
        tag_ = f"{os.getpid() % 10000}{random.randint(10, 99)}"
        self.prefix = f"jrs{tag_}"
        self.subnet = f"10.{random.randint(64, 250)}.{random.randint(1, 250)}"
        self.bridge = f"{self.prefix}br"
        self.made = []

    def ip(self, host):
        return f"{self.subnet}.{HOSTS[host]}"

    def ns(self, host):
        return f"{self.prefix}-{host}"

    def up(self):
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        run("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for host, n in HOSTS.items():
            ns = self.ns(host)
            run("ip", "netns", "add", ns)
            self.made.append(("netns", ns))
            outer = f"{self.prefix}v{n}"
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", outer, "master", self.bridge)
            run("ip", "link", "set", outer, "up")
            run("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self, host):
        run("ip", "-n", self.ns(host), "link", "set", "eth0", "down")

    def down(self):
        for kind, name in reversed(self.made):
            if kind == "netns":
                run("ip", "netns", "del", name, check=False)
            else:
                run("ip", "link", "del", name, check=False)


# -- the hosts' configurations ---------------------------------------------------------

class Cluster:
    """Writes each host's configuration and process list, and starts and stops them."""

    def __init__(self, directory, net):
        self.dir = directory
        self.net = net
        certs = directory / "pki"
        certs.mkdir(parents=True)
        self.ca = Ca("jabberd-rs multihost test CA")
        self.ca_file = self.ca.write(certs / "ca.crt")
        self.router_cert = self.ca.issue(certs, "router.test")
        self.client_certs = {name: self.ca.issue(certs, name)
                             for name in ("xdb-file", "s2s", "sm", "c2s", "admin")}
        self.stranger = Ca("another CA").issue(certs / "stranger", "sm")
        self.started = []

    def router_element(self, name, instance=None):
        crt, key = self.client_certs[name]
        return (f"<router address='{self.net.ip('router')}' port='{ROUTER_PORT}' tls='true' "
                f"ca-file='{self.ca_file}' server-name='router.test' cert='{crt}' key='{key}' "
                f"name='{name}' secret='{SECRETS[name]}' reconnect='0.1' keepalive='1' timeout='2'/>")

    def host_dir(self, host):
        d = self.dir / host
        d.mkdir(exist_ok=True)
        return d

    def base_configs(self, host):
        """serverproc's configurations (as every other test uses them) with this
        cluster's TLS router links."""
        d = self.host_dir(host)
        cluster = self

        class Configs(Server):
            def router_element(self, name):
                return cluster.router_element(name)

        configs = Configs(d)
        configs.port = LOCAL_PORT
        configs.starttls_port, configs.tls_port = C2S_PORT, 5223
        (d / "certs").mkdir(exist_ok=True)
        configs.write_configs()
        return d

    def write(self):
        d = self.base_configs("router")
        router_crt, router_key = self.router_cert
        (d / "router.xml").write_text(
            "<router>\n"
            f"  <listen address='127.0.0.1' port='{LOCAL_PORT}'/>\n"
            f"  <listen address='{self.net.ip('router')}' port='{ROUTER_PORT}' tls='true'/>\n"
            f"  <tls cert='{router_crt}' key='{router_key}' client-ca='{self.ca_file}'/>\n"
            f"  <users file='{d / 'router-users.xml'}'/>\n"
            "  <grace seconds='2'/>\n"
            "  <keepalive seconds='1' timeout='2'/>\n"
            "  <log level='debug'/>\n"
            "</router>\n")
        (d / "ctl.xml").write_text(
            f"<jabberctl><router address='127.0.0.1' port='{LOCAL_PORT}' name='admin' "
            f"secret='{SECRETS['admin']}'/></jabberctl>\n")
        self.process_list("router", [
            ("router", "router", d / "router.xml", "", f"127.0.0.1:{LOCAL_PORT}")])

        d = self.base_configs("store")
        s2s = (ROOT / "etc" / "s2s.xml").read_text()
        s2s = re.sub(r"<router [^>]*/>", self.router_element("s2s"), s2s)
        s2s = s2s.replace('<listen address="::" port="5269"',
                          f'<listen address="{self.net.ip("store")}" port="5269"')
        s2s = s2s.replace("var/certs/", f"{d}/certs/")
        (d / "s2s.xml").write_text(s2s)
        self.process_list("store", [
            ("xdb-file", "xdb-file", d / "xdb-file.xml", "", None),
            ("s2s", "s2s", d / "s2s.xml", "", None)])

        for n in (1, 2):
            d = self.base_configs(f"sm{n}")
            self.process_list(f"sm{n}", [(f"sm-{n}", "sm", d / "sm.xml", f"--instance {n}", None)])
            d = self.base_configs(f"c2s{n}")
            c2s = (d / "c2s.xml").read_text().replace(
                "<listen address='127.0.0.1'", f"<listen address='{self.net.ip(f'c2s{n}')}'")
            (d / "c2s.xml").write_text(c2s)
            self.process_list(f"c2s{n}", [(f"c2s-{n}", "c2s", d / "c2s.xml", f"--instance {n}", None)])

    def process_list(self, host, processes):
        d = self.host_dir(host)
        lines = [f"<supervisor>\n  <bin-dir>{bin_dir()}</bin-dir>\n"
                 f"  <run-dir>{d / 'run'}</run-dir>\n  <log-dir>{d / 'log'}</log-dir>\n"]
        for name, program, config, args, wait_for in processes:
            attrs = f"name='{name}' program='{program}' config='{config}'"
            if args:
                attrs += f" args='{args}'"
            if wait_for:
                attrs += f" wait-for='{wait_for}'"
            lines.append(f"  <process {attrs} stop-timeout='3'/>\n")
        lines.append("</supervisor>\n")
        (d / "supervisor.xml").write_text("".join(lines))

    def jabberd(self, host, *command, check=True):
        return run("ip", "netns", "exec", self.net.ns(host), str(ROOT / "scripts" / "jabberd"),
                   "-f", str(self.dir / host / "supervisor.xml"), *command, check=check)

    def start(self):
        for host in HOSTS:
            self.jabberd(host, "start", "--daemon", "--no-build")
            self.started.append(host)

    def stop(self):
        for host in reversed(self.started):
            self.jabberd(host, "stop", check=False)

    def log(self, host, name):
        p = self.dir / host / "log" / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def logs(self):
        out = []
        for host in HOSTS:
            for p in sorted((self.dir / host / "log").glob("*.log")):
                text = p.read_text(errors="replace").splitlines()[-40:]
                out.append(f"== {host}/{p.name}\n" + "\n".join(text))
        return "\n".join(out)

    def wait(self, condition, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def adduser(self, jid, password):
        run("ip", "netns", "exec", self.net.ns("router"), str(bin_dir() / "jabberctl"),
            "-c", str(self.dir / "router" / "ctl.xml"), "adduser", jid, "--password", password)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("this test makes network namespaces: it needs root and iproute2 "
                    "(apt-get install iproute2)")
    net = Network()
    directory = tmp_path_factory.mktemp("multihost")
    c = Cluster(directory, net)
    try:
        net.up()
        c.write()
        c.start()
        router_log = lambda: c.log("router", "router")  # noqa: E731
        for name in ("xdb-file", "s2s", "sm-1", "sm-2", "c2s-1", "c2s-2"):
            c.wait(lambda: re.search(rf"component=\"?{name}\"?.*component connected|"
                                     rf"{name}.*component connected", router_log()),
                   f"{name} to connect to the router over TLS")
        for jid_user, password in USERS.items():
            c.adduser(f"{jid_user}@localhost", password)
        yield c
    finally:
        c.stop()
        net.down()


def connect(cluster, user, host, resource):
    return login(C2S_PORT, user, USERS[user], host=cluster.net.ip(host), resource=resource)


def chat(sender, to, body):
    sender.send(f"<message type='chat' to='{to}' id='{body}'><body>{body}</body></message>")


def expect_body(client, body, what):
    return until(client, lambda e: e.tag.endswith("message")
                 and e.findtext("{jabber:client}body") == body, what)[-1]


def expect_child(client, child, what):
    return until(client, lambda e: e.find(child) is not None, what)[-1]


def sm_of(cluster, user):
    """The sm instance (host) that started the user's session, from the sm logs."""
    for n in (1, 2):
        if re.search(rf"jid={re.escape(user)}@localhost.*session started|"
                     rf"user\{{jid={re.escape(user)}@localhost\}}", cluster.log(f"sm{n}", f"sm-{n}")):
            return n
    return None


def test_chat_carbons_and_archive_across_hosts(cluster):
    alice_a = connect(cluster, "alice", "c2s1", "a")
    alice_b = connect(cluster, "alice", "c2s2", "b")
    bob = connect(cluster, "bob", "c2s2", "phone")
    for c in (alice_a, alice_b):
        assert c.iq("set", f"<enable xmlns='{NS_CARBONS}'/>").get("type") == "result"
    chat(bob, "alice@localhost/a", "across-1")
    expect_body(alice_a, "across-1", "bob's message on c2s-1")
    expect_child(alice_b, f"{tag(NS_CARBONS, 'received')}/{tag(NS_FORWARD, 'forwarded')}",
                 "the carbon on c2s-2")
    chat(alice_a, "bob@localhost/phone", "across-2")
    expect_body(bob, "across-2", "alice's answer on c2s-2")
    expect_child(alice_b, tag(NS_CARBONS, "sent"), "the sent carbon on c2s-2")
    # The archive (sm of alice, storage on another host) has both.
    result = alice_b.iq("set", f"<query xmlns='{NS_MAM}' queryid='q'/>")
    assert result.get("type") == "result", to_xml(result)
    bodies = [m.findtext(".//{jabber:client}body") for m in alice_b.other
              if m.find(f".//{tag(NS_MAM, 'result')}") is not None]
    assert "across-1" in bodies and "across-2" in bodies, bodies
    for c in (alice_a, alice_b, bob):
        c.close()


def test_a_component_without_a_certificate_from_the_ca_is_refused(cluster):
    from OpenSSL import SSL
    import socket
    for cert in (None, cluster.stranger):
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        if cert is not None:
            ctx.use_certificate_file(str(cert[0]))
            ctx.use_privatekey_file(str(cert[1]))
        sock = socket.create_connection((cluster.net.ip("router"), ROUTER_PORT), timeout=5)
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"router.test")
        refused = False
        try:
            conn.do_handshake()
            conn.send(b"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
                      b"xmlns:stream='http://etherx.jabber.org/streams' to='sm'>")
            refused = not conn.recv(4096)
        except (SSL.Error, OSError):
            refused = True
        finally:
            sock.close()
        assert refused, f"the router talked to a component with certificate {cert}"
    cluster.wait(lambda: "TLS handshake failed" in cluster.log("router", "router"),
                 "the router to log the refusals", timeout=5)


def test_routing_normalises_jids_like_sm(cluster):
    # Forms of ärger@localhost that a naive hash would send to the other sm instance.
    canonical = "ärger@localhost"
    forms = [f for f in ("ÄRGER@localhost", "a\u0308rger@localhost", "A\u0308RGER@LOCALHOST",
                         "Ärger@LocalHost")
             if owner(f) != owner(canonical)]
    assert forms, "no form of the name hashes elsewhere: pick another name"
    u = login(C2S_PORT, "ärger", USERS["ärger"], host=cluster.net.ip("c2s1"), resource="r")
    bob = connect(cluster, "bob", "c2s2", "n")
    for i, form in enumerate(forms):
        chat(bob, f"{form}/r", f"form-{i}")
        expect_body(u, f"form-{i}", f"the message sent to {form!r}")
    u.close()
    bob.close()


def test_cutting_an_sm_host_moves_its_users_to_the_other(cluster):
    # Users whose sessions the cut sm host holds: the router's choice among sm-1, sm-2.
    on_sm1 = [u for u in ("alice", "bob", "carol", "dave") if owner(f"{u}@localhost") == "sm-1"]
    on_sm2 = [u for u in ("alice", "bob", "carol", "dave") if owner(f"{u}@localhost") == "sm-2"]
    assert on_sm1 and on_sm2, (on_sm1, on_sm2)
    moved, stays = on_sm1[0], on_sm2[0]
    m = connect(cluster, moved, "c2s1", "m")
    s = connect(cluster, stays, "c2s2", "s")
    # Available: a message that reaches sm-2 before the restore goes to offline
    # storage and comes to the restored (available) session from there.
    m.send("<presence/>")
    chat(s, f"{moved}@localhost/m", "before-cut")
    expect_body(m, "before-cut", "a message before the cut")
    offset = len(cluster.log("c2s1", "c2s-1"))
    cut_at = time.monotonic()
    router_offset = len(cluster.log("router", "router"))
    cluster.net.cut("sm1")
    # Sent once the router has found the link dead, around the restore: it goes to
    # sm-2, which gives it to the restored session (through offline storage if it
    # comes first). It must reach the moved user on the same connection. (What the
    # router had written into the dead link's socket before it noticed is lost: links
    # do not acknowledge yet, issue 13.)
    cluster.wait(lambda: "link lost" in cluster.log("router", "router")[router_offset:],
                 "the router to find sm-1's link dead", timeout=15)
    chat(s, f"{moved}@localhost/m", "during-cut")
    # The router notices within keepalive (1 s) + timeout (2 s) and tells c2s, which
    # restores the sessions sm-1 held at sm-2 (the instance that serves their users
    # now): the client stays connected and notices nothing.
    cluster.wait(lambda: "session restored" in cluster.log("c2s1", "c2s-1")[offset:],
                 "c2s-1 to restore the moved user's session at sm-2", timeout=15)
    noticed = time.monotonic() - cut_at
    assert noticed < 10, noticed
    assert not m.closed and not m.stream_closed and m.stream_error is None, \
        to_xml(m.stream_error) if m.stream_error is not None else "stream closed"
    assert re.search(rf"user\{{jid={re.escape(moved)}@localhost\}}.*session restored",
                     cluster.log("sm2", "sm-2")), "the session restored at sm-2"
    expect_body(m, "during-cut", "the message sent during the cut")
    # Messages reach the same connection, now through sm-2, both ways.
    chat(s, f"{moved}@localhost/m", "after-cut")
    expect_body(m, "after-cut", "a message after the move")
    chat(m, f"{stays}@localhost/s", "from-sm2")
    expect_body(s, "from-sm2", "chat after the move")
    m.close()
    s.close()
