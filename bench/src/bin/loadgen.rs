//! Client load generator for the whole server (router, xdb-file, sm, c2s).
//!
//! Starts a server in a temporary directory (release binaries next to this one), creates
//! accounts, and measures:
//! - `logins`: SCRAM-SHA-1 logins per second (plaintext or STARTTLS), p50/p99 login time;
//! - `messages`: messages per second between clients in pairs with a fixed number in
//!   flight per client, p50/p99 delivery latency, and server CPU per delivered message
//!   (user + system time of every server process, from /proc);
//! - `pair`: low load (issue 14): one pair of clients, one message in flight each (as
//!   `messages --clients 2 --inflight 1`, 20 s), with context switches per message per
//!   process; `--one-way` (only one sends: exactly one message in flight), `--syscalls`
//!   (system calls, futex calls and wake-ups per message per process, `perf stat` on
//!   tracepoints), `--profile c2s,sm` (`perf record -g` of those processes);
//! - `idle`: server memory (RSS of every server process) per idle authenticated
//!   connection;
//!
//! `messages` and `idle` take `--transport tcp|ws|bosh` (`idle` only for BOSH): the
//! clients connect over TCP, XMPP over WebSocket (RFC 7395) or BOSH (XEP-0206) on c2s's
//! http listener (`bench::websocket`, `bench::bosh`); everything above the transport is
//! the same client.
//! - `hibernated`: server memory per session hibernating (XEP-0198) after its client's
//!   connection dropped;
//! - `pep`: a presence storm of clients announcing capabilities (XEP-0115) that want
//!   PEP notifications (XEP-0163), each with mutual contacts; each publishes an avatar
//!   and a device list; then all log out and in again and get the last items. Server CPU
//!   per login and per notification, the disco#info queries that reach clients (one per
//!   distinct `ver` is the goal), wall time of each phase and memory;
//! - `muc`: group chat (`bench::muc`): a 1 000-occupant room on the muc component,
//!   server CPU and time of one more join, and room deliveries per second with server
//!   CPU per delivery; the same clients against Prosody's MUC in the same run.
//!
//! With `--unix` the component links (c2s, sm, xdb-file, muc to the router) use a Unix
//! socket instead of TCP on loopback.
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
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

use bench::caps::{self, Software};
use bench::client::{accounts, client_tls, store_fragments, Client, ClientKeys, Transport, DOMAIN};
use bench::muc;
use bench::pep::{self, key, Cmd, Counters, Snapshot};
use bench::procstat::{context_switches, cpu_micros, per_process, server_pids, threads};
use bench::pump::{percentile, pump_messages};
use jrs_harness::{Options, Server};

