#!/usr/bin/env python3
"""A read-only credential store: how to plug an account directory into jabberd-rs.

It is a component (XEP-0114 plus the router's bind extension, docs/protocol.md) that
binds the storage route of the credentials namespace only (`urn:jabberd-rs:auth:0`) for
each of its hosts, so the router sends it the credential lookups of c2s and everything
else to the file storage ("Storage routed by namespace"). It answers them from a file
of SCRAM records, one account per line:

    alice@localhost SHA-256 4096 SALT-BASE64 STORED-KEY-BASE64 SERVER-KEY-BASE64
    alice@localhost SHA-1 4096 SALT-BASE64 STORED-KEY-BASE64 SERVER-KEY-BASE64

(the keys of RFC 5802: what a directory that keeps SCRAM verifiers has; passwords never
appear). The file is read again when it changes. Writes are refused (`not-allowed`: the
directory is managed elsewhere), except account removal (`delete` of every namespace),
which it answers as done: the directory's entry is not this server's to remove.

Run by the router (`<exec name="credstore" command="python3 contrib/credstore.py FILE
localhost" secret=".."/>` in router.xml, which sets $JABBERD_NAME and $JABBERD_SECRET,
and a router-users.xml entry `<component name="credstore" secret=".." trusted="false">
<allow type="xdb" host="any" ns="urn:jabberd-rs:auth:0"/></component>`), or on its own
with --router HOST:PORT. Standard library only.
"""
import argparse
import hashlib
import os
import socket
import sys
import xml.parsers.expat
from xml.sax.saxutils import escape, quoteattr

NS_AUTH = "urn:jabberd-rs:auth:0"
NS_XDB = "urn:jabberd-rs:xdb:0"
NS_ROUTER = "urn:jabberd-rs:router:0"


class Records:
    """The accounts of the file, read again when its modification time changes."""

    def __init__(self, path):
        self.path, self.mtime, self.by_jid = path, None, {}

    def get(self, jid):
        mtime = os.stat(self.path).st_mtime_ns
        if mtime != self.mtime:
            self.by_jid, self.mtime = {}, mtime
            with open(self.path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 6 and not line.startswith("#"):
                        self.by_jid.setdefault(parts[0].lower(), []).append(parts[1:])
        return self.by_jid.get(jid.lower())


def credentials(records):
    scram = "".join(
        f"<scram hash={quoteattr(h)} iterations={quoteattr(i)} salt={quoteattr(s)} "
        f"stored-key={quoteattr(st)} server-key={quoteattr(sv)}/>"
        for h, i, s, st, sv in records)
    return f"<credentials xmlns='{NS_AUTH}'>{scram}</credentials>"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("hosts", nargs="+")
    ap.add_argument("--router", help="HOST:PORT of the router (default: stdin/stdout)")
    args = ap.parse_args()
    name, secret = os.environ["JABBERD_NAME"], os.environ["JABBERD_SECRET"]
    records = Records(args.file)
    if args.router:
        host, port = args.router.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        read, write = sock.recv, sock.sendall
    else:
        read = lambda n: os.read(0, n)  # noqa: E731

        def write(data):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    def send(s):
        write(s.encode())

    send("<stream:stream xmlns='jabber:component:accept' "
         f"xmlns:stream='http://etherx.jabber.org/streams' to={quoteattr(name)}>")
    depth, current = 0, None  # current: [tag, attrs]

    def answer(attrs, kind, content="", error=None):
        reply = (f"<xdb xmlns='{NS_XDB}' type='{kind}' to={quoteattr(attrs.get('from', ''))} "
                 f"from={quoteattr(attrs.get('to', ''))} ns={quoteattr(attrs.get('ns', ''))} "
                 f"id={quoteattr(attrs.get('id', ''))}>")
        if error:
            reply += (f"<error type='cancel'><{error} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                      "<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>this credential store "
                      "is read-only</text></error>")
        send(reply + content + "</xdb>")

    def start(tag, attrs):
        nonlocal depth, current
        depth += 1
        if depth == 1:  # the router's header: prove the secret
            send(f"<handshake>{hashlib.sha1((attrs['id'] + secret).encode()).hexdigest()}</handshake>")
        elif depth == 2:
            current = [tag, attrs]

    def end(tag):
        nonlocal depth, current
        depth -= 1
        if depth != 1 or current is None:
            return
        tag, attrs = current
        current = None
        if tag == "handshake":  # accepted: bind the credentials of each host
            for i, h in enumerate(args.hosts):
                send(f"<bind xmlns='{NS_ROUTER}' id='b{i}' route='xdb' host={quoteattr(h)} "
                     f"ns='{NS_AUTH}'/>")
        elif tag == "xdb":
            op = attrs.get("type")
            if op == "get":
                found = records.get(attrs.get("to", ""))
                answer(attrs, "result", credentials(found) if found else "")
            elif op == "list":
                owners = [j for j in records.by_jid if j.endswith("@" + attrs.get("to", ""))]
                answer(attrs, "result", "".join(f"<owner jid={quoteattr(j)}/>" for j in owners))
            elif op == "delete" and attrs.get("ns") == "*":
                answer(attrs, "result")
            elif op not in ("result", "error"):
                answer(attrs, "error", error="not-allowed")
        elif tag == "bind" and attrs.get("type") == "error":
            sys.exit(f"credstore: the router refused a bind: {escape(str(attrs))}")

    p = xml.parsers.expat.ParserCreate()
    p.StartElementHandler, p.EndElementHandler = start, end
    while chunk := read(65536):
        p.Parse(chunk)


if __name__ == "__main__":
    main()
