//! Client load generator for the whole server (router, xdb-file, sm, c2s).
//!
//! Starts a server in a temporary directory (release binaries next to this one), creates
//! accounts, and measures:
//! - `logins`: SCRAM-SHA-1 logins per second (plaintext or STARTTLS), p50/p99 login time;
//! - `messages`: messages per second between clients in pairs with a fixed number in
//!   flight per client, p50/p99 delivery latency, and server CPU per delivered message
//!   (user + system time of every server process, from /proc);
//! - `idle`: server memory (RSS of every server process) per idle authenticated
//!   connection.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/loadgen all
//! ```
//! Figures go into docs/benchmarks.md by hand; tests never assert them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Parser, Subcommand};
use hmac::{Hmac, Mac};
use sha1::{Digest, Sha1};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use jrs_component::transport::BoxIo;
use jrs_component::FramedReader;
use jrs_harness::{Options, Server};
use jrs_stream::{Frame, Limits, Stanza};

const DOMAIN: &str = "localhost";
const PASSWORD: &str = "bench-password";
/// One salt for every bench account, so the client computes PBKDF2 once (clients may
/// cache the salted password, RFC 5802 section 5.1) and measures the server, not itself.
const SALT: &[u8] = b"jabberd-rs-bench";

#[derive(Parser, Debug)]
#[command(about = "Client load against a whole jabberd-rs server")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// sm modules to leave out of the default set (comma-separated), e.g.
    /// `--without mam,carbons,blocking` for the server as it was before them.
    #[arg(long, global = true, value_delimiter = ',')]
    without: Vec<String>,
    /// Clients enable message carbons (XEP-0280) after login, as mobile clients do.
    #[arg(long, global = true)]
    carbons: bool,
}

/// The sm modules that run when sm.xml has no `<modules>` (sm/src/modules/mod.rs).
const SM_DEFAULT_MODULES: [&str; 15] = [
    "roster",
    "presence",
    "subscription",
    "messages",
    "offline",
    "carbons",
    "blocking",
    "mam",
    "disco",
    "ping",
    "version",
    "time",
    "last",
    "vcard",
    "private",
];

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// Logins per second and login time.
    Logins {
        #[arg(long, default_value_t = 3000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// STARTTLS before SASL.
        #[arg(long)]
        tls: bool,
    },
    /// Messages per second between clients in pairs, latency and CPU per message.
    Messages {
        #[arg(long, default_value_t = 200)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        inflight: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Server memory per idle authenticated connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// STARTTLS before SASL.
        #[arg(long)]
        tls: bool,
    },
    /// Everything above with the default settings.
    All,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    jrs_component::service::raise_open_files_limit();
    jrs_component::transport::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let setup = Setup {
            without: args.without.clone(),
            carbons: args.carbons,
        };
        let scenarios = match args.scenario {
            Scenario::All => vec![
                Scenario::Logins {
                    count: 3000,
                    concurrency: 64,
                    tls: false,
                },
                Scenario::Logins {
                    count: 3000,
                    concurrency: 64,
                    tls: true,
                },
                Scenario::Messages {
                    clients: 200,
                    inflight: 10,
                    seconds: 10,
                },
                Scenario::Idle {
                    connections: 10_000,
                    tls: false,
                },
                Scenario::Idle {
                    connections: 10_000,
                    tls: true,
                },
            ],
            one => vec![one],
        };
        for s in scenarios {
            let bench = Bench::start(&s, &setup).await?;
            let result = match s {
                Scenario::Logins {
                    count,
                    concurrency,
                    tls,
                } => bench.logins(count, concurrency, tls).await,
                Scenario::Messages {
                    clients,
                    inflight,
                    seconds,
                } => bench.messages(clients, inflight, seconds).await,
                Scenario::Idle { connections, tls } => bench.idle(connections, tls).await,
                Scenario::All => unreachable!(),
            };
            if result.is_err() {
                // What the server said about it, before its directory goes.
                for name in ["router", "xdb-file", "sm", "c2s"] {
                    let log = bench.server.log(name);
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    eprintln!("--- {name}.log (last lines) ---");
                    for line in tail.into_iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
            result?;
        }
        Ok(())
    })
}

/// How the server and clients are set up.
struct Setup {
    without: Vec<String>,
    carbons: bool,
}

/// A running server with accounts, and what a client needs to reach it.
struct Bench {
    server: Server,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    keys: ClientKeys,
    carbons: bool,
}