#[derive(Parser, Debug)]
#[command(about = "Client load against a whole jabberd-rs server")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// sm modules to leave out of the default set (comma-separated), e.g.
    /// `--without mam,carbons,blocking` for the server as it was before them.
    #[arg(long, global = true, value_delimiter = ',')]
    without: Vec<String>,
    /// XML added to sm.xml as it is, e.g. `--sm-xml "<delivery local='false'/>"` to
    /// compare a setting in one build.
    #[arg(long, global = true, default_value = "")]
    sm_xml: String,
    /// Clients enable message carbons (XEP-0280) after login, as mobile clients do.
    #[arg(long, global = true)]
    carbons: bool,
    /// Clients enable stream management (XEP-0198) with resumption and ask for an
    /// acknowledgement after every 5 stanzas they send.
    #[arg(long, global = true)]
    sm: bool,
    /// Component links (c2s, sm, xdb-file to the router) over a Unix socket
    /// (`<listen unix=...>` in router.xml, `unix=` on each `<router/>`) instead of TCP
    /// on loopback; the router keeps its TCP listener for the accounts' setup.
    #[arg(long, global = true)]
    unix: bool,
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
        /// Every account logs in and out twice before the measured logins (not
        /// measured): what a reconnect storm meets, accounts used before. Without it the
        /// first logins of each new account (1 000 of them) are measured too, which make
        /// the account's files (its last activity record and that file's spare).
        #[arg(long)]
        warm: bool,
    },
    /// Messages per second between clients in pairs, latency and CPU per message.
    Messages {
        #[arg(long, default_value_t = 200)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        inflight: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// How the clients connect: `tcp`, `ws` (RFC 7395 on c2s's http listener).
        #[arg(long, value_enum, default_value = "tcp")]
        transport: Transport,
        /// Record c2s with `perf record -g` during the measurement into
        /// perf-messages-TRANSPORT.data in the current directory.
        #[arg(long)]
        profile: bool,
        /// STARTTLS before SASL (`tcp`), or direct TLS with `--tls direct`.
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "starttls")]
        tls: Option<TlsWay>,
    },
    /// One pair of clients, each keeping one message in flight to the other (issue 14:
    /// `messages --clients 2 --inflight 1`, with more detail): messages/s, latency
    /// p50/p99, server CPU per message in all and per process, context switches per
    /// message per process.
    Pair {
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Only the first client sends: exactly one message in flight at a time.
        #[arg(long)]
        one_way: bool,
        /// Count system calls, futex calls and context switches of each server process
        /// with `perf stat` (tracepoints) during the measurement.
        #[arg(long)]
        syscalls: bool,
        /// Record these server processes (comma-separated names, e.g. `c2s,sm`) with
        /// `perf record -g` during the measurement into perf-pair-NAME.data.
        #[arg(long, value_delimiter = ',')]
        profile: Vec<String>,
        /// STARTTLS before SASL, or direct TLS with `--tls direct`.
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "starttls")]
        tls: Option<TlsWay>,
    },
    /// Server memory per idle authenticated connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// STARTTLS before SASL (TCP only), or direct TLS with `--tls direct` (one
        /// client process).
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "starttls")]
        tls: Option<TlsWay>,
        /// How the clients connect: `tcp`, `ws` (WebSocket) or `bosh` (a BOSH session
        /// left polling: one request held by c2s).
        #[arg(long, value_enum, default_value = "tcp")]
        transport: Transport,
        /// c2s processes sharing the client ports (SO_REUSEPORT): each holds at most its
        /// open-file limit of connections (here 20 000, not raisable), so 100 000 need six
        /// or more. The extra ones are started as instances 2.. (`--instance K`).
        #[arg(long, default_value_t = 1)]
        c2s_instances: u32,
        /// Client processes (`loadgen hold`), each logging its share of the users in
        /// from its own loopback address (127.0.1.K): a process's open files and an
        /// address's ephemeral ports both stop short of 100 000. TCP only.
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// Mutual contacts in each user's roster (even): then every client also sends
        /// one presence change, and the server CPU per presence is reported (each goes
        /// to its contacts online).
        #[arg(long, default_value_t = 0)]
        contacts: usize,
    },
    /// A client process of `idle --processes` (not run by hand): logs in users
    /// `from`..`to` from `source`, prints `ready N`, then sends a presence change from
    /// each client at every `presence` line on its standard input (answering `sent N`),
    /// and logs out at the end of its input.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        port: u16,
        /// STARTTLS, trusting this certificate.
        #[arg(long)]
        cert: Option<std::path::PathBuf>,
        #[arg(long)]
        from: usize,
        #[arg(long)]
        to: usize,
        #[arg(long)]
        source: std::net::Ipv4Addr,
    },
    /// Server memory per session hibernating (XEP-0198) after its connection dropped.
    Hibernated {
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
    },
    /// Capabilities and personal eventing: a presence storm of clients with caps and
    /// mutual contacts, then each publishes an avatar and a device list, then all log
    /// in again and get the last items.
    Pep {
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Mutual (`both`) contacts in each roster (even).
        #[arg(long, default_value_t = 100)]
        contacts: usize,
        /// Distinct client programs, so distinct capabilities `ver`s.
        #[arg(long, default_value_t = 3)]
        vers: usize,
        /// Logins in progress at a time.
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Leave out the last phase (log out, log in again, last items).
        #[arg(long)]
        no_relogin: bool,
        /// Log users in by number (user0, user1, ...: a user's contacts, its neighbours
        /// by number, log in at about the same time) instead of in a random order.
        #[arg(long)]
        in_order: bool,
        /// Record sm with `perf record` during one phase (`storm`, `publish`,
        /// `logout` or `relogin`) into perf-PHASE.data in the current directory.
        #[arg(long)]
        profile: Option<String>,
    },
    /// Group chat (issue 10): a room of `occupants` clients on the muc component; the
    /// CPU and time of one more join, and room deliveries per second for a steady
    /// stream of messages; the same clients against Prosody's MUC (`--server`).
    Muc {
        #[arg(long, default_value_t = 1000)]
        occupants: usize,
        /// Join/leave rounds of the newcomer (the median is reported).
        #[arg(long, default_value_t = 7)]
        joins: usize,
        /// Occupants that send room messages.
        #[arg(long, default_value_t = 4)]
        senders: usize,
        /// Messages in flight per sender (sent, not yet reflected back to it).
        #[arg(long, default_value_t = 5)]
        inflight: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Logins and joins in progress at a time while the room fills.
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// `jabberd-rs`, `prosody` or `both` (one after the other, in this run).
        #[arg(long, default_value = "both")]
        server: String,
        /// Room archives on (muc's `<archive enabled>`; Prosody's MUC has none loaded).
        #[arg(long)]
        archive: bool,
        /// Record muc, sm, router and c2s (or prosody) with `perf record -g` during the
        /// message phase into perf-muc-SERVER.data in the current directory.
        #[arg(long)]
        profile: bool,
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
            sm_xml: args.sm_xml.clone(),
            carbons: args.carbons,
            sm: args.sm,
            unix: args.unix,
        };
        let scenarios = match args.scenario {
            Scenario::All => vec![
                Scenario::Logins {
                    count: 3000,
                    concurrency: 64,
                    tls: false,
                    warm: false,
                },
                Scenario::Logins {
                    count: 3000,
                    concurrency: 64,
                    tls: true,
                    warm: false,
                },
                Scenario::Messages {
                    clients: 200,
                    inflight: 10,
                    seconds: 10,
                    transport: Transport::Tcp,
                    profile: false,
                    tls: None,
                },
                Scenario::Idle {
                    connections: 10_000,
                    tls: None,
                    transport: Transport::Tcp,
                    c2s_instances: 1,
                    processes: 1,
                    contacts: 0,
                },
                Scenario::Idle {
                    connections: 10_000,
                    tls: Some(TlsWay::StartTls),
                    transport: Transport::Tcp,
                    c2s_instances: 1,
                    processes: 1,
                    contacts: 0,
                },
            ],
            one => vec![one],
        };
        for s in scenarios {
            if let Scenario::Hold {
                port,
                cert,
                from,
                to,
                source,
            } = &s
            {
                hold(*port, cert.as_deref(), *from..*to, *source).await?;
                continue;
            }
            if let Scenario::Muc { server, .. } = &s {
                if matches!(server.as_str(), "both" | "jabberd-rs") {
                    let bench = Bench::start(&s, &setup).await?;
                    let result = bench.muc(&s).await;
                    if result.is_err() {
                        bench.server.print_log_tails(20);
                    }
                    result?;
                }
                if matches!(server.as_str(), "both" | "prosody") {
                    muc_prosody(&s).await?;
                }
                continue;
            }
            let mut bench = Bench::start(&s, &setup).await?;
            let result = match s {
                Scenario::Logins {
                    count,
                    concurrency,
                    tls,
                    warm,
                } => {
                    if warm {
                        // Twice: a file's spare is made at its second write.
                        let users = count.min(1000);
                        bench.login_pass(2 * users, concurrency, tls).await?;
                        // The last logout times reach the disk (flush='later').
                        tokio::time::sleep(Duration::from_millis(1200)).await;
                    }
                    bench.logins(count, concurrency, tls, warm).await
                }
                Scenario::Messages {
                    clients,
                    inflight,
                    seconds,
                    transport,
                    profile,
                    tls,
                } => {
                    bench
                        .messages(clients, inflight, seconds, transport, profile, tls)
                        .await
                }
                Scenario::Pair {
                    seconds,
                    one_way,
                    syscalls,
                    profile,
                    tls,
                } => bench.pair(seconds, one_way, syscalls, &profile, tls).await,
                Scenario::Idle {
                    connections,
                    tls,
                    transport,
                    c2s_instances,
                    processes,
                    contacts,
                } => {
                    let spread = Spread {
                        c2s_instances,
                        processes,
                        contacts,
                    };
                    bench.idle(connections, tls, transport, spread).await
                }
                Scenario::Hibernated { sessions } => bench.hibernated(sessions).await,
                Scenario::Pep {
                    users,
                    contacts,
                    vers,
                    concurrency,
                    no_relogin,
                    in_order,
                    profile,
                } => {
                    let plan = PepPlan {
                        users,
                        contacts,
                        vers,
                        concurrency,
                        relogin: !no_relogin,
                        in_order,
                        profile,
                    };
                    bench.pep(&plan).await
                }
                Scenario::All | Scenario::Muc { .. } | Scenario::Hold { .. } => unreachable!(),
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
    sm_xml: String,
    carbons: bool,
    sm: bool,
    unix: bool,
}

/// A running server with accounts, and what a client needs to reach it.
struct Bench {
    server: Server,
    port: u16,
    /// c2s's http listener (WebSocket, BOSH).
    web_port: u16,
    /// c2s's direct TLS listener (XEP-0368).
    direct_port: u16,
    tls: Arc<rustls::ClientConfig>,
    keys: ClientKeys,
    carbons: bool,
    sm: bool,
    unix: bool,
}

/// The router's Unix socket with `--unix`, relative to the installation.
const UNIX_LINK: &str = "router.sock";

/// The `<router/>` element of component `name`: the harness's TCP one, or with
/// `--unix` the same over the router's Unix socket.
fn router_link(server: &Server, setup: &Setup, name: &str, secret: &str) -> String {
    if setup.unix {
        format!("<router unix='{UNIX_LINK}' name='{name}' secret='{secret}' reconnect='0.05'/>")
    } else {
        server.router_element(name, secret)
    }
}

/// As the harness's `start_c2s_with_http`, with c2s's router link over the Unix socket.
/// Returns (plaintext/STARTTLS port, direct TLS port, http port) once all accept
/// connections.
async fn start_c2s_unix(server: &mut Server, extra: &str) -> anyhow::Result<(u16, u16, u16)> {
    let (starttls, direct, http) = (
        jrs_harness::free_port(),
        jrs_harness::free_port(),
        jrs_harness::free_port(),
    );
    let config = format!(
        "<c2s><router unix='{UNIX_LINK}' name='c2s' secret='c2s-secret' reconnect='0.05'/>\
         <host name='localhost' cert='certs/localhost.crt' key='certs/localhost.key' self-signed='true'/>\
         <listen address='127.0.0.1' port='{starttls}'/><listen address='127.0.0.1' port='{direct}' mode='tls'/>\
         <listen address='127.0.0.1' port='{http}' mode='http' secure='true'/>\
         {extra}<log level='debug'/></c2s>"
    );
    server.write("c2s.xml", &config)?;
    server.spawn("c2s", "c2s", &["-c", "c2s.xml"])?;
    for port in [starttls, direct, http] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = server.exited("c2s") {
                bail!("c2s exited ({status}):\n{}", server.log("c2s"));
            }
            if Instant::now() > deadline {
                bail!("c2s does not listen on {port}:\n{}", server.log("c2s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // c2s listens before its router link is up: a login before that would fail (under
    // valgrind, bench/callgrind_ab.sh, it does).
    server.wait_connected("c2s", 0).await?;
    Ok((starttls, direct, http))
}

impl Bench {
    async fn start(scenario: &Scenario, setup: &Setup) -> anyhow::Result<Bench> {
        let users = match scenario {
            Scenario::Logins { count, .. } => (*count).min(1000),
            Scenario::Messages { clients, .. } => *clients,
            Scenario::Pair { .. } => 2,
            Scenario::Idle { connections, .. } => *connections,
            Scenario::Hold { .. } => 0,
            Scenario::Hibernated { sessions } => *sessions,
            Scenario::Pep { users, .. } => *users,
            Scenario::Muc { occupants, .. } => *occupants + 1,
            Scenario::All => 0,
        };
        let muc = matches!(scenario, Scenario::Muc { .. });
        let mut server = Server::start(Options {
            max_queue_bytes: 64 << 20,
            extra_router: if setup.unix {
                format!("<listen unix='{UNIX_LINK}'/>")
            } else {
                String::new()
            },
            extra_users: if muc {
                "<component name='muc' secret='muc-secret' trusted='true'><allow type='normal' host='conference.localhost'/></component>".to_owned()
            } else {
                String::new()
            },
            ..Options::default()
        })
        .await?;
        server.write(
            "xdb-file.xml",
            &format!(
            "<xdb-file>{}<host>localhost</host>{}<spool dir='spool'/><log level='warn'/></xdb-file>",
            router_link(&server, setup, "xdb-file", "xdb-secret"),
            if muc { "<host>conference.localhost</host>" } else { "" }
        ),
        )?;
        server.spawn("xdb-file", "xdb-file", &["-c", "xdb-file.xml"])?;
        // A joiner into a 1 000-occupant room gets 1 000 presences at once: more than
        // sm's default queue per user (1 000 events, etc/sm.xml), which refuses the rest.
        let sessions = if muc {
            "<sessions queue='100000'/>"
        } else {
            ""
        };
        let modules: String = setup
            .without
            .iter()
            .map(|m| format!("<module name='{m}' enabled='false'/>"))
            .collect();
        server.write(
            "sm.xml",
            &format!(
                "<sm>{}<host>localhost</host>{sessions}<modules defaults='true'>{modules}</modules>{}<log level='warn'/></sm>",
                router_link(&server, setup, "sm", "sm-secret"),
                setup.sm_xml,
            ),
        )?;
        server.spawn("sm", "sm", &["-c", "sm.xml"])?;
        if let Scenario::Muc { archive, .. } = scenario {
            // etc/muc.xml with room limits that let 1 000+ occupants in and a few of
            // them send hundreds of messages a second.
            server.write(
                "muc.xml",
                &format!(
                    "<muc>{}<service>conference.localhost</service><storage>xdb</storage>\
                     <rooms max-rooms='100' max-occupants='100000' default-max-users='100000' \
                     max-history='50' default-history='20' message-rate='1000000' message-burst='1000000'/>\
                     <archive enabled='{archive}'/><log level='info'/></muc>",
                    router_link(&server, setup, "muc", "muc-secret")
                ),
            )?;
            server.spawn("muc", "muc", &["-c", "muc.xml"])?;
            server.wait_connected("muc", 0).await?;
        }
        // An http listener for the web transports (`secure`: as behind a TLS proxy, so
        // no STARTTLS is asked for), with no limit on connections from the one address.
        let c2s_extra = "<tls required='false'/><limits max-stanza-bytes='65536' max-depth='32' rate-bytes='100000000'/><timeouts idle='3600'/><web max-connections-per-address='1000000'/>";
        let (port, direct_port, web_port) = if setup.unix {
            start_c2s_unix(&mut server, c2s_extra).await?
        } else {
            server.start_c2s_with_http(c2s_extra).await?
        };
        let keys = ClientKeys::new();
        let mut fragments = accounts(users, &keys);
        let rosters = match scenario {
            Scenario::Pep {
                users, contacts, ..
            } => Some((*users, *contacts)),
            Scenario::Idle {
                connections,
                contacts,
                ..
            } if *contacts > 0 => Some((*connections, *contacts)),
            _ => None,
        };
        if let Some((users, contacts)) = rosters {
            if contacts % 2 == 1 || contacts >= users {
                bail!("--contacts must be even and fewer than --users");
            }
            // Rosters of mutual contacts, written to storage before sm reads them.
            fragments.extend((0..users).map(|i| {
                (
                    format!("user{i}@{DOMAIN}"),
                    "jabber:iq:roster",
                    pep::roster_fragment(i, users, contacts),
                )
            }));
        }
        store_fragments(&server, fragments).await?;
        let tls = client_tls(&server.path("certs/localhost.crt"))?;
        eprintln!(
            "server up in {} ({users} accounts; sm modules without {:?}; clients enable carbons: {}, stream management: {}; component links over {})",
            server.dir.display(),
            setup.without,
            setup.carbons,
            setup.sm,
            if setup.unix { "a Unix socket" } else { "TCP loopback" }
        );
        Ok(Bench {
            server,
            port,
            web_port,
            direct_port,
            tls,
            keys,
            carbons: setup.carbons,
            sm: setup.sm,
            unix: setup.unix,
        })
    }

    /// A client logged in as `user`/`resource`, with stream management enabled when
    /// the bench asks for it.
    async fn client(
        &self,
        user: &str,
        resource: &str,
        tls: bool,
        transport: Transport,
    ) -> anyhow::Result<Client> {
        let tls = tls.then(|| self.tls.clone());
        let port = self.port_for(transport);
        let mut c = Client::login_over(transport, port, user, resource, &self.keys, tls).await?;
        if self.sm {
            enable_stream_management(&mut c).await?;
        }
        Ok(c)
    }

    fn pids(&self) -> Vec<u32> {
        server_pids(&self.server.dir)
    }

    /// The port a client of `transport` connects to.
    fn port_for(&self, transport: Transport) -> u16 {
        match transport {
            Transport::Tcp => self.port,
            Transport::Ws | Transport::Bosh => self.web_port,
        }
    }

    async fn logins(
        &self,
        count: usize,
        concurrency: usize,
        tls: bool,
        warm: bool,
    ) -> anyhow::Result<()> {
        let pids = self.pids();
        let before: Vec<u64> = pids.iter().map(|p| cpu_micros(&[*p])).collect();
        let cpu_before = cpu_micros(&pids);
        let start = Instant::now();
        let mut times = self.login_pass(count, concurrency, tls).await?;
        let elapsed = start.elapsed();
        let cpu = cpu_micros(&self.pids()) - cpu_before;
        println!(
            "logins ({}{}): {count} SCRAM-SHA-1 logins, {concurrency} at a time: {:.0} logins/s, login time p50 {:.1} ms p99 {:.1} ms, server CPU {:.0} µs/login",
            if tls { "STARTTLS" } else { "plaintext" },
            if warm { ", accounts used before" } else { "" },
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

    /// `count` logins (user `i % 1000` for the i-th), `concurrency` at a time, each
    /// closed once done; returns the login times.
    async fn login_pass(
        &self,
        count: usize,
        concurrency: usize,
        tls: bool,
    ) -> anyhow::Result<Vec<Duration>> {
        let next = Arc::new(AtomicU64::new(0));
        let times = Arc::new(Mutex::new(Vec::with_capacity(count)));
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
        let times = times.lock().unwrap().clone();
        Ok(times)
    }

    async fn messages(
        &self,
        clients: usize,
        inflight: u64,
        seconds: u64,
        transport: Transport,
        profile: bool,
        tls: Option<TlsWay>,
    ) -> anyhow::Result<()> {
        self.message_load(
            clients,
            inflight,
            false,
            seconds,
            transport,
            profile,
            &Detail {
                tls,
                ..Detail::default()
            },
        )
        .await
    }

    /// `messages` with one pair of clients, one message in flight each (or, `one_way`,
    /// only the first sends), with context switches per process and optionally system
    /// call counts and profiles.
    async fn pair(
        &self,
        seconds: u64,
        one_way: bool,
        syscalls: bool,
        profile: &[String],
        tls: Option<TlsWay>,
    ) -> anyhow::Result<()> {
        let detail = Detail {
            switches: true,
            syscalls,
            profile: profile.to_vec(),
            tls,
        };
        self.message_load(2, 1, one_way, seconds, Transport::Tcp, false, &detail)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn message_load(
        &self,
        clients: usize,
        inflight: u64,
        one_way: bool,
        seconds: u64,
        transport: Transport,
        profile: bool,
        detail: &Detail,
    ) -> anyhow::Result<()> {
        if transport == Transport::Bosh {
            bail!("messages: --transport tcp or ws");
        }
        if detail.tls.is_some() && transport != Transport::Tcp {
            bail!("messages: --tls is for --transport tcp");
        }
        let clients = clients & !1;
        let mut logged = vec![];
        for i in 0..clients {
            let mut c = match detail.tls {
                Some(TlsWay::Direct) => {
                    let mut c = Client::login_direct_tls(
                        self.direct_port,
                        &format!("user{i}"),
                        "m",
                        &self.keys,
                        self.tls.clone(),
                    )
                    .await?;
                    if self.sm {
                        enable_stream_management(&mut c).await?;
                    }
                    c
                }
                way => {
                    self.client(&format!("user{i}"), "m", way.is_some(), transport)
                        .await?
                }
            };
            if self.carbons {
                c.send(b"<iq type='set' id='carbons'><enable xmlns='urn:xmpp:carbons:2'/></iq>")
                    .await?;
            }
            c.send(b"<presence/>").await?;
            logged.push(c);
        }
        // Let initial presence processing settle before measuring.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let profiler = if profile {
            Profiler::record(
                &self.pids(),
                "c2s",
                &format!("perf-messages-{transport:?}.data").to_lowercase(),
                false,
            )
        } else {
            Profiler(None)
        };
        let acked: Arc<Vec<AtomicU64>> =
            Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
        let wake: Arc<Vec<Notify>> = Arc::new((0..clients).map(|_| Notify::new()).collect());
        let running = Arc::new(AtomicBool::new(true));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let pids = self.pids();
        let tracers = detail.start(&pids);
        let epoch = Instant::now();
        let before: Vec<u64> = pids.iter().map(|p| cpu_micros(&[*p])).collect();
        let switches_before: Vec<u64> = pids.iter().map(|p| context_switches(&[*p])).collect();
        let cpu_before = cpu_micros(&pids);
        let mut tasks = vec![];
        for (i, client) in logged.into_iter().enumerate() {
            let inflight = if one_way && i % 2 == 1 { 0 } else { inflight };
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
        let switches: Vec<u64> = pids
            .iter()
            .zip(&switches_before)
            .map(|(p, b)| context_switches(&[*p]) - b)
            .collect();
        let counts = tracers.stop();
        profiler.stop();
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
            "messages over {}{}{suffix}{}: {clients} clients in pairs, {inflight} in flight each{}, {seconds} s: {delivered} of {sent} delivered, {:.0} messages/s, latency p50 {:.2} ms p99 {:.2} ms, server CPU {:.1} µs/message",
            transport.name(),
            match detail.tls {
                Some(TlsWay::StartTls) => " with STARTTLS",
                Some(TlsWay::Direct) => " with direct TLS",
                None => "",
            },
            if self.unix { ", component links over a Unix socket" } else { "" },
            if one_way { " (one way: only the first of each pair sends)" } else { "" },
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
        if detail.switches {
            let sw = |pid: u32| {
                let i = pids.iter().position(|p| *p == pid).expect("known pid");
                switches[i] as f64 / delivered.max(1) as f64
            };
            println!(
                "  context switches per message by process: {}",
                per_process(&pids, sw, "")
            );
            println!(
                "  threads by process: {}",
                per_process(&pids, |p| threads(p) as f64, "")
            );
        }
        for (name, events) in counts {
            println!(
                "  {name} per message: {}",
                events
                    .iter()
                    .map(|(e, n)| format!("{e} {:.2}", *n as f64 / delivered.max(1) as f64))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }

    async fn idle(
        &mut self,
        connections: usize,
        tls: Option<TlsWay>,
        transport: Transport,
        spread: Spread,
    ) -> anyhow::Result<()> {
        if tls.is_some() && transport != Transport::Tcp {
            bail!("idle: --tls is for --transport tcp");
        }
        if spread.processes > 1 && transport != Transport::Tcp {
            bail!("idle: --processes is for --transport tcp");
        }
        if spread.processes > 1 && tls == Some(TlsWay::Direct) {
            bail!("idle: --tls direct is for one client process");
        }
        for k in 2..=spread.c2s_instances {
            let name = format!("c2s-{k}");
            self.server.spawn(
                &name,
                "c2s",
                &["-c", "c2s.xml", "--instance", &k.to_string()],
            )?;
            self.server.wait_connected(&name, 0).await?;
        }
        let pids = self.pids();
        let memory = Memory::now(pids.clone());
        let started = Instant::now();
        let mut held = if spread.processes > 1 {
            Held::Elsewhere(
                self.hold_elsewhere(connections, tls.is_some(), spread.processes)
                    .await?,
            )
        } else {
            let here = self
                .log_in_many(connections, "idle", self.sm, true, transport, tls)
                .await?;
            Held::Here(here)
        };
        let login_time = started.elapsed();
        // Let the server settle (initial presence, caches) before reading memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        wait_idle(&pids).await;
        let (before, after, by_process) = memory.growth(connections);
        println!(
            "idle ({}{}): {connections} authenticated connections with presence{}: server RSS {before} KiB -> {after} KiB, {:.1} KiB per connection (logged in in {:.1} s)",
            match (transport, tls) {
                (Transport::Tcp, Some(TlsWay::StartTls)) => "STARTTLS",
                (Transport::Tcp, Some(TlsWay::Direct)) => "direct TLS",
                (Transport::Tcp, None) => "plaintext",
                (t, _) => t.name(),
            },
            if self.sm { ", stream management" } else { "" },
            if spread.contacts > 0 {
                format!(", {} contacts each", spread.contacts)
            } else {
                String::new()
            },
            (after.saturating_sub(before)) as f64 / connections as f64,
            login_time.as_secs_f64()
        );
        println!("  KiB per connection by process: {by_process}");
        if spread.contacts > 0 {
            // Every client changes its presence once: each change goes to the user's
            // contacts online (all of them are).
            let each: Vec<u64> = pids.iter().map(|p| cpu_micros(&[*p])).collect();
            let total = cpu_micros(&pids);
            let sent = held.presence_round().await?;
            wait_idle(&pids).await;
            let n = sent.max(1) as f64;
            let at = |pid: u32| {
                let i = pids.iter().position(|p| *p == pid).expect("known pid");
                (cpu_micros(&[pid]) - each[i]) as f64 / n
            };
            println!(
                "  presence changes: {sent}, each to {} contacts online: server CPU {:.1} µs per change ({})",
                spread.contacts,
                (cpu_micros(&pids) - total) as f64 / n,
                per_process(&pids, at, "")
            );
        }
        drop(held);
        Ok(())
    }

    /// Starts `processes` client processes (`loadgen hold`) sharing users 0..`connections`
    /// and waits until each has logged its share in.
    async fn hold_elsewhere(
        &self,
        connections: usize,
        tls: bool,
        processes: usize,
    ) -> anyhow::Result<Vec<Holder>> {
        let exe = std::env::current_exe()?;
        let mut holders = vec![];
        for k in 0..processes {
            let (from, to) = (
                k * connections / processes,
                (k + 1) * connections / processes,
            );
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("hold")
                .args(["--port", &self.port.to_string()])
                .args(["--from", &from.to_string(), "--to", &to.to_string()])
                .args(["--source", &format!("127.0.1.{}", k + 1)])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true);
            if tls {
                cmd.arg("--cert")
                    .arg(self.server.path("certs/localhost.crt"));
            }
            let mut child = cmd.spawn()?;
            let stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
            holders.push(Holder {
                _child: child,
                stdin,
                lines,
            });
        }
        for h in &mut holders {
            h.answer("ready").await?;
        }
        Ok(holders)
    }

    /// Logs in `sessions` clients with resumable stream management and presence, drops
    /// their connections (no stream close: the sessions hibernate at sm), and reports
    /// server memory per hibernating session.
    async fn hibernated(&self, sessions: usize) -> anyhow::Result<()> {
        let memory = Memory::now(self.pids());
        // Each batch's connections drop without a stream close once logged in (as the
        // logins go on, so that c2s reuses their memory rather than growing to hold
        // them all at once: what stays is the hibernating sessions' state).
        self.log_in_many(sessions, "away", true, false, Transport::Tcp, None)
            .await?;
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
        transport: Transport,
        tls: Option<TlsWay>,
    ) -> anyhow::Result<Vec<Client>> {
        log_in_batches(0..count, keep, |i| {
            let (port, keys) = (self.port_for(transport), self.keys.clone());
            let (direct_port, config) = (self.direct_port, self.tls.clone());
            async move {
                let user = format!("user{i}");
                let mut c = match tls {
                    Some(TlsWay::Direct) => {
                        Client::login_direct_tls(direct_port, &user, resource, &keys, config)
                            .await?
                    }
                    way => {
                        let config = way.map(|_| config);
                        Client::login_over(transport, port, &user, resource, &keys, config).await?
                    }
                };
                if sm {
                    enable_stream_management(&mut c).await?;
                }
                c.send(b"<presence/>").await?;
                Ok(c)
            }
        })
        .await
    }
}

/// Logs `users` in (`login(i)` for user i), 100 at a time; returns the clients when
/// `keep`, else drops each batch's connections once it is logged in.
async fn log_in_batches<F>(
    users: std::ops::Range<usize>,
    keep: bool,
    mut login: impl FnMut(usize) -> F,
) -> anyhow::Result<Vec<Client>>
where
    F: std::future::Future<Output = anyhow::Result<Client>> + Send + 'static,
{
    let mut clients = Vec::with_capacity(if keep { users.len() } else { 0 });
    let batch = 100;
    for start in users.clone().step_by(batch) {
        let mut logins = tokio::task::JoinSet::new();
        for i in start..(start + batch).min(users.end) {
            logins.spawn(login(i));
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

/// What `loadgen pep` runs.
struct PepPlan {
    users: usize,
    contacts: usize,
    vers: usize,
    concurrency: usize,
    relogin: bool,
    in_order: bool,
    profile: Option<String>,
}

/// The clients of `loadgen pep` while they are connected: each one's command channel
/// and task.
struct PepClients {
    cmds: Vec<mpsc::UnboundedSender<Cmd>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Server CPU, client counters and time at the start of a phase.
struct Mark {
    pids: Vec<u32>,
    each: Vec<u64>,
    total: u64,
    counted: Snapshot,
    at: Instant,
}

impl Mark {
    fn now(pids: &[u32], counters: &Counters) -> Mark {
        Mark {
            pids: pids.to_vec(),
            each: pids.iter().map(|p| cpu_micros(&[*p])).collect(),
            total: cpu_micros(pids),
            counted: counters.snapshot(),
            at: Instant::now(),
        }
    }

    /// Server CPU (µs) since the mark divided by `per`, in all and by process.
    fn cpu_per(&self, per: u64) -> (f64, String) {
        let per = per.max(1) as f64;
        let total = (cpu_micros(&self.pids) - self.total) as f64 / per;
        let at = |pid: u32| {
            let i = self.pids.iter().position(|p| *p == pid).expect("known pid");
            (cpu_micros(&[pid]) - self.each[i]) as f64 / per
        };
        (total, per_process(&self.pids, at, ""))
    }

    /// What the clients counted since the mark.
    fn counted(&self, counters: &Counters) -> Snapshot {
        counters.snapshot().since(&self.counted)
    }
}

/// How a phase ended: when what was expected had arrived (or the last stanza did).
struct Settled {
    complete: bool,
    wall: Duration,
}

/// Waits until `complete` says every expected stanza arrived and no stanza came for a
/// second after that (or none came for 15 s: something was lost), then until the
/// server is idle, so the CPU read after it holds all the phase's work.
async fn settle(
    counters: &Counters,
    pids: &[u32],
    since: Instant,
    complete: impl Fn(&Counters) -> bool,
) -> Settled {
    let mut last = counters.get(key::STANZAS);
    let mut last_change = Instant::now();
    let mut last_at = since.elapsed();
    let mut done_at = None;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = counters.get(key::STANZAS);
        if now != last {
            last = now;
            last_change = Instant::now();
            last_at = since.elapsed();
        }
        if done_at.is_none() && complete(counters) {
            done_at = Some(since.elapsed());
        }
        let quiet = last_change.elapsed();
        if (done_at.is_some() && quiet >= Duration::from_secs(1))
            || quiet >= Duration::from_secs(15)
        {
            break;
        }
    }
    wait_idle(pids).await;
    Settled {
        complete: done_at.is_some(),
        wall: done_at.unwrap_or(last_at),
    }
}

/// Waits (at most 60 s) until the server used under 1% of a core over 500 ms.
async fn wait_idle(pids: &[u32]) {
    let start = Instant::now();
    let mut cpu = cpu_micros(pids);
    while start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_micros(pids);
        if now - cpu < 5_000 {
            return;
        }
        cpu = now;
    }
}

/// `perf record` of one process while it lives; stopped (SIGINT) by [`Profiler::stop`].
struct Profiler(Option<std::process::Child>);

/// What `pair` adds to a message load's report.
#[derive(Default)]
struct Detail {
    /// Clients use TLS.
    tls: Option<TlsWay>,
    /// Context switches per message per process (from /proc).
    switches: bool,
    /// System calls per message per process (`perf stat` on tracepoints).
    syscalls: bool,
    /// Processes to record with `perf record -g`.
    profile: Vec<String>,
}

/// How message clients use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TlsWay {
    /// STARTTLS on the client port before SASL.
    #[value(name = "starttls")]
    StartTls,
    /// TLS from the first byte on c2s's direct TLS port (XEP-0368).
    Direct,
}

/// The tracepoints `pair --syscalls` counts in each server process.
const SYSCALL_EVENTS: &[(&str, &str)] = &[
    ("raw_syscalls:sys_enter", "syscalls"),
    ("syscalls:sys_enter_futex", "futex"),
    ("syscalls:sys_enter_epoll_wait", "epoll_wait"),
    ("syscalls:sys_enter_read", "read"),
    ("syscalls:sys_enter_recvfrom", "recvfrom"),
    ("syscalls:sys_enter_write", "write"),
    ("syscalls:sys_enter_writev", "writev"),
    ("syscalls:sys_enter_sendto", "sendto"),
    ("syscalls:sys_enter_sched_yield", "sched_yield"),
    ("syscalls:sys_enter_pwrite64", "pwrite64"),
    ("syscalls:sys_enter_syncfs", "syncfs"),
    ("syscalls:sys_enter_fsync", "fsync"),
    ("syscalls:sys_enter_openat", "openat"),
    ("syscalls:sys_enter_mkdir", "mkdir"),
    ("syscalls:sys_enter_statx", "statx"),
    ("sched:sched_switch", "switches"),
    ("sched:sched_wakeup", "wakeups made"),
];

/// `perf stat` and `perf record` children started for a measurement.
struct Tracers {
    stats: Vec<(String, String, std::process::Child)>,
    records: Vec<std::process::Child>,
}

impl Detail {
    fn start(&self, pids: &[u32]) -> Tracers {
        let mut t = Tracers {
            stats: vec![],
            records: vec![],
        };
        let name_of = |p: u32| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        for &pid in pids {
            let name = name_of(pid);
            if self.syscalls {
                let out = std::env::temp_dir().join(format!("loadgen-stat-{pid}.csv"));
                let events: Vec<&str> = SYSCALL_EVENTS.iter().map(|e| e.0).collect();
                match std::process::Command::new("perf")
                    .args(["stat", "-x,", "-e", &events.join(","), "-o"])
                    .arg(&out)
                    .args(["-p", &pid.to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                {
                    Ok(c) => t.stats.push((name.clone(), out.display().to_string(), c)),
                    Err(e) => eprintln!("perf stat did not start: {e}"),
                }
            }
            if self.profile.contains(&name) {
                let out = format!("perf-pair-{name}.data");
                match std::process::Command::new("perf")
                    .args([
                        "record",
                        "-F",
                        "999",
                        "-g",
                        "-o",
                        &out,
                        "-p",
                        &pid.to_string(),
                    ])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                {
                    Ok(c) => {
                        eprintln!("profiling {name} (pid {pid}) into {out}");
                        t.records.push(c)
                    }
                    Err(e) => eprintln!("perf record did not start: {e}"),
                }
            }
        }
        if !t.stats.is_empty() || !t.records.is_empty() {
            // Let perf attach before the measurement starts.
            std::thread::sleep(Duration::from_millis(700));
        }
        t
    }
}

impl Tracers {
    /// Stops every perf (SIGINT, so it writes its output) and returns, per process
    /// name, each counted event.
    fn stop(self) -> Vec<(String, Vec<(&'static str, u64)>)> {
        let mut children: Vec<&mut std::process::Child> = vec![];
        let mut stats = self.stats;
        let mut records = self.records;
        children.extend(stats.iter_mut().map(|s| &mut s.2));
        children.extend(records.iter_mut());
        for c in &children {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
        }
        for c in children {
            let _ = c.wait();
        }
        let mut out = vec![];
        for (name, file, _) in stats {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let _ = std::fs::remove_file(&file);
            let mut events = vec![];
            for (event, label) in SYSCALL_EVENTS {
                let n = text
                    .lines()
                    .find(|l| l.split(',').nth(2) == Some(event))
                    .and_then(|l| l.split(',').next()?.parse::<u64>().ok())
                    .unwrap_or(0);
                events.push((*label, n));
            }
            out.push((name, events));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Profiler {
    /// Starts recording sm when `phase` is the one to profile.
    fn start(plan: &PepPlan, phase: &str, pids: &[u32]) -> Profiler {
        if plan.profile.as_deref() != Some(phase) {
            return Profiler(None);
        }
        let Some(sm) = pids.iter().copied().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sm")
        }) else {
            eprintln!("no sm process to profile");
            return Profiler(None);
        };
        let out = format!("perf-{phase}.data");
        let child = std::process::Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "499", "--call-graph"])
            .args(["dwarf,16384", "-o", &out, "-p", &sm.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(c) => {
                eprintln!("profiling sm (pid {sm}) during {phase} into {out}");
                // Let perf attach before the phase starts.
                std::thread::sleep(Duration::from_millis(500));
                Profiler(Some(c))
            }
            Err(e) => {
                eprintln!("perf did not start: {e}");
                Profiler(None)
            }
        }
    }

    /// Starts `perf record` of the server process named `name` into `out` (`dwarf`:
    /// DWARF call graphs, else frame pointers' `-g`).
    fn record(pids: &[u32], name: &str, out: &str, dwarf: bool) -> Profiler {
        let Some(pid) = pids.iter().copied().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name)
        }) else {
            eprintln!("no {name} process to profile");
            return Profiler(None);
        };
        let mut cmd = std::process::Command::new("perf");
        cmd.args(["record", "-o", out, "-p", &pid.to_string()]);
        if dwarf {
            cmd.args(["-F", "499", "--call-graph", "dwarf,16384"]);
        } else {
            cmd.arg("-g");
        }
        match cmd.stdout(std::process::Stdio::null()).spawn() {
            Ok(c) => {
                eprintln!("profiling {name} (pid {pid}) into {out}");
                std::thread::sleep(Duration::from_millis(500));
                Profiler(Some(c))
            }
            Err(e) => {
                eprintln!("perf did not start: {e}");
                Profiler(None)
            }
        }
    }

    fn stop(self) {
        if let Some(mut c) = self.0 {
            // SAFETY: kill(2) on the pid of a child this process started and has not
            // waited for yet.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGINT);
            }
            let _ = c.wait();
        }
    }
}

impl Bench {
    async fn pep(&self, plan: &PepPlan) -> anyhow::Result<()> {
        if self.sm {
            bail!("`pep` clients do not answer stream management requests: run it without --sm");
        }
        let (users, contacts) = (plan.users as u64, plan.contacts as u64);
        let softwares: Vec<Arc<Software>> = caps::softwares(plan.vers)
            .into_iter()
            .map(Arc::new)
            .collect();
        println!(
            "pep: {users} users, {contacts} mutual contacts each, {} client programs (ver {}), each wanting +notify of {}",
            softwares.len(),
            softwares
                .iter()
                .map(|s| s.ver.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            caps::NOTIFY_NODES.join(", ")
        );
        let counters = Arc::new(Counters::default());
        let pids = self.pids();
        // Metadata and device list of each user: to its own session and to each contact.
        let expected_events = users * (contacts + 1) * 2;
        let expected_presence = users * contacts;

        // 1. The storm: every client logs in with caps; contacts' presence everywhere.
        let memory = Memory::now(pids.clone());
        let profiler = Profiler::start(plan, "storm", &pids);
        let mark = Mark::now(&pids, &counters);
        let (clients, mut times) = self.pep_logins(plan, 1, &softwares, &counters).await?;
        let logged_in = mark.at.elapsed();
        let settled = settle(&counters, &pids, mark.at, |c| {
            c.get(key::PRESENCE_AVAILABLE) - mark.counted.get(key::PRESENCE_AVAILABLE)
                >= expected_presence
        })
        .await;
        profiler.stop();
        let (cpu, by) = mark.cpu_per(users);
        let got = mark.counted(&counters);
        println!(
            "pep storm: {users} logins with caps, {} at a time{}: logged in after {:.2} s (login p50 {:.1} ms, p99 {:.1} ms), {} of {expected_presence} contact presences after {:.2} s{}; server CPU {cpu:.0} µs/login",
            plan.concurrency,
            if plan.in_order { ", by number" } else { ", random order" },
            logged_in.as_secs_f64(),
            percentile(&mut times, 0.50).as_secs_f64() * 1e3,
            percentile(&mut times, 0.99).as_secs_f64() * 1e3,
            got.get(key::PRESENCE_AVAILABLE),
            settled.wall.as_secs_f64(),
            if settled.complete { "" } else { " (INCOMPLETE)" },
        );
        println!("  CPU µs per login by process: {by}");
        print_disco(&got, &softwares);
        print_counts(&got);
        let (before, after, by) = memory.growth(plan.users);
        println!(
            "  memory: server RSS {before} KiB -> {after} KiB, {:.1} KiB per session ({by})",
            after.saturating_sub(before) as f64 / users as f64
        );

        // 2. Each user publishes its avatar (data, metadata) and device list.
        let memory = Memory::now(pids.clone());
        let profiler = Profiler::start(plan, "publish", &pids);
        let mark = Mark::now(&pids, &counters);
        for c in &clients.cmds {
            let _ = c.send(Cmd::Publish);
        }
        let settled = settle(&counters, &pids, mark.at, |c| {
            c.get(key::EVENTS) - mark.counted.get(key::EVENTS) >= expected_events
                && c.get(key::PUBLISHED) + c.get(key::PUBLISH_ERRORS)
                    - mark.counted.get(key::PUBLISHED)
                    - mark.counted.get(key::PUBLISH_ERRORS)
                    >= users * pep::PUBLICATIONS
        })
        .await;
        profiler.stop();
        let got = mark.counted(&counters);
        let events = got.get(key::EVENTS);
        let (cpu, by) = mark.cpu_per(events);
        println!(
            "pep publish: {} publications ({} per user: avatar data, avatar metadata, device list), {} answered, {} refused; {events} of {expected_events} notifications after {:.2} s{}; server CPU {cpu:.1} µs/notification, {:.0} µs/publication",
            users * pep::PUBLICATIONS,
            pep::PUBLICATIONS,
            got.get(key::PUBLISHED),
            got.get(key::PUBLISH_ERRORS),
            settled.wall.as_secs_f64(),
            if settled.complete { "" } else { " (INCOMPLETE)" },
            mark.cpu_per(users * pep::PUBLICATIONS).0,
        );
        println!("  CPU µs per notification by process: {by}");
        if let Some(e) = counters.first_error.lock().expect("first error").take() {
            println!("  first refusal: {e}");
        }
        print_disco(&got, &softwares);
        print_counts(&got);
        let (before, after, by) = memory.growth(plan.users);
        println!(
            "  memory: server RSS {before} KiB -> {after} KiB, {:.1} KiB more per user ({by})",
            after.saturating_sub(before) as f64 / users as f64
        );

        // 3. Every client logs out (unavailable presence to every online contact).
        let profiler = Profiler::start(plan, "logout", &pids);
        let mark = Mark::now(&pids, &counters);
        for c in &clients.cmds {
            let _ = c.send(Cmd::Close);
        }
        for t in clients.tasks {
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(30), t).await {
                eprintln!("a client ended with: {e}");
            }
        }
        let closed = mark.at.elapsed();
        wait_idle(&pids).await;
        profiler.stop();
        let (cpu, by) = mark.cpu_per(users);
        let got = mark.counted(&counters);
        println!(
            "pep logout: {users} clients closed their streams in {:.2} s, {} unavailable presences read before; server CPU {cpu:.0} µs/logout ({by})",
            closed.as_secs_f64(),
            got.get(key::PRESENCE_UNAVAILABLE),
        );
        // No session is left: what sm still holds is caches and what its allocator
        // kept of the bursts (glibc does not give freed memory back at once).
        println!(
            "  memory with no session left: server RSS {} KiB ({})",
            rss_kib(&pids),
            per_process(&pids, |p| rss_kib(&[p]) as f64, " KiB")
        );
        if !plan.relogin {
            return Ok(());
        }

        // 4. The storm again, now with items: each client gets its own last items and
        // its contacts' (and caps are known: no query should reach a client).
        let profiler = Profiler::start(plan, "relogin", &pids);
        let mark = Mark::now(&pids, &counters);
        let (clients, mut times) = self.pep_logins(plan, 2, &softwares, &counters).await?;
        let logged_in = mark.at.elapsed();
        let settled = settle(&counters, &pids, mark.at, |c| {
            c.get(key::PRESENCE_AVAILABLE) - mark.counted.get(key::PRESENCE_AVAILABLE)
                >= expected_presence
                && c.get(key::EVENTS) - mark.counted.get(key::EVENTS) >= expected_events
        })
        .await;
        profiler.stop();
        let got = mark.counted(&counters);
        let (cpu, by) = mark.cpu_per(users);
        println!(
            "pep relogin: {users} logins with caps: logged in after {:.2} s (login p50 {:.1} ms, p99 {:.1} ms), {} of {expected_presence} contact presences and {} of {expected_events} last items after {:.2} s{}; server CPU {cpu:.0} µs/login, {:.1} µs per message delivered (presence and items)",
            logged_in.as_secs_f64(),
            percentile(&mut times, 0.50).as_secs_f64() * 1e3,
            percentile(&mut times, 0.99).as_secs_f64() * 1e3,
            got.get(key::PRESENCE_AVAILABLE),
            got.get(key::EVENTS),
            settled.wall.as_secs_f64(),
            if settled.complete { "" } else { " (INCOMPLETE)" },
            mark.cpu_per(got.get(key::STANZAS)).0,
        );
        println!("  CPU µs per login by process: {by}");
        print_disco(&got, &softwares);
        print_counts(&got);
        println!(
            "  memory: server RSS {} KiB ({})",
            rss_kib(&pids),
            per_process(&pids, |p| rss_kib(&[p]) as f64, " KiB")
        );
        for c in &clients.cmds {
            let _ = c.send(Cmd::Close);
        }
        for t in clients.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        wait_idle(&pids).await;
        println!(
            "  memory after they logged out again: server RSS {} KiB ({})",
            rss_kib(&pids),
            per_process(&pids, |p| rss_kib(&[p]) as f64, " KiB")
        );
        Ok(())
    }

    /// Logs in every user, `plan.concurrency` logins at a time, in a random order
    /// (shuffled with `seed`) or by number; each client sends its presence with the
    /// caps of `softwares[i % len]` (user i) and is then run by [`pep::run`]. Returns
    /// the clients (by user number) and each login's time (connect to bind).
    async fn pep_logins(
        &self,
        plan: &PepPlan,
        seed: u64,
        softwares: &[Arc<Software>],
        counters: &Arc<Counters>,
    ) -> anyhow::Result<(PepClients, Vec<Duration>)> {
        let users = plan.users;
        let mut order: Vec<usize> = (0..users).collect();
        if !plan.in_order {
            order.shuffle(&mut StdRng::seed_from_u64(seed));
        }
        let order = Arc::new(order);
        let next = Arc::new(AtomicU64::new(0));
        let done = Arc::new(Mutex::new(Vec::with_capacity(users)));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..plan.concurrency {
            let (next, done, counters) = (next.clone(), done.clone(), counters.clone());
            let (port, keys, softwares) = (self.port, self.keys.clone(), softwares.to_vec());
            let order = order.clone();
            workers.spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if k >= users {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let i = order[k];
                    let t = Instant::now();
                    let mut c =
                        Client::login(port, &format!("user{i}"), "pep", &keys, None).await?;
                    let took = t.elapsed();
                    let software = softwares[i % softwares.len()].clone();
                    c.send(pep::presence(&software).as_bytes()).await?;
                    let (tx, rx) = mpsc::unbounded_channel();
                    let task = tokio::spawn(pep::run(c, i, software, counters.clone(), rx));
                    done.lock().unwrap().push((i, tx, task, took));
                }
            });
        }
        while let Some(w) = workers.join_next().await {
            w??;
        }
        let mut done = std::mem::take(&mut *done.lock().unwrap());
        done.sort_by_key(|d| d.0);
        let mut clients = PepClients {
            cmds: vec![],
            tasks: vec![],
        };
        let mut times = vec![];
        for (_, tx, task, took) in done {
            clients.cmds.push(tx);
            clients.tasks.push(task);
            times.push(took);
        }
        Ok((clients, times))
    }
}

impl Bench {
    async fn muc(&self, scenario: &Scenario) -> anyhow::Result<()> {
        if self.sm || self.carbons {
            bail!("`muc` clients neither do stream management nor carbons");
        }
        let pids = self.pids();
        let target = muc::Target {
            name: "jabberd-rs".to_owned(),
            port: self.port,
            pids: pids.clone(),
            service: "conference.localhost".to_owned(),
        };
        let profiled: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| matches!(c.trim(), "muc" | "sm" | "router" | "c2s"))
            })
            .collect();
        muc::run(
            &target,
            &self.keys,
            &muc_plan(scenario, "jabberd-rs", profiled),
        )
        .await
    }
}

/// The `muc` scenario against Debian's Prosody and its own MUC.
async fn muc_prosody(scenario: &Scenario) -> anyhow::Result<()> {
    let Scenario::Muc { occupants, .. } = scenario else {
        unreachable!()
    };
    let keys = ClientKeys::new();
    let prosody = muc::Prosody::start(occupants + 1, &keys).await?;
    eprintln!(
        "prosody up in {} (pid {})",
        prosody.dir.display(),
        prosody.pid()
    );
    let target = muc::Target {
        name: "prosody".to_owned(),
        port: prosody.port,
        pids: vec![prosody.pid()],
        service: "conference.localhost".to_owned(),
    };
    let result = muc::run(
        &target,
        &keys,
        &muc_plan(scenario, "prosody", vec![prosody.pid()]),
    )
    .await;
    if result.is_err() {
        eprintln!(
            "{}",
            std::fs::read_to_string(prosody.dir.join("prosody.log")).unwrap_or_default()
        );
    }
    result
}

fn muc_plan(scenario: &Scenario, server: &str, profiled: Vec<u32>) -> muc::Plan {
    let Scenario::Muc {
        occupants,
        joins,
        senders,
        inflight,
        seconds,
        concurrency,
        profile,
        ..
    } = scenario
    else {
        unreachable!()
    };
    muc::Plan {
        occupants: *occupants,
        joins: (*joins).max(1),
        senders: *senders,
        inflight: *inflight,
        seconds: *seconds,
        concurrency: *concurrency,
        profile: profile.then(|| (format!("perf-muc-{server}.data"), profiled)),
    }
}

/// The disco#info queries that reached clients in a phase, by `ver`.
fn print_disco(got: &Snapshot, softwares: &[Arc<Software>]) {
    let by_ver: Vec<String> = softwares
        .iter()
        .map(|s| {
            let n = got.get(&format!("{} {}", key::DISCO, s.ver));
            format!("{} {n}", s.ver)
        })
        .collect();
    let unknown: u64 = got
        .with_prefix(key::DISCO)
        .filter(|(ver, _)| !softwares.iter().any(|s| s.ver == *ver))
        .map(|(_, n)| n)
        .sum();
    println!(
        "  disco#info queries that reached clients: {} ({} distinct vers: {}{})",
        got.get(key::DISCO),
        softwares.len(),
        by_ver.join(", "),
        if unknown > 0 {
            format!("; for other nodes: {unknown}")
        } else {
            String::new()
        }
    );
}

/// Everything the clients read in a phase, by kind.
fn print_counts(got: &Snapshot) {
    let mut parts = vec![];
    for (k, v) in &got.0 {
        if k.starts_with(key::DISCO) {
            continue;
        }
        parts.push(format!("{k} {v}"));
    }
    println!("  received: {}", parts.join(", "));
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

/// How `loadgen idle` spreads its connections (see its options).
struct Spread {
    c2s_instances: u32,
    processes: usize,
    contacts: usize,
}

/// The idle clients: in this process, or in client processes.
enum Held {
    Here(Vec<Client>),
    Elsewhere(Vec<Holder>),
}

impl Held {
    /// Every client sends one presence change; how many were sent.
    async fn presence_round(&mut self) -> anyhow::Result<usize> {
        match self {
            Held::Here(clients) => {
                for c in clients.iter_mut() {
                    c.send(PRESENCE_CHANGE).await?;
                }
                Ok(clients.len())
            }
            Held::Elsewhere(holders) => {
                for h in holders.iter_mut() {
                    h.stdin.write_all(b"presence\n").await?;
                }
                let mut sent = 0;
                for h in holders.iter_mut() {
                    sent += h.answer("sent").await?;
                }
                Ok(sent)
            }
        }
    }
}

const PRESENCE_CHANGE: &[u8] = b"<presence><show>away</show></presence>";

/// A `loadgen hold` process: killed when dropped (its clients' connections close).
struct Holder {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Holder {
    /// Waits for the process's `WORD N` line; N.
    async fn answer(&mut self, word: &str) -> anyhow::Result<usize> {
        let line = self.lines.next_line().await?.unwrap_or_default();
        match line.strip_prefix(word).map(|n| n.trim().parse::<usize>()) {
            Some(Ok(n)) => Ok(n),
            _ => bail!("a client process answered {line:?}, not {word}"),
        }
    }
}

/// `loadgen hold`: see [`Scenario::Hold`].
async fn hold(
    port: u16,
    cert: Option<&std::path::Path>,
    users: std::ops::Range<usize>,
    source: std::net::Ipv4Addr,
) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let keys = ClientKeys::new();
    let tls = cert.map(client_tls).transpose()?;
    let mut clients = log_in_batches(users, true, |i| {
        let (keys, tls) = (keys.clone(), tls.clone());
        async move {
            let user = format!("user{i}");
            let mut c = Client::login_from(Some(source), port, &user, "idle", &keys, tls).await?;
            c.send(b"<presence/>").await?;
            Ok(c)
        }
    })
    .await?;
    println!("ready {}", clients.len());
    let mut input = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = input.next_line().await? {
        if line.trim() == "presence" {
            for c in clients.iter_mut() {
                c.send(PRESENCE_CHANGE).await?;
            }
            println!("sent {}", clients.len());
        }
    }
    Ok(())
}

/// XEP-0198 with resumption, as mobile clients enable it after binding.
async fn enable_stream_management(c: &mut Client) -> anyhow::Result<()> {
    c.send(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await?;
    c.expect("enabled").await?;
    Ok(())
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
