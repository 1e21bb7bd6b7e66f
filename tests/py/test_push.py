"""End-to-end tests of XEP-0357 Push Notifications in sm, against a whole server
(tests/py/serverproc.py).

The app server is a plain XEP-0114 component written here (AppServer, `push.localhost`,
connected to the router with its own name and secret as any third-party component
would): it records the notifications sm publishes to it and answers each, with an error
for the nodes the test says. Clients are raw ones (scram_client.py), which can drop
their connection in the middle of an XEP-0198 session.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_push.py -q
"""

import hashlib
import socket
import struct
import time
from xml.sax.saxutils import escape

import pytest

pytest.importorskip("OpenSSL")

from scram_client import NS_STREAM, RawClient, local, login, to_xml  # noqa: E402
from serverproc import serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
APP = "push.localhost"
APP_SECRET = "push-secret"
NS_PUSH = "urn:xmpp:push:0"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_DATA = "jabber:x:data"
NS_SM = "urn:xmpp:sm:3"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
# sm's own enable form field: notifications carry the message body.
INCLUDE_BODY = "urn:jabberd-rs:push:0#include-body"


@pytest.fixture
def server(request, tmp_path):
    # The default module set (push among them); the app server may connect.
    with serving(request, tmp_path, USERS,
                 users_extra=f"<component name='{APP}' secret='{APP_SECRET}'/>",
                 sm_extra="<modules defaults='true'/>") as s:
        yield s


# -- the app server ----------------------------------------------------------------------

def fields(form):
    """{var: value} of a data form."""
    return {f.get("var"): "".join(v.text or "" for v in f.findall(f"{{{NS_DATA}}}value"))
            for f in form.findall(f"{{{NS_DATA}}}field")}


class Notification:
    """A notification as XEP-0357 section 5 shows it, read from the publish IQ."""

    def __init__(self, iq):
        self.xml = to_xml(iq)
        assert local(iq) == "iq" and iq.get("type") == "set", self.xml
        self.frm = iq.get("from")
        self.to = iq.get("to")
        pubsub = iq.find(f"{{{NS_PUBSUB}}}pubsub")
        assert pubsub is not None, self.xml
        publish = pubsub.find(f"{{{NS_PUBSUB}}}publish")
        self.node = publish.get("node")
        form = publish.find(f"{{{NS_PUBSUB}}}item/{{{NS_PUSH}}}notification/{{{NS_DATA}}}x")
        assert form is not None, self.xml
        self.summary = fields(form)
        assert self.summary.get("FORM_TYPE") == "urn:xmpp:push:summary", self.xml
        options = pubsub.find(f"{{{NS_PUBSUB}}}publish-options/{{{NS_DATA}}}x")
        self.options = fields(options) if options is not None else None

    @property
    def count(self):
        return self.summary.get("message-count")


