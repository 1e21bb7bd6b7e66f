"""A real web client in a real browser against the web edge of c2s: Converse.js (npm
converse.js, its built dist) on a page served on loopback, in headless Chromium (Debian's
`chromium`) driven by playwright-core, both pinned in tests/js/package.json; the script
is tests/js/converse.mjs.  Alice logs in with Converse over WebSocket (RFC 7395), then
in a second run over BOSH (XEP-0124/0206), types a message to bob, who is logged in on
TCP (STARTTLS, the raw client of scram_client.py); bob answers and Converse must show
the answer in the chat; the script screenshots the chat (docs/images/converse-websocket.png
is one such screenshot).

The page's origin is the only one the listener allows (`<web allowed-origins/>`), so a
browser's real `Origin` is checked, and BOSH runs cross-origin (CORS preflight).

Needs Node.js (>= 20.10), Chromium and the packages of tests/js; scripts/test installs
the packages (npm ci --prefix tests/js), .ci/run Chromium; by hand:

    apt-get install chromium nodejs npm   # Debian; or any Node.js >= 20.10 with npm
    npm ci --prefix tests/js --no-audit --no-fund
    .venv/bin/python -m pytest tests/py/test_converse.py -q

$CHROMIUM names another Chromium executable (default /usr/bin/chromium, else `chromium`
on PATH).
"""

import json
import os
import shutil
import subprocess
import time
import uuid
from xml.sax.saxutils import escape, quoteattr

import pytest

import scram_client
from scram_client import local, to_xml
from serverproc import ROOT, accepts, free_port, serving

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
JS_DIR = ROOT / "tests" / "js"
SCRIPT = JS_DIR / "converse.mjs"
RUN_TIMEOUT = 15  # seconds for one run of converse.mjs (it takes 2-4 s here)
INSTALL = ("install Node.js >= 20.10 and Chromium (Debian: apt-get install chromium nodejs npm) "
           "and the packages of tests/js (npm ci --prefix tests/js --no-audit --no-fund); "
           "scripts/test does the latter, .ci/run the former")


