"""End-to-end tests of c2s, the client connection manager: TLS (STARTTLS and direct
TLS), SASL mechanisms (channel binding included), in-band registration, resource
binding, stamping of `from`, stream errors for bad input, and the failed-login limit.

Each test starts a whole server (router, xdb-file, sm, c2s: tests/py/serverproc.py)
in tmp_path.  slixmpp is the independent client; scram_client.py is a raw client
(pyOpenSSL) for what slixmpp cannot do (-PLUS mechanisms, which need the TLS
exporter) and for sending bad bytes.

SASL-level tests stop at <success/> (and the restarted stream's features), so they
need c2s and storage only; tests that bind a resource also need sm.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_c2s.py -q
"""

import base64
import time

import pytest

pytest.importorskip("OpenSSL")

from scram_client import (  # noqa: E402
    NS_BIND, NS_REGISTER, NS_SASL, NS_TLS, RawClient, Scram, local, login, stanza_error_condition,
    tag, to_xml,
)
from serverproc import run_clients, serving  # noqa: E402

MECHANISMS = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


@pytest.fixture
def register_server(request, tmp_path):
    with serving(request, tmp_path, USERS, register=True) as s:
        yield s


def received(client):
    return client.received.decode(errors="replace")


def authenticate(client, user, password, mechanism):
    """Runs one SASL exchange; returns the outcome element."""
    if mechanism == "PLAIN":
        return client.plain(user, password)
    outcome, _ = client.scram(user, password, mechanism)
    return outcome


def connect_tls(server, mode, source=None):
    """A raw client with TLS up and the post-TLS features read."""
    port = server.starttls_port if mode == "starttls" else server.tls_port
    c = RawClient.connect(port, mode=mode, source=source)
    c.open_stream()
    if mode == "starttls":
        c.starttls()
        c.open_stream()
    return c


# -- TLS and logins with slixmpp -----------------------------------------------------

def test_starttls_offer_is_required_and_alone(server):
    c = RawClient.connect(server.starttls_port, mode="starttls")
    features = c.open_stream()
    assert c.stream_header.get("from") == "localhost", received(c)
    assert c.stream_header.get("version") == "1.0", received(c)
    children = [child.tag for child in features]
    assert children == [tag(NS_TLS, "starttls")], received(c)
    assert features.find(f"{tag(NS_TLS, 'starttls')}/{tag(NS_TLS, 'required')}") is not None, received(c)
    c.starttls()
    assert c.tls_version() == "TLSv1.3"
    c.open_stream()
    assert c.mechanisms() == MECHANISMS, received(c)
    c.close()


def test_direct_tls_features_and_alpn(server):
    c = RawClient.connect(server.tls_port, mode="tls")
    assert c.alpn() == b"xmpp-client"
    assert c.tls_version() == "TLSv1.3"
    features = c.open_stream()
    assert features.find(tag(NS_TLS, "starttls")) is None, received(c)
    assert c.mechanisms() == MECHANISMS, received(c)
    c.close()


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
def test_slixmpp_login(server, direct_tls):
    async def test(clients):
        alice = clients.make("alice@localhost/phone", USERS["alice"], direct_tls=direct_tls)
        await alice.start()
        assert str(alice.boundjid) == "alice@localhost/phone"
        # The session works: a message to ourselves comes back.
        alice.send_message(mto=alice.boundjid, mbody="note to self", mtype="chat")
        got = await alice.expect_message("note to self")
        assert str(got["from"]) == "alice@localhost/phone"

    run_clients(test, server.starttls_port, server.tls_port)


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"])
def test_slixmpp_mechanisms(server, mech):
    async def test(clients):
        bob = clients.make("bob@localhost/desk", USERS["bob"], mech=mech)
        await bob.start()
        assert str(bob.boundjid) == "bob@localhost/desk"
        wrong = clients.make("bob@localhost/x", "not-the-password", mech=mech)
        wrong.connect("127.0.0.1", server.starttls_port)
        await wait_event(wrong.auth_failed, f"{mech} with a wrong password to fail")
        assert not wrong.started.is_set()

    run_clients(test, server.starttls_port, server.tls_port)


async def wait_event(event, what, timeout=5.0):
    import asyncio
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


# -- SASL with the raw client --------------------------------------------------------

