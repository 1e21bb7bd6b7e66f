"""Entity capabilities (XEP-0115) and personal eventing (XEP-0163) with a second,
independent client: xmpp.js (@xmpp/client, pinned in tests/js/package.json), driven by
tests/js/pep.mjs.  The script logs two users in over STARTTLS, makes them mutual
contacts, announces capabilities that want avatar metadata and OMEMO device list
notifications (and answers the server's disco#info query for them), publishes both
kinds of items and checks the notifications, an items query and the last items with a
delay stamp on a second login.  It logs in with SASL PLAIN over the TLS stream: xmpp.js's
SCRAM-SHA-1 misparses some valid server nonces (see pep.mjs).

Needs Node.js (>= 20.10) and the packages of tests/js; scripts/test installs those
(npm ci --prefix tests/js), by hand:

    apt-get install nodejs npm   # Debian 13; or any Node.js >= 20.10 with npm
    npm ci --prefix tests/js --no-audit --no-fund
    .venv/bin/python -m pytest tests/py/test_pep_xmppjs.py -q
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from serverproc import ROOT, serving

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
JS_DIR = ROOT / "tests" / "js"
SCRIPT = JS_DIR / "pep.mjs"
INSTALL = ("install Node.js >= 20.10 (Debian 13: apt-get install nodejs npm) and the xmpp.js "
           "packages (npm ci --prefix tests/js --no-audit --no-fund); scripts/test does the latter")


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS) as s:
        yield s


@pytest.fixture
def node():
    """The node executable; fails (no skip: this client is part of the suite) with how to
    install what is missing, before any server starts."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not on PATH: {INSTALL}")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    if (major, minor) < (20, 10):
        pytest.fail(f"node {version} is too old for @xmpp/client: {INSTALL}")
    if not (JS_DIR / "node_modules" / "@xmpp" / "client").is_dir():
        pytest.fail(f"{JS_DIR / 'node_modules'} has no @xmpp/client: {INSTALL}")
    return node


def test_pep_with_xmppjs(node, server):
    env = dict(os.environ)
    # The server's self-signed certificate is trusted for this process only (the
    # certificate check itself stays on).
    env["NODE_EXTRA_CA_CERTS"] = str(Path(server.dir) / "certs" / "localhost.crt")
    env.pop("NODE_TLS_REJECT_UNAUTHORIZED", None)
    env["PEP_PASSWORD_A"] = USERS["alice"]
    env["PEP_PASSWORD_B"] = USERS["bob"]
    try:
        result = subprocess.run(
            [node, str(SCRIPT), "--port", str(server.starttls_port), "--domain", "localhost",
             "--user-a", "alice", "--user-b", "bob"],
            cwd=JS_DIR, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=30)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"pep.mjs did not end within 30 s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    output = f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    print(result.stdout)  # the summary, for -s or -rP
    summary = json.loads(result.stdout)
    assert summary["ok"] is True, output
    # xmpp.js binds with Bind 2 (XEP-0386): the resource is its tag and a stable suffix.
    assert summary["jids"]["a"].startswith("alice@localhost/laptop"), output
    assert summary["jids"]["b"].startswith("bob@localhost/phone"), output
