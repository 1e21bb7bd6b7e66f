"""contrib/install.sh into a staging directory (--destdir): the layout of
docs/install.md, configurations that every program accepts (--check), systemd units
that systemd-analyze accepts, and the journald log format of the programs.

Nothing outside the temporary directories is touched: in --destdir mode the script
creates no user, changes no owner and never runs systemctl (fakes on PATH record any
such call, and the test fails if there is one).

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_install.py -q
"""

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serverproc import bin_dir, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "contrib" / "install.sh"
PREFIX = "/usr/local"
LIB = f"{PREFIX}/lib/jabberd"
ETC = "/etc/jabberd"
UNIT_DIR = "/etc/systemd/system"
# The programs that run as services, with the configuration file each takes.
SERVICES = ["router", "logd", "xdb-file", "xdb-pg", "sm", "muc", "upload", "proxy65", "c2s", "s2s"]
PROGRAMS = SERVICES + ["jabberctl"]
UNITS = [f"jabberd-{p}.service" for p in SERVICES if p not in ("sm", "c2s")] + [
    "jabberd-sm@.service", "jabberd-c2s@.service", "jabberd-sm.target", "jabberd.target",
    "jabberd.service"]
# What the layout maps each installed absolute directory from (docs/install.md).
LAYOUT = ["/etc/jabberd/", "/var/lib/jabberd/", "/var/log/jabberd/", "/run/jabberd/"]
# Commands the script must not run in --destdir mode.
FORBIDDEN = ["systemctl", "useradd", "groupadd", "adduser", "chown", "chgrp"]


def require_binaries():
    missing = [p for p in PROGRAMS if not (bin_dir() / p).exists()]
    if missing:
        pytest.fail(f"not built in {bin_dir()}: {', '.join(missing)} "
                    "(cargo build --workspace --bins, or set JABBERD_BIN_DIR)")


def stub_binaries(tmp):
    """Tiny stand-ins for the executables, for the tests that never run them: a real
    (debug) set is over a gigabyte per copy."""
    d = tmp / "stub-bin"
    d.mkdir(exist_ok=True)
    for p in PROGRAMS:
        (d / p).write_text("#!/bin/sh\nexit 0\n")
        (d / p).chmod(0o755)
    return d