class AppServer:
    """A XEP-0357 app server: a XEP-0114 component that answers every notification with
    a result, or with an error for the nodes in `failing`."""

    def __init__(self, server, name=APP, secret=APP_SECRET):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.c = RawClient(sock, domain=name)
        self.failing = set()
        self.c.send("<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
                    f"xmlns:stream='{NS_STREAM}' to='{name}'>")
        deadline = time.monotonic() + 5
        while self.c.stream_header is None:
            if self.c.closed or time.monotonic() > deadline:
                raise AssertionError(f"no stream header from the router: {self.c.received!r}")
            self.c._read_some(0.1)
        digest = hashlib.sha1((self.c.stream_header["id"] + secret).encode()).hexdigest()
        self.c.send(f"<handshake>{digest}</handshake>")
        self.c.expect("handshake")

    def notification(self, timeout=5.0):
        """The next notification (answered already)."""
        iq = self.c.next(timeout, what="a push notification")
        n = Notification(iq)
        if n.node in self.failing:
            error = ("<error type='cancel'><item-not-found "
                     "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>")
            self.c.send(f"<iq type='error' id='{iq.get('id')}' from='{APP}' "
                        f"to='{iq.get('from')}'>{error}</iq>")
        else:
            self.c.send(f"<iq type='result' id='{iq.get('id')}' from='{APP}' to='{iq.get('from')}'/>")
        return n

    def quiet(self, seconds=0.5):
        """Nothing comes within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.c._pending:
            self.c._read_some(deadline - time.monotonic())
        assert not self.c._pending, [to_xml(e) for e in self.c._pending]

    def close(self):
        self.c.close()


# -- clients -----------------------------------------------------------------------------

def enable_push(client, node, form=None):
    """XEP-0357 <enable/> at APP for `node`, with a publish-options form holding `form`."""
    x = ""
    if form is not None:
        values = "".join(f"<field var='{var}'><value>{value}</value></field>"
                         for var, value in form.items())
        x = (f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'>"
             f"<value>{PUBLISH_OPTIONS}</value></field>{values}</x>")
    iq = client.iq("set", f"<enable xmlns='{NS_PUSH}' jid='{APP}' node='{node}'>{x}</enable>")
    assert iq.get("type") == "result", to_xml(iq)


def disable_push(client, node=None):
    attr = f" node='{node}'" if node is not None else ""
    iq = client.iq("set", f"<disable xmlns='{NS_PUSH}' jid='{APP}'{attr}/>")
    assert iq.get("type") == "result", to_xml(iq)


def enable_resumption(client):
    client.send(f"<enable xmlns='{NS_SM}' resume='true'/>")
    enabled = client.expect("enabled", NS_SM)
    assert enabled.get("id"), to_xml(enabled)
    return enabled.get("id")


def cut(client):
    """Drops the connection without closing the stream (a phone losing its network)."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()
    client.closed = True


def chat(sender, body):
    sender.send(f"<message to='alice@localhost' type='chat'><body>{escape(body)}</body></message>")


def bodies_until(client, last, timeout=5.0):
    """The bodies of the messages `client` receives until one with body `last`."""
    deadline = time.monotonic() + timeout
    got = []
    while last not in got:
        e = client.next(max(0.0, deadline - time.monotonic()), what=f"the message {last!r}")
        if local(e) == "message" and (b := e.findtext("{jabber:client}body")) is not None:
            got.append(b)
    return got


def sm_logged(server, text, since):
    """Waits until sm's log has `text` after character `since`."""
    server.wait_for(lambda: text in server.log("sm")[since:], f"sm to log {text!r}", watch=["sm"])


def offline(server, client):
    """Closes `client`'s stream and waits until sm ended its session."""
    since = len(server.log("sm"))
    client.close()
    sm_logged(server, "session ended by c2s", since)


def alice(server, resource="phone"):
    return login(server.starttls_port, "alice", USERS["alice"], resource=resource)


def bob(server):
    return login(server.starttls_port, "bob", USERS["bob"], resource="b")


# -- tests -------------------------------------------------------------------------------

def test_a_hibernating_session_is_notified_a_live_one_is_not(server):
    app = AppServer(server)
    sender = bob(server)
    phone = alice(server)
    previd = enable_resumption(phone)
    phone.send("<presence/>")
    enable_push(phone, "n1", {"secret": "s1"})
    # Online: the message goes to the client and no notification is sent (else it
    # would come before the first one below, with a count of 1 for this message).
    chat(sender, "online")
    assert bodies_until(phone, "online") == ["online"]
    # The connection drops: the session hibernates, and messages wake the app.
    since = len(server.log("sm"))
    cut(phone)
    sm_logged(server, "session hibernating", since)
    chat(sender, "away1")
    chat(sender, "away2")
    first, second = app.notification(), app.notification()
    assert (first.count, second.count) == ("1", "2"), first.xml
    assert (first.frm, first.to, first.node) == ("alice@localhost", APP, "n1"), first.xml
    assert first.summary.get("last-message-sender") == "bob@localhost/b", first.xml
    assert "last-message-body" not in first.summary, first.xml
    assert first.options == {"FORM_TYPE": PUBLISH_OPTIONS, "secret": "s1"}, first.xml
    # The app wakes the client, which resumes and gets what waited.
    again = login_resume(server, previd)
    assert bodies_until(again, "away2")[-2:] == ["away1", "away2"]
    # Dropped again: the count starts again.
    since = len(server.log("sm"))
    cut(again)
    sm_logged(server, "session hibernating", since)
    chat(sender, "away3")
    assert app.notification().count == "1"
    sender.close()
    app.close()


