"""Tests for scripts/jabberd, the process supervisor.

The server executables are replaced by tests/py/fakes/fake_program.py,
copied into a temporary bin dir under each program name; JABBERD_BIN_DIR
points the supervisor at it.  Each fake logs its events (START, LISTENING,
HUP, TERM) with a timestamp to its stdout, i.e. to log/NAME.log.

Run from the repository root:  python3 -m pytest tests/py/test_supervisor.py -q
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "jabberd"
FAKE = Path(__file__).resolve().parent / "fakes" / "fake_program.py"
PROGRAMS = ["router", "xdb-file", "sm", "c2s", "s2s"]
# Start order of the default test list (sm has two instances).
NAMES = ["router", "xdb-file", "sm-1", "sm-2", "c2s", "s2s"]


from serverproc import free_port  # noqa: E402  (a port outside the ephemeral range)


def wait_for(condition, what, timeout=5.0):
    """Poll condition() every 50 ms; return its first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class Env:
    """A temporary bin/run/log dir and supervisor.xml, plus helpers."""

    def __init__(self):
        # Short path: the control socket path must fit in sun_path.
        self.root = Path(tempfile.mkdtemp(prefix="jd-", dir="/tmp"))
        self.bin = self.root / "bin"
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "log"
        self.xml = self.root / "supervisor.xml"
        self.port = free_port()
        self.bin.mkdir()
        fake = FAKE.read_text().split("\n", 1)[1]
        for program in PROGRAMS:
            path = self.bin / program
            path.write_text(f"#!{sys.executable}\n{fake}")
            path.chmod(0o755)

    def write_config(self, processes=None, extra=""):
        if processes is None:
            processes = self.default_processes()
        self.xml.write_text(
            "<supervisor>\n"
            "  <bin-dir>overridden/by/JABBERD_BIN_DIR</bin-dir>\n"
            f"  <run-dir>{self.run_dir}</run-dir>\n"
            f"  <log-dir>{self.log_dir}</log-dir>\n"
            f"{extra}"
            f"{processes}"
            "</supervisor>\n")

    def default_processes(self, router_args=None, c2s_attrs=""):
        if router_args is None:
            router_args = f"--listen {self.port} --delay 0.3"
        return (
            f'  <process name="router" program="router" config="etc/router.xml" '
            f'args="{router_args}" wait-for="127.0.0.1:{self.port}" wait-timeout="5"/>\n'
            '  <process name="xdb-file" program="xdb-file" config="etc/xdb-file.xml"/>\n'
            '  <process name="sm" program="sm" config="etc/sm.xml" instances="2"/>\n'
            f'  <process name="c2s" program="c2s" config="etc/c2s.xml" {c2s_attrs}/>\n'
            '  <process name="s2s" program="s2s" config="etc/s2s.xml"/>\n')

    def jabberd(self, *args, timeout=30, script=SCRIPT, extra_env=None):
        env = dict(os.environ, JABBERD_BIN_DIR=str(self.bin), **(extra_env or {}))
        return subprocess.run([str(script), *args, "-f", str(self.xml)], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self):
        result = self.jabberd("start", "--daemon", "--no-build")
        assert result.returncode == 0, result.stderr
        self.wait_ready()
        return result

    def wait_ready(self):
        # The supervisor returns once everything is spawned; the fakes need a
        # moment more to log START and install their signal handlers.
        for name in NAMES:
            wait_for(lambda: self.events(name, "START"), f"{name} to start")

    def status(self):
        """{name: (pid or None, state, restarts)} from `jabberd status`."""
        result = self.jabberd("status")
        assert result.returncode == 0, result.stderr
        table = {}
        for line in result.stdout.splitlines()[2:]:  # supervisor line, header
            name, pid, state, _uptime, restarts = line.split()[:5]
            table[name] = (None if pid == "-" else int(pid), state, int(restarts))
        return table

    def pids(self):
        return {name: row[0] for name, row in self.status().items()}

    def events(self, name, kind=None):
        """[(time, event, details)] from the fake's lines in log/NAME.log."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return []
        found = []
        for line in path.read_text().splitlines():
            if line.startswith("===="):  # the supervisor's start banner
                continue
            stamp, event, _name, details = (line.split(" ", 3) + [""])[:4]
            if kind is None or event == kind:
                found.append((float(stamp), event, details))
        return found

    def start_info(self, name):
        """The JSON of the latest START event of a fake."""
        return json.loads(self.events(name, "START")[-1][2])

    def supervisor_log(self):
        path = self.log_dir / "supervisor.log"
        return path.read_text() if path.exists() else ""

    def cleanup(self):
        """Stop the supervisor; kill anything left so no test leaks processes."""
        sup = None
        pid_file = self.run_dir / "jabberd.pid"
        if pid_file.exists():
            sup = int(pid_file.read_text())
            try:
                self.jabberd("stop", timeout=70)
            except subprocess.TimeoutExpired:
                pass
        leftovers = [sup] if sup else []
        for log in self.log_dir.glob("*.log") if self.log_dir.exists() else []:
            for _, _, details in self.events(log.stem, "START"):
                leftovers.append(json.loads(details)["pid"])
        for pid in leftovers:
            if pid_alive(pid) and self.owns(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def owns(self, pid):
        # Only kill pids that still run our fakes or our supervisor.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.root).encode() in cmdline


@pytest.fixture
def env():
    e = Env()
    e.write_config()
    yield e
    e.cleanup()


@pytest.fixture
def running(env):
    env.start()
    return env


# --- start and status -------------------------------------------------------

def test_start_daemon_brings_everything_up_in_order(running):
    status = running.status()
    assert list(status) == NAMES
    for name, (pid, state, restarts) in status.items():
        assert state == "running" and restarts == 0, name
        info = running.start_info(name)
        assert info["pid"] == pid
        assert info["cwd"] == str(ROOT)  # children run in the repository root
    # The router was listening before anything else was started ...
    listening = running.events("router", "LISTENING")[0][0]
    assert all(listening < running.events(name, "START")[0][0] for name in NAMES[1:])
    # ... and the supervisor started them in list order.
    started = [line.split("started ")[1].split()[0]
               for line in running.supervisor_log().splitlines() if "INFO: started " in line]
    assert started == NAMES
    assert (running.run_dir / "jabberd.pid").exists()


def test_status_over_plain_text_socket(running):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(running.run_dir / "supervisor.sock"))
        sock.sendall(b"status\n")
        reply = sock.makefile().read()
    assert "NAME" in reply and "router" in reply and "running" in reply


def test_instances_get_instance_flag(running):
    for k in (1, 2):
        argv = running.start_info(f"sm-{k}")["argv"]
        assert argv[1:] == ["-c", "etc/sm.xml", "--instance", str(k)]
        assert argv[0] == str(running.bin / "sm")
    router_argv = running.start_info("router")["argv"]
    assert "--instance" not in router_argv
    assert router_argv[1:3] == ["-c", "etc/router.xml"]


def test_second_start_is_refused(running):
    before = running.pids()
    result = running.jabberd("start", "--daemon", "--no-build")
    assert result.returncode != 0
    assert "already running" in result.stderr
    assert running.pids() == before


def test_status_when_not_running(env):
    result = env.jabberd("status")
    assert result.returncode == 3
    assert "not running" in result.stdout + result.stderr


def test_missing_executable_without_build(env):
    (env.bin / "s2s").unlink()
    result = env.jabberd("start", "--daemon", "--no-build")
    assert result.returncode == 1
    assert "s2s" in result.stderr and "missing" in result.stderr


def test_missing_executable_triggers_cargo_build(env):
    # A copy of the script in a fake repository with a Cargo.toml, and a fake
    # cargo on PATH that "builds" the missing executable.
    repo = env.root / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "Cargo.toml").write_text("[workspace]\n")
    script = repo / "scripts" / "jabberd"
    shutil.copy(SCRIPT, script)
    tools = env.root / "tools"
    tools.mkdir()
    cargo = tools / "cargo"
    cargo.write_text('#!/bin/sh\necho "$PWD $*" > "$CARGO_LOG"\n'
                     'cp "$JABBERD_BIN_DIR/c2s" "$JABBERD_BIN_DIR/s2s"\n')
    cargo.chmod(0o755)
    (env.bin / "s2s").unlink()
    cargo_log = env.root / "cargo.log"
    extra = {"PATH": f"{tools}:{os.environ['PATH']}", "CARGO_LOG": str(cargo_log)}

    result = env.jabberd("start", "--daemon", script=script, extra_env=extra)
    assert result.returncode == 0, result.stderr
    assert "building" in result.stderr
    assert cargo_log.read_text().split() == [str(repo), "build", "--release"]
    env.wait_ready()
    assert env.start_info("s2s")["cwd"] == str(repo)  # base dir follows the script
    assert env.jabberd("stop", script=script).returncode == 0


# --- restarts ---------------------------------------------------------------

def test_killed_child_is_restarted_others_keep_their_pids(running):
    before = running.pids()
    os.kill(before["c2s"], signal.SIGKILL)

    def restarted():
        row = running.status()["c2s"]
        return row if row[0] not in (None, before["c2s"]) and row[1] == "running" else None

    pid, _, restarts = wait_for(restarted, "c2s to be restarted")
    assert restarts == 1
    after = running.pids()
    assert {n: p for n, p in after.items() if n != "c2s"} == \
           {n: p for n, p in before.items() if n != "c2s"}
    assert "c2s" in running.supervisor_log() and "SIGKILL" in running.supervisor_log()


def test_restart_name(running):
    before = running.pids()
    result = running.jabberd("restart", "sm-2")
    assert result.returncode == 0, result.stderr
    after = running.pids()
    assert after["sm-2"] != before["sm-2"] and after["sm-1"] == before["sm-1"]
    assert running.events("sm-2", "TERM")  # it was stopped with SIGTERM

    # A process name restarts all of its instances.
    result = running.jabberd("restart", "sm")
    assert result.returncode == 0, result.stderr
    again = running.pids()
    assert again["sm-1"] != after["sm-1"] and again["sm-2"] != after["sm-2"]
    assert again["router"] == before["router"]

    result = running.jabberd("restart", "nosuch")
    assert result.returncode != 0
    assert "unknown process 'nosuch'" in result.stderr


# --- signals and stopping ---------------------------------------------------

def test_reload_forwards_sighup_to_children(running):
    result = running.jabberd("reload")
    assert result.returncode == 0, result.stderr
    for name in NAMES:
        wait_for(lambda: running.events(name, "HUP"), f"SIGHUP to reach {name}")


def test_stop_ends_everything_in_reverse_order(running):
    pids = running.pids()
    result = running.jabberd("stop")
    assert result.returncode == 0, result.stderr
    assert not (running.run_dir / "jabberd.pid").exists()
    assert not (running.run_dir / "supervisor.sock").exists()
    assert not any(pid_alive(pid) for pid in pids.values())
    terms = sorted((running.events(name, "TERM")[0][0], name) for name in NAMES)
    assert [name for _, name in terms] == list(reversed(NAMES))
    assert running.jabberd("status").returncode == 3


def test_stop_kills_after_stop_timeout(env):
    env.write_config(env.default_processes(c2s_attrs='args="--ignore-term" stop-timeout="0.5"'))
    env.start()
    c2s = env.pids()["c2s"]
    started = time.monotonic()
    assert env.jabberd("stop").returncode == 0
    assert time.monotonic() - started < 5
    assert env.events("c2s", "TERM")  # got SIGTERM, ignored it ...
    assert not pid_alive(c2s)  # ... and was killed
    assert "sending SIGKILL" in env.supervisor_log()


def test_foreground_stops_on_sigterm(env):
    out = open(env.root / "foreground.out", "w+")
    proc = subprocess.Popen([str(SCRIPT), "start", "--no-build", "-f", str(env.xml)],
                            env=dict(os.environ, JABBERD_BIN_DIR=str(env.bin)),
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: env.jabberd("status").returncode == 0, "foreground supervisor")
        env.wait_ready()
        pids = env.pids()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.seek(0)
    assert "started router" in out.read()  # foreground mode logs to stderr too
    assert not (env.run_dir / "jabberd.pid").exists()
    assert not any(pid_alive(pid) for pid in pids.values())


# --- startup failures -------------------------------------------------------

@pytest.mark.parametrize("router_args, message", [
    ("--exit 3", "router exited with code 3 before accepting connections"),
    ("", "router did not accept connections"),
])
def test_router_never_up(env, router_args, message):
    processes = env.default_processes(router_args=router_args)
    env.write_config(processes.replace('wait-timeout="5"', 'wait-timeout="0.5"'))
    result = env.jabberd("start", "--daemon", "--no-build")
    assert result.returncode == 1
    assert message in result.stderr
    assert not (env.run_dir / "jabberd.pid").exists()
    assert not env.events("xdb-file")  # nothing after the router was started
    router_pid = env.start_info("router")["pid"]
    assert not pid_alive(router_pid)


BAD_CONFIGS = [
    # (content, line, words expected in the message)
    ("<supervisor>\n  <process name='a' program='a'/>\n  <proces name='b' program='b'/>\n</supervisor>\n",
     3, "unknown element <proces>"),
    ("<supervisor>\n  <process name='a' program='a' instance='2'/>\n</supervisor>\n",
     2, "unknown attribute 'instance'"),
    ("<supervisor>\n\n  <process program='a'/>\n</supervisor>\n",
     3, "without name"),
    ("<supervisor>\n  <process name='a'/>\n</supervisor>\n",
     2, "without program"),
    ("<supervisor>\n  <process name='a' program='a'\n    instances='two'/>\n</supervisor>\n",
     2, "bad number instances='two'"),
    ("<supervisor>\n  <stop-timeout>soon</stop-timeout>\n  <process name='a' program='a'/>\n</supervisor>\n",
     2, "bad number stop-timeout='soon'"),
    ("<supervisor>\n  <process name='a' program='a' wait-for='nowhere'/>\n</supervisor>\n",
     2, "bad wait-for"),
    ("<supervisor>\n  <process name='a' program='a'>\n</supervisor>\n",
     3, "mismatched tag"),
]


@pytest.mark.parametrize("content, line, words", BAD_CONFIGS)
def test_bad_config_reports_file_and_line(env, content, line, words):
    env.xml.write_text(content)
    for command in (["start", "--daemon", "--no-build"], ["status"]):
        result = env.jabberd(*command)
        assert result.returncode == 2
        assert result.stderr.startswith(f"{env.xml}:{line}: ")
        assert words in result.stderr and "(expected" in result.stderr


def test_shipped_config_is_valid():
    result = subprocess.run([str(SCRIPT), "status", "-f", str(ROOT / "etc" / "supervisor.xml")],
                            capture_output=True, text=True, timeout=10)
    # Parses fine; whether a supervisor runs here does not matter.
    assert result.returncode in (0, 3), result.stderr
