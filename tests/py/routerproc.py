"""Start a real `router` on a free loopback port in a temporary directory.

Used by the end-to-end tests (test_component.py).  The binary is taken from
$JABBERD_BIN_DIR if set, else from target/debug at the top of the repository.

    with RouterProcess(tmp_path, {"echo.localhost": "echo-secret"}) as router:
        ... connect to 127.0.0.1:router.port ...
        router.log_text()   # what the router wrote to stderr so far
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

ROOT = Path(__file__).resolve().parents[2]


def router_binary():
    bin_dir = os.environ.get("JABBERD_BIN_DIR") or str(ROOT / "target" / "debug")
    return Path(bin_dir) / "router"


from serverproc import free_port  # noqa: E402  (a port outside the ephemeral range)


class RouterProcess:
    """A router process with its own config, users file and log in `directory`."""

    def __init__(self, directory, components, log_level="debug", grace_seconds=1,
                 grace_max_packets=100):
        self.dir = Path(directory)
        self.components = dict(components)
        self.log_level = log_level
        self.grace_seconds = grace_seconds
        self.grace_max_packets = grace_max_packets
        self.port = None
        self.proc = None
        self.log_path = self.dir / "router.log"
        self._log_file = None

    def write_config(self):
        users = self.dir / "router-users.xml"
        lines = ["<users>"]
        for name, secret in self.components.items():
            lines.append(f"  <component name={quoteattr(name)} secret={quoteattr(secret)}/>")
        lines.append("</users>")
        users.write_text("\n".join(lines) + "\n")
        config = self.dir / "router.xml"
        config.write_text(
            "<router>\n"
            f'  <listen address="127.0.0.1" port="{self.port}"/>\n'
            f"  <users file={quoteattr(str(users))}/>\n"
            f'  <grace seconds="{self.grace_seconds}" max-packets="{self.grace_max_packets}"/>\n'
            f'  <log level="{self.log_level}"/>\n'
            "</router>\n"
        )
        return config

    def start(self, timeout=10.0):
        binary = router_binary()
        if not binary.exists():
            raise FileNotFoundError(f"router binary not found: {binary} (build it or set JABBERD_BIN_DIR)")
        self.dir.mkdir(parents=True, exist_ok=True)
        # A free port can be taken between the probe and the bind: retry a few times.
        for _attempt in range(3):
            self.port = free_port()
            config = self.write_config()
            self._log_file = open(self.log_path, "ab")
            env = dict(os.environ)
            env.pop("RUST_LOG", None)  # the config's log level is what the tests expect
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(config)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=self._log_file,
                env=env,
            )
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"router did not listen on port {self.port}; log:\n{self.log_text()}")

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
