//! Client load generator for the whole server (router, xdb-file, sm, c2s).
//!
//! Starts a server in a temporary directory (release binaries next to this one), creates
//! accounts, and measures:
//! - `logins`: SCRAM-SHA-1 logins per second (plaintext or STARTTLS), p50/p99 login time;
//! - `messages`: messages per second between clients in pairs with a fixed number in
//!   flight per client, p50/p99 delivery latency, and server CPU per delivered message
//!   (user + system time of every server process, from /proc);
//! - `idle`: server memory (RSS of every server process) per idle authenticated
//!   connection;
//! - `hibernated`: server memory per session hibernating (XEP-0198) after its client's
//!   connection dropped.
//!
//! With `--sm` clients enable stream management with resumption (XEP-0198) after
//! binding, ask for an acknowledgement (`<r/>`) after every 5 stanzas they send, and
//! answer the server's.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/loadgen all
//! ```
//! Figures go into docs/benchmarks.md by hand; tests never assert them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use tokio::sync::Notify;

use bench::client::{client_tls, create_accounts, Client, ClientKeys, DOMAIN};
use bench::procstat::{cpu_micros, per_process, server_pids};
use jrs_harness::{Options, Server};
use jrs_stream::{Frame, Stanza};

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
    /// Clients enable stream management (XEP-0198) with resumption and ask for an
    /// acknowledgement after every 5 stanzas they send.
    #[arg(long, global = true)]
    sm: bool,
}

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
    /// Server memory per session hibernating (XEP-0198) after its connection dropped.
    Hibernated {
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
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
            sm: args.sm,
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
                Scenario::Hibernated { sessions } => bench.hibernated(sessions).await,
                Scenario::All => unreachable!(),
            };
            if result.is_err() {
                bench.server.print_log_tails(20);
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
    sm: bool,
}

/// A running server with accounts, and what a client needs to reach it.
struct Bench {
    server: Server,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    keys: ClientKeys,
    carbons: bool,
    sm: bool,
}

/// Clients that enable stream management ask for an acknowledgement this often.
const ASK_EVERY: u64 = 5;

