"""Helpers of the federation tests (test_s2s.py): one of our servers serving a domain
other than localhost with s2s running, a Prosody started from a config the test writes,
and a tiny DNS server on loopback.

Prosody has no static map of remote domains; it is pointed at the fake DNS server through
libunbound's `forward` option, and the fake server publishes an SRV record for our domain.
"""

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import serverproc
from serverproc import Server, ServerError, accepts, bin_dir, free_port

PROSODY = shutil.which("prosody")
PROSODYCTL = shutil.which("prosodyctl")


class FedServer(Server):
    """Our server for `domain`, with s2s listening on `s2s_port` and `s2s_extra` in
    s2s.xml (routes, tls, queue)."""

    def __init__(self, directory, domain, s2s_extra="", **kwargs):
        super().__init__(directory, **kwargs)
        self.domain = domain
        self.s2s_port = free_port()
        self.s2s_extra = s2s_extra

    def write_configs(self):
        super().write_configs()
        d = self.dir
        for name in ("xdb-file.xml", "sm.xml", "c2s.xml"):
            p = d / name
            text = p.read_text()
            text = text.replace(">localhost<", f">{self.domain}<")
            text = text.replace("name='localhost'", f"name='{self.domain}'")
            text = text.replace("localhost.crt", f"{self.domain}.crt").replace(
                "localhost.key", f"{self.domain}.key")
            p.write_text(text)
        certs = d / "certs"
        (d / "s2s.xml").write_text(
            "<s2s>\n"
            f"  <router address='127.0.0.1' port='{self.port}' name='s2s' secret='s2s-secret' reconnect='0.05'/>\n"
            f"  <host name='{self.domain}' cert='{certs}/s2s-{self.domain}.crt' "
            f"key='{certs}/s2s-{self.domain}.key' self-signed='true'/>\n"
            f"  <listen address='127.0.0.1' port='{self.s2s_port}'/>\n"
            f"  <dialback secret='secret-of-{self.domain}'/>\n"
            f"  {self.s2s_extra}\n"
            "  <log level='debug'/>\n"
            "</s2s>\n")

    def start(self):
        if not (bin_dir() / "s2s").exists():
            raise ServerError(f"s2s is not built in {bin_dir()}")
        super().start()
        offset = self._start_component("s2s")
        self.wait_for(lambda: accepts(self.s2s_port), "s2s to listen", watch=["s2s"])
        self._wait_connected("s2s", offset)
        return self

    def logs_text(self, offsets=None, tail_lines=None):
        text = super().logs_text(offsets, tail_lines)
        s2s = self.log("s2s")
        if tail_lines is not None:
            s2s = "\n".join(s2s.splitlines()[-tail_lines:])
        return f"{text}\n===== s2s.log =====\n{s2s}"

    def stop(self):
        proc = self.procs.get("s2s")
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        super().stop()


# -- a DNS server on loopback --------------------------------------------------------------

def _name(labels):
    out = b""
    for label in labels.strip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