def login_resume(server, previd):
    """A new connection resuming session `previd` (h=0: everything comes again)."""
    c = RawClient.connect(server.starttls_port, mode="starttls")
    c.open_stream()
    c.starttls()
    c.open_stream()
    outcome, _ = c.scram("alice", USERS["alice"], "SCRAM-SHA-256")
    assert local(outcome) == "success", to_xml(outcome)
    c.open_stream()
    c.send(f"<resume xmlns='{NS_SM}' previd='{previd}' h='0'/>")
    resumed = c.expect("resumed", NS_SM)
    assert resumed.get("previd") == previd, to_xml(resumed)
    return c


def test_offline_notifications_count_and_carry_the_body_when_asked(server):
    app = AppServer(server)
    phone = alice(server)
    enable_push(phone, "plain", {"secret": "s1"})
    enable_push(phone, "with-body", {INCLUDE_BODY: "true"})
    # XEP-0357 4: the account says it supports push.
    info = phone.iq("get", f"<query xmlns='{NS_DISCO_INFO}'/>", to="alice@localhost")
    features = [f.get("var") for f in info.iter(f"{{{NS_DISCO_INFO}}}feature")]
    assert NS_PUSH in features, to_xml(info)
    offline(server, phone)
    sender = bob(server)
    chat(sender, "one")
    chat(sender, "two & more")
    got = [app.notification() for _ in range(4)]
    assert [(n.node, n.count) for n in got] == [
        ("plain", "1"), ("with-body", "1"), ("plain", "2"), ("with-body", "2")], [n.xml for n in got]
    for n in got:
        assert n.summary.get("last-message-sender") == "bob@localhost/b", n.xml
    # The body only where it was asked for; sm's own field is not sent on.
    assert [n.summary.get("last-message-body") for n in got] == [None, "one", None, "two & more"]
    assert got[0].options == {"FORM_TYPE": PUBLISH_OPTIONS, "secret": "s1"}, got[0].xml
    assert got[1].options is None, got[1].xml
    # She comes back (offline storage has the messages), and the count starts again.
    phone = alice(server)
    phone.send("<presence/>")
    assert bodies_until(phone, "two & more") == ["one", "two & more"]
    offline(server, phone)
    chat(sender, "three")
    assert [(n.node, n.count) for n in (app.notification(), app.notification())] == [
        ("plain", "1"), ("with-body", "1")]
    sender.close()
    app.close()


def test_disabled_registrations_get_nothing(server):
    app = AppServer(server)
    phone = alice(server)
    enable_push(phone, "n1")
    enable_push(phone, "n2")
    disable_push(phone, "n1")
    offline(server, phone)
    sender = bob(server)
    chat(sender, "one")
    # n1 was enabled first: its notification would come first.
    assert app.notification().node == "n2"
    # Without a node: every node of the app server.
    phone = alice(server)
    disable_push(phone)
    offline(server, phone)
    chat(sender, "two")
    # sm handles alice's events in order: by the time her next login gets the message
    # from offline storage, a notification for it would have been sent.
    phone = alice(server)
    phone.send("<presence/>")
    assert bodies_until(phone, "two")[-1] == "two"
    app.quiet(0.5)
    phone.close()
    sender.close()
    app.close()


def test_an_app_server_that_keeps_failing_loses_its_registration(server):
    app = AppServer(server)
    app.failing = {"bad"}
    phone = alice(server)
    enable_push(phone, "bad")
    enable_push(phone, "good")
    offline(server, phone)
    since = len(server.log("sm"))
    sender = bob(server)
    for i in range(3):
        chat(sender, f"m{i}")
        assert [app.notification().node for _ in range(2)] == ["bad", "good"]
    # The third error in a row disables it (<push failures='3'/>, the default).
    sm_logged(server, "push registration disabled", since)
    chat(sender, "m3")
    n = app.notification()
    assert (n.node, n.count) == ("good", "4"), n.xml
    app.quiet(0.3)
    sender.close()
    app.close()
