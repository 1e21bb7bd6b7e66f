//! Test harness: starts the real executables on free loopback ports in a temporary
//! directory, and talks to them over real sockets.
//!
//! - [`Server`]: a temporary installation (configs, spool, logs) and its processes.
//! - [`RawComponent`]: a component link driven byte by byte, for error paths.
//! - [`component`]: a component link through `jrs-component`, for ordinary traffic.
//! - [`postgres`]: a throwaway PostgreSQL cluster, and xdb-pg on it.

pub mod postgres;

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use jrs_component::Component;
use jrs_config::RouterLink;
use jrs_stream::Limits;

/// The directory holding the workspace's executables (next to the test binary's `deps/`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("JABBERD_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("profile dir")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The settings of a plain TCP link to a router on loopback `port`.
pub fn link(port: u16, name: &str, secret: &str) -> RouterLink {
    RouterLink {
        address: "127.0.0.1".into(),
        port,
        unix: None,
        name: name.into(),
        secret: secret.into(),
        tls: false,
        ca_file: None,
        server_name: None,
        client_cert: None,
        reconnect: Duration::from_millis(50),
        keepalive: jrs_config::LINK_KEEPALIVE,
        timeout: jrs_config::LINK_TIMEOUT,
    }
}

/// A port nobody listens on right now.
/// A port free to listen on, below the kernel's ephemeral range (32768-60999 on
/// Linux): a port the kernel hands out itself (bind to 0) may be taken, before our
/// server binds it, as the local port of one of the test's own outgoing connections
/// (seen: s2s "Address already in use"). As tests/py/serverproc.py does.
/// A port is never handed out twice by one process: two draws could otherwise give the
/// same free port to two listeners of one server (seen: c2s "is bound by another
/// listener of this process").
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..500 {
        let port = rand::random_range(20000..32000);
        let mut given = GIVEN.lock().expect("ports lock");
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port found in 20000-32000")
}

/// `router-users.xml` entries for plain (untrusted) components: each name's secret is
/// `NAME-secret`.
pub fn plain_users(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("<component name='{n}' secret='{n}-secret'/>"))
        .collect()
}

/// The next stanza on a component link, within 5 s (panics otherwise: for tests).
pub async fn recv(reader: &mut jrs_component::ComponentReader) -> jrs_stream::Stanza {
    tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .expect("a stanza within 5 s")
        .expect("link up")
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F: FnMut() -> Option<T>>(
    what: &str,
    timeout: Duration,
    mut f: F,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// Secrets of the components every test installation knows.
pub const USERS: &[(&str, &str)] = &[
    ("xdb-file", "xdb-secret"),
    ("xdb-pg", "xdb-pg-secret"),
    ("sm", "sm-secret"),
    ("s2s", "s2s-secret"),
    ("c2s", "c2s-secret"),
    ("admin", "admin-secret"),
];

/// Options for a test installation.
pub struct Options {
    pub grace_secs: f64,
    pub max_queue_bytes: usize,
    pub max_stanza_bytes: usize,
    /// Extra `<component>` entries for router-users.xml.
    pub extra_users: String,
    /// Extra `<listen>`/`<tls>` elements for router.xml.
    pub extra_router: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            grace_secs: 2.0,
            max_queue_bytes: 1 << 20,
            max_stanza_bytes: 256 * 1024,
            extra_users: String::new(),
            extra_router: String::new(),
        }
    }
}

/// A temporary installation: its directory, the router's port and running processes.
/// Dropping it kills the processes and removes the directory (kept if the test failed,
/// so the logs can be read).
pub struct Server {
    pub dir: PathBuf,
    pub port: u16,
    children: HashMap<String, Child>,
}