impl Bench {
    async fn start(scenario: &Scenario, setup: &Setup) -> anyhow::Result<Bench> {
        let users = match scenario {
            Scenario::Logins { count, .. } => (*count).min(1000),
            Scenario::Messages { clients, .. } => *clients,
            Scenario::Idle { connections, .. } => *connections,
            Scenario::Hibernated { sessions } => *sessions,
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
        let modules: String = setup
            .without
            .iter()
            .map(|m| format!("<module name='{m}' enabled='false'/>"))
            .collect();
        server.write(
            "sm.xml",
            &format!(
                "<sm>{}<host>localhost</host><modules defaults='true'>{modules}</modules><log level='warn'/></sm>",
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
            "server up in {} ({users} accounts; sm modules without {:?}; clients enable carbons: {}, stream management: {})",
            server.dir.display(),
            setup.without,
            setup.carbons,
            setup.sm
        );
        Ok(Bench {
            server,
            port,
            tls,
            keys,
            carbons: setup.carbons,
            sm: setup.sm,
        })
    }

    /// A client logged in as `user`/`resource`, with stream management enabled when
    /// the bench asks for it.
    async fn client(&self, user: &str, resource: &str, tls: bool) -> anyhow::Result<Client> {
        let tls = tls.then(|| self.tls.clone());
        let mut c = Client::login(self.port, user, resource, &self.keys, tls).await?;
        if self.sm {
            enable_stream_management(&mut c).await?;
        }
        Ok(c)
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
            let mut c = self.client(&format!("user{i}"), "m", false).await?;
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
            let sm = self.sm;
            tasks.push(tokio::spawn(async move {
                pump_messages(
                    client, i, partner, &to, inflight, sm, epoch, &acked, &wake, &running,
                    &latencies,
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
        let suffix = if self.sm {
            " (stream management, <r/> every 5)"
        } else {
            ""
        };
        println!(
            "messages{suffix}: {clients} clients in pairs, {inflight} in flight each, {seconds} s: {delivered} of {sent} delivered, {:.0} messages/s, latency p50 {:.2} ms p99 {:.2} ms, server CPU {:.1} µs/message",
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
        let memory = Memory::now(self.pids());
        let held = self.log_in_many(connections, "idle", self.sm, true).await?;
        // Let the server settle (initial presence, caches) before reading memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (before, after, by_process) = memory.growth(connections);
        println!(
            "idle ({}{}): {connections} authenticated connections with presence: server RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
            if tls { "STARTTLS" } else { "plaintext" },
            if self.sm { ", stream management" } else { "" },
            (after.saturating_sub(before)) as f64 / connections as f64
        );
        println!("  KiB per connection by process: {by_process}");
        drop(held);
        Ok(())
    }

    /// Logs in `sessions` clients with resumable stream management and presence, drops
    /// their connections (no stream close: the sessions hibernate at sm), and reports
    /// server memory per hibernating session.
    async fn hibernated(&self, sessions: usize) -> anyhow::Result<()> {
        let memory = Memory::now(self.pids());
        // Each batch's connections drop without a stream close once logged in (as the
        // logins go on, so that c2s reuses their memory rather than growing to hold
        // them all at once: what stays is the hibernating sessions' state).
        self.log_in_many(sessions, "away", true, false).await?;
        // Let c2s hand the sessions over and both settle before reading memory.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (before, after, by_process) = memory.growth(sessions);
        println!(
            "hibernated: {sessions} sessions whose connection dropped: server RSS {before} KiB -> {after} KiB, {:.1} KiB per hibernating session",
            (after.saturating_sub(before)) as f64 / sessions as f64
        );
        println!("  KiB per session by process: {by_process}");
        Ok(())
    }

    /// Logs in `user0`.. `user{count-1}` with `resource`, 100 at a time, each enabling
    /// stream management (with `sm`) and sending initial presence. Returns the clients
    /// when `keep`, else drops each batch's connections once it is logged in.
    async fn log_in_many(
        &self,
        count: usize,
        resource: &'static str,
        sm: bool,
        keep: bool,
    ) -> anyhow::Result<Vec<Client>> {
        let mut clients = Vec::with_capacity(count);
        let batch = 100;
        for start in (0..count).step_by(batch) {
            let mut logins = tokio::task::JoinSet::new();
            for i in start..(start + batch).min(count) {
                let (port, keys) = (self.port, self.keys.clone());
                logins.spawn(async move {
                    let mut c =
                        Client::login(port, &format!("user{i}"), resource, &keys, None).await?;
                    if sm {
                        enable_stream_management(&mut c).await?;
                    }
                    c.send(b"<presence/>").await?;
                    Ok::<_, anyhow::Error>(c)
                });
            }
            while let Some(c) = logins.join_next().await {
                let c = c??;
                if keep {
                    clients.push(c);
                }
            }
        }
        Ok(clients)
    }
}

/// The server processes' memory at one moment, to report growth from.
struct Memory {
    pids: Vec<u32>,
    each: Vec<u64>,
    total: u64,
}

impl Memory {
    fn now(pids: Vec<u32>) -> Memory {
        let each = pids.iter().map(|p| rss_kib(&[*p])).collect();
        let total = rss_kib(&pids);
        Memory { pids, each, total }
    }

    /// Total RSS then and now (KiB), and each process's growth divided by `count`.
    fn growth(&self, count: usize) -> (u64, u64, String) {
        let after = rss_kib(&self.pids);
        let at = |pid: u32| {
            let i = self.pids.iter().position(|p| *p == pid).expect("known pid");
            rss_kib(&[pid]).saturating_sub(self.each[i]) as f64 / count as f64
        };
        (self.total, after, per_process(&self.pids, at, ""))
    }
}

/// XEP-0198 with resumption, as mobile clients enable it after binding.
async fn enable_stream_management(c: &mut Client) -> anyhow::Result<()> {
    c.send(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await?;
    c.expect("enabled").await?;
    Ok(())
}

/// Sends to the partner with at most `inflight` unacknowledged, and receives from it,
/// until `running` is cleared. Returns how many this client sent. With `sm`, asks for an
/// acknowledgement every [`ASK_EVERY`] stanzas and answers the server's asks.
#[allow(clippy::too_many_arguments)]
async fn pump_messages(
    mut client: Client,
    me: usize,
    partner: usize,
    to: &str,
    inflight: u64,
    sm: bool,
    epoch: Instant,
    acked: &[AtomicU64],
    wake: &[Notify],
    running: &AtomicBool,
    latencies: &Mutex<Vec<Duration>>,
) -> anyhow::Result<u64> {
    let mut sent = 0u64;
    // XEP-0198: stanzas received since enabling (the client's h).
    let mut handled = 0u32;
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
            if sm && sent.is_multiple_of(ASK_EVERY) {
                batch.extend_from_slice(b"<r xmlns='urn:xmpp:sm:3'/>");
            }
        }
        if !batch.is_empty() {
            client.send(&batch).await?;
        }
        tokio::select! {
            frame = client.reader.next_frame() => {
                let Frame::Element(bytes) = frame? else { bail!("stream closed") };
                let stanza = Stanza::parse(bytes)?;
                if matches!(stanza.name(), "message" | "presence" | "iq") {
                    handled = handled.wrapping_add(1);
                } else if sm && stanza.name() == "r" {
                    client
                        .send(format!("<a xmlns='urn:xmpp:sm:3' h='{handled}'/>").as_bytes())
                        .await?;
                }
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
