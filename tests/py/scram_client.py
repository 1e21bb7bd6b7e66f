"""A hand-written raw XMPP client for the end-to-end tests: STARTTLS or direct TLS
through pyOpenSSL (which, unlike Python's ssl module, can export TLS keying
material), SASL SCRAM-SHA-1/-256 with and without channel binding `tls-exporter`
(RFC 5802, RFC 7677, RFC 9266), PLAIN, resource binding, and sending any bytes.

Everything the server sends is kept verbatim in `client.received` (bytes), so a test
can show exactly what came over the wire.

    c = RawClient.connect(port, mode="starttls")      # or mode="tls"
    c.open_stream(); c.starttls()                     # mode="starttls" only
    c.open_stream()
    ok = c.scram("alice", "pw", "SCRAM-SHA-256-PLUS")
    c.open_stream(); jid = c.bind("phone")
"""

import base64
import hashlib
import hmac
import os
import select
import socket
import time
import xml.etree.ElementTree as ET

from OpenSSL import SSL

NS_STREAM = "http://etherx.jabber.org/streams"
NS_CLIENT = "jabber:client"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_STREAMS_ERR = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_REGISTER = "jabber:iq:register"

TIMEOUT = 5.0


class StreamClosed(Exception):
    """The server closed the stream or the connection while we waited."""


def tag(ns, name):
    return f"{{{ns}}}{name}"


def local(element):
    return element.tag.rsplit("}", 1)[-1]


def until(client, predicate, what, timeout=TIMEOUT):
    """The elements a client received up to and including the first that satisfies
    predicate (those it kept aside first)."""
    deadline = time.monotonic() + timeout
    got = []
    while True:
        if client.other:
            e = client.other.pop(0)
        else:
            e = client.next(max(0.0, deadline - time.monotonic()), what=what)
        got.append(e)
        if predicate(e):
            return got


def stream_error_condition(element):
    """The defined condition of a <stream:error/>, or None."""
    for child in element:
        if child.tag.startswith(f"{{{NS_STREAMS_ERR}}}") and local(child) != "text":
            return local(child)
    return None


def stanza_error_condition(element):
    """(type, condition) of the <error/> of a stanza, or None."""
    error = None
    for child in element:
        if local(child) == "error":
            error = child
    if error is None:
        return None
    for child in error:
        if child.tag.startswith(f"{{{NS_STANZAS}}}") and local(child) != "text":
            return error.get("type"), local(child)
    return error.get("type"), None


def to_xml(element):
    return ET.tostring(element, encoding="unicode")


# -- SCRAM (RFC 5802 / RFC 7677) ------------------------------------------------------

HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


def saslname(name):
    return name.replace("=", "=3D").replace(",", "=2C")


class Scram:
    """The client side of one SCRAM exchange.

    cb_type: None (no channel binding, flag 'n'), 'tls-exporter' (flag 'p=...'), or
    'y' (client supports binding but thinks the server does not).
    cb_data: the channel binding data to put into c= (tests pass wrong data on purpose).
    """

    def __init__(self, mechanism, username, password, cb_type=None, cb_data=b"", nonce=None):
        base = mechanism[:-5] if mechanism.endswith("-PLUS") else mechanism
        self.hash = HASHES[base]
        self.username = username
        self.password = password
        if cb_type is None:
            self.gs2_header = b"n,,"
        elif cb_type == "y":
            self.gs2_header = b"y,,"
        else:
            self.gs2_header = f"p={cb_type},,".encode()
        self.cb_data = cb_data if cb_type not in (None, "y") else b""
        self.cnonce = nonce or base64.b64encode(os.urandom(18)).decode()
        self.client_first_bare = f"n={saslname(username)},r={self.cnonce}"
        self.server_signature = None

    def client_first(self):
        return self.gs2_header + self.client_first_bare.encode()

    def _hmac(self, key, msg):
        return hmac.new(key, msg, self.hash).digest()

    def client_final(self, server_first):
        text = server_first.decode()
        attrs = dict(item.split("=", 1) for item in text.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.cnonce):
            raise ValueError(f"server nonce {nonce!r} does not extend ours {self.cnonce!r}")
        salted = hashlib.pbkdf2_hmac(self.hash, self.password.encode(), salt, iterations)
        client_key = self._hmac(salted, b"Client Key")
        stored_key = hashlib.new(self.hash, client_key).digest()
        channel = base64.b64encode(self.gs2_header + self.cb_data).decode()
        without_proof = f"c={channel},r={nonce}"
        auth_message = f"{self.client_first_bare},{text},{without_proof}".encode()
        signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = self._hmac(salted, b"Server Key")
        self.server_signature = self._hmac(server_key, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, data):
        """True if the server's final message carries the signature we expect."""
        text = data.decode()
        if not text.startswith("v="):
            return False
        return hmac.compare_digest(base64.b64decode(text[2:]), self.server_signature)