@pytest.fixture
def tools():
    """(node, chromium) executables; fails (no skip: this client is part of the suite)
    with how to install what is missing, before any server starts."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not on PATH: {INSTALL}")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    if (major, minor) < (20, 10):
        pytest.fail(f"node {version} is too old for playwright-core: {INSTALL}")
    chromium = os.environ.get("CHROMIUM") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium"))
    if not chromium or not os.access(chromium, os.X_OK):
        pytest.fail(f"no Chromium (/usr/bin/chromium, chromium on PATH or $CHROMIUM): {INSTALL}")
    for package, needed in [("converse.js", "dist/converse.min.js"), ("playwright-core", "package.json")]:
        if not (JS_DIR / "node_modules" / package / needed).is_file():
            pytest.fail(f"{JS_DIR / 'node_modules'} has no {package}: {INSTALL}")
    return node, chromium


@pytest.fixture
def server(request, tmp_path):
    http, page = free_port(), free_port()
    extra = (f"<listen address='127.0.0.1' port='{http}' mode='http' secure='true'/>"
             f"<web allowed-origins='http://127.0.0.1:{page}'/>")
    with serving(request, tmp_path, USERS, c2s_extra=extra) as s:
        s.http_port, s.page_port = http, page
        s.wait_for(lambda: accepts(http), "the web listener", watch=["c2s"])
        yield s


def bob_online(server):
    """bob on TCP (STARTTLS, SCRAM), available so that a message to his bare JID
    reaches him."""
    bob = scram_client.login(server.starttls_port, "bob", USERS["bob"], resource="tcp")
    bob.send("<presence/>")
    return bob


def read_file(path):
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.parametrize("transport", ["websocket", "bosh"])
def test_converse_chats_with_a_tcp_user(tools, server, tmp_path, transport):
    node, chromium = tools
    url = (f"ws://127.0.0.1:{server.http_port}/xmpp-websocket" if transport == "websocket"
           else f"http://127.0.0.1:{server.http_port}/http-bind")
    token = uuid.uuid4().hex[:8]
    text = f"Hello bob, this is Converse.js over {transport} ({token})"
    answer = f"Hello alice, bob on TCP got your {transport} message ({token})"
    screenshot = tmp_path / f"converse-{transport}.png"
    out, err = tmp_path / "converse.stdout", tmp_path / "converse.stderr"

    bob = bob_online(server)
    env = dict(os.environ, CONVERSE_PASSWORD=USERS["alice"])
    cmd = [node, str(SCRIPT), "--transport", transport, "--url", url, "--jid", "alice@localhost",
           "--to", "bob@localhost", "--send", text, "--expect", answer,
           "--screenshot", str(screenshot), "--page-port", str(server.page_port),
           "--chromium", chromium, "--timeout", str(RUN_TIMEOUT)]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=JS_DIR, env=env, stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr)
    try:
        def output():
            return (f"converse.mjs exit status {proc.poll()}\nstdout:\n{read_file(out)}\n"
                    f"stderr:\n{read_file(err)}")

        # bob waits for alice's message (what the server delivers from the browser) ...
        deadline = time.monotonic() + RUN_TIMEOUT + 2
        got = None
        while got is None:
            if proc.poll() is not None:
                pytest.fail(f"converse.mjs ended before bob got alice's message; bob received:\n"
                            f"{bob.received.decode(errors='replace')}\n{output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"bob got no message from alice within {RUN_TIMEOUT} s; bob received:\n"
                            f"{bob.received.decode(errors='replace')}\n{output()}")
            try:
                element = bob.next(timeout=0.2, what="alice's message")
            except TimeoutError:
                continue
            if local(element) == "message" and element.find("{jabber:client}body") is not None:
                got = element
        sender = got.get("from") or ""
        assert sender.startswith("alice@localhost/"), f"{to_xml(got)}\n{output()}"
        assert got.get("to", "").split("/")[0] == "bob@localhost", to_xml(got)
        assert got.get("type") == "chat", to_xml(got)
        assert got.find("{jabber:client}body").text == text, f"{to_xml(got)}\n{output()}"

        # ... and answers the browser's full JID; Converse must show it in the chat.
        bob.send(f"<message to={quoteattr(sender)} type='chat' id='answer-{token}'>"
                 f"<body>{escape(answer)}</body></message>")
        try:
            status = proc.wait(timeout=RUN_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"converse.mjs did not end\n{output()}")
        assert status == 0, output()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        bob.close()

    print(read_file(out))  # the summary, for -s or -rP
    summary = json.loads(read_file(out))
    assert summary["ok"] is True, output()
    assert summary["transport"] == transport and summary["url"] == url, output()
    assert summary["jid"] == sender, output()  # the JID the server bound is the sender bob saw
    assert summary["received"]["body"] == answer, output()
    assert summary["received"]["from"].split("/")[0] == "bob@localhost", output()
    assert text in summary["chat_messages"] and answer in summary["chat_messages"], output()
    assert not summary["page_errors"], output()
    check_logout(transport, summary["logout"], output())
    data = screenshot.read_bytes() if screenshot.exists() else b""
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, \
        f"no screenshot at {screenshot} ({len(data)} bytes)\n{output()}"


def check_logout(transport, logout, output):
    """Converse's logout, as the browser saw it on the wire (converse.mjs records it)."""
    if transport == "websocket":
        # RFC 7395 3.6: the client's <close/>; Strophe closes the socket right after it
        # without waiting for the server's, so only the absence of errors is checked.
        sent = [f["payload"] for f in logout["frames"] if f["dir"] == "sent"]
        assert any("<close" in p and "urn:ietf:params:xml:ns:xmpp-framing" in p for p in sent), output
        received = [f["payload"] for f in logout["frames"] if f["dir"] == "received"]
        assert not [p for p in received if "http://etherx.jabber.org/streams" in p and "error" in p], output
        assert all(s["closed"] for s in logout["sockets"]), output
        return
    # BOSH: Converse (Strophe) sends <body type='terminate'> (with its unavailable
    # presence) while its previous request is held. XEP-0124 section 13: the connection
    # manager SHOULD answer the oldest pending request with a <body type='terminate'/> and
    # every other one with an empty <body/>; a `condition` says the session ended in
    # error (XEP-0124 17.2), and `remote-stream-error` in particular that the XMPP
    # server sent a stream error, which the body then carries (XEP-0206 section 6) --
    # not what a client's own clean logout is.
    answers = logout["bosh_answers"]
    assert answers and not logout["unanswered"], output
    assert all(a["status"] == 200 and not a.get("failed") for a in answers), output
    assert any(a["attrs"].get("type") == "terminate" for a in answers), output
    with_condition = [a for a in answers if a["attrs"].get("condition")]
    assert not with_condition, (
        "a clean BOSH logout (the client's type='terminate') was answered with an error "
        "condition: c2s/src/web/bosh.rs Session::end (called by Session::request for "
        "type='terminate') answers every held request with "
        "Reply::terminate(\"remote-stream-error\"); XEP-0124 section 13 wants "
        "type='terminate' on the oldest pending request and an empty <body/> on the others, "
        "without a condition (no stream error happened). Answers during the logout:\n"
        + json.dumps(answers, indent=1) + "\n" + output)
