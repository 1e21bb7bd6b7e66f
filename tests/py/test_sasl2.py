"""SASL2 (XEP-0388), Bind 2 (XEP-0386), FAST (XEP-0484), XEP-0440 channel binding types
and XEP-0474 downgrade protection: xmpp.js end to end (tests/js/fast.mjs, needs Node.js
and tests/js/node_modules as test_pep_xmppjs.py), and raw streams for exact elements.

    .venv/bin/python -m pytest tests/py/test_sasl2.py -q
"""

import base64
import hashlib
import hmac
import json
import os
import subprocess
from pathlib import Path

import pytest

from scram_client import NS_SASL, RawClient, Scram, local, tag, to_xml
from serverproc import serving
from test_pep_xmppjs import JS_DIR, node  # noqa: F401 (fixture)

USERS = {"alice": "alice-pw"}
NS_SASL2 = "urn:xmpp:sasl:2"
NS_BIND2 = "urn:xmpp:bind:0"
NS_SM = "urn:xmpp:sm:3"
NS_FAST = "urn:xmpp:fast:0"
NS_CB = "urn:xmpp:sasl-cb:0"
UA = "<user-agent id='b0e6a1c2-test'><software>pytest</software></user-agent>"


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


def b64(data):
    return base64.b64encode(data).decode()


def connect(server):
    c = RawClient.connect(server.starttls_port)
    c.open_stream()
    c.starttls()
    features = c.open_stream()
    return c, features


def sasl2_mechanisms(features):
    auth = features.find(tag(NS_SASL2, "authentication"))
    assert auth is not None, to_xml(features)
    return [m.text for m in auth.findall(tag(NS_SASL2, "mechanism"))], auth


def plain2(c, extra="", user="alice", password="alice-pw"):
    payload = b64(f"\0{user}\0{password}".encode())
    c.send(f"<authenticate xmlns='{NS_SASL2}' mechanism='PLAIN'>"
           f"<initial-response>{payload}</initial-response>{UA}{extra}</authenticate>")
    return c.next(what="the SASL2 outcome")


def test_xmppjs_fast_login_in_one_round_trip(node, server):  # noqa: F811
    env = dict(os.environ)
    env["NODE_EXTRA_CA_CERTS"] = str(Path(server.dir) / "certs" / "localhost.crt")
    env.pop("NODE_TLS_REJECT_UNAUTHORIZED", None)
    env["FAST_PASSWORD"] = USERS["alice"]
    result = subprocess.run(
        [node, str(JS_DIR / "fast.mjs"), "--port", str(server.starttls_port), "--user", "alice"],
        cwd=JS_DIR, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40)
    output = f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    summary = json.loads(result.stdout)
    assert summary["ok"] is True, output
    assert summary["second"]["mechanisms"] == ["HT-SHA-256-NONE"], output
    assert summary["first"]["jid"].startswith("alice@localhost/fastjs/"), output
    assert summary["second"]["jid"] == summary["first"]["jid"], "stable resource per user agent"


