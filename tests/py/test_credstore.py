"""The example credential store (contrib/credstore.py), a third-party-style component
run by the router (`<exec>`) that binds the credentials namespace of localhost: a user
whose SCRAM record is only in its file logs in, other data still goes to the file
storage, a password change is refused (the store is read-only) and the user is listed.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_credstore.py -q
"""

import base64
import hashlib
import hmac
import os
import sys
from xml.sax.saxutils import quoteattr

import pytest

pytest.importorskip("OpenSSL")

from scram_client import login  # noqa: E402
from serverproc import ROOT, serving  # noqa: E402

NS_AUTH = "urn:jabberd-rs:auth:0"


def scram_record(jid, password, hash_name, algo, iterations=4096):
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac(algo, password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", algo).digest()
    stored = hashlib.new(algo, client_key).digest()
    server = hmac.new(salted, b"Server Key", algo).digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"{jid} {hash_name} {iterations} {b64(salt)} {b64(stored)} {b64(server)}\n"


def test_a_directory_of_scram_records_serves_logins(request, tmp_path):
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("# jid hash iterations salt stored-key server-key\n"
                        + scram_record("carol@localhost", "carol-pw", "SHA-256", "sha256")
                        + scram_record("carol@localhost", "carol-pw", "SHA-1", "sha1"))
    command = f"{sys.executable} {ROOT / 'contrib' / 'credstore.py'} {accounts} localhost"
    with serving(request, tmp_path,
                 router_extra=f"<exec name='credstore' command={quoteattr(command)} secret='cred-secret' "
                              f"log={quoteattr(str(tmp_path / 'log' / 'credstore.log'))}/>",
                 users_extra="<component name='credstore' secret='cred-secret' trusted='false'>"
                             f"<allow type='xdb' host='any' ns='{NS_AUTH}'/></component>") as server:
        server.wait_for(lambda: f"route=xdb host=localhost {NS_AUTH}" in server.log("router"),
                        "the credential store to bind its namespace")
        carol = login(server.starttls_port, "carol", "carol-pw", resource="c")
        assert carol.jid == "carol@localhost/c"
        # The rest of her data goes to the file storage.
        carol.iq("set", "<vCard xmlns='vcard-temp'><FN>Carol</FN></vCard>")
        assert (tmp_path / "spool" / "localhost" / "carol").is_dir()
        carol.close()
        # A wrong password is refused as with any store.
        with pytest.raises(AssertionError):
            login(server.starttls_port, "carol", "not-her-password", resource="x")
        # Read-only: a password change is refused with the store's error.
        result = server.ctl("passwd", "carol@localhost", "--password", "new-pw", check=False)
        assert result.returncode != 0 and "read-only" in result.stdout + result.stderr, result
        # She is listed: the list is gathered from both stores.
        assert "carol@localhost" in server.ctl("users", "localhost").stdout.split()
