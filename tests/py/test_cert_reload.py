"""SIGHUP reloads c2s's and s2s's certificates without dropping a connection: new
connections get the new certificate (and, in c2s, the new `tls-server-end-point`
channel binding), open ones go on; a certificate file that does not load leaves the
old certificate in use (docs/operations.md, "Certificates")."""

import datetime
import hashlib
import os
import signal
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from s2s_servers import FedServer
from scram_client import RawClient, local, to_xml
from serverproc import serving

USERS = {"alice": "alice-pw"}


def write_cert(cert_path, key_path, name):
    """A new self-signed certificate for `name` over the old files; its SHA-256."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def served_cert(conn):
    """SHA-256 of the DER certificate a pyOpenSSL connection got."""
    return hashlib.sha256(conn.get_peer_cert_chain(as_cryptography=True)[0]
                          .public_bytes(serialization.Encoding.DER)).digest()


def sighup(server, name, expect):
    offset = server.log_size(name)
    server.procs[name].send_signal(signal.SIGHUP)
    server.wait_for(lambda: expect in server.log(name)[offset:], f"{name}: {expect!r}",
                    timeout=5, watch=[name])


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


def test_c2s_reloads_its_certificate_on_sighup(server):
    certs = server.dir / "certs"
    old = RawClient.connect(server.tls_port, mode="tls")
    old.open_stream()
    before = served_cert(old.tls)
    assert before == hashlib.sha256(x509.load_pem_x509_certificate(
        (certs / "localhost.crt").read_bytes()).public_bytes(serialization.Encoding.DER)).digest()

    new_hash = write_cert(certs / "localhost.crt", certs / "localhost.key", "localhost")
    sighup(server, "c2s", "certificates reloaded")
    c = RawClient.connect(server.tls_port, mode="tls")
    c.open_stream()
    assert served_cert(c.tls) == new_hash, "a new connection gets the new certificate"
    # tls-server-end-point follows: SCRAM-PLUS binding to the new certificate's hash
    # succeeds (RFC 5929: SHA-256 of the DER for an ECDSA-SHA256 certificate).
    outcome, _ = c.scram("alice", "alice-pw", "SCRAM-SHA-256-PLUS",
                         cb_type="tls-server-end-point", cb_data=new_hash)
    assert local(outcome) == "success", to_xml(outcome)
    c.close()
    # The connection from before goes on, with the old certificate.
    outcome, _ = old.scram("alice", "alice-pw", "SCRAM-SHA-256")
    assert local(outcome) == "success", to_xml(outcome)
    old.close()

    # A broken file: the certificate in use stays.
    (certs / "localhost.crt").write_text("not a certificate\n")
    sighup(server, "c2s", "certificates not reloaded")
    c = RawClient.connect(server.tls_port, mode="tls")
    c.open_stream()
    assert served_cert(c.tls) == new_hash
    c.close()


def s2s_starttls(port, domain):
    """STARTTLS on a server-to-server stream to `domain`; the pyOpenSSL connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                 f"xmlns:stream='http://etherx.jabber.org/streams' "
                 f"xmlns:db='jabber:server:dialback' to='{domain}' from='remote.test' "
                 "version='1.0'>".encode())
    got = b""
    deadline = time.monotonic() + 5
    while b"</stream:features>" not in got and time.monotonic() < deadline:
        got += sock.recv(4096)
    assert b"starttls" in got, got
    sock.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    got = b""
    while b"proceed" not in got and time.monotonic() < deadline:
        got += sock.recv(4096)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(domain.encode())
    conn.set_connect_state()
    sock.setblocking(True)
    conn.do_handshake()
    return conn


def test_s2s_reloads_its_certificate_on_sighup(tmp_path):
    server = FedServer(tmp_path, "a.test").start()
    try:
        certs = server.dir / "certs"
        old = s2s_starttls(server.s2s_port, "a.test")
        before = served_cert(old)
        new_hash = write_cert(certs / "s2s-a.test.crt", certs / "s2s-a.test.key", "a.test")
        assert new_hash != before
        sighup(server, "s2s", "certificates reloaded")
        new = s2s_starttls(server.s2s_port, "a.test")
        assert served_cert(new) == new_hash
        # The stream from before is still open: it answers a stream restart.
        old.sendall(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                    b"xmlns:stream='http://etherx.jabber.org/streams' "
                    b"xmlns:db='jabber:server:dialback' to='a.test' from='remote.test' "
                    b"version='1.0'>")
        got = b""
        while b"</stream:features>" not in got:
            got += old.recv(4096)
        for c in (old, new):
            c.close()
    finally:
        server.stop()
    assert os.path.exists(certs / "s2s-a.test.crt")
