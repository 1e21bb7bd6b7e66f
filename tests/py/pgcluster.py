"""A throwaway PostgreSQL cluster for tests and benchmarks (xdb-pg, docs/storage-pg.md),
made with Debian's binaries (/usr/lib/postgresql/VERSION/bin/initdb and pg_ctl) in a
temporary directory: its socket there too, on a free port, no TCP. initdb and
postgres refuse to run as root, so when run as root they run as `nobody`, who owns
the directory. Used by tests/py/test_storage_pg.py and c2s/bench/bench_fast.py; the
Rust tests have the same in crates/harness/src/postgres.rs.

Raises PostgresMissing (an AssertionError: a test fails, it does not skip) when the
binaries are not installed:  apt-get install postgresql
"""

import glob
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile


class PostgresMissing(AssertionError):
    pass


def pg_bin_dir():
    """The newest /usr/lib/postgresql/VERSION/bin with initdb and pg_ctl."""
    def version(d):
        m = re.search(r"/postgresql/(\d+)", d)
        return int(m.group(1)) if m else 0
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    raise PostgresMissing("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb "
                          "(apt-get install postgresql); this needs it")


def _free_port():
    """A port number for the socket's name (no TCP is opened): one nobody listens on."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


class Cluster:
    """A PostgreSQL cluster in a temporary directory, its socket there too, no TCP."""

    def __init__(self):
        self.bin = pg_bin_dir()
        self.dir = tempfile.mkdtemp(prefix="jrs-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = _free_port()
        # initdb and postgres refuse to run as root: run them as nobody, who must own
        # the directory (a pytest tmp_path is root's alone, hence a directory of its own).
        self.prefix = []
        if os.geteuid() == 0:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, user="nobody")
            self.prefix = ["runuser", "-u", "nobody", "--"]
        try:
            self.run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-N")
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def run(self, program, *args):
        result = subprocess.run([*self.prefix, os.path.join(self.bin, program), *args],
                                capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise AssertionError(f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def start(self):
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "postgres.log"), "-w",
                 "-o", f"-k {self.dir} -p {self.port} -c listen_addresses=''", "start")

    def stop(self):
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    @property
    def url(self):
        return f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"

    def log(self):
        try:
            with open(os.path.join(self.dir, "postgres.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def postmaster_pid(self):
        """The postmaster's pid while the cluster runs, else None."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def cpu_seconds(self):
        """CPU time (user + system) of the cluster's processes so far: the postmaster,
        its live children (backends, WAL writer, checkpointer...) and the children it
        has reaped (backends of closed connections)."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            return 0.0
        ticks = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid = int(entry), int(fields[1])
            if pid == postmaster:
                # utime, stime, cutime, cstime
                ticks += sum(int(v) for v in fields[11:15])
            elif ppid == postmaster:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def destroy(self):
        try:
            self.stop()
        except AssertionError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