# -- the connection --------------------------------------------------------------------

class RawClient:
    """One client connection, read and written by hand."""

    def __init__(self, sock, domain="localhost"):
        self.sock = sock
        self.tls = None  # the OpenSSL.SSL.Connection once TLS is up
        self.domain = domain
        self.received = b""  # every byte the server sent, in order
        self.closed = False  # the server closed (TCP or TLS close)
        self.stream_closed = False  # </stream:stream> seen
        self.stream_header = None  # attributes of the server's last stream header
        self.features = None  # the last <stream:features/>
        self.stream_error = None  # a <stream:error/> element, if one came
        self._pending = []  # parsed top-level elements not yet taken
        self._parser = None
        self._depth = 0
        self.jid = None
        self._ids = 0
        self.other = []  # stanzas that came while iq() waited for its answer
        self._out = b""  # bytes for the socket not written yet
        self.write_failed = False
        self.max_tls12 = False  # TLS 1.2 at most

    # connection set-up

    @classmethod
    def connect(cls, port, mode="starttls", host="127.0.0.1", source=None, alpn=True,
                min_tls13=True, domain="localhost", session=None, max_tls12=False):
        """Connects to c2s. mode 'tls' starts TLS at once (ALPN xmpp-client unless
        alpn=False). `source` binds the local address (e.g. '127.0.0.5') so tests of
        per-address limits can use their own address. `session` (from `tls_session()`
        of an earlier connection) asks for TLS session resumption. `max_tls12`: speak
        TLS 1.2 at most (here and at STARTTLS)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        client = cls(sock, domain)
        client.max_tls12 = max_tls12
        if mode == "tls":
            client._handshake(alpn=alpn, min_tls13=min_tls13 and not max_tls12,
                              session=session)
        elif mode != "starttls":
            raise ValueError(mode)
        return client

    _contexts = {}

    def _context(self, alpn, min_tls13):
        # One context per kind, shared by every connection: a TLS session is resumed
        # only through a context like the one that made it.
        key = (alpn, min_tls13, self.max_tls12)
        if key in RawClient._contexts:
            return RawClient._contexts[key]
        ctx = RawClient._contexts[key] = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if min_tls13:
            ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        if self.max_tls12:
            ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        # The server's certificate is self-signed for localhost: not verified here.
        ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        if alpn:
            ctx.set_alpn_protos([b"xmpp-client"])
        return ctx

    def _handshake(self, alpn=False, min_tls13=True, session=None):
        """TLS through memory BIOs: the socket is read and written here, so a write
        error (the server closed after a stream error) never stops us from reading
        and decrypting what the server sent before it closed."""
        conn = SSL.Connection(self._context(alpn, min_tls13), None)
        conn.set_tlsext_host_name(self.domain.encode())
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
        self.tls = conn
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                self._flush(deadline)
                if not self._recv_raw(deadline - time.monotonic(), during_handshake=True):
                    raise StreamClosed("connection closed during the TLS handshake")
        self._flush(deadline)

    def tls_session(self):
        """The TLS session to resume on a later connection (TLS 1.3: taken from a
        ticket the server sent after the handshake, so read something first)."""
        return self.tls.get_session() if self.tls else None

    def tls_resumed(self):
        """Whether this connection's TLS handshake resumed an earlier session."""
        return bool(SSL._lib.SSL_session_reused(self.tls._ssl)) if self.tls else False

    def tls_version(self):
        return self.tls.get_protocol_version_name() if self.tls else None

    def alpn(self):
        return self.tls.get_alpn_proto_negotiated() if self.tls else None

    def exporter(self):
        """The RFC 9266 tls-exporter channel binding data of this connection."""
        return self.tls.export_keying_material(b"EXPORTER-Channel-Binding", 32, None)

    # bytes

    def _flush(self, deadline):
        """Moves TLS output to the socket's send buffer (waiting, and reading
        meanwhile, while the socket is full). Returns False if the connection is
        broken."""
        if self.tls is not None:
            while True:
                try:
                    self._out += self.tls.bio_read(65536)
                except SSL.WantReadError:
                    break
        while self._out:
            if self.write_failed:
                self._out = b""
                return False
            try:
                n = self.sock.send(self._out[:65536])
                self._out = self._out[n:]
                continue
            except BlockingIOError:
                pass
            except OSError:
                self.write_failed = True
                self._out = b""
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out writing to the server")
            r, w, _ = select.select([self.sock], [self.sock], [], left)
            if r:
                # The server may answer (with a stream error) and stop reading.
                self._recv_raw(0)
                if self.closed:
                    self.write_failed = True
                    self._out = b""
                    return False
        return True

    def send(self, data, timeout=TIMEOUT):
        """Writes all of `data` (str or bytes). Returns False if the connection broke
        before all of it was written (expected in the tests that send too much)."""
        if isinstance(data, str):
            data = data.encode()
        deadline = time.monotonic() + timeout
        for i in range(0, len(data), 16384):
            if self.write_failed or self.closed:
                return False
            chunk = data[i:i + 16384]
            if self.tls is not None:
                try:
                    self.tls.sendall(chunk)
                except SSL.Error:
                    self.write_failed = True
                    return False
            else:
                self._out += chunk
            if not self._flush(deadline):
                return False
        return not self.write_failed

    def _recv_raw(self, timeout, during_handshake=False):
        """Reads from the socket once (waiting up to `timeout`), decrypting if TLS is
        up and feeding the XML parser. Returns True if bytes came."""
        if self.closed:
            return False
        if timeout > 0:
            r, _, _ = select.select([self.sock], [], [], timeout)
            if not r:
                return False
        try:
            raw = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            raw = b""
        if not raw:
            self.closed = True
            if self.tls is not None:
                self.tls.bio_shutdown()
                self._decrypt()
            return False
        if self.tls is None:
            self._feed(raw)
            return True
        self.tls.bio_write(raw)
        if not during_handshake:
            self._decrypt()
        return True

    def _decrypt(self):
        while True:
            try:
                data = self.tls.recv(65536)
            except SSL.WantReadError:
                # Session tickets and the like need answers sometimes.
                try:
                    self._out += self.tls.bio_read(65536)
                except SSL.WantReadError:
                    pass
                return
            except SSL.ZeroReturnError:  # close_notify
                self.closed = True
                return
            except SSL.Error:
                self.closed = True
                return
            if not data:
                return
            self._feed(data)

    def _read_some(self, timeout):
        """Reads what arrives within `timeout` seconds (at least one socket read)."""
        deadline = time.monotonic() + timeout
        if self.tls is not None and not self.closed:
            self._decrypt()
        while not self.closed:
            if self._recv_raw(max(0.0, deadline - time.monotonic())):
                return
            if time.monotonic() >= deadline:
                return

    # XML

    def _new_parser(self):
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._depth = 0

    def _feed(self, data):
        self.received += data
        if self._parser is None:
            self._new_parser()
        # A whitespace keepalive or the bytes of a next stream header go to the same
        # parser; the stream header is the root element.
        self._parser.feed(data)
        try:
            events = list(self._parser.read_events())
        except ET.ParseError as e:
            raise AssertionError(f"the server sent XML we cannot parse ({e}):\n{self.received!r}")
        for event, element in events:
            if event == "start":
                self._depth += 1
                if self._depth == 1:
                    self.stream_header = dict(element.attrib)
            else:
                self._depth -= 1
                if self._depth == 0:
                    self.stream_closed = True
                elif self._depth == 1:
                    if element.tag == tag(NS_STREAM, "features"):
                        self.features = element
                    elif element.tag == tag(NS_STREAM, "error"):
                        self.stream_error = element
                    self._pending.append(element)

    def restart_parser(self):
        """A new stream starts (after STARTTLS or SASL success)."""
        self._new_parser()
        self.features = None

    def next(self, timeout=TIMEOUT, what="an element"):
        """The next top-level element the server sent."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            if self.closed or self.stream_closed:
                raise StreamClosed(f"stream closed while waiting for {what}; received:\n"
                                   f"{self.received.decode(errors='replace')}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}; received:\n"
                                   f"{self.received.decode(errors='replace')}")
            self._read_some(left)
        return self._pending.pop(0)

    def expect(self, name, ns=None, timeout=TIMEOUT):
        """The next top-level element, which must be `name` (local name), else an
        AssertionError that shows what came instead."""
        element = self.next(timeout, what=f"<{name}/>")
        if local(element) != name or (ns is not None and element.tag != tag(ns, name)):
            raise AssertionError(f"expected <{name}/>, got {to_xml(element)}; received:\n"
                                 f"{self.received.decode(errors='replace')}")
        return element

    def wait_closed(self, timeout=TIMEOUT):
        """Waits until the server closed the stream (</stream:stream>) or the
        connection; returns every element that came meanwhile."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            got.extend(self._pending)
            self._pending.clear()
            if self.closed or self.stream_closed:
                # Drain what is left (the TCP close may follow the stream close).
                self._read_some(0.2)
                got.extend(self._pending)
                self._pending.clear()
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the server did not close the stream within {timeout} s; "
                                   f"received:\n{self.received.decode(errors='replace')}")
            self._read_some(left)

    def wait_stream_error(self, timeout=TIMEOUT):
        """Waits for the stream to end; returns the condition of its stream error
        (None if it closed without one)."""
        self.wait_closed(timeout)
        return stream_error_condition(self.stream_error) if self.stream_error is not None else None

    def next_id(self):
        self._ids += 1
        return f"r{self._ids}"

    # stream negotiation

    def open_stream(self, to=None, version="1.0", timeout=TIMEOUT):
        """Sends our stream header and reads the server's header and features."""
        self.restart_parser()
        to = self.domain if to is None else to
        self.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                  f"xmlns:stream='{NS_STREAM}' to='{to}' version='{version}' xml:lang='en'>")
        return self.expect("features", NS_STREAM, timeout)

    def mechanisms(self):
        if self.features is None:
            return []
        mechs = self.features.find(tag(NS_SASL, "mechanisms"))
        if mechs is None:
            return []
        return [m.text for m in mechs.findall(tag(NS_SASL, "mechanism"))]

    def starttls(self, session=None):
        self.send(f"<starttls xmlns='{NS_TLS}'/>")
        self.expect("proceed", NS_TLS)
        self._handshake(alpn=False, min_tls13=not self.max_tls12, session=session)

    def _auth(self, mechanism, initial):
        payload = base64.b64encode(initial).decode() if initial else "="
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='{mechanism}'>{payload}</auth>")

    def plain(self, username, password, authzid=""):
        """PLAIN; returns the <success/> or <failure/> element."""
        self._auth("PLAIN", f"{authzid}\0{username}\0{password}".encode())
        return self.next(what="the PLAIN outcome")

    def scram(self, username, password, mechanism="SCRAM-SHA-256", cb_data=None, cb_type=None):
        """A SCRAM exchange. For -PLUS mechanisms the channel binding is tls-exporter
        with this connection's exporter data unless `cb_data` is given. Returns
        (outcome element, Scram), where the outcome is <success/> (its server signature
        already checked) or <failure/>."""
        plus = mechanism.endswith("-PLUS")
        if plus:
            cb_type = cb_type or "tls-exporter"
            if cb_data is None:
                cb_data = self.exporter()
        scram = Scram(mechanism, username, password, cb_type=cb_type, cb_data=cb_data or b"")
        self._auth(mechanism, scram.client_first())
        element = self.next(what="the SCRAM server-first message")
        if local(element) != "challenge":
            return element, scram
        server_first = base64.b64decode(element.text or "")
        final = scram.client_final(server_first)
        self.send(f"<response xmlns='{NS_SASL}'>{base64.b64encode(final).decode()}</response>")
        element = self.next(what="the SCRAM outcome")
        if local(element) == "challenge":
            # Server final message as a challenge (allowed by RFC 6120): answer empty.
            data = base64.b64decode(element.text or "")
            assert scram.verify_server_final(data), f"bad server signature: {data!r}"
            self.send(f"<response xmlns='{NS_SASL}'/>")
            element = self.next(what="the SASL outcome")
        if local(element) == "success":
            data = base64.b64decode(element.text) if element.text and element.text != "=" else b""
            assert scram.verify_server_final(data), \
                f"<success/> without the right server signature: {data!r}"
        return element, scram

    def bind(self, resource=None, timeout=TIMEOUT):
        """Binds a resource; returns the result or error <iq/>. Sets self.jid on
        success."""
        iq_id = self.next_id()
        inner = f"<resource>{resource}</resource>" if resource else ""
        self.send(f"<iq type='set' id='{iq_id}'><bind xmlns='{NS_BIND}'>{inner}</bind></iq>")
        iq = self.expect("iq", timeout=timeout)
        if iq.get("type") == "result":
            self.jid = iq.find(f"{tag(NS_BIND, 'bind')}/{tag(NS_BIND, 'jid')}").text
        return iq

    def session(self):
        iq_id = self.next_id()
        self.send(f"<iq type='set' id='{iq_id}'><session xmlns='{NS_SESSION}'/></iq>")
        return self.expect("iq")

    def iq(self, iq_type, inner, to=None, timeout=TIMEOUT):
        """Sends an iq and returns its answer (other stanzas that arrive meanwhile are
        kept in self.other)."""
        iq_id = self.next_id()
        to_attr = f" to='{to}'" if to else ""
        self.send(f"<iq type='{iq_type}' id='{iq_id}'{to_attr}>{inner}</iq>")
        deadline = time.monotonic() + timeout
        while True:
            element = self.next(max(0.0, deadline - time.monotonic()), what=f"the answer to iq {iq_id}")
            if local(element) == "iq" and element.get("id") == iq_id:
                return element
            self.other.append(element)

    def close(self):
        try:
            if not self.closed:
                self.send("</stream:stream>", timeout=1)
        except Exception:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def login(port, username, password, mode="starttls", mechanism="SCRAM-SHA-256",
          resource=None, source=None, domain="localhost", host="127.0.0.1", max_tls12=False):
    """Connects (to host:port), negotiates TLS and SASL, binds; returns the client (its
    jid set). Raises AssertionError with what the server sent if a step fails."""
    c = RawClient.connect(port, mode=mode, source=source, domain=domain, host=host,
                          max_tls12=max_tls12)
    c.open_stream()
    if mode == "starttls":
        c.starttls()
        c.open_stream()
    if mechanism == "PLAIN":
        outcome = c.plain(username, password)
    else:
        outcome, _ = c.scram(username, password, mechanism)
    if local(outcome) != "success":
        raise AssertionError(f"{mechanism} login of {username} failed: {to_xml(outcome)}")
    c.open_stream()
    iq = c.bind(resource)
    if iq.get("type") != "result":
        raise AssertionError(f"bind failed for {username}: {to_xml(iq)}; received:\n"
                             f"{c.received.decode(errors='replace')}")
    return c
