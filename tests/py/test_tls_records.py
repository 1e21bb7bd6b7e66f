"""End-to-end tests of c2s's TLS record layer (`<tls record-layer>`, docs/c2s.md "TLS
records after the handshake"): after a TLS 1.3 handshake by rustls, c2s runs the
connection's records itself (crates/sx/src/tls_records.rs).

The client is pyOpenSSL (OpenSSL 3) through scram_client.RawClient, independent of
rustls on both counts: it checks that c2s's records are what OpenSSL expects (large
stanzas over several records each way, channel binding with the TLS exporter taken
before the keys), that TLS 1.2 clients are still served (rustls keeps those), that a
forged record ends that connection alone with a TLS alert, and that
`record-layer='rustls'` serves the same way.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_tls_records.py -q
"""

import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("OpenSSL")

from scram_client import login, tag  # noqa: E402
from serverproc import bin_dir, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
NS_CLIENT = "jabber:client"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


def chat(sender, recipient_jid, body):
    sender.send(f"<message type='chat' to='{recipient_jid}' id='m{len(body)}'>"
                f"<body>{body}</body></message>")


def body_of(client, expected_len):
    """The body of the next chat message `client` receives."""
    deadline = time.monotonic() + 10
    while True:
        element = client.next(max(0.0, deadline - time.monotonic()), what="a message")
        if element.tag == tag(NS_CLIENT, "message"):
            body = element.find(tag(NS_CLIENT, "body"))
            if body is not None and len(body.text or "") == expected_len:
                return body.text


def exchange(a, b):
    """Stanzas of a few bytes and of several TLS records (16 KiB each) both ways."""
    for n in (5, 20_000, 50_000):
        text = ("abcdefghij" * (n // 10 + 1))[:n]
        chat(a, b.jid, text)
        assert body_of(b, n) == text
        chat(b, a.jid, text[::-1])
        assert body_of(a, n) == text[::-1]


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_tls13_records_carry_stanzas_and_channel_binding(server, mode):
    port = server.starttls_port if mode == "starttls" else server.tls_port
    # -PLUS binds the login to the TLS exporter, which c2s took before rustls's keys.
    a = login(port, "alice", USERS["alice"], mode=mode, mechanism="SCRAM-SHA-256-PLUS")
    b = login(port, "bob", USERS["bob"], mode=mode, mechanism="SCRAM-SHA-1-PLUS")
    assert a.tls_version() == "TLSv1.3"
    exchange(a, b)
    a.close()
    b.close()


def test_tls12_client_is_served(server):
    old = login(server.starttls_port, "alice", USERS["alice"], max_tls12=True)
    assert old.tls_version() == "TLSv1.2"
    new = login(server.starttls_port, "bob", USERS["bob"])
    assert new.tls_version() == "TLSv1.3"
    exchange(old, new)
    old.close()
    new.close()


def test_a_forged_record_ends_that_connection_alone(server):
    a = login(server.starttls_port, "alice", USERS["alice"])
    b = login(server.starttls_port, "bob", USERS["bob"])
    forger = login(server.starttls_port, "alice", USERS["alice"], resource="forger")
    # A well-framed application-data record that no key made, written under TLS.
    forger._out += bytes([23, 3, 3, 0, 40]) + bytes(range(40))
    forger._flush(time.monotonic() + 5)
    forger.wait_closed()
    server.wait_for(lambda: "does not decrypt" in server.log("c2s"),
                    "c2s to log the forged record")
    exchange(a, b)
    a.close()
    b.close()


@pytest.fixture
def rustls_server(request, tmp_path):
    with serving(request, tmp_path, USERS,
                 c2s_extra="<tls required='true' record-layer='rustls'/>") as s:
        yield s


def test_rustls_record_layer_serves_the_same(rustls_server):
    s = rustls_server
    a = login(s.tls_port, "alice", USERS["alice"], mode="tls", mechanism="SCRAM-SHA-256-PLUS")
    b = login(s.starttls_port, "bob", USERS["bob"], mechanism="SCRAM-SHA-256-PLUS")
    exchange(a, b)
    a.close()
    b.close()


def test_unknown_record_layer_is_a_config_error(tmp_path):
    """A misspelt value stops c2s at its configuration check, naming the file, the line
    and the values it takes."""
    shipped = (Path(__file__).resolve().parents[2] / "etc" / "c2s.xml").read_text()
    element = "<tls required=\"true\" record-layer=\"compact\"/>"
    assert element in shipped
    config = tmp_path / "c2s.xml"
    config.write_text(shipped.replace(element, element.replace("compact", "kernel")))
    line = next(i for i, text in enumerate(config.read_text().splitlines(), 1)
                if "record-layer=\"kernel\"" in text)
    result = subprocess.run([str(bin_dir() / "c2s"), "-c", str(config), "--check"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert f"c2s.xml:{line}" in message, message
    assert "expected 'compact' or 'rustls'" in message, message