/// The SCRAM-SHA-1 client's cached keys for [`PASSWORD`] and [`SALT`].
#[derive(Clone)]
struct ClientKeys {
    client_key: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

fn hmac_sha1(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha1> as hmac::digest::KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

impl ClientKeys {
    fn new() -> ClientKeys {
        let mut salted = [0u8; 20];
        pbkdf2::pbkdf2_hmac::<Sha1>(
            PASSWORD.as_bytes(),
            SALT,
            jrs_auth::DEFAULT_ITERATIONS,
            &mut salted,
        );
        let client_key = hmac_sha1(&salted, b"Client Key");
        ClientKeys {
            stored_key: Sha1::digest(&client_key).to_vec(),
            server_key: hmac_sha1(&salted, b"Server Key"),
            client_key,
        }
    }
}

impl Bench {
    async fn start(scenario: &Scenario, setup: &Setup) -> anyhow::Result<Bench> {
        let users = match scenario {
            Scenario::Logins { count, .. } => (*count).min(1000),
            Scenario::Messages { clients, .. } => *clients,
            Scenario::Idle { connections, .. } => *connections,
            Scenario::All => 0,
        };
        let mut server = Server::start(Options {
            max_queue_bytes: 64 << 20,
            ..Options::default()
        })
        .await?;
        server.write(
            "xdb-file.xml",
            &format!(
            "<xdb-file>{}<host>localhost</host><spool dir='spool'/><log level='warn'/></xdb-file>",
            server.router_element("xdb-file", "xdb-secret")
        ),
        )?;
        server.spawn("xdb-file", "xdb-file", &["-c", "xdb-file.xml"])?;
        let modules: String = SM_DEFAULT_MODULES
            .iter()
            .filter(|m| !setup.without.iter().any(|w| w == *m))
            .map(|m| format!("<module name='{m}'/>"))
            .collect();
        server.write(
            "sm.xml",
            &format!(
                "<sm>{}<host>localhost</host><modules>{modules}</modules><log level='warn'/></sm>",
                server.router_element("sm", "sm-secret")
            ),
        )?;
        server.spawn("sm", "sm", &["-c", "sm.xml"])?;
        let (port, _) = server
            .start_c2s("<tls required='false'/><limits max-stanza-bytes='65536' max-depth='32' rate-bytes='100000000'/><timeouts idle='3600'/>")
            .await?;
        let keys = ClientKeys::new();
        create_accounts(&server, users, &keys).await?;
        let tls = client_tls(&server.path("certs/localhost.crt"))?;
        eprintln!(
            "server up in {} ({users} accounts; sm modules without {:?}; clients enable carbons: {})",
            server.dir.display(),
            setup.without,
            setup.carbons
        );
        Ok(Bench {
            server,
            port,
            tls,
            keys,
            carbons: setup.carbons,
        })
    }

    fn pids(&self) -> Vec<u32> {
        server_pids(&self.server.dir)
    }

    async fn logins(&self, count: usize, concurrency: usize, tls: bool) -> anyhow::Result<()> {
        let next = Arc::new(AtomicU64::new(0));
        let times = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let pids = self.pids();
        let before: Vec<u64> = pids.iter().map(|p| cpu_micros(&[*p])).collect();
        let cpu_before = cpu_micros(&pids);
        let start = Instant::now();
        let mut tasks = vec![];
        for _ in 0..concurrency {
            let (next, times) = (next.clone(), times.clone());
            let (port, tls_config, keys) = (self.port, self.tls.clone(), self.keys.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= count {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let user = format!("user{}", i % 1000);
                    let t = Instant::now();
                    let mut client = Client::login(
                        port,
                        &user,
                        &format!("r{i}"),
                        &keys,
                        tls.then(|| tls_config.clone()),
                    )
                    .await?;
                    times.lock().unwrap().push(t.elapsed());
                    client.close().await;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let elapsed = start.elapsed();
        let cpu = cpu_micros(&self.pids()) - cpu_before;
        let mut times = times.lock().unwrap().clone();
        println!(
            "logins ({}): {count} SCRAM-SHA-1 logins, {concurrency} at a time: {:.0} logins/s, login time p50 {:.1} ms p99 {:.1} ms, server CPU {:.0} µs/login",
            if tls { "STARTTLS" } else { "plaintext" },
            count as f64 / elapsed.as_secs_f64(),
            percentile(&mut times, 0.50).as_secs_f64() * 1e3,
            percentile(&mut times, 0.99).as_secs_f64() * 1e3,
            cpu as f64 / count as f64
        );
        let at = |pid: u32| {
            let i = pids.iter().position(|p| *p == pid).expect("known pid");
            (cpu_micros(&[pid]) - before[i]) as f64 / count as f64
        };
        println!(
            "  CPU µs per login by process: {}",
            per_process(&pids, at, "")
        );
        Ok(())
    }

    async fn messages(&self, clients: usize, inflight: u64, seconds: u64) -> anyhow::Result<()> {
        let clients = clients & !1;
        let mut logged = vec![];
        for i in 0..clients {
            let mut c =
                Client::login(self.port, &format!("user{i}"), "m", &self.keys, None).await?;
            if self.carbons {
                c.send(b"<iq type='set' id='carbons'><enable xmlns='urn:xmpp:carbons:2'/></iq>")
                    .await?;
            }
            c.send(b"<presence/>").await?;
            logged.push(c);
        }
        // Let initial presence processing settle before measuring.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let acked: Arc<Vec<AtomicU64>> =
            Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
        let wake: Arc<Vec<Notify>> = Arc::new((0..clients).map(|_| Notify::new()).collect());
        let running = Arc::new(AtomicBool::new(true));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let epoch = Instant::now();
        let pids = self.pids();
        let before: Vec<u64> = pids.iter().map(|p| cpu_micros(&[*p])).collect();
        let cpu_before = cpu_micros(&pids);
        let mut tasks = vec![];
        for (i, client) in logged.into_iter().enumerate() {
            let partner = i ^ 1;
            let to = format!("user{partner}@{DOMAIN}/m");
            let (acked, wake, running, latencies) = (
                acked.clone(),
                wake.clone(),
                running.clone(),
                latencies.clone(),
            );
            tasks.push(tokio::spawn(async move {
                pump_messages(
                    client, i, partner, &to, inflight, epoch, &acked, &wake, &running, &latencies,
                )
                .await
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        running.store(false, Ordering::Release);
        let delivered: u64 = acked.iter().map(|a| a.load(Ordering::Acquire)).sum();
        let elapsed = epoch.elapsed();
        let cpu = cpu_micros(&self.pids()) - cpu_before;
        for w in wake.iter() {
            w.notify_one();
        }
        let mut sent = 0;
        for t in tasks {
            sent += t.await??;
        }
        let mut lat = latencies.lock().unwrap().clone();
        println!(
            "messages: {clients} clients in pairs, {inflight} in flight each, {seconds} s: {delivered} of {sent} delivered, {:.0} messages/s, latency p50 {:.2} ms p99 {:.2} ms, server CPU {:.1} µs/message",
            delivered as f64 / elapsed.as_secs_f64(),
            percentile(&mut lat, 0.50).as_secs_f64() * 1e3,
            percentile(&mut lat, 0.99).as_secs_f64() * 1e3,
            cpu as f64 / delivered.max(1) as f64
        );
        let at = |pid: u32| {
            let i = pids.iter().position(|p| *p == pid).expect("known pid");
            (cpu_micros(&[pid]) - before[i]) as f64 / delivered.max(1) as f64
        };
        println!(
            "  CPU µs per message by process: {}",
            per_process(&pids, at, "")
        );
        Ok(())
    }

    async fn idle(&self, connections: usize, tls: bool) -> anyhow::Result<()> {
        let pids = self.pids();
        let each_before: Vec<u64> = pids.iter().map(|p| rss_kib(&[*p])).collect();
        let before = rss_kib(&pids);
        let mut held = Vec::with_capacity(connections);
        let batch = 100;
        for start in (0..connections).step_by(batch) {
            // One batch of logins at a time, concurrently.
            let mut logins = tokio::task::JoinSet::new();
            for i in start..(start + batch).min(connections) {
                let (port, keys) = (self.port, self.keys.clone());
                logins.spawn(async move {
                    let mut c =
                        Client::login(port, &format!("user{i}"), "idle", &keys, None).await?;
                    c.send(b"<presence/>").await?;
                    Ok::<_, anyhow::Error>(c)
                });
            }
            while let Some(c) = logins.join_next().await {
                held.push(c??);
            }
        }
        // Let the server settle (initial presence, caches) before reading memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(&self.pids());
        println!(
            "idle ({}): {connections} authenticated connections with presence: server RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
            if tls { "STARTTLS" } else { "plaintext" },
            (after.saturating_sub(before)) as f64 / connections as f64
        );
        let at = |pid: u32| {
            let i = pids.iter().position(|p| *p == pid).expect("known pid");
            rss_kib(&[pid]).saturating_sub(each_before[i]) as f64 / connections as f64
        };
        println!(
            "  KiB per connection by process: {}",
            per_process(&pids, at, "")
        );
        drop(held);
        Ok(())
    }
}

/// Sends to the partner with at most `inflight` unacknowledged, and receives from it,
/// until `running` is cleared. Returns how many this client sent.
#[allow(clippy::too_many_arguments)]
async fn pump_messages(
    mut client: Client,
    me: usize,
    partner: usize,
    to: &str,
    inflight: u64,
    epoch: Instant,
    acked: &[AtomicU64],
    wake: &[Notify],
    running: &AtomicBool,
    latencies: &Mutex<Vec<Duration>>,
) -> anyhow::Result<u64> {
    let mut sent = 0u64;
    let mut local = Vec::new();
    loop {
        if !running.load(Ordering::Acquire) {
            break;
        }
        let mut batch = Vec::new();
        while sent - acked[me].load(Ordering::Acquire) < inflight {
            let stamp = epoch.elapsed().as_nanos();
            batch.extend_from_slice(
                format!("<message to='{to}' type='chat' id='{stamp}'><body>hello {sent}</body></message>").as_bytes(),
            );
            sent += 1;
        }
        if !batch.is_empty() {
            client.send(&batch).await?;
        }
        tokio::select! {
            frame = client.reader.next_frame() => {
                let Frame::Element(bytes) = frame? else { bail!("stream closed") };
                let stanza = Stanza::parse(bytes)?;
                if stanza.name() == "message" && stanza.kind() == Some("chat") {
                    if let Some(stamp) = stanza.id().and_then(|s| s.parse::<u128>().ok()) {
                        let now = epoch.elapsed().as_nanos();
                        local.push(Duration::from_nanos(now.saturating_sub(stamp) as u64));
                    }
                    acked[partner].fetch_add(1, Ordering::AcqRel);
                    wake[partner].notify_one();
                }
            }
            _ = wake[me].notified() => {}
        }
    }
    latencies.lock().unwrap().extend(local);
    Ok(sent)
}

/// A logged-in client connection.
struct Client {
    reader: FramedReader<BoxIo>,
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

impl Client {
    async fn login(
        port: u16,
        user: &str,
        resource: &str,
        keys: &ClientKeys,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let limits = Limits {
            max_stanza_bytes: 1 << 20,
            max_depth: 64,
        };
        let mut c = Client {
            reader: FramedReader::new(Box::new(tcp) as BoxIo, limits),
        };
        c.open().await?;
        if let Some(config) = tls {
            c.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                .await?;
            c.expect("proceed").await?;
            let tcp = std::mem::replace(
                &mut c.reader,
                FramedReader::new(Box::new(tokio::io::empty()) as BoxIo, limits),
            )
            .into_inner();
            let name = rustls::pki_types::ServerName::try_from(DOMAIN)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            c.reader = FramedReader::new(Box::new(tls) as BoxIo, limits);
            c.open().await?;
        }
        // SCRAM-SHA-1 with the cached keys.
        let nonce = format!("{:032x}", rand::random::<u128>());
        let first_bare = format!("n={user},r={nonce}");
        c.send(
            format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{}</auth>",
                B64.encode(format!("n,,{first_bare}"))
            )
            .as_bytes(),
        )
        .await?;
        let challenge = c.expect("challenge").await?;
        let server_first =
            String::from_utf8(B64.decode(String::from_utf8_lossy(challenge.inner()).trim())?)?;
        let server_nonce = server_first
            .split(',')
            .find_map(|p| p.strip_prefix("r="))
            .context("no nonce")?;
        let final_bare = format!("c=biws,r={server_nonce}");
        let auth_message = format!("{first_bare},{server_first},{final_bare}");
        let signature = hmac_sha1(&keys.stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = keys
            .client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        c.send(
            format!(
                "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                B64.encode(format!("{final_bare},p={}", B64.encode(proof)))
            )
            .as_bytes(),
        )
        .await?;
        let success = c.expect("success").await?;
        let verifier = B64.encode(hmac_sha1(&keys.server_key, auth_message.as_bytes()));
        let server_final =
            String::from_utf8(B64.decode(String::from_utf8_lossy(success.inner()).trim())?)?;
        if server_final != format!("v={verifier}") {
            bail!("the server's signature does not verify");
        }
        c.reader.restart();
        c.open().await?;
        c.send(format!("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>").as_bytes()).await?;
        let bound = c.expect("iq").await?;
        if bound.kind() != Some("result") {
            bail!("bind failed: {}", String::from_utf8_lossy(bound.bytes()));
        }
        Ok(c)
    }

    async fn open(&mut self) -> anyhow::Result<()> {
        self.send(HEADER.as_bytes()).await?;
        match self.reader.next_frame().await? {
            Frame::StreamOpen(_) => {}
            other => bail!("expected a stream header, got {other:?}"),
        }
        self.expect("stream:features").await.map(drop)
    }

    async fn expect(&mut self, name: &str) -> anyhow::Result<Stanza> {
        loop {
            match self.reader.next_frame().await? {
                Frame::Element(bytes) => {
                    let s = Stanza::parse(bytes)?;
                    if s.name() == name {
                        return Ok(s);
                    }
                    if s.name() == "failure" || s.name() == "stream:error" {
                        bail!(
                            "expected <{name}>, got {}",
                            String::from_utf8_lossy(s.bytes())
                        );
                    }
                }
                other => bail!("expected <{name}>, got {other:?}"),
            }
        }
    }

    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let io = self.reader.get_mut();
        io.write_all(data).await?;
        io.flush().await?;
        Ok(())
    }

    async fn close(&mut self) {
        let _ = self.send(b"</stream:stream>").await;
        let _ = self.reader.get_mut().shutdown().await;
    }
}

/// Writes the same credentials record (fixed salt) for user0..userN-1.
async fn create_accounts(server: &Server, users: usize, keys: &ClientKeys) -> anyhow::Result<()> {
    let record = jrs_auth::Credentials {
        scram: vec![jrs_auth::ScramKeys {
            hash: jrs_auth::ScramHash::Sha1,
            iterations: jrs_auth::DEFAULT_ITERATIONS,
            salt: SALT.to_vec(),
            stored_key: keys.stored_key.clone(),
            server_key: keys.server_key.clone(),
        }],
    }
    .to_xml();
    let (mut reader, writer) = server.component("admin", "admin-secret").await?.split();
    let xdb = Arc::new(jrs_xdb::XdbClient::new("admin", Duration::from_secs(10)));
    xdb.set_outbox(writer.spawn());
    let answers = xdb.clone();
    tokio::spawn(async move {
        while let Ok(s) = reader.next().await {
            answers.answer(&s);
        }
    });
    // Storage may still be connecting: retry the first write.
    for attempt in 0.. {
        match xdb
            .set("user0@localhost", jrs_auth::NS_AUTH, record.clone())
            .await
        {
            Ok(()) => break,
            Err(e) if attempt < 50 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow!("storage: {e}")),
        }
    }
    let mut pending = vec![];
    for i in 1..users {
        let (xdb, record) = (xdb.clone(), record.clone());
        pending.push(tokio::spawn(async move {
            xdb.set(&format!("user{i}@localhost"), jrs_auth::NS_AUTH, record)
                .await
        }));
        if pending.len() >= 200 {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending {
        p.await??;
    }
    Ok(())
}

/// A client TLS configuration that trusts the server's self-made certificate.
fn client_tls(cert: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in jrs_component::transport::load_certs(cert)? {
        roots.add(c)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// The server's processes: every process whose working directory is the installation.
fn server_pids(dir: &PathBuf) -> Vec<u32> {
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).ok().as_ref() == Some(dir) {
            pids.push(pid);
        }
    }
    pids
}

/// `name=value` for each server process, e.g. `c2s=12.3 sm=4.5`.
fn per_process(pids: &[u32], value: impl Fn(u32) -> f64, unit: &str) -> String {
    let mut parts: Vec<(String, f64)> = pids
        .iter()
        .map(|&pid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            (name, value(pid))
        })
        .collect();
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    parts
        .iter()
        .map(|(n, v)| format!("{n} {v:.1}{unit}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cpu_micros(pids: &[u32]) -> u64 {
    let hz = 100; // USER_HZ on Linux
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<String> = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
        })
        .sum::<u64>()
        * 1_000_000
        / hz
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}
