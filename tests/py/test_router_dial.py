"""Components the router reaches itself (docs/router.md, "Components the router dials or
runs"): `<exec>` runs contrib/echo_bot.py with its standard input and output as the
link and starts it again when it exits; `<connect>` dials a component listening here
(a small XEP-0114 listener in this file, with the roles reversed) and dials again when
the link drops.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_router_dial.py -q
"""

import hashlib
import socket
import sys
import threading
import xml.parsers.expat
from xml.sax.saxutils import escape, quoteattr

import pytest

pytest.importorskip("OpenSSL")

from scram_client import local, login, until  # noqa: E402
from serverproc import ROOT, TIMEOUT, free_port, serving  # noqa: E402

USERS = {"alice": "alice-pw"}


def body_of(e):
    return e.findtext("{jabber:client}body")


def echo(alice, to, text):
    alice.send(f"<message to='{to}' type='chat'><body>{text}</body></message>")
    return until(alice, lambda e: local(e) == "message" and body_of(e) == text,
                 f"the echo of {text!r} from {to}")[-1]


def connections(server, name):
    return server.log("router").count(f'component="{name}"}}: router::link: component connected')


def test_exec_runs_a_bot_and_restarts_it(request, tmp_path):
    """The router starts the bot (sh -c), which authenticates over its stdio like any
    component; a user's message is echoed; when the bot exits the router starts it
    again and it answers again."""
    bot = ROOT / "contrib" / "echo_bot.py"
    with serving(request, tmp_path, USERS,
                 router_extra=f"<exec name='bot.localhost' command={quoteattr(f'{sys.executable} {bot}')} "
                              f"secret='bot-secret' log={quoteattr(str(tmp_path / 'log' / 'bot.log'))}/>",
                 users_extra="<component name='bot.localhost' secret='bot-secret' trusted='false'/>") as server:
        server.wait_for(lambda: connections(server, "bot.localhost") >= 1, "the bot to connect")
        alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
        m = echo(alice, "bot.localhost", "hello bot")
        assert m.get("from") == "bot.localhost"
        alice.send("<message to='bot.localhost' type='chat'><body>quit</body></message>")
        server.wait_for(lambda: connections(server, "bot.localhost") >= 2, "the bot to be started again")
        echo(alice, "bot.localhost", "hello again")
        alice.close()


class Listener:
    """A component that listens (XEP-0114 with the roles reversed): it reads the router's
    header, answers with its own and a stream id, checks the router's handshake and echoes
    chat messages. `drop()` cuts the current link."""

    def __init__(self, name, secret):
        self.name, self.secret = name, secret
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", free_port()))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.links = 0
        self.refused = 0
        self.conn = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conn = conn
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        stream_id = "s%d" % self.links
        state = {"depth": 0, "stanza": None, "authed": False}

        def send(s):
            conn.sendall(s.encode())

        def start(tag, attrs):
            state["depth"] += 1
            if state["depth"] == 1:
                send("<stream:stream xmlns='jabber:component:accept' "
                     f"xmlns:stream='http://etherx.jabber.org/streams' from='{self.name}' id='{stream_id}'>")
            elif state["depth"] == 2:
                state["stanza"] = {"tag": tag, "attrs": attrs, "text": "", "body": ""}
            elif state["depth"] == 3 and tag == "body":
                state["stanza"]["in_body"] = True

        def data(d):
            s = state["stanza"]
            if s is not None:
                if s.get("in_body"):
                    s["body"] += d
                elif state["depth"] == 2:
                    s["text"] += d

        def end(tag):
            state["depth"] -= 1
            s = state["stanza"]
            if state["depth"] == 2 and s:
                s["in_body"] = False
            if state["depth"] != 1 or not s:
                return
            state["stanza"] = None
            if s["tag"] == "handshake":
                expected = hashlib.sha1((stream_id + self.secret).encode()).hexdigest()
                if s["text"].strip() == expected:
                    state["authed"] = True
                    self.links += 1
                    send("<handshake/>")
                else:
                    self.refused += 1
                    send("<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                         "</stream:error></stream:stream>")
                    conn.close()
            elif s["tag"] == "message" and state["authed"] and s["body"]:
                a = s["attrs"]
                send(f"<message from={quoteattr(a['to'])} to={quoteattr(a['from'])} type='chat'>"
                     f"<body>{escape(s['body'])}</body></message>")

        p = xml.parsers.expat.ParserCreate()
        p.StartElementHandler, p.EndElementHandler, p.CharacterDataHandler = start, end, data
        try:
            while chunk := conn.recv(4096):
                p.Parse(chunk)
        except (OSError, xml.parsers.expat.ExpatError):
            pass

    def drop(self):
        if self.conn is not None:
            self.conn.shutdown(socket.SHUT_RDWR)
            self.conn.close()

    def close(self):
        self.sock.close()


def test_connect_dials_a_listening_component_and_again_after_a_drop(request, tmp_path):
    """The router dials the listening component, proves the shared secret, and the
    component then serves users like any other; when the link drops the router dials
    again."""
    gw = Listener("gw.localhost", "gw-secret")
    try:
        with serving(request, tmp_path, USERS,
                     router_extra=f"<connect name='gw.localhost' address='127.0.0.1' port='{gw.port}' "
                                  "secret='gw-secret' reconnect='0.1'/>",
                     users_extra="<component name='gw.localhost' secret='unused' trusted='false'/>") as server:
            server.wait_for(lambda: gw.links >= 1, "the router to dial the component")
            alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
            m = echo(alice, "gw.localhost", "through the gateway")
            assert m.get("from") == "gw.localhost"
            gw.drop()
            server.wait_for(lambda: gw.links >= 2, "the router to dial again", timeout=TIMEOUT * 2)
            server.wait_for(lambda: connections(server, "gw.localhost") >= 2, "the link to be registered")
            echo(alice, "gw.localhost", "still there")
            assert gw.refused == 0
            alice.close()
    finally:
        gw.close()
