//! xdb-pg: the PostgreSQL storage component. Answers the same `xdb` requests as
//! xdb-file (get, set, delete, append, take, list and the archive operations) from a
//! PostgreSQL database. See `docs/protocol.md` and `docs/storage-pg.md`.

mod archive;
mod batch;
mod config;
mod db;
mod fragments;
mod lists;
mod owner;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use jrs_component::service::{exit_code, load_and_init, run_component, Bind, CommonArgs};
use jrs_component::{Outbox, PacketType};
use jrs_metrics::storage::SERVED;
use jrs_stream::{Stanza, StanzaErrorCondition};
use jrs_xdb::{Op, Refusal, Request};

use crate::config::PgStorageConfig;
use crate::db::{Conn, Tx};
use crate::owner::Owner;

jrs_component::server_allocator!();

/// The jabberd-rs PostgreSQL storage component.
#[derive(Parser, Debug)]
#[command(name = "xdb-pg", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

/// Longest a request may wait for the database before it is answered
/// `service-unavailable` (and the connection is dropped and made again).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Between attempts to reach the database at start.
const RETRY: Duration = Duration::from_secs(2);

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "xdb-pg")
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = load_and_init(&args.common, PgStorageConfig::load, |c| c.log.clone())?
    else {
        return Ok(());
    };
    let link = config.router.clone().for_instance(args.common.instance);
    std::sync::LazyLock::force(&SERVED);
    let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let binds: Vec<Bind> = config
        .hosts
        .iter()
        .flat_map(|h| {
            namespaces.iter().map(move |ns| Bind {
                route: PacketType::Xdb,
                host: h.clone(),
                shared: false,
                fanout: false,
                ns: ns.clone(),
            })
        })
        .collect();

    let runtime =
        jrs_component::runtime::build("xdb-pg", jrs_component::runtime::Shape::Multi(Some(2)))?;
    runtime.block_on(async move {
        // The schema first: bind only once requests can be served. Until then the
        // router holds them for its grace period.
        loop {
            match db::migrate(&config.postgres).await {
                Ok(()) => break,
                Err(e) => {
                    warn!("cannot prepare the database (retrying in {RETRY:?}): {e:#}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        // One connection per worker; each owner's requests always go to the same
        // worker, so they are applied in the order they were sent.
        let hosts = Arc::new(config.hosts.clone());
        let jobs: Vec<mpsc::UnboundedSender<Job>> = (0..config.connections)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(worker(config.postgres.clone(), hosts.clone(), rx));
                tx
            })
            .collect();
        info!(hosts = ?config.hosts, connections = config.connections, "xdb-pg starting");
        run_component(link, config.limits, binds, |mut reader, outbox| {
            let jobs = jobs.clone();
            async move {
                loop {
                    let stanza = reader.next().await?;
                    if stanza.name() != "xdb" {
                        if let Some(reply) = stanza.error_reply(
                            StanzaErrorCondition::ServiceUnavailable,
                            "xdb-pg only answers storage requests",
                        ) {
                            outbox.send(reply);
                        }
                        continue;
                    }
                    if matches!(stanza.kind(), Some("result" | "error")) {
                        debug!("ignoring an xdb answer sent to storage");
                        continue;
                    }
                    if batch::is_batch(&stanza) {
                        batch::split(stanza, &outbox, &jobs)?;
                        continue;
                    }
                    let worker = worker_for(stanza.to().unwrap_or(""), jobs.len());
                    jobs[worker]
                        .send(Job::Request(stanza, outbox.clone(), Instant::now()))
                        .map_err(|_| anyhow::anyhow!("a database worker stopped"))?;
                }
            }
        })
        .await
    })
}

/// What a worker does: a request of one owner, or its part of a batch.
pub enum Job {
    /// With when it arrived (for the metrics).
    Request(Stanza, Outbox, Instant),
    Part(batch::Part),
}

/// The worker of an owner: FNV-1a of the owner as written, case-folded.
pub fn worker_for(owner: &str, workers: usize) -> usize {
    let hash = owner.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b.to_ascii_lowercase() as u64).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % workers as u64) as usize
}

