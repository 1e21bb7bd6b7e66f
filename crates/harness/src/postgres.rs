//! A throwaway PostgreSQL cluster for tests and benchmarks, made with Debian's
//! binaries (`/usr/lib/postgresql/VERSION/bin/initdb` and `pg_ctl`) in a temporary
//! directory: its socket there too, on a free port, no TCP. initdb and postgres refuse
//! to run as root, so when the euid is 0 they run as `nobody` (`runuser -u nobody --`),
//! who owns the directory. The same as tests/py/pgcluster.py's `Cluster`.
//!
//! - [`PgCluster::new`]: a cluster of one's own, stopped and removed on drop.
//! - [`PgCluster::shared`]: one cluster for every test of a test binary (stopped and
//!   removed when the process exits); [`PgCluster::create_database`] gives each test a
//!   database of its own.
//! - [`Server::start_xdb_pg`]: xdb-pg on one of its databases, in a test installation.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};

use crate::{free_port, Server};

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// The newest `/usr/lib/postgresql/VERSION/bin` holding `initdb` and `pg_ctl` (or
/// `$JRS_PG_BIN` when set).
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("JRS_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb \
             (apt-get install postgresql); the xdb-pg tests need it"
        ),
    }
}

/// A PostgreSQL cluster in a temporary directory (the data in `DIR/data`, the socket
/// in `DIR`, the server's log in `DIR/postgres.log`).
pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// Run initdb and pg_ctl as `nobody` (we are root).
    as_nobody: bool,
    settings: Vec<(String, String)>,
    next_db: AtomicU32,
}

impl PgCluster {
    /// Makes and starts a cluster with PostgreSQL's default settings.
    pub fn new() -> anyhow::Result<PgCluster> {
        Self::with_settings(&[])
    }

    /// Makes and starts a cluster, with `-c NAME=VALUE` for each setting.
    pub fn with_settings(settings: &[(&str, &str)]) -> anyhow::Result<PgCluster> {
        let bin = pg_bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "jrs-pg-{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // SAFETY: geteuid has no preconditions.
        let as_nobody = unsafe { libc::geteuid() } == 0;
        let cluster = PgCluster {
            dir,
            port: free_port(),
            bin,
            as_nobody,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            next_db: AtomicU32::new(0),
        };
        if as_nobody {
            // Dropped (directory removed) on error from here on.
            chown_nobody(&cluster.dir)?;
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data().display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
            ],
        )?;
        cluster.start()?;
        Ok(cluster)
    }

    /// The cluster every caller in this process shares, made at the first call; it is
    /// stopped and removed when the process exits.
    pub fn shared() -> anyhow::Result<Arc<PgCluster>> {
        static SHARED: Mutex<Option<Arc<PgCluster>>> = Mutex::new(None);
        extern "C" fn stop_shared() {
            let cluster = SHARED.lock().ok().and_then(|mut s| s.take());
            drop(cluster);
        }
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &*shared {
            return Ok(c.clone());
        }
        let cluster = Arc::new(PgCluster::new()?);
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a plain function without arguments.
        AT_EXIT.call_once(|| unsafe {
            libc::atexit(stop_shared);
        });
        *shared = Some(cluster.clone());
        Ok(cluster)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null()).current_dir(&self.dir);
        cmd
    }

    /// Runs a PostgreSQL program (as `nobody` when root); its output, or an error with
    /// it.
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}):\n{text}",
                args.join(" "),
                out.status
            );
        }
        Ok(text)
    }

    /// Starts the server (again, after [`PgCluster::stop`]); returns once it accepts
    /// connections.
    pub fn start(&self) -> anyhow::Result<()> {
        let mut options = format!(
            "-k {} -p {} -c listen_addresses=''",
            self.dir.display(),
            self.port
        );
        for (k, v) in &self.settings {
            options.push_str(&format!(" -c {k}={v}"));
        }
        let log = self.dir.join("postgres.log").display().to_string();
        let data = self.data().display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-o", &options, "start"],
        )
        .with_context(|| self.log_tail(30))?;
        Ok(())
    }

    /// Stops the server (`fast`: connections are ended, the data stays).
    pub fn stop(&self) -> anyhow::Result<()> {
        let data = self.data().display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])?;
        Ok(())
    }

    /// The libpq-style URL of database `db`, through the socket directory.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@/{db}?host={}&port={}",
            self.dir.display(),
            self.port
        )
    }

    /// Runs `sql` with psql in database `db`; its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        psql(&self.bin, &self.url(db), sql)
    }

    /// A new empty database (`t0`, `t1`, ...); its name.
    pub fn create_database(&self) -> anyhow::Result<String> {
        let name = format!("t{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(name)
    }

    /// The postmaster's pid (the first line of `data/postmaster.pid`), while it runs.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- postgres.log (last lines) ---\n{}", self.log_tail(20));
        }
        let data = self.data().display().to_string();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `sql` with psql (from `bin`, else the PATH) on the database at `url`; its
/// output (unaligned, tuples only).
pub fn psql(bin: &Path, url: &str, sql: &str) -> anyhow::Result<String> {
    let program = if bin.join("psql").is_file() {
        bin.join("psql")
    } else {
        PathBuf::from("psql")
    };
    let out = Command::new(program)
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .context("running psql")?;
    if !out.status.success() {
        bail!(
            "psql -c '{sql}' failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// CPU time (user + system, µs) a cluster's processes have spent so far: the
/// postmaster's, its live children's (backends, checkpointer, WAL writer...) and that
/// of the children it has reaped (backends of closed connections, autovacuum workers).
pub fn cluster_cpu_micros(postmaster: u32) -> u64 {
    let fields = |pid: &str| -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name: state, ppid, ... utime (14th field), stime, cutime,
        // cstime; the state is not a number, so it reads as 0.
        Some(
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect(),
        )
    };
    let mut ticks = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        let Some(f) = fields(&name) else {
            continue;
        };
        if f.len() < 15 {
            continue;
        }
        if pid == postmaster {
            ticks += f[11] + f[12] + f[13] + f[14];
        } else if f[1] == postmaster as u64 {
            ticks += f[11] + f[12];
        }
    }
    ticks * 1_000_000 / 100 // USER_HZ on Linux
}

fn chown_nobody(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    // SAFETY: getpwnam with a NUL-terminated name; the result is read at once.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(c"nobody".as_ptr());
        if pw.is_null() {
            bail!("no user 'nobody' to run PostgreSQL as (it refuses root)");
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: chown with a NUL-terminated path.
    if unsafe { libc::chown(path.as_ptr(), uid, gid) } != 0 {
        bail!(
            "chown nobody {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Server {
    /// Writes `xdb-pg.xml` (serving localhost from the database at `url`, `extra`
    /// elements appended) and starts xdb-pg as process `xdb-pg`; returns once it is
    /// connected to the router (after preparing the schema).
    pub async fn start_xdb_pg(&mut self, url: &str, extra: &str) -> anyhow::Result<u32> {
        let config = format!(
            "<xdb-pg>{}<host>localhost</host><postgresql url='{}' pool-size='4'/>{extra}<log level='debug'/></xdb-pg>",
            self.router_element("xdb-pg", "xdb-pg-secret"),
            jrs_stream::xml::escape(url)
        );
        self.write("xdb-pg.xml", &config)?;
        let since = self.log("xdb-pg").len();
        let pid = self.spawn("xdb-pg", "xdb-pg", &["-c", "xdb-pg.xml"])?;
        self.wait_connected("xdb-pg", since).await?;
        Ok(pid)
    }
}
