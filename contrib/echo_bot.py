#!/usr/bin/env python3
"""An echo bot run by the router (`<exec>` in router.xml): XEP-0114 over standard input
and output, its name and secret from $JABBERD_NAME and $JABBERD_SECRET. It answers each
chat message with the same body; the body "quit" makes it exit (the router starts it
again)."""
import hashlib, os, sys, xml.parsers.expat
from xml.sax.saxutils import escape, quoteattr

name, secret = os.environ["JABBERD_NAME"], os.environ.get("JABBERD_SECRET", "")
out = sys.stdout.buffer
def send(s): out.write(s.encode()); out.flush()
send("<stream:stream xmlns='jabber:component:accept' "
     f"xmlns:stream='http://etherx.jabber.org/streams' to={quoteattr(name)}>")
depth, stanza = 0, None      # the stanza being read: [attrs, body text, in body]
def start(tag, attrs):
    global depth, stanza
    depth += 1
    if depth == 1 and tag.endswith("stream"):   # the router's header: prove the secret
        digest = hashlib.sha1((attrs["id"] + secret).encode()).hexdigest()
        send(f"<handshake>{digest}</handshake>")
    elif depth == 2:
        stanza = [tag, attrs, "", False]
    elif depth == 3 and stanza and tag.endswith("body"):
        stanza[3] = True
def text(data):
    if stanza and stanza[3]: stanza[2] += data
def end(tag):
    global depth, stanza
    depth -= 1
    if depth == 2 and stanza: stanza[3] = False
    if depth == 1 and stanza:
        kind, attrs, body = stanza[0], stanza[1], stanza[2]
        stanza = None
        if kind.endswith("message") and attrs.get("type") != "error" and body:
            if body == "quit": sys.exit(0)
            send(f"<message from={quoteattr(attrs['to'])} to={quoteattr(attrs['from'])} "
                 f"type='chat'><body>{escape(body)}</body></message>")
p = xml.parsers.expat.ParserCreate()
p.StartElementHandler, p.EndElementHandler, p.CharacterDataHandler = start, end, text
while chunk := sys.stdin.buffer.read1(4096):
    p.Parse(chunk)
