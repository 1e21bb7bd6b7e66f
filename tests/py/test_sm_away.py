"""Nothing is lost when sm dies with sessions in flight (issue 13): a client that leaves
while its sm is away (its session waits at c2s for the restore), and a session that
hibernates at sm (XEP-0198) when sm is SIGKILLed. sm is killed and started again by
hand (tests/py/serverproc.py), so it stays away as long as the test needs.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_sm_away.py -q
"""

import signal
import time

import pytest

pytest.importorskip("OpenSSL")

from scram_client import local, login, to_xml  # noqa: E402
from test_stream_management import (  # noqa: E402
    USERS, bodies, chat, cut, enable, messages, next_message, presence, resume, sm,
    sm_server, subscribed)

# No acks asked of the clients: what they received stays unacknowledged.
QUIET_SM = "<stream-management hibernate='60' ack-every='100' ack-after='300'/>"


def sm_away(server):
    """Kills sm and waits until c2s knows (its sessions wait for a restore)."""
    offset = server.log_size("c2s")
    server.kill("sm")
    server.wait_for(lambda: "went away" in server.log("c2s")[offset:], "c2s to hear that sm went away")


def pair(server, alice_sm=False):
    """bob/b and alice/a online and subscribed to each other; alice with XEP-0198
    resumption when `alice_sm`."""
    subscribed(server)
    bob = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    bob.send("<presence/>")
    alice = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    alice.previd = enable(alice).get("id") if alice_sm else None
    alice.send("<presence/>")
    presence(bob, "alice@localhost/a")
    return alice, bob


def leaves_while_sm_is_away(server, alice, leave):
    """sm is killed, alice sends "held" to bob (c2s holds it for her session) and leaves
    (`leave(alice)`) before sm is back; returns the c2s log offset from before."""
    sm_away(server)
    offset = server.log_size("c2s")
    chat(alice, "bob@localhost/b", "held")
    leave(alice)
    server.wait_for(lambda: "ends after its restore" in server.log("c2s")[offset:],
                    "c2s to keep alice's ended session for its restore")
    return offset


def test_a_client_leaving_while_sm_is_away_loses_nothing(request, tmp_path):
    with sm_server(request, tmp_path) as server:
        alice, bob = pair(server)
        offset = leaves_while_sm_is_away(server, alice, lambda a: a.close())
        server.restart("sm")
        # sm gets alice's session back, delivers what she sent, then ends it.
        assert bodies([next_message(bob, timeout=10)]) == ["held"]
        presence(bob, "alice@localhost/a", "unavailable", timeout=10)
        assert "session restored to end it" in server.log("c2s")[offset:]
        bob.close()


def test_a_resumable_client_cut_while_sm_is_away_loses_nothing(request, tmp_path):
    with sm_server(request, tmp_path, c2s_extra=QUIET_SM) as server:
        alice, bob = pair(server, alice_sm=True)
        chat(bob, "alice@localhost/a", "unacked")
        assert bodies(messages(alice, 1)) == ["unacked"]
        # The connection drops: the session cannot hibernate at an sm that is away, so
        # it ends after its restore, returning what alice did not acknowledge.
        leaves_while_sm_is_away(server, alice, cut)
        server.restart("sm")
        assert bodies([next_message(bob, timeout=10)]) == ["held"]
        presence(bob, "alice@localhost/a", "unavailable", timeout=10)
        # What alice never acknowledged waits for her in offline storage.
        alice = login(server.starttls_port, "alice", USERS["alice"], resource="again")
        alice.send("<presence/>")
        assert bodies(messages(alice, 1)) == ["unacked"]
        alice.close()
        bob.close()


def test_what_a_hibernating_session_held_survives_sm_killed(request, tmp_path):
    with sm_server(request, tmp_path, c2s_extra=QUIET_SM) as server:
        alice, bob = pair(server, alice_sm=True)
        previd = alice.previd
        chat(bob, "alice@localhost/a", "unacked")
        assert bodies(messages(alice, 1)) == ["unacked"]
        offset = server.log_size("sm")
        cut(alice)
        server.wait_for(lambda: "session hibernating" in server.log("sm")[offset:],
                        "alice's session to hibernate at sm")
        # Queued at sm for the hibernating session (one to the full JID, one to the bare).
        chat(bob, "alice@localhost/a", "queued-full")
        chat(bob, "alice@localhost", "queued-bare")

        def written():
            # xdb-file's spool: the record is a file of alice's.
            text = "".join(f.read_text(errors="replace")
                           for f in (server.dir / "spool").rglob("*hibernated*") if f.is_file())
            return "queued-full" in text and "queued-bare" in text
        server.wait_for(written, "the queue written through to storage")
        server.kill("sm")
        sm_offset = server.log_size("sm")
        server.restart("sm")
        server.wait_for(lambda: "undelivered" in server.log("sm")[sm_offset:],
                        "the new sm to give back what the session held")
        # The session died with sm: its resumption fails; alice logs in again and
        # finds everything in offline storage, in order, once.
        again = resume(server, "alice", previd, h=0)
        assert local(sm(again, "failed")) == "failed"
        again.close()
        alice = login(server.starttls_port, "alice", USERS["alice"], resource="again")
        alice.send("<presence/>")
        got = messages(alice, 3, timeout=10)
        assert bodies(got) == ["unacked", "queued-full", "queued-bare"], [to_xml(e) for e in got]
        alice.close()
        bob.close()


def test_c2s_stops_at_once_with_a_session_waiting_to_end(request, tmp_path):
    """A session whose client left while sm was away waits for a restore that a stopping
    c2s does not wait for: SIGTERM ends c2s at once, saying what it dropped."""
    with sm_server(request, tmp_path) as server:
        alice, bob = pair(server)
        offset = leaves_while_sm_is_away(server, alice, lambda a: a.close())
        bob.close()
        started = time.monotonic()
        server.kill("c2s", signal.SIGTERM, timeout=5.0)
        assert time.monotonic() - started < 4.0
        assert "end unrestored" in server.log("c2s")[offset:]