class FakeDns:
    """Answers SRV and A questions from `records`: {(name, 'SRV'|'A'): [rdata, ...]} with
    SRV rdata (priority, weight, port, target) and A rdata 'a.b.c.d'. Anything else gets
    an empty answer."""

    def __init__(self, records):
        self.records = {(n.lower().strip("."), t): v for (n, t), v in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(1500)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                answer = self._answer(data)
            except Exception as e:  # a query we do not understand: no answer
                self.queries.append(("unanswered", repr(e)))
                continue
            self.sock.sendto(answer, peer)

    def _answer(self, q):
        pos, labels = 12, []
        while q[pos]:
            n = q[pos]
            labels.append(q[pos + 1:pos + 1 + n].decode().lower())
            pos += 1 + n
        qtype = struct.unpack(">H", q[pos + 1:pos + 3])[0]
        question = q[12:pos + 5]
        name = ".".join(labels)
        self.queries.append((name, qtype))
        # A name that exists, or has names below it (an empty non-terminal: resolvers
        # that minimise queries ask for those, and NXDOMAIN would deny everything below).
        known = any(n == name or n.endswith("." + name) for n, _ in self.records)
        answers = b""
        count = 0
        kind = {33: "SRV", 1: "A"}.get(qtype)
        for rdata in self.records.get((name, kind), []):
            if kind == "SRV":
                prio, weight, port, target = rdata
                rd = struct.pack(">HHH", prio, weight, port) + _name(target)
            else:
                rd = socket.inet_aton(rdata)
            answers += b"\xc0\x0c" + struct.pack(">HHIH", qtype, 1, 60, len(rd)) + rd
            count += 1
        # Unknown names get an empty answer, not NXDOMAIN: libunbound then treats the
        # whole zone as non-existent (and stops asking).
        flags = 0x8180
        del known
        header = q[:2] + struct.pack(">HHHHH", flags, 1, count, 0, 0)
        return header + question + answers

    def close(self):
        self._stop = True
        self.sock.close()


# -- Prosody -------------------------------------------------------------------------------

def make_cert(directory, domain):
    """A self-signed certificate and key for `domain` (PEM files)."""
    cert, key = Path(directory) / f"{domain}.crt", Path(directory) / f"{domain}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={domain}", "-addext", f"subjectAltName=DNS:{domain}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


class Prosody:
    """A Prosody serving `domain` from its own directory, c2s and s2s on loopback ports,
    DNS through `dns_port` (the fake server)."""

    def __init__(self, directory, domain, dns_port, require_encryption=True, secure_auth=False):
        self.dir = Path(directory)
        self.domain = domain
        self.c2s_port = free_port()
        self.s2s_port = free_port()
        self.dns_port = dns_port
        self.require_encryption = require_encryption
        self.secure_auth = secure_auth
        self.proc = None
        self.config = self.dir / "prosody.cfg.lua"

    def write_config(self):
        d = self.dir
        (d / "data").mkdir(parents=True, exist_ok=True)
        cert, key = make_cert(d, self.domain)
        lua = lambda b: "true" if b else "false"  # noqa: E731

        self.config.write_text(f"""
run_as_root = true
prosody_user = "root"
prosody_group = "root"
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = "{d}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ {self.s2s_port} }}
s2s_direct_tls_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", "tls", "dialback", "disco", "ping", "presence", "smacks" }}
modules_disabled = {{ "s2s_bidi", "posix" }}
authentication = "internal_plain"
storage = "internal"
c2s_require_encryption = true
s2s_require_encryption = {lua(self.require_encryption)}
s2s_secure_auth = {lua(self.secure_auth)}
s2s_timeout = 10
unbound = {{ forward = "127.0.0.1@{self.dns_port}", hoststxt = false }}
VirtualHost "{self.domain}"
  ssl = {{ certificate = "{cert}", key = "{key}" }}
""")

    def ctl(self, *args):
        return subprocess.run([PROSODYCTL, "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    def register(self, user, password):
        r = self.ctl("register", user, self.domain, password)
        if r.returncode != 0:
            raise ServerError(f"prosodyctl register failed: {r.stdout}{r.stderr}")

    def start(self):
        self.write_config()
        self.log_file = open(self.dir / "prosody.out", "ab")
        self.proc = subprocess.Popen([PROSODY, "--config", str(self.config), "-F"],
                                     cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=self.log_file)
        deadline = time.monotonic() + 15
        while not (accepts(self.c2s_port) and accepts(self.s2s_port)):
            if self.proc.poll() is not None:
                raise ServerError(f"prosody exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise ServerError(f"prosody does not listen:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self):
        out = ""
        for name in ("prosody.out", "prosody.log"):
            try:
                out += f"===== {name} =====\n" + (self.dir / name).read_text(errors="replace")
            except OSError:
                pass
        return out

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log_file", None):
            self.log_file.close()


__all__ = ["FedServer", "FakeDns", "Prosody", "PROSODY", "PROSODYCTL", "serverproc", "os"]