def test_scram_plus_ssdp_bind2_inline_sm_then_inline_resume(server):
    c, features = connect(server)
    mechs, auth = sasl2_mechanisms(features)
    assert "SCRAM-SHA-256-PLUS" in mechs and "PLAIN" in mechs
    inline = auth.find(tag(NS_SASL2, "inline"))
    assert inline.find(tag(NS_BIND2, "bind")) is not None and inline.find(tag(NS_SM, "sm")) is not None
    fast = inline.find(tag(NS_FAST, "fast"))
    assert [m.text for m in fast] [-1] == "HT-SHA-256-NONE"
    cb = features.find(tag(NS_CB, "sasl-channel-binding"))
    cb_types = sorted(t.get("type") for t in cb)
    assert "tls-server-end-point" in cb_types and "tls-exporter" in cb_types

    scram = Scram("SCRAM-SHA-256-PLUS", "alice", "alice-pw", cb_type="tls-exporter", cb_data=c.exporter())
    c.send(f"<authenticate xmlns='{NS_SASL2}' mechanism='SCRAM-SHA-256-PLUS'>"
           f"<initial-response>{b64(scram.client_first())}</initial-response>{UA}"
           f"<bind xmlns='{NS_BIND2}'><tag>pytest</tag><enable xmlns='{NS_SM}' resume='true'/></bind>"
           "</authenticate>")
    challenge = c.expect("challenge", NS_SASL2)
    server_first = base64.b64decode(challenge.text)
    attrs = dict(a.split("=", 1) for a in server_first.decode().split(","))
    # XEP-0474: h is the hash of the advertised lists; a client that saw a stripped list
    # (here: no -PLUS, no XEP-0440) computes another and stops.
    def ssdp(m, t):
        s = "\x1e".join(sorted(m)) + ("\x1f" + "\x1e".join(sorted(t)) if t is not None else "")
        return b64(hashlib.sha256(s.encode()).digest())
    assert attrs["h"] == ssdp(mechs, cb_types)
    stripped = [m for m in mechs if not m.endswith("-PLUS")]
    assert attrs["h"] != ssdp(stripped, None), "a downgrade would go unnoticed"
    final = scram.client_final(server_first)
    c.send(f"<response xmlns='{NS_SASL2}'>{b64(final)}</response>")
    success = c.expect("success", NS_SASL2)
    assert scram.verify_server_final(base64.b64decode(success.find(tag(NS_SASL2, "additional-data")).text))
    full = success.find(tag(NS_SASL2, "authorization-identifier")).text
    assert full.startswith("alice@localhost/pytest/")
    enabled = success.find(f"{tag(NS_BIND2, 'bound')}/{tag(NS_SM, 'enabled')}")
    assert enabled is not None and enabled.get("resume") == "true", to_xml(success)
    c.expect("features")  # no restart: the features of the bound stream follow
    iq = c.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    assert iq.get("type") == "result"
    previd = enabled.get("id")
    c.sock.close()  # vanish: the session hibernates

    c2, _ = connect(server)
    success = plain2(c2, f"<resume xmlns='{NS_SM}' previd='{previd}' h='1'/>")
    assert local(success) == "success", to_xml(success)
    resumed = success.find(tag(NS_SM, "resumed"))
    assert resumed is not None and resumed.get("previd") == previd, to_xml(success)
    assert success.find(tag(NS_SASL2, "authorization-identifier")).text == full
    c2.close()


def test_bind2_enables_carbons_inline(server):
    """Bind 2 with carbons enabled inline (XEP-0386 4): the server lists the feature,
    the session gets copies of a chat another resource of the user receives, and the
    enable IQ's answer (sm's, asked by c2s for the client) never reaches the client."""
    c, features = connect(server)
    _, auth = sasl2_mechanisms(features)
    inline = [f.get("var") for f in auth.iter(tag(NS_BIND2, "feature"))]
    assert "urn:xmpp:carbons:2" in inline, to_xml(auth)
    success = plain2(c, f"<bind xmlns='{NS_BIND2}'><tag>carbons</tag>"
                        "<enable xmlns='urn:xmpp:carbons:2'/></bind>")
    assert local(success) == "success", to_xml(success)
    c.expect("features")
    c.send("<presence/>")
    other = RawClient.connect(server.starttls_port)
    other.open_stream()
    other.starttls()
    other.open_stream()
    other.scram("alice", "alice-pw")
    other.open_stream()
    other.bind("phone")
    other.send("<presence/>")
    # A message to the other resource comes to this one as a carbon copy.
    other.send("<message to='alice@localhost/phone' type='chat'><body>to the phone</body></message>")
    while True:
        e = c.next(what="the carbon copy")
        assert not (local(e) == "iq" and (e.get("id") or "").startswith("bind2-carbons")), to_xml(e)
        if local(e) == "message" and e.find("{urn:xmpp:carbons:2}received") is not None:
            break
    c.close()
    other.close()


def test_sasl2_without_bind2_then_legacy_bind(server):
    c, _ = connect(server)
    success = plain2(c)
    assert local(success) == "success"
    assert success.find(tag(NS_SASL2, "authorization-identifier")).text == "alice@localhost"
    features = c.expect("features")
    assert features.find(tag("urn:ietf:params:xml:ns:xmpp-bind", "bind")) is not None
    assert c.bind("desk").get("type") == "result"
    assert c.jid == "alice@localhost/desk"
    failure = None
    c2, _ = connect(server)
    failure = plain2(c2, password="wrong")
    assert local(failure) == "failure"
    assert failure.find(tag(NS_SASL, "not-authorized")) is not None, to_xml(failure)
    c.close()
    c2.close()