impl Server {
    /// Writes the configuration and starts the router; returns once it accepts links.
    pub async fn start(options: Options) -> anyhow::Result<Server> {
        let dir = std::env::temp_dir().join(format!(
            "jrs-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("log"))?;
        let port = free_port();
        let mut server = Server {
            dir,
            port,
            children: HashMap::new(),
        };
        let users: String = USERS
            .iter()
            .map(|(n, s)| {
                let allow = match *n {
                    "xdb-file" | "xdb-pg" => {
                        "<allow type='xdb' host='any'/><allow type='xdb' host='*'/>"
                    }
                    "sm" => "<allow type='session' host='any'/><allow type='normal' host='any'/>",
                    "s2s" => "<allow type='normal' host='*'/>",
                    _ => "",
                };
                format!("<component name='{n}' secret='{s}' trusted='true'>{allow}</component>\n")
            })
            .collect();
        server.write(
            "router-users.xml",
            &format!("<users>\n{users}{}\n</users>\n", options.extra_users),
        )?;
        let users_path = server.path("router-users.xml");
        server.write(
            "router.xml",
            &format!(
                "<router>\n  <listen address='127.0.0.1' port='{port}'/>\n  {}\n  <users file='{}'/>\n  \
                 <limits max-stanza-bytes='{}' max-depth='64' max-queue-bytes='{}' handshake-timeout='5'/>\n  \
                 <grace seconds='{}' max-packets='1000'/>\n  <keepalive seconds='30'/>\n  <log level='debug'/>\n</router>\n",
                options.extra_router,
                users_path.display(),
                options.max_stanza_bytes,
                options.max_queue_bytes,
                options.grace_secs
            ),
        )?;
        server.spawn("router", "router", &["-c", "router.xml"])?;
        server.wait_listening(port).await?;
        Ok(server)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(rel);
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The `<router .../>` element a component config needs to reach this router.
    pub fn router_element(&self, name: &str, secret: &str) -> String {
        format!("<router address='127.0.0.1' port='{}' name='{name}' secret='{secret}' reconnect='0.05'/>", self.port)
    }

    /// Starts `program` (from [`bin_dir`]) as process `name`, in the installation's
    /// directory, logging to `log/NAME.log`.
    pub fn spawn(&mut self, name: &str, program: &str, args: &[&str]) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("log/{name}.log")))?;
        let child = Command::new(bin_dir().join(program))
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program} from {}", bin_dir().display()))?;
        let pid = child.id();
        if let Some(mut old) = self.children.insert(name.to_owned(), child) {
            let _ = old.kill();
            let _ = old.wait();
        }
        Ok(pid)
    }

    /// Writes `xdb-file.xml` (spool under the installation) and starts xdb-file.
    pub async fn start_storage(&mut self) -> anyhow::Result<()> {
        let config = format!(
            "<xdb-file>{}<host>localhost</host><spool dir='spool'/><log level='debug'/></xdb-file>",
            self.router_element("xdb-file", "xdb-secret")
        );
        self.write("xdb-file.xml", &config)?;
        let since = self.log("xdb-file").len();
        self.spawn("xdb-file", "xdb-file", &["-c", "xdb-file.xml"])?;
        self.wait_connected("xdb-file", since).await
    }

    /// Waits until component process `name` logs that it connected to the router, after
    /// byte `since` of its log (the log is kept across restarts).
    pub async fn wait_connected(&self, name: &str, since: usize) -> anyhow::Result<()> {
        wait_for(
            &format!("{name} to connect to the router"),
            Duration::from_secs(10),
            || {
                let log = self.log(name);
                log.get(since..)
                    .is_some_and(|new| new.contains("connected to the router"))
                    .then_some(())
            },
        )
        .await
        .with_context(|| self.log(name))
    }

    /// Writes `c2s.xml` (a self-signed certificate for localhost under the installation,
    /// STARTTLS and direct TLS listeners on free loopback ports, registration enabled when
    /// asked, `extra` elements appended) and starts c2s. Returns (STARTTLS port, TLS port)
    /// once both accept connections.
    pub async fn start_c2s(&mut self, extra: &str) -> anyhow::Result<(u16, u16)> {
        let (starttls, direct) = (free_port(), free_port());
        let config = format!(
            "<c2s>{}<host name='localhost' cert='certs/localhost.crt' key='certs/localhost.key' self-signed='true'/>\
             <listen address='127.0.0.1' port='{starttls}'/><listen address='127.0.0.1' port='{direct}' mode='tls'/>\
             {extra}<log level='debug'/></c2s>",
            self.router_element("c2s", "c2s-secret")
        );
        self.write("c2s.xml", &config)?;
        let since = self.log("c2s").len();
        self.spawn("c2s", "c2s", &["-c", "c2s.xml"])?;
        for port in [starttls, direct] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                if let Some(status) = self.exited("c2s") {
                    bail!("c2s exited ({status}):\n{}", self.log("c2s"));
                }
                if Instant::now() > deadline {
                    bail!("c2s does not listen on {port}:\n{}", self.log("c2s"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // It listens before its router link is up (a slow start, as under valgrind,
        // shows it): a login before would find no storage.
        self.wait_connected("c2s", since).await?;
        Ok((starttls, direct))
    }

    /// As [`Server::start_c2s`], with an http listener for web clients (WebSocket at
    /// `/xmpp-websocket`, BOSH at `/http-bind`) on a free loopback port, marked `secure`
    /// (as behind a TLS-terminating proxy: no STARTTLS asked for). Returns (STARTTLS
    /// port, TLS port, http port) once all three accept connections.
    pub async fn start_c2s_with_http(&mut self, extra: &str) -> anyhow::Result<(u16, u16, u16)> {
        let http = free_port();
        let (starttls, direct) = self
            .start_c2s(&format!(
                "<listen address='127.0.0.1' port='{http}' mode='http' secure='true'/>{extra}"
            ))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", http)).await.is_err() {
            if let Some(status) = self.exited("c2s") {
                bail!("c2s exited ({status}):\n{}", self.log("c2s"));
            }
            if Instant::now() > deadline {
                bail!("c2s does not listen on {http}:\n{}", self.log("c2s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((starttls, direct, http))
    }

    /// The pid of a process started with [`Server::spawn`].
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.get(name).map(Child::id)
    }

    /// SIGKILLs a process started with [`Server::spawn`].
    pub fn kill9(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs a process started with [`Server::spawn`] and waits (at most `limit`) for
    /// it to exit; its exit status, or `None` if it had to be killed.
    pub async fn terminate(
        &mut self,
        name: &str,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.children.remove(name)?;
        // SAFETY: kill(2) with a pid we started and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `port` accepts TCP connections.
    pub async fn wait_listening(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.exited("router") {
                bail!("router exited ({status}):\n{}", self.log("router"));
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {port}:\n{}", self.log("router"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status of a process, if it has exited.
    pub fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        self.children
            .get_mut(name)
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log(&self, name: &str) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.path(&format!("log/{name}.log"))) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// A component link to this router through `jrs-component`.
    pub async fn component(&self, name: &str, secret: &str) -> anyhow::Result<Component> {
        let link = self::link(self.port, name, secret);
        Component::connect(
            &link,
            Limits {
                max_stanza_bytes: 16 << 20,
                max_depth: 64,
            },
        )
        .await
    }

    /// A byte-level component link to this router, already authenticated.
    pub async fn raw(&self, name: &str, secret: &str) -> anyhow::Result<RawComponent> {
        let mut c = RawComponent::connect(self.port, name).await?;
        c.handshake(secret).await?;
        Ok(c)
    }

    /// Prints the last `lines` lines of every process's log to stderr (what the server
    /// said about a failure, before its directory goes).
    pub fn print_log_tails(&self, lines: usize) {
        for name in ["router", "xdb-file", "xdb-pg", "sm", "s2s", "c2s"] {
            let log = self.log(name);
            if !log.is_empty() {
                let tail: Vec<&str> = log.lines().rev().take(lines).collect();
                eprintln!("--- {name}.log (last lines) ---");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for (_, mut child) in self.children.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("test failed: installation kept at {}", self.dir.display());
            self.print_log_tails(40);
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A component link driven by hand: send any bytes, read what comes back.
pub struct RawComponent {
    pub stream: TcpStream,
    /// Everything received and not yet consumed by [`RawComponent::expect`].
    pub received: String,
    pub stream_id: String,
}

impl RawComponent {
    /// Connects and opens a component stream to `name`; reads the router's header.
    pub async fn connect(port: u16, name: &str) -> anyhow::Result<RawComponent> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(
                format!(
                    "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
                     xmlns:stream='http://etherx.jabber.org/streams' to='{name}'>"
                )
                .as_bytes(),
            )
            .await?;
        let mut c = RawComponent {
            stream,
            received: String::new(),
            stream_id: String::new(),
        };
        let header = c
            .expect("stream header", |s| {
                s.contains("<stream:stream") && s.contains('>')
            })
            .await?;
        let id = header
            .split("id='")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .ok_or_else(|| anyhow!("no stream id in {header}"))?;
        c.stream_id = id.to_owned();
        // Keep anything after the header (a stream error, say) for the caller.
        let after = header
            .split_once("'>")
            .map(|(_, a)| a.to_owned())
            .unwrap_or_default();
        c.received = after + &c.received;
        Ok(c)
    }

    pub async fn handshake(&mut self, secret: &str) -> anyhow::Result<()> {
        let digest = jrs_component::protocol::handshake_digest(&self.stream_id, secret);
        self.send(&format!("<handshake>{digest}</handshake>"))
            .await?;
        let got = self
            .expect("handshake answer", |s| {
                s.contains("<handshake/>") || s.contains("stream:error")
            })
            .await?;
        if !got.contains("<handshake/>") {
            bail!("handshake refused: {got}");
        }
        Ok(())
    }

    pub async fn send(&mut self, data: &str) -> std::io::Result<()> {
        self.send_bytes(data.as_bytes()).await
    }

    pub async fn send_bytes(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(data).await
    }

    /// Reads until `done` holds for the received text (within 5 s); returns the text and
    /// clears it.
    pub async fn expect(
        &mut self,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        self.expect_within(what, Duration::from_secs(5), done).await
    }

    pub async fn expect_within(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while !done(&self.received) {
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .map_err(|_| {
                    anyhow!("timed out waiting for {what}; received: {}", self.received)
                })??;
            if n == 0 {
                if done(&self.received) {
                    break;
                }
                bail!(
                    "connection closed while waiting for {what}; received: {}",
                    self.received
                );
            }
            self.received.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        Ok(std::mem::take(&mut self.received))
    }

    /// Reads until the router closes the connection; returns everything received.
    pub async fn read_to_close(&mut self) -> anyhow::Result<String> {
        let mut buf = vec![0u8; 65536];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut buf)).await {
                Err(_) => bail!(
                    "the router did not close the link; received: {}",
                    self.received
                ),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(std::mem::take(&mut self.received)),
                Ok(Ok(n)) => self.received.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    }
}

/// Writes a self-signed certificate for `name` and its key as PEM files in `dir`.
pub fn self_signed(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()])?;
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.cert.pem())?;
    std::fs::write(&k, cert.signing_key.serialize_pem())?;
    Ok((c, k))
}

impl Server {
    /// Writes `sm.xml` (serving localhost, `extra` elements appended) and starts sm; returns
    /// once it is connected and bound.
    pub async fn start_sm(&mut self, extra: &str) -> anyhow::Result<()> {
        let config = format!(
            "<sm>{}<host>localhost</host>{extra}<log level='debug'/></sm>",
            self.router_element("sm", "sm-secret")
        );
        self.write("sm.xml", &config)?;
        let before = self.log("sm").matches("connected to the router").count();
        self.spawn("sm", "sm", &["-c", "sm.xml"])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log("sm").matches("connected to the router").count() <= before {
            if let Some(status) = self.exited("sm") {
                bail!("sm exited ({status}):\n{}", self.log("sm"));
            }
            if Instant::now() > deadline {
                bail!("sm did not connect:\n{}", self.log("sm"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// A certificate authority for tests: issues certificates that a process trusts when
/// given `ca_file` (for SASL EXTERNAL between servers, say).
pub struct TestCa {
    pub ca_file: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// Makes the CA and writes its certificate to `dir/ca.crt`.
    pub fn new(dir: &Path) -> anyhow::Result<TestCa> {
        std::fs::create_dir_all(dir)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "jabberd-rs test CA");
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, cert.pem())?;
        Ok(TestCa {
            ca_file,
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// Issues a certificate for `domain` and writes it and its key as
    /// `dir/DOMAIN.crt` and `dir/DOMAIN.key`.
    pub fn issue(&self, dir: &Path, domain: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let params = rcgen::CertificateParams::new(vec![domain.to_owned()])?;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let (c, k) = (
            dir.join(format!("{domain}.crt")),
            dir.join(format!("{domain}.key")),
        );
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        Ok((c, k))
    }
}
