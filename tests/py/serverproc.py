"""Start a whole server (router, xdb-file, sm, c2s) on free loopback ports in a
temporary directory, for the client end-to-end tests (test_c2s.py, test_im.py).

Binaries come from $JABBERD_BIN_DIR if set, else from target/debug at the top of
the repository.  Every process runs with the temporary directory as its working
directory and writes stdout+stderr to log/NAME.log there.

    with Server(tmp_path, register=True) as server:
        server.adduser("alice@localhost", "pw")
        ... connect to 127.0.0.1:server.starttls_port or server.tls_port ...
        server.kill("sm"); server.restart("sm")
        print(server.logs_text())
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import quoteattr

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ["router", "xdb-file", "sm", "c2s"]
SECRETS = {"xdb-file": "xdb-secret", "sm": "sm-secret", "c2s": "c2s-secret", "admin": "admin-secret",
           "muc": "muc-secret", "logd": "logd-secret"}
MUC_SERVICE = "conference.localhost"
CONNECTED = "connected to the router"
POLL = 0.05


def bin_dir():
    return Path(os.environ.get("JABBERD_BIN_DIR") or str(ROOT / "target" / "debug"))


def binaries_missing():
    """Names of the executables that are not built."""
    return [p for p in PROCESSES + ["muc", "jabberctl"] if not (bin_dir() / p).exists()]


_GIVEN_PORTS = set()


def free_port():
    """A port free to listen on, below the kernel's ephemeral range (32768-60999 on
    Linux): a port the kernel hands out itself (bind to 0) may be taken, before our
    server binds it, as the local port of one of the test's own outgoing connections.
    Never the same port twice in one process (two listeners of one server drew the
    same free port once)."""
    import random
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _GIVEN_PORTS.add(port)
            return port
    raise RuntimeError("no free port found in 20000-32000")


def accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerError(RuntimeError):
    pass


class Server:
    """A temporary installation and its four processes.

    register: XEP-0077 account creation before login in c2s.
    auth_failures: (max, window seconds) of c2s's failed-login limit.
    c2s_extra / sm_extra: extra XML elements for c2s.xml / sm.xml.
    users_extra: extra <component/> entries for router-users.xml (third-party components).
    upload: also run the upload component (upload.localhost, HTTPS on upload_port with
    c2s's self-signed certificate; upload_extra: extra elements for upload.xml).
    proxy65: also run the SOCKS5 bytestream proxy (proxy.localhost, SOCKS5 on proxy65_port;
    proxy65_extra: extra elements for proxy65.xml).
    muc: also run the group chat service (muc, for conference.localhost, its rooms
    stored by xdb-file); muc_extra: extra XML elements for muc.xml.
    storage="pg" with pg_url: the storage process (still named "xdb-file" here) is
    xdb-pg on that PostgreSQL database (tests/py/test_storage_pg.py).
    logd: also run the log sink (started right after the router); logd_extra: its
    outputs (elements of logd.xml), by default <file path='log/server.log' level='info'/>.
    log_level: every process's log level ('debug' for tests, 'info' as shipped).
    metrics: every process serves /metrics (docs/metrics.md) on its own loopback port,
    metrics_ports[NAME] (NAME as in procs: router, xdb-file, sm, c2s, ...).
    """

    def __init__(self, directory, register=False, auth_failures=(5, 60), timeouts=None,
                 c2s_extra="", sm_extra="", grace_seconds=2, users_extra="", router_extra="",
                 upload=False, upload_extra="", muc=False, muc_extra="",
                 proxy65=False, proxy65_extra="", storage="file", pg_url=None,
                 logd=False, logd_extra="", log_level="debug", metrics=False):
        self.dir = Path(directory)
        self.log_level = log_level  # of every process; benchmarks use the shipped 'info'
        self.storage = storage
        self.pg_url = pg_url
        self.register = register
        self.auth_failures = auth_failures
        self.timeouts = timeouts  # (idle, keepalive) seconds or None for c2s's defaults
        self.c2s_extra = c2s_extra
        self.sm_extra = sm_extra
        self.users_extra = users_extra
        self.router_extra = router_extra
        self.upload = upload
        self.upload_extra = upload_extra
        self.upload_port = None
        self.proxy65 = proxy65
        self.proxy65_extra = proxy65_extra
        self.proxy65_port = None
        self.muc = muc
        self.muc_extra = muc_extra
        self.logd = logd
        self.logd_extra = logd_extra
        self.grace_seconds = grace_seconds
        self.metrics = metrics
        self.metrics_ports = {}
        self.port = None  # the router's TCP listener
        # Its Unix socket, where the server's own components connect (as in etc/).
        self.router_socket = self.dir / "router.sock"
        self.starttls_port = None
        self.tls_port = None
        self.procs = {}
        self._log_files = {}

    # -- configuration -------------------------------------------------------------

    def router_address(self, name):
        """Where the component `name` reaches the router: the Unix socket, as the shipped
        etc/ has it, but for jabberctl (`admin`), which uses TCP on loopback as shipped."""
        if name == "admin":
            return f"address='127.0.0.1' port='{self.port}'"
        return f"unix={quoteattr(str(self.router_socket))}"

    def router_element(self, name):
        return (f"<router {self.router_address(name)} name='{name}' "
                f"secret='{SECRETS[name]}' reconnect='0.05'/>")

    def path(self, rel):
        return self.dir / rel

    def write_configs(self):
        d = self.dir
        users = d / "router-users.xml"
        users.write_text((ROOT / "etc" / "router-users.xml").read_text()
                         .replace("</users>", f"{self.users_extra}\n</users>"))
        (d / "router.xml").write_text(
            "<router>\n"
            f"  <listen unix={quoteattr(str(self.router_socket))}/>\n"
            f"  <listen address='127.0.0.1' port='{self.port}'/>\n"
            f"  <users file={quoteattr(str(users))}/>\n"
            f"  <grace seconds='{self.grace_seconds}'/>\n"
            f"  {self.router_extra}\n"
            f"  <log level='{self.log_level}'/>\n"
            "</router>\n")
        if self.storage == "pg":
            (d / "xdb-file.xml").write_text(
                "<xdb-pg>\n"
                f"  <router {self.router_address('xdb-pg')} name='xdb-pg' "
                "secret='xdb-pg-secret' reconnect='0.05'/>\n"
                "  <host>localhost</host>\n"
                f"{f'  <host>{MUC_SERVICE}</host>' if self.muc else ''}\n"
                f"  <postgresql url={quoteattr(self.pg_url)} pool-size='2'/>\n"
                f"  <log level='{self.log_level}'/>\n"
                "</xdb-pg>\n")
        else:
            (d / "xdb-file.xml").write_text(
                "<xdb-file>\n"
                f"  {self.router_element('xdb-file')}\n"
                "  <host>localhost</host>\n"
                f"{f'  <host>{MUC_SERVICE}</host>' if self.muc else ''}\n"
                f"  <spool dir={quoteattr(str(d / 'spool'))}/>\n"
                f"  <log level='{self.log_level}'/>\n"
                "</xdb-file>\n")
        (d / "sm.xml").write_text(self.sm_config())
        timeouts = ""
        if self.timeouts is not None:
            timeouts = f"  <timeouts idle='{self.timeouts[0]}' keepalive='{self.timeouts[1]}'/>\n"
        (d / "c2s.xml").write_text(self.c2s_config(self.starttls_port, self.tls_port, timeouts))
        (d / "ctl.xml").write_text(
            f"<jabberctl>{self.router_element('admin')}</jabberctl>\n")
        if self.upload:
            (d / "upload.xml").write_text(self.upload_config())
        if self.proxy65:
            (d / "proxy65.xml").write_text(
                "<proxy65>\n"
                f"  <router {self.router_address('proxy.localhost')} name='proxy.localhost' "
                "secret='proxy65-secret' reconnect='0.05'/>\n"
                "  <host>localhost</host>\n"
                f"  <listen address='127.0.0.1' port='{self.proxy65_port}'/>\n"
                f"  {self.proxy65_extra}\n"
                f"  <log level='{self.log_level}'/>\n"
                "</proxy65>\n")
        if self.logd:
            outputs = self.logd_extra or "<file path='log/server.log' level='info'/>"
            (d / "logd.xml").write_text(
                "<logd>\n"
                f"  {self.router_element('logd')}\n"
                f"  {outputs}\n"
                f"  <log level='{self.log_level}'/>\n"
                "</logd>\n")
        if self.muc:
            (d / "muc.xml").write_text(
                "<muc>\n"
                f"  {self.router_element('muc')}\n"
                f"  <service>{MUC_SERVICE}</service>\n"
                f"  {self.muc_extra}\n"
                f"  <log level='{self.log_level}'/>\n"
                "</muc>\n")
        if self.metrics:
            self.add_metrics_elements()

    def add_metrics_elements(self):
        """A <metrics/> element, on a port of its own, in every configuration written."""
        for name in ["router", "xdb-file", "sm", "c2s", "upload", "proxy65", "logd", "muc"]:
            path = self.dir / f"{name}.xml"
            if not path.exists():
                continue
            port = self.metrics_ports[name] = free_port()
            text = path.read_text().rstrip()
            end = text.rindex("</")
            path.write_text(f"{text[:end]}  <metrics address='127.0.0.1' port='{port}'/>\n"
                            f"{text[end:]}\n")

    def upload_config(self):
        certs = self.dir / "certs"
        return (
            "<upload>\n"
            f"  <router {self.router_address('upload.localhost')} name='upload.localhost' "
            "secret='upload-secret' reconnect='0.05'/>\n"
            "  <host>localhost</host>\n"
            f"  <http address='127.0.0.1' port='{self.upload_port}' tls='true' "
            f"cert={quoteattr(str(certs / 'localhost.crt'))} "
            f"key={quoteattr(str(certs / 'localhost.key'))} "
            f"base-url='https://localhost:{self.upload_port}' timeout='5'/>\n"
            f"  <secret file={quoteattr(str(self.dir / 'upload.secret'))}/>\n"
            f"  <spool dir={quoteattr(str(self.dir / 'upload'))}/>\n"
            f"  {self.upload_extra}\n"
            f"  <log level='{self.log_level}'/>\n"
            "</upload>\n")

    def c2s_config(self, starttls_port, tls_port, timeouts=""):
        certs = self.dir / "certs"
        return (
            "<c2s>\n"
            f"  {self.router_element('c2s')}\n"
            f"  <host name='localhost' cert={quoteattr(str(certs / 'localhost.crt'))} "
            f"key={quoteattr(str(certs / 'localhost.key'))} self-signed='true'/>\n"
            f"  <listen address='127.0.0.1' port='{starttls_port}' mode='starttls'/>\n"
            f"  <listen address='127.0.0.1' port='{tls_port}' mode='tls'/>\n"
            f"  <register enabled='{'true' if self.register else 'false'}'/>\n"
            "  <limits max-stanza-bytes='65536' max-depth='32' rate-bytes='1000000'/>\n"
            f"{timeouts}"
            f"  <auth-failures max='{self.auth_failures[0]}' window='{self.auth_failures[1]}'/>\n"
            f"  {self.c2s_extra}\n"
            f"  <log level='{self.log_level}'/>\n"
            "</c2s>\n")

    def start_second_c2s(self):
        """A second c2s instance (c2s-2, its own ports: starttls_port2, tls_port2)
        serving the same domain; waits until it listens and is connected."""
        self.starttls_port2, self.tls_port2 = free_port(), free_port()
        (self.dir / "c2s-2.xml").write_text(self.c2s_config(self.starttls_port2, self.tls_port2))
        offset = self.log_size("c2s-2")
        self.spawn("c2s-2", binary="c2s", extra=["--instance", "2"])
        self.wait_for(lambda: accepts(self.starttls_port2) and accepts(self.tls_port2),
                      "c2s-2 to listen", watch=["c2s-2"])
        self._wait_connected("c2s-2", offset)

    def sm_config(self):
        """etc/sm.xml (whatever elements it has now) with the router, host and log
        level of this installation, plus sm_extra."""
        tree = ET.parse(ROOT / "etc" / "sm.xml")
        root = tree.getroot()
        for child in list(root):
            if child.tag in ("router", "host", "log"):
                root.remove(child)
        root.insert(0, ET.fromstring(self.router_element("sm")))
        host = ET.Element("host")
        host.text = "localhost"
        root.insert(1, host)
        root.append(ET.Element("log", {"level": "debug"}))
        for extra in ET.fromstring(f"<x>{self.sm_extra}</x>"):
            for old in root.findall(extra.tag):
                root.remove(old)
            root.append(extra)
        ET.indent(root)
        return ET.tostring(root, encoding="unicode") + "\n"

    # -- processes -----------------------------------------------------------------

    def spawn(self, name, binary=None, extra=()):
        if name in self.procs and self.procs[name].poll() is None:
            raise ServerError(f"{name} is running already")
        log_path = self.log_path(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if name in self._log_files:
            self._log_files[name].close()
        self._log_files[name] = open(log_path, "ab")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)  # the configs' log levels apply
        if name == "xdb-file" and self.storage == "pg":
            binary = binary or "xdb-pg"
        self.procs[name] = subprocess.Popen(
            [str(bin_dir() / (binary or name)), "-c", str(self.dir / f"{name}.xml"), *extra],
            cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=self._log_files[name], stderr=self._log_files[name], env=env)
        return self.procs[name]

    def log_path(self, name):
        return self.dir / "log" / f"{name}.log"

    def log(self, name):
        try:
            return self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""

    def log_size(self, name):
        try:
            return self.log_path(name).stat().st_size
        except OSError:
            return 0

    def logs_text(self, offsets=None, tail_lines=None):
        """Every process's log, each under a heading; from `offsets[name]` on if given."""
        out = []
        for name in PROCESSES + [n for n in self.procs if n not in PROCESSES]:
            text = self.log(name)
            if offsets is not None:
                text = text.encode(errors="replace")[offsets.get(name, 0):].decode(errors="replace")
            if tail_lines is not None:
                text = "\n".join(text.splitlines()[-tail_lines:])
            out.append(f"===== {name}.log =====\n{text}")
        return "\n".join(out)

    def offsets(self):
        return {name: self.log_size(name) for name in PROCESSES}

    def wait_for(self, condition, what, timeout=10.0, watch=()):
        """Polls condition() every 50 ms until it is truthy; fails early if a process in
        `watch` exited."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            for name in watch:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise ServerError(f"{name} exited with {proc.returncode} while waiting for "
                                      f"{what}\n{self.logs_text()}")
            if time.monotonic() > deadline:
                raise ServerError(f"timed out after {timeout} s waiting for {what}\n{self.logs_text()}")
            time.sleep(POLL)

    def _start_component(self, name):
        """Starts a component and waits until it logs that it bound its routes."""
        offset = self.log_size(name)
        self.spawn(name)
        return offset

    def _wait_connected(self, name, offset, timeout=10.0):
        self.wait_for(lambda: CONNECTED in self.log(name).encode(errors="replace")[offset:].decode(errors="replace"),
                      f"{name} to connect to the router", timeout, watch=[name])

    def start(self):
        """Starts every process; a port taken meanwhile by someone else (a listener
        failing with `Address already in use`) makes it start again on other ports."""
        for attempt in range(3):
            try:
                return self._start_once()
            except ServerError:
                taken = "Address already in use" in self.logs_text()
                if not taken or attempt == 2:
                    raise
                self.stop()
                self.procs = {}

    def _start_once(self):
        missing = binaries_missing() + (
            ["logd"] if self.logd and not (bin_dir() / "logd").exists() else [])
        if missing:
            raise ServerError(f"not built in {bin_dir()}: {', '.join(missing)} "
                              "(cargo build --workspace --bins, or set JABBERD_BIN_DIR)")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "log").mkdir(exist_ok=True)
        for attempt in range(3):
            self.port, self.starttls_port, self.tls_port = free_port(), free_port(), free_port()
            self.upload_port = free_port() if self.upload else None
            self.proxy65_port = free_port() if self.proxy65 else None
            self.write_configs()
            self.spawn("router")
            try:
                self.wait_for(lambda: accepts(self.port), "the router to listen", watch=["router"])
                break
            except ServerError:
                self.stop()
                if attempt == 2:
                    raise
        if self.logd:
            # First, so that it is bound before the others log anything.
            self._wait_connected("logd", self._start_component("logd"))
        components = ["xdb-file", "sm", "c2s"] + (["muc"] if self.muc else [])
        offsets = {name: self._start_component(name) for name in components}
        self.wait_for(lambda: accepts(self.starttls_port) and accepts(self.tls_port),
                      "c2s to listen", watch=["c2s"])
        for name in components:
            self._wait_connected(name, offsets[name])
        if self.upload:
            # After c2s, which made the certificate upload serves.
            offset = self._start_component("upload")
            self.wait_for(lambda: accepts(self.upload_port), "upload to listen", watch=["upload"])
            self._wait_connected("upload", offset)
        if self.proxy65:
            offset = self._start_component("proxy65")
            self.wait_for(lambda: accepts(self.proxy65_port), "proxy65 to listen",
                          watch=["proxy65"])
            self._wait_connected("proxy65", offset)
        return self

    def kill(self, name, sig=signal.SIGKILL, timeout=5.0):
        """Sends `sig` to process `name` and waits until it exited."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        return proc.returncode

    def restart(self, name, timeout=10.0):
        """Starts `name` again (killing it first if it still runs) and waits until it
        is connected to the router (for c2s also until it listens)."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            self.kill(name, signal.SIGTERM)
        offset = self._start_component(name)
        if name == "router":
            self.wait_for(lambda: accepts(self.port), "the router to listen", timeout, watch=[name])
            return
        if name == "c2s":
            self.wait_for(lambda: accepts(self.starttls_port) and accepts(self.tls_port),
                          "c2s to listen", timeout, watch=[name])
        self._wait_connected(name, offset, timeout)

    def running(self, name):
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def ctl(self, *args, check=True, timeout=15.0):
        """Runs jabberctl against this installation; returns the CompletedProcess."""
        result = subprocess.run(
            [str(bin_dir() / "jabberctl"), "-c", str(self.dir / "ctl.xml"), *args],
            cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout)
        if check and result.returncode != 0:
            raise ServerError(f"jabberctl {' '.join(args)} failed ({result.returncode}):\n"
                              f"{result.stdout}{result.stderr}")
        return result

    def adduser(self, jid, password):
        self.ctl("adduser", jid, "--password", password)

    def addusers(self, accounts, timeout=15.0):
        """Creates several accounts ({jid: password}) with concurrent jabberctl runs."""
        procs = {
            jid: subprocess.Popen(
                [str(bin_dir() / "jabberctl"), "-c", str(self.dir / "ctl.xml"),
                 "adduser", jid, "--password", password],
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            for jid, password in accounts.items()
        }
        failed = []
        for jid, proc in procs.items():
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                failed.append(f"jabberctl adduser {jid} failed ({proc.returncode}): {out}")
        if failed:
            raise ServerError("\n".join(failed))

    def stop(self):
        # c2s first (it hands resumable sessions to sm on the way out), so clients see
        # their streams close; the router last.
        known = ["c2s", "c2s-2", "sm", "xdb-file", "router"]
        others = [n for n in self.procs if n not in known]
        for first in (["c2s", "c2s-2"], others + ["sm", "xdb-file", "router"]):
            for name in first:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for name in first:
                proc = self.procs.get(name)
                if proc is not None and name.startswith("c2s"):
                    try:
                        proc.wait(timeout=6)
                    except subprocess.TimeoutExpired:
                        pass
        for name in others + known:
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._log_files.values():
            f.close()
        self._log_files = {}

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
        return False


# -- slixmpp clients ---------------------------------------------------------------------
#
# Imported lazily so that serverproc works without slixmpp (the raw client does not
# need it).

TIMEOUT = 5.0  # seconds for any single wait: every step is normally milliseconds


def slixmpp_client_class():
    import asyncio
    import ssl

    from slixmpp import ClientXMPP

    class Client(ClientXMPP):
        """A ClientXMPP for a test server: no certificate check (self-signed),
        STARTTLS or direct TLS on an explicit port, a SASL mechanism if given,
        subscription requests left to the test (auto_authorize None: slixmpp's False
        would deny them), and every stanza recorded for the test to await."""

        def __init__(self, jid, password, port, direct_tls=False, mech=None,
                     plugins=("xep_0030", "xep_0199", "xep_0203"), record_bodyless=False):
            super().__init__(jid, password, sasl_mech=mech)
            self.port = port
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if direct_tls:
                ctx.set_alpn_protocols(["xmpp-client"])
            self.ssl_context = ctx
            self.enable_direct_tls = direct_tls
            self.enable_starttls = not direct_tls
            self.enable_plaintext = False
            self.auto_authorize = None
            self.auto_subscribe = False
            self.auto_reconnect = False
            self.started = asyncio.Event()
            self.gone = asyncio.Event()
            self.auth_failed = asyncio.Event()
            self.stream_errors = []
            self.stanzas = []  # every message, presence and iq push received, in order
            self._arrived = asyncio.Event()
            for plugin in plugins:
                self.register_plugin(plugin)
            self.add_event_handler("session_start", lambda _e: self.started.set())
            self.add_event_handler("disconnected", lambda _e: self.gone.set())
            self.add_event_handler("failed_all_auth", lambda _e: self.auth_failed.set())
            self.add_event_handler("stream_error", lambda e: self.stream_errors.append(e["condition"]))
            for event in ("message", "presence", "roster_update"):
                self.add_event_handler(event, self._record)
            if record_bodyless:
                # slixmpp's 'message' event leaves out messages without a <body/> of
                # their own (carbons, archive results, errors): record those too.
                from slixmpp.xmlstream.handler import Callback
                from slixmpp.xmlstream.matcher import MatchXPath

                def bodyless(msg):
                    if msg.xml.find("{jabber:client}body") is None:
                        self._record(msg)

                self.register_handler(Callback("record bodyless messages",
                                               MatchXPath("{jabber:client}message"), bodyless))

        def _record(self, stanza):
            self.stanzas.append(stanza)
            self._arrived.set()

        async def start(self, what=None):
            """Connects and waits for the session (bound resource)."""
            self.connect("127.0.0.1", self.port)
            waiter = asyncio.ensure_future(self.started.wait())
            failed = asyncio.ensure_future(self.auth_failed.wait())
            gone = asyncio.ensure_future(self.gone.wait())
            done, pending = await asyncio.wait([waiter, failed, gone], timeout=TIMEOUT,
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if waiter not in done:
                reason = ("authentication failed" if failed in done else
                          f"the stream closed (stream errors: {self.stream_errors})" if gone in done else
                          f"timed out after {TIMEOUT} s")
                raise AssertionError(f"login of {self.requested_jid} did not complete: {reason}")
            return self

        async def settle(self):
            """Returns once everything sm did for this user before now has reached this
            client: sm handles a user's events in order, and the answer to a ping to the
            own bare JID (needs plugin xep_0199) comes the same way as anything before it."""
            await self.plugin["xep_0199"].send_ping(self.boundjid.bare, timeout=TIMEOUT)

        async def online(self, priority=0, status=None):
            """Logs in, sends presence with `priority` (and `status`), and waits until sm
            has handled it."""
            await self.start()
            self.send_presence(ppriority=priority, pstatus=status)
            await self.settle()

        async def expect(self, what, predicate, timeout=TIMEOUT):
            """Takes the first recorded stanza for which predicate(stanza) is true,
            waiting up to `timeout` seconds for it."""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                for i, stanza in enumerate(self.stanzas):
                    if predicate(stanza):
                        return self.stanzas.pop(i)
                left = deadline - loop.time()
                if left <= 0:
                    seen = "\n  ".join(str(s) for s in self.stanzas) or "(nothing)"
                    raise AssertionError(f"{self.boundjid or self.requested_jid}: timed out after "
                                         f"{timeout} s waiting for {what}; received meanwhile:\n  {seen}")
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    pass

        async def expect_message(self, body, timeout=TIMEOUT):
            return await self.expect(
                f"a message with body {body!r}",
                lambda s: s.name == "message" and s["type"] != "error" and s["body"] == body,
                timeout)

        def received_bodies(self):
            return [s["body"] for s in self.stanzas if s.name == "message"]

        async def stop(self):
            if not self.gone.is_set() and self.transport is not None:
                self.disconnect(wait=1.0)
                try:
                    await asyncio.wait_for(self.gone.wait(), 2.0)
                except asyncio.TimeoutError:
                    self.abort()
            self.cancel_connection_attempt()
            task, self._run_out_filters = self._run_out_filters, None
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    return Client


def run_clients(test, port, tls_port=None):
    """Runs `await test(clients)` on a fresh event loop. clients.make(jid, password,
    **kwargs) makes a slixmpp client for the STARTTLS port (direct_tls=True: the TLS
    port); every client made is disconnected afterwards, whatever happens."""
    import asyncio

    Client = slixmpp_client_class()

    class Clients:
        def __init__(self):
            self.all = []

        def make(self, jid, password, direct_tls=False, **kwargs):
            client = Client(jid, password, tls_port if direct_tls else port,
                            direct_tls=direct_tls, **kwargs)
            self.all.append(client)
            return client

    async def main():
        clients = Clients()
        try:
            await test(clients)
        finally:
            for client in clients.all:
                await client.stop()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    finally:
        loop.close()


def server_fixture(request, tmp_path, **options):
    """The body of the tests' `server` fixtures: a started Server whose logs are
    attached to the report of a failed test (pytest shows them with the failure)."""
    server = Server(tmp_path, **options)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def serving(request, tmp_path, users=None, **options):
    """A started server (`server_fixture`) with `users` (local part -> password) on
    localhost, finished (`finish_server`) when the block ends:
    `with serving(request, tmp_path, USERS) as server: ...`."""
    server = server_fixture(request, tmp_path, **options)
    try:
        if users:
            server.addusers({f"{user}@localhost": pw for user, pw in users.items()})
        yield server
    finally:
        finish_server(request, server)


def finish_server(request, server):
    server.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        report.sections.append(("server logs", server.logs_text()))