def ht(token, cb=b""):
    return hmac.new(token.encode(), b"Initiator" + cb, hashlib.sha256).digest()


def test_fast_token_invalidation_and_wrong_token(server):
    c, _ = connect(server)
    success = plain2(c, f"<request-token xmlns='{NS_FAST}' mechanism='HT-SHA-256-NONE'/>")
    token = success.find(tag(NS_FAST, "token"))
    assert token is not None and token.get("expiry"), to_xml(success)
    token = token.get("token")
    c.close()

    def fast_login(extra=""):
        c, _ = connect(server)
        c.send(f"<authenticate xmlns='{NS_SASL2}' mechanism='HT-SHA-256-NONE'>"
               f"<initial-response>{b64(b'alice' + bytes([0]) + ht(token))}</initial-response>{UA}"
               f"<fast xmlns='{NS_FAST}' {extra}/></authenticate>")
        return c, c.next(what="the FAST outcome")

    c, success = fast_login("count='1'")
    assert local(success) == "success", to_xml(success)
    responder = hmac.new(token.encode(), b"Responder", hashlib.sha256).digest()
    assert base64.b64decode(success.find(tag(NS_SASL2, "additional-data")).text) == responder
    c.close()
    # The same count again is a replay.
    c, failure = fast_login("count='1'")
    assert local(failure) == "failure" and failure.find(tag(NS_SASL, "not-authorized")) is not None
    c.close()
    c, success = fast_login("count='2' invalidate='true'")
    assert local(success) == "success", to_xml(success)
    assert success.find(tag(NS_FAST, "token")) is None
    c.close()
    c, failure = fast_login("count='3'")
    assert local(failure) == "failure", "an invalidated token is refused"
    c.close()


def test_fast_reconnect_resumes_tls_and_the_session_in_one_round_trip(server):
    """How a mobile client comes back: a TLS ticket (the handshake skips the certificate),
    the FAST token and XEP-0198 resumption inline, all in the first request."""
    c, _ = connect(server)
    success = plain2(c, f"<request-token xmlns='{NS_FAST}' mechanism='HT-SHA-256-NONE'/>"
                        f"<bind xmlns='{NS_BIND2}'><tag>phone</tag>"
                        f"<enable xmlns='{NS_SM}' resume='true'/></bind>")
    token = success.find(tag(NS_FAST, "token")).get("token")
    previd = success.find(f"{tag(NS_BIND2, 'bound')}/{tag(NS_SM, 'enabled')}").get("id")
    full = success.find(tag(NS_SASL2, "authorization-identifier")).text
    assert not c.tls_resumed()
    tls_session = c.tls_session()
    c.sock.close()  # vanish: the session hibernates

    for count in (1, 2):
        c2 = RawClient.connect(server.starttls_port)
        c2.open_stream()
        c2.starttls(session=tls_session)
        c2.open_stream()
        assert c2.tls_resumed(), "the server took the TLS ticket"
        c2.send(f"<authenticate xmlns='{NS_SASL2}' mechanism='HT-SHA-256-NONE'>"
                f"<initial-response>{b64(b'alice' + bytes([0]) + ht(token))}</initial-response>"
                f"{UA}<resume xmlns='{NS_SM}' previd='{previd}' h='0'/>"
                f"<fast xmlns='{NS_FAST}' count='{count}'/></authenticate>")
        success = c2.next(what="the FAST outcome")
        assert local(success) == "success", to_xml(success)
        resumed = success.find(tag(NS_SM, "resumed"))
        assert resumed is not None and resumed.get("previd") == previd, to_xml(success)
        assert success.find(tag(NS_SASL2, "authorization-identifier")).text == full
        iq = c2.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
        assert iq.get("type") == "result"
        c2.sock.close()
    # OpenSSL spoils a session whose connection is freed without a TLS shutdown: c is
    # kept alive to here.
    del c