@pytest.mark.parametrize("mechanism, nonce, server_first, final, server_final", [
    # RFC 5802 section 5 and RFC 7677 section 3: user 'user', password 'pencil'.
    ("SCRAM-SHA-1", "fyko+d2lbbFgONRv9qkxdawL",
     "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
     "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
     "v=rmF9pqV8S7suAoZWja4dJRkFsKQ="),
    ("SCRAM-SHA-256", "rOprNGfwEbeRWgbNEkqO",
     "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
     "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
     "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
     "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
])
def test_scram_client_matches_rfc_examples(mechanism, nonce, server_first, final, server_final):
    """The raw client's SCRAM is right (so a failing exchange is the server's doing)."""
    scram = Scram(mechanism, "user", "pencil", nonce=nonce)
    assert scram.client_first() == f"n,,n=user,r={nonce}".encode()
    assert scram.client_final(server_first.encode()) == final.encode()
    assert scram.verify_server_final(server_final.encode())
    # With channel binding the c= attribute carries the gs2 header and the data.
    plus = Scram(mechanism + "-PLUS", "user", "pencil", cb_type="tls-exporter",
                 cb_data=b"\x01" * 32, nonce=nonce)
    assert plus.client_first() == f"p=tls-exporter,,n=user,r={nonce}".encode()
    c_attr = plus.client_final(server_first.encode()).split(b",")[0]
    assert base64.b64decode(c_attr[2:]) == b"p=tls-exporter,," + b"\x01" * 32

@pytest.mark.parametrize("mode", ["starttls", "tls"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_mechanism_succeeds(server, mechanism, mode):
    c = connect_tls(server, mode)
    assert mechanism in c.mechanisms(), received(c)
    outcome = authenticate(c, "alice", USERS["alice"], mechanism)
    assert local(outcome) == "success", (
        f"{mechanism} over {mode} failed: {to_xml(outcome)}\nreceived:\n{received(c)}")
    # The stream restarts and offers resource binding.
    features = c.open_stream()
    assert features.find(tag(NS_BIND, "bind")) is not None, received(c)
    assert c.mechanisms() == [], received(c)
    c.close()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_mechanism_wrong_password(server, mechanism):
    c = connect_tls(server, "starttls")
    start = time.monotonic()
    outcome = authenticate(c, "alice", "wrong-password", mechanism)
    elapsed = time.monotonic() - start
    assert local(outcome) == "failure", received(c)
    assert [local(e) for e in outcome] == ["not-authorized"], received(c)
    assert elapsed >= 0.25, f"failure answered after {elapsed:.3f} s, without the pause"
    # An unknown user fails the same way.
    outcome = authenticate(c, "nobody", "whatever", mechanism)
    assert [local(e) for e in outcome] == ["not-authorized"], received(c)
    # The client may try again on the same stream (RFC 6120 6.4.5).
    outcome = authenticate(c, "alice", USERS["alice"], mechanism)
    assert local(outcome) == "success", (
        f"{mechanism} after a failure: {to_xml(outcome)}\nreceived:\n{received(c)}")
    c.close()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"])
def test_plus_with_wrong_channel_binding_fails(server, mechanism):
    # Control: the right binding data works on this server (so the failure below is
    # the binding check, not -PLUS failing altogether).
    good = connect_tls(server, "tls")
    outcome, _ = good.scram("alice", USERS["alice"], mechanism)
    assert local(outcome) == "success", (
        f"control: {mechanism} with the right tls-exporter data failed: {to_xml(outcome)}\n"
        f"received:\n{received(good)}")
    good.close()

    for wrong in (bytes(32), bytes(b ^ 1 for b in connect_tls(server, "tls").exporter())):
        c = connect_tls(server, "starttls")
        outcome, _ = c.scram("alice", USERS["alice"], mechanism, cb_data=wrong)
        assert local(outcome) == "failure", received(c)
        assert [local(e) for e in outcome] == ["not-authorized"], received(c)
        c.close()

    # Channel binding data of another connection (a man in the middle's) fails too.
    other = connect_tls(server, "tls")
    c = connect_tls(server, "tls")
    outcome, _ = c.scram("alice", USERS["alice"], mechanism, cb_data=other.exporter())
    assert local(outcome) == "failure", received(c)
    other.close()
    c.close()


def test_scram_downgrade_flag_refused(server):
    """A client that supports channel binding but believes the server does not sends
    gs2 flag 'y'; as the server did offer -PLUS, RFC 5802 section 6 requires it to fail
    the exchange (someone removed -PLUS from the offer)."""
    c = connect_tls(server, "tls")
    assert "SCRAM-SHA-256-PLUS" in c.mechanisms(), received(c)
    outcome, _ = c.scram("alice", USERS["alice"], "SCRAM-SHA-256", cb_type="y")
    assert local(outcome) == "failure", (
        f"SCRAM-SHA-256 with gs2 flag 'y' after -PLUS was offered: {to_xml(outcome)}\n"
        f"received:\n{received(c)}")
    c.close()


def test_sasl_before_starttls_is_refused(server):
    c = RawClient.connect(server.starttls_port, mode="starttls")
    features = c.open_stream()
    assert features.find(tag(NS_SASL, "mechanisms")) is None, received(c)
    c.send(f"<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-1'>biwsbj1hbGljZSxyPWFiY2Q=</auth>")
    assert c.wait_stream_error() == "policy-violation", received(c)
    assert c.stream_closed or c.closed
    assert b"<success" not in c.received and b"<challenge" not in c.received, received(c)


# -- in-band registration --------------------------------------------------------------

def register(c, username, password):
    form = c.iq("get", f"<query xmlns='{NS_REGISTER}'/>")
    assert form.get("type") == "result", to_xml(form)
    query = form.find(tag(NS_REGISTER, "query"))
    assert query is not None, to_xml(form)
    assert query.find(tag(NS_REGISTER, "username")) is not None, to_xml(form)
    assert query.find(tag(NS_REGISTER, "password")) is not None, to_xml(form)
    return c.iq("set", f"<query xmlns='{NS_REGISTER}'><username>{username}</username>"
                       f"<password>{password}</password></query>")


def test_register_then_login(register_server):
    server = register_server
    c = connect_tls(server, "starttls")
    assert c.features.find(tag("http://jabber.org/features/iq-register", "register")) is not None, received(c)
    answer = register(c, "dave", "dave-pw")
    assert answer.get("type") == "result", received(c)
    # The new account logs in on the same stream.
    outcome = authenticate(c, "dave", "dave-pw", "SCRAM-SHA-256")
    assert local(outcome) == "success", received(c)
    c.close()

    # A second registration of the name gets conflict; the first password still works.
    c2 = connect_tls(server, "tls")
    answer = register(c2, "dave", "other-pw")
    assert answer.get("type") == "error", received(c2)
    assert stanza_error_condition(answer) == ("cancel", "conflict"), received(c2)
    outcome = authenticate(c2, "dave", "other-pw", "PLAIN")
    assert local(outcome) == "failure", received(c2)
    c2.close()
    # Registering a name jabberctl created also conflicts.
    c3 = connect_tls(server, "starttls")
    answer = register(c3, "alice", "x")
    assert stanza_error_condition(answer) == ("cancel", "conflict"), received(c3)
    c3.close()

    # And the new account gets a full session (needs sm).
    d = login(server.starttls_port, "dave", "dave-pw", mechanism="SCRAM-SHA-1", resource="laptop")
    assert d.jid == "dave@localhost/laptop"
    d.close()


def test_register_disabled(server):
    c = connect_tls(server, "starttls")
    assert c.features.find(tag("http://jabber.org/features/iq-register", "register")) is None, received(c)
    c.send(f"<iq type='set' id='reg1'><query xmlns='{NS_REGISTER}'><username>eve</username>"
           "<password>pw</password></query></iq>")
    condition = c.wait_stream_error()
    assert condition == "not-authorized", received(c)
    # No account was made.
    c2 = connect_tls(server, "starttls")
    assert local(authenticate(c2, "eve", "pw", "PLAIN")) == "failure", received(c2)
    c2.close()


# -- sessions -------------------------------------------------------------------------

def test_bind_generated_and_chosen_resource(server):
    a = login(server.starttls_port, "alice", USERS["alice"], resource=None)
    assert a.jid.startswith("alice@localhost/") and len(a.jid) > len("alice@localhost/"), a.jid
    b = login(server.tls_port, "alice", USERS["alice"], mode="tls", resource="tablet")
    assert b.jid == "alice@localhost/tablet"
    # Legacy session establishment is answered with a result.
    answer = b.session()
    assert answer.get("type") == "result", received(b)
    a.close()
    b.close()


def test_bind_conflict_replaces_old_session(server):
    old = login(server.starttls_port, "alice", USERS["alice"], resource="same")
    new = login(server.tls_port, "alice", USERS["alice"], mode="tls", resource="same")
    assert new.jid == "alice@localhost/same"
    assert old.wait_stream_error() == "conflict", received(old)
    # The new session works: a message to itself comes back.
    new.send("<message to='alice@localhost/same' type='chat' id='m1'><body>still here</body></message>")
    msg = new.expect("message")
    assert msg.findtext("{jabber:client}body") == "still here", received(new)
    new.close()


def test_forged_from_is_overwritten(server):
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    alice.send("<message from='bob@localhost/x' to='bob@localhost/b' type='chat' id='forged'>"
               "<body>who am I?</body></message>")
    msg = bob.expect("message")
    assert msg.get("from") == "alice@localhost/a", received(bob)
    assert msg.findtext("{jabber:client}body") == "who am I?"
    alice.close()
    bob.close()


# -- bad input: the offender's stream ends, others keep going --------------------------

BAD_INPUT = {
    # id: (bytes to send, expected stream error)
    # End tags that do not match, balanced in number: the element is complete.
    "mismatched-tags": (b"<message to='bob@localhost'><body>x</message></body>", "not-well-formed"),
    # Raw characters XML excludes: relayed, they would knock the recipient's client off.
    "raw-ufffe": (b"<message to='bob@localhost'><body>ok \xef\xbf\xbe ok</body></message>",
                  "not-well-formed"),
    "raw-uffff": (b"<message to='bob@localhost'><body>ok \xef\xbf\xbf ok</body></message>",
                  "not-well-formed"),
    # An end tag that does not match its start tag must be refused as it arrives, not
    # only once the element's depth returns to zero (which here never happens).
    "mismatched-open": (b"<message to='bob@localhost'><body>x</message>", "not-well-formed"),
    "bad-char": (b"<message to='bob@localhost'><body>\x01</body></message>", "not-well-formed"),
    "comment": (b"<message to='bob@localhost'><!-- hi --><body>x</body></message>", "restricted-xml"),
    "entity": (b"<message to='bob@localhost'><body>&xxe;</body></message>", "restricted-xml"),
    "pi": (b"<?evil instruction?><message to='bob@localhost'/>", "restricted-xml"),
    "doctype": (b"<!DOCTYPE foo [<!ENTITY xxe 'x'>]><message/>", "restricted-xml"),
    "too-large": (b"<message to='bob@localhost'><body>" + b"x" * 70000 + b"</body></message>",
                  "policy-violation"),
    "too-deep": (b"<a>" * 100000, "policy-violation"),
}


def chat(sender, receiver, body):
    sender.send(f"<message to='{receiver.jid}' type='chat'><body>{body}</body></message>")
    msg = receiver.expect("message")
    assert msg.findtext("{jabber:client}body") == body, received(receiver)
    assert msg.get("from") == sender.jid


@pytest.mark.parametrize("kind", list(BAD_INPUT))
def test_bad_input_before_bind(server, kind):
    """Right after authentication (no session yet): c2s alone must end the stream."""
    data, condition = BAD_INPUT[kind]
    c = connect_tls(server, "starttls")
    assert local(authenticate(c, "carol", USERS["carol"], "SCRAM-SHA-256")) == "success", received(c)
    c.open_stream()
    c.send(data)
    # Bad input is refused as it arrives: no need to wait long.
    assert c.wait_stream_error(timeout=2.0) == condition, received(c)[-2000:]


@pytest.mark.parametrize("kind", list(BAD_INPUT))
def test_bad_input_in_session(server, kind):
    data, condition = BAD_INPUT[kind]
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    bob = login(server.tls_port, "bob", USERS["bob"], mode="tls", resource="b")
    carol = login(server.starttls_port, "carol", USERS["carol"], resource="c")
    chat(alice, bob, "before")
    carol.send(data)
    assert carol.wait_stream_error(timeout=2.0) == condition, received(carol)[-2000:]
    chat(alice, bob, "after")
    chat(bob, alice, "and back")
    alice.close()
    bob.close()


# -- failed-login limit ----------------------------------------------------------------

def test_auth_failure_limit(server):
    # Our own loopback address, so no other test's failures count (all of 127/8 is
    # local on Linux).
    source = "127.0.0.2"
    for attempt in range(5):
        c = connect_tls(server, "starttls", source=source)
        outcome = authenticate(c, "alice", f"wrong-{attempt}", "SCRAM-SHA-256")
        assert [local(e) for e in outcome] == ["not-authorized"], received(c)
        c.close()
    c = connect_tls(server, "tls", source=source)
    start = time.monotonic()
    outcome = authenticate(c, "alice", USERS["alice"], "SCRAM-SHA-256")
    assert local(outcome) == "failure", received(c)
    assert [local(e) for e in outcome if local(e) != "text"] == ["temporary-auth-failure"], received(c)
    # Refused before any work: no pause, no challenge.
    assert time.monotonic() - start < 0.25
    assert b"<challenge" not in c.received
    # PLAIN too.
    assert [local(e) for e in authenticate(c, "alice", USERS["alice"], "PLAIN")
            if local(e) != "text"] == ["temporary-auth-failure"], received(c)
    c.close()
    # Another address is not affected.
    other = connect_tls(server, "starttls", source="127.0.0.3")
    assert local(authenticate(other, "alice", USERS["alice"], "SCRAM-SHA-256")) == "success", received(other)
    other.close()


def test_sasl_attempts_per_stream_are_limited(server):
    """RFC 6120 6.4.5: a few retries on one stream (3 by default), then the stream is
    closed with policy-violation; the per-address limit is a separate one."""
    c = connect_tls(server, "starttls", source="127.0.0.4")
    for attempt in range(2):
        outcome = authenticate(c, "alice", f"wrong-{attempt}", "PLAIN")
        assert [local(e) for e in outcome] == ["not-authorized"], received(c)
    # Any failure counts: an unknown mechanism too.
    c._auth("X-UNKNOWN", b"")
    failure = c.next(what="the third failure")
    assert local(failure) == "failure" and [local(e) for e in failure] == ["invalid-mechanism"], \
        received(c)
    assert c.wait_stream_error() == "policy-violation", received(c)
    # The address may still log in on a new stream (3 < the per-address limit of 5).
    ok = connect_tls(server, "starttls", source="127.0.0.4")
    assert local(authenticate(ok, "alice", USERS["alice"], "PLAIN")) == "success", received(ok)
    ok.close()


def test_iq_without_id_is_refused_and_not_executed(server):
    """RFC 6120 8.1.3: an IQ needs an id; one without is answered bad-request and its
    request is not carried out (here: a roster set)."""
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    alice.send("<iq type='set'><query xmlns='jabber:iq:roster'>"
               "<item jid='mallory@localhost' name='M'/></query></iq>")
    reply = alice.expect("iq")
    assert reply.get("type") == "error" and reply.get("id") is None, to_xml(reply)
    assert stanza_error_condition(reply) == ("modify", "bad-request"), to_xml(reply)
    roster = alice.iq("get", "<query xmlns='jabber:iq:roster'/>")
    assert roster.get("type") == "result", to_xml(roster)
    assert "mallory@localhost" not in to_xml(roster), to_xml(roster)
    # Before binding too.
    c = connect_tls(server, "starttls")
    assert local(authenticate(c, "bob", USERS["bob"], "PLAIN")) == "success", received(c)
    c.open_stream()
    c.send("<iq type='set'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    reply = c.expect("iq")
    assert stanza_error_condition(reply) == ("modify", "bad-request"), to_xml(reply)
    assert c.bind("r").get("type") == "result", received(c)
    alice.close()
    c.close()


def test_a_refused_burst_is_logged_once(request, tmp_path):
    """A client that overruns a user's queue gets resource-constraint answers, and sm's
    log gets a line when the burst starts, not one per refused stanza."""
    with serving(request, tmp_path, USERS, sm_extra="<sessions queue='4'/>") as s:
        alice = login(s.starttls_port, "alice", USERS["alice"], resource="a")
        bob = login(s.starttls_port, "bob", USERS["bob"], resource="b")
        before = s.log_size("sm")
        burst = "".join(f"<message to='bob@localhost' type='chat' id='m{i}'><body>{i}</body></message>"
                        for i in range(400))
        alice.send(burst)
        refused = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                element = alice.next(timeout=1.0)
            except TimeoutError:
                break
            if element.get("type") == "error":
                assert stanza_error_condition(element)[1] == "resource-constraint", to_xml(element)
                refused += 1
        assert refused >= 10, f"only {refused} refusals: the queue did not overflow"
        log = s.log("sm")[before:]
        lines = [line for line in log.splitlines() if "user queue full" in line]
        assert 1 <= len(lines) <= 2, "\n".join(lines[:10])
        assert "ERROR" not in "\n".join(lines)
        alice.close()
        bob.close()
