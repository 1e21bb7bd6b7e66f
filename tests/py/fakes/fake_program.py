#!/usr/bin/env python3
"""Stand-in for a server executable in the supervisor tests.

The test copies this file into a temporary bin dir under each program name
(router, sm, ...).  Every event goes to stdout, which the supervisor sends
to log/NAME.log, one line each:  TIME EVENT NAME DETAILS
  START     {"pid": ..., "cwd": ..., "argv": [...]} as JSON
  LISTENING after binding --listen PORT (the fake router)
  HUP       on SIGHUP
  TERM      on SIGTERM (then exits 0 unless --ignore-term)

Options (anything else, such as -c CONFIG, is ignored):
  --listen PORT    listen on 127.0.0.1:PORT and accept connections
  --delay SECS     wait this long before listening
  --ignore-term    ignore SIGTERM (to test the SIGKILL after stop-timeout)
  --exit CODE      exit at once with CODE
  --instance K     appended by the supervisor; part of NAME
"""

import json
import os
import signal
import socket
import sys
import time


def option(argv, flag, default=None):
    if flag in argv:
        return argv[argv.index(flag) + 1]
    return default


ARGV = sys.argv
INSTANCE = option(ARGV, "--instance")
NAME = os.path.basename(ARGV[0]) + (f"-{INSTANCE}" if INSTANCE else "")
IGNORE_TERM = "--ignore-term" in ARGV


def emit(event, details=""):
    sys.stdout.write(f"{time.time():.6f} {event} {NAME} {details}\n")
    sys.stdout.flush()


def on_term(_signum, _frame):
    emit("TERM")
    if not IGNORE_TERM:
        sys.exit(0)


def on_hup(_signum, _frame):
    emit("HUP")


def main():
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    emit("START", json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": ARGV}))
    if option(ARGV, "--exit") is not None:
        sys.exit(int(option(ARGV, "--exit")))
    port = option(ARGV, "--listen")
    if port is None:
        while True:
            signal.pause()
    time.sleep(float(option(ARGV, "--delay", "0")))
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(port)))
    server.listen(16)
    emit("LISTENING", port)
    while True:
        conn, _ = server.accept()
        conn.close()


if __name__ == "__main__":
    main()