/// Serves its owners' requests one at a time on its own connection, made again when
/// it is lost.
async fn worker(
    pg: tokio_postgres::Config,
    hosts: Arc<Vec<String>>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let mut conn: Option<Conn> = None;
    while let Some(job) = jobs.recv().await {
        if conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            conn = None;
        }
        let mut down = None;
        if conn.is_none() {
            match with_timeout(async { db::connect(&pg).await.map_err(db::refusal) }).await {
                Ok(c) => {
                    info!("connected to the database");
                    conn = Some(c);
                }
                Err(r) => down = Some(r),
            }
        }
        let unavailable = match job {
            Job::Request(stanza, outbox, start) => {
                let result = match (&mut conn, &down) {
                    (Some(c), _) => with_timeout(serve(c, &hosts, &stanza)).await,
                    (None, Some(r)) => Err(r.clone()),
                    (None, None) => unreachable!("connected or refused"),
                };
                let unavailable = result
                    .as_ref()
                    .is_err_and(|r| r.condition == StanzaErrorCondition::ServiceUnavailable);
                let op = stanza.kind().unwrap_or("");
                SERVED.answered(op, result.is_ok(), start);
                outbox.send(answer(&stanza, result));
                unavailable
            }
            Job::Part(part) => match (&mut conn, &down) {
                (Some(c), _) => part.apply(Ok(c), &hosts).await,
                (None, Some(r)) => part.apply(Err(r), &hosts).await,
                (None, None) => unreachable!("connected or refused"),
            },
        };
        if unavailable {
            conn = None;
        }
    }
}

/// `fut`, or `service-unavailable` when the database takes longer than
/// [`REQUEST_TIMEOUT`] (its transaction is dropped: rolled back).
pub async fn with_timeout<T>(fut: impl Future<Output = Result<T, Refusal>>) -> Result<T, Refusal> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(db::unavailable_refusal(format!(
            "the database did not answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

fn answer(stanza: &Stanza, result: Result<(Request, Bytes), Refusal>) -> Bytes {
    match result {
        Ok((request, content)) => request.result(&content),
        Err(refusal) => jrs_xdb::refused(stanza, &refusal),
    }
}

/// Serves one request in one transaction, committed before the answer (durable
/// before it, but for `flush='later'`).
async fn serve(
    conn: &mut Conn,
    hosts: &[String],
    stanza: &Stanza,
) -> Result<(Request, Bytes), Refusal> {
    let request = Request::parse(stanza)?;
    let owner = Owner::parse(&request.owner)?;
    owner.check_served(hosts)?;
    let mut tx = conn.begin().await?;
    if request.flush == jrs_xdb::Flush::Later {
        tx.flush_later().await?;
    }
    let content = apply(&mut tx, &owner, &request).await?;
    tx.commit().await?;
    debug!(op = request.op.name(), owner = %request.owner, ns = %request.ns, "done");
    Ok((request, content))
}

async fn apply(tx: &mut Tx<'_>, owner: &Owner, request: &Request) -> Result<Bytes, Refusal> {
    let ns = request.ns.as_str();
    let empty = Bytes::new();
    Ok(match request.op {
        Op::Get => fragments::get(tx, owner, ns).await?,
        Op::Set => {
            fragments::set(tx, owner, ns, &request.content).await?;
            empty
        }
        Op::Delete => {
            fragments::delete(tx, owner, ns).await?;
            empty
        }
        Op::Append => {
            lists::append(tx, owner, ns, &request.content, request.max_items).await?;
            empty
        }
        Op::Take => lists::take(tx, owner, ns).await?,
        Op::List if ns == jrs_xdb::LIST_CONTENTS => fragments::contents(tx, owner).await?.to_xml(),
        Op::List => fragments::list_to_xml(&fragments::list(tx, &owner.host).await?),
        Op::ArchiveAppend => {
            archive::append(tx, owner, ns, &request.content, retention(request), now()).await?;
            empty
        }
        Op::ArchiveQuery => archive::query(tx, owner, ns, &request.content).await?,
        Op::ArchiveTrim => {
            archive::trim(tx, owner, ns, retention(request), now()).await?;
            empty
        }
        Op::ArchiveRetract => {
            archive::retract(tx, owner, ns, &request.content).await?;
            empty
        }
    })
}

pub fn retention(request: &Request) -> jrs_xdb::archive::Retention {
    jrs_xdb::archive::Retention {
        max_items: request.max_items.map(|n| n as u64),
        max_age: request.max_age,
    }
}

/// Microseconds since the Unix epoch (the unit of archive times).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