def run_install(tmp, destdir, *args, check=True, bins=None):
    """Runs install.sh with fakes of FORBIDDEN first on PATH; returns the result.
    `bins`: the executables to install (default: the built ones)."""
    fakes = tmp / "fakebin"
    calls = tmp / "forbidden-calls"
    if not fakes.exists():
        fakes.mkdir()
        for name in FORBIDDEN:
            fake = fakes / name
            fake.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{calls}'\nexit 0\n")
            fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fakes}:{os.environ['PATH']}")
    result = subprocess.run(
        [str(INSTALL), "--destdir", str(destdir), "--bin-dir", str(bins or bin_dir()), *args],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"install.sh failed:\n{result.stdout}{result.stderr}"
    made = calls.read_text() if calls.exists() else ""
    assert made == "", f"install.sh --destdir ran system commands:\n{made}"
    return result


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    require_binaries()
    tmp = tmp_path_factory.mktemp("install")
    dest = tmp / "dest"
    run_install(tmp, dest)
    return dest


def mode(path):
    return stat.S_IMODE(path.lstat().st_mode)


def test_layout(staged):
    dest = staged
    for d, m in [(ETC, 0o750), ("/var/lib/jabberd", 0o750), ("/var/lib/jabberd/spool", 0o750),
                 ("/var/lib/jabberd/certs", 0o750), ("/var/lib/jabberd/upload", 0o750),
                 ("/var/log/jabberd", 0o750), ("/run/jabberd", 0o750), (LIB, 0o755),
                 (UNIT_DIR, 0o755)]:
        path = dest / d.lstrip("/")
        assert path.is_dir(), f"{d} missing"
        assert mode(path) == m, f"{d}: mode {mode(path):o}, expected {m:o}"
    for p in PROGRAMS:
        exe = dest / LIB.lstrip("/") / p
        assert exe.is_file() and mode(exe) == 0o755, exe
        assert exe.read_bytes() == (bin_dir() / p).read_bytes(), f"{p} is not the built one"
    supervisor = dest / LIB.lstrip("/") / "scripts" / "jabberd"
    assert supervisor.read_bytes() == (ROOT / "scripts" / "jabberd").read_bytes()
    assert os.readlink(dest / LIB.lstrip("/") / "etc") == ETC
    configs = sorted(p.name for p in (ROOT / "etc").glob("*.xml"))
    assert sorted(p.name for p in (dest / ETC.lstrip("/")).iterdir()) == configs
    for name in configs:
        assert mode(dest / ETC.lstrip("/") / name) == 0o640, name
    assert sorted(p.name for p in (dest / UNIT_DIR.lstrip("/")).iterdir()) == sorted(UNITS)
    assert (dest / PREFIX.lstrip("/") / "share/doc/jabberd/install.md").is_file()
    wrapper = (dest / PREFIX.lstrip("/") / "bin/jabberctl").read_text()
    assert f'exec "{LIB}/jabberctl" -c "{ETC}/jabberctl.xml" "$@"' in wrapper


def test_configs_have_absolute_paths(staged):
    """No path relative to the repository (etc/, var/, log/, run/) is left, in
    attributes, text or comments."""
    relative = re.compile(r"(?<![\w./-])(etc|var|log|run)/")
    for path in sorted((staged / ETC.lstrip("/")).iterdir()):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not relative.search(line), f"{path.name}:{n}: relative path: {line.strip()}"
    router = (staged / ETC.lstrip("/") / "router.xml").read_text()
    assert f'<users file="{ETC}/router-users.xml"/>' in router
    assert 'dir="/var/lib/jabberd/spool"' in (staged / ETC.lstrip("/") / "xdb-file.xml").read_text()
    c2s = (staged / ETC.lstrip("/") / "c2s.xml").read_text()
    assert 'cert="/var/lib/jabberd/certs/localhost.crt"' in c2s
    assert 'path="/var/log/jabberd/server.log"' in (staged / ETC.lstrip("/") / "logd.xml").read_text()
    upload = (staged / ETC.lstrip("/") / "upload.xml").read_text()
    assert '<spool dir="/var/lib/jabberd/upload"/>' in upload
    assert '<secret file="/var/lib/jabberd/upload.secret"/>' in upload


def inside(dest, text):
    """The text with the layout's absolute directories moved into the staging dir."""
    for d in LAYOUT:
        text = text.replace(f'"{d}', f'"{dest}{d}').replace(f">{d}", f">{dest}{d}")
    return text


@pytest.mark.parametrize("program", SERVICES)
def test_installed_config_passes_check(staged, program, tmp_path):
    """Every installed file passes its program's --check: as installed where the check
    reads no other file, and with its paths moved into the staging directory (the router
    reads its users file, /etc/jabberd/router-users.xml, while checking)."""
    exe = staged / LIB.lstrip("/") / program
    installed = staged / ETC.lstrip("/") / f"{program}.xml"
    moved = tmp_path / f"{program}.xml"
    moved.write_text(inside(staged, installed.read_text()))
    files = [moved] if program == "router" else [installed, moved]
    for config in files:
        result = subprocess.run([str(exe), "-c", str(config), "--check"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{program} --check {config}:\n{result.stdout}{result.stderr}"
        assert result.stdout.strip() == f"{config}: ok"
    assert list(tmp_path.iterdir()) == [moved], "--check must not create files"


def test_supervisor_list(staged):
    """The installed supervisor.xml names the installed programs and configurations,
    and the installed supervisor accepts it (status: 3, not running; 2 would be a bad file)."""
    text = (staged / ETC.lstrip("/") / "supervisor.xml").read_text()
    assert f"<bin-dir>{LIB}</bin-dir>" in text
    assert "<run-dir>/run/jabberd</run-dir>" in text
    assert "<log-dir>/var/log/jabberd</log-dir>" in text
    body = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    processes = re.findall(r'<process name="([^"]+)" program="([^"]+)" config="([^"]+)"', body)
    assert [p[0] for p in processes] == ["router", "logd", "xdb-file", "sm", "muc", "upload",
                                         "proxy65", "c2s", "s2s"]
    for _, program, config in processes:
        assert (staged / LIB.lstrip("/") / program).is_file(), program
        assert config == f"{ETC}/{program}.xml"
        assert (staged / config.lstrip("/")).is_file(), config
    supervisor = staged / LIB.lstrip("/") / "scripts" / "jabberd"
    result = subprocess.run(
        [sys.executable, str(supervisor), "status", "-f", str(staged / ETC.lstrip("/") / "supervisor.xml")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode in (0, 3), f"{result.returncode}:\n{result.stdout}{result.stderr}"


def unit_text(staged, name):
    return (staged / UNIT_DIR.lstrip("/") / name).read_text()


def test_units(staged):
    """One unit per program, each started as the supervisor would (but with instances
    from the template name), as the jabberd user, Type=exec (the programs do not speak
    sd_notify), ordered after the router and grouped by jabberd.target."""
    exec_of = {f"jabberd-{p}.service": f"{LIB}/{p} -c {ETC}/{p}.xml"
               for p in SERVICES if p not in ("sm", "c2s")}
    exec_of["jabberd-sm@.service"] = f"{LIB}/sm -c {ETC}/sm.xml --instance %i"
    exec_of["jabberd-c2s@.service"] = f"{LIB}/c2s -c {ETC}/c2s.xml --instance %i"
    for name, command in exec_of.items():
        text = unit_text(staged, name)
        lines = text.splitlines()
        assert f"ExecStart={command}" in lines, name
        for line in ["Type=exec", "User=jabberd", "Restart=on-failure", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
                     "ReadWritePaths=/var/lib/jabberd /var/log/jabberd /run/jabberd",
                     "RuntimeDirectory=jabberd", "PartOf=jabberd.target", "WantedBy=jabberd.target"]:
            assert line in lines, f"{name}: no {line}"
        caps = [x for x in lines if x.startswith("CapabilityBoundingSet=")]
        wanted = "CAP_NET_BIND_SERVICE" if name in ("jabberd-c2s@.service", "jabberd-upload.service") else ""
        assert caps == [f"CapabilityBoundingSet={wanted}"], name
        # Only the router (users file), c2s and s2s (certificates) act on SIGHUP.
        reloads = ("jabberd-router.service", "jabberd-c2s@.service", "jabberd-s2s.service")
        assert ("ExecReload=/bin/kill -HUP $MAINPID" in lines) == (name in reloads), name
        if name != "jabberd-router.service":
            after = next(x for x in lines if x.startswith("After="))
            assert "jabberd-router.service" in after.split(), name
            assert "Wants=" in text and "Requires=" not in text and "BindsTo=" not in text, name
        if name.startswith(("jabberd-c2s", "jabberd-s2s")):
            assert "LimitNOFILE=65536" in lines, name
            # They stop before any sm instance: c2s hands its sessions to sm.
            assert "jabberd-sm.target" in after.split(), name
    sm = unit_text(staged, "jabberd-sm@.service").splitlines()
    assert "Before=jabberd-sm.target" in sm
    assert "Wants=jabberd-router.service jabberd-sm.target" in sm
    target = unit_text(staged, "jabberd.target")
    also = " ".join(x[5:] for x in target.splitlines() if x.startswith("Also=")).split()
    assert also == ["jabberd-router.service", "jabberd-logd.service", "jabberd-xdb-file.service",
                    "jabberd-sm@1.service", "jabberd-muc.service", "jabberd-upload.service",
                    "jabberd-proxy65.service", "jabberd-c2s@1.service", "jabberd-s2s.service"]
    service = unit_text(staged, "jabberd.service").splitlines()
    assert (f"ExecStart=/usr/bin/python3 {LIB}/scripts/jabberd start -f {ETC}/supervisor.xml "
            "--no-build") in service
    assert "KillMode=mixed" in service and "Conflicts=jabberd.target" in service


def test_systemd_analyze_verify(staged, tmp_path):
    """systemd-analyze verify accepts every installed unit, with the executables' paths
    moved into the staging directory (it checks that they exist).  It exits 0 even for
    unknown keys, so any output counts as a failure."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd): units not verified")
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = unit_text(staged, name).replace(f"{PREFIX}/", f"{staged}{PREFIX}/")
        (units / name).write_text(text)
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:", SYSTEMD_LOG_COLOR="0")
    result = subprocess.run([analyze, "verify", *[str(units / n) for n in UNITS]],
                            env=env, capture_output=True, text=True, timeout=120)
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and out == "", f"systemd-analyze verify:\n{out}"


def test_enabling_the_target(tmp_path):
    """`systemctl enable jabberd.target` (here offline, with --root) enables the default
    set through Also=; more instances and xdb-pg are enabled by themselves and stay
    enabled when the target is disabled."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        pytest.skip("systemctl not installed: enabling not checked")
    dest = tmp_path / "dest"
    run_install(tmp_path, dest, bins=stub_binaries(tmp_path))
    wants = dest / UNIT_DIR.lstrip("/") / "jabberd.target.wants"

    def enabled():
        return sorted(p.name for p in wants.iterdir()) if wants.exists() else []

    def ctl(*args):
        r = subprocess.run([systemctl, f"--root={dest}", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, f"systemctl {' '.join(args)}:\n{r.stdout}{r.stderr}"

    ctl("enable", "jabberd.target")
    assert (dest / UNIT_DIR.lstrip("/") / "multi-user.target.wants" / "jabberd.target").is_symlink()
    assert enabled() == sorted(["jabberd-router.service", "jabberd-logd.service",
                                "jabberd-xdb-file.service", "jabberd-sm@1.service",
                                "jabberd-muc.service", "jabberd-upload.service",
                                "jabberd-proxy65.service", "jabberd-c2s@1.service",
                                "jabberd-s2s.service"])
    assert os.readlink(wants / "jabberd-sm@1.service") == f"{UNIT_DIR}/jabberd-sm@.service"
    ctl("enable", "jabberd-sm@2.service")
    ctl("disable", "jabberd-xdb-file.service")
    ctl("enable", "jabberd-xdb-pg.service")
    assert "jabberd-sm@2.service" in enabled() and "jabberd-xdb-pg.service" in enabled()
    assert "jabberd-xdb-file.service" not in enabled()
    ctl("disable", "jabberd.target")
    assert enabled() == ["jabberd-sm@2.service", "jabberd-xdb-pg.service"]


def test_reinstall_keeps_configuration(tmp_path):
    """A second run is an upgrade: programs and units replaced, an edited configuration
    kept, the shipped version beside it as FILE.new; a third run changes nothing."""
    dest = tmp_path / "dest"
    run_install(tmp_path, dest, bins=stub_binaries(tmp_path))
    etc = dest / ETC.lstrip("/")
    shipped = (etc / "c2s.xml").read_text()
    edited = shipped.replace('<register enabled="false"/>', '<register enabled="true"/>')
    assert edited != shipped
    (etc / "c2s.xml").write_text(edited)
    unit = dest / UNIT_DIR.lstrip("/") / "jabberd-router.service"
    unit.write_text("stale")
    second = run_install(tmp_path, dest, bins=stub_binaries(tmp_path))
    assert (etc / "c2s.xml").read_text() == edited
    assert (etc / "c2s.xml.new").read_text() == shipped
    assert "c2s.xml.new" in second.stdout
    assert sorted(p.name for p in etc.glob("*.new")) == ["c2s.xml.new"]
    assert unit.read_text() != "stale"
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    third = run_install(tmp_path, dest, bins=stub_binaries(tmp_path))
    assert "installed" not in third.stdout, third.stdout
    assert "c2s.xml.new" in third.stdout, "still reminds of the shipped version"
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before


def test_prefix(tmp_path):
    dest = tmp_path / "dest"
    run_install(tmp_path, dest, "--prefix", "/opt/jabberd", bins=stub_binaries(tmp_path))
    lib = "/opt/jabberd/lib/jabberd"
    assert (dest / lib.lstrip("/") / "router").is_file()
    assert (dest / "opt/jabberd/bin/jabberctl").is_file()
    assert not (dest / "usr").exists()
    router = (dest / UNIT_DIR.lstrip("/") / "jabberd-router.service").read_text()
    assert f"ExecStart={lib}/router -c {ETC}/router.xml" in router
    assert "/usr/local" not in router
    assert f"<bin-dir>{lib}</bin-dir>" in (dest / ETC.lstrip("/") / "supervisor.xml").read_text()


def test_refuses_without_binaries(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_install(tmp_path, tmp_path / "dest", "--bin-dir", str(empty), check=False)
    assert result.returncode == 1
    assert "missing from" in result.stderr and "router" in result.stderr
    assert not (tmp_path / "dest" / "etc").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="as root it would install into the system")
def test_refuses_system_install_unless_root(tmp_path):
    require_binaries()
    result = subprocess.run([str(INSTALL), "--bin-dir", str(bin_dir())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "run as root" in result.stderr


def run_router_briefly(staged, tmp_path, journal):
    """Starts the installed router on a free port with stderr to a file, JOURNAL_STREAM
    naming that file (as systemd names the journal stream) or another one, and returns
    its log once it is ready."""
    config = tmp_path / "router.xml"
    text = inside(staged, (staged / ETC.lstrip("/") / "router.xml").read_text())
    config.write_text(text.replace('port="5347"', f'port="{free_port()}"'))
    log = tmp_path / "router.log"
    with open(log, "w") as err:
        st = os.fstat(err.fileno())
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino if journal else st.st_ino + 1}"
        proc = subprocess.Popen([str(staged / LIB.lstrip("/") / "router"), "-c", str(config)],
                                cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
    try:
        deadline = time.monotonic() + 20
        while "router ready" not in log.read_text():
            assert proc.poll() is None, f"router exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"router not ready:\n{log.read_text()}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    return log.read_text().splitlines()


def test_log_lines_for_the_journal(staged, tmp_path):
    """With stderr on the journal the lines have the syslog priority and no time."""
    lines = run_router_briefly(staged, tmp_path, journal=True)
    assert lines, "no log"
    for line in lines:
        assert re.match(r"<[3-7]>(ERROR| WARN| INFO|DEBUG|TRACE) ", line), line
        assert "\x1b[" not in line, line
    assert any(line.startswith("<6> INFO ") and "router ready" in line for line in lines), lines


def test_log_lines_elsewhere(staged, tmp_path):
    """JOURNAL_STREAM inherited but naming another stream: the usual lines, with time."""
    lines = run_router_briefly(staged, tmp_path, journal=False)
    assert lines and all(re.match(r"\d{4}-\d\d-\d\dT", line) for line in lines), lines
