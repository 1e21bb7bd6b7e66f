//! xdb-file: the storage component. Answers `xdb` requests (get, set, delete, append,
//! take, list, and the archive operations) from files under a spool directory. See `docs/protocol.md` and
//! `docs/storage.md`.

mod archive;
mod batch;
mod config;
mod spool;
mod sync;

use std::sync::mpsc;
use std::time::Instant;

use clap::Parser;
use tracing::{debug, info, warn};

use jrs_component::service::{exit_code, load_and_init, run_component, Bind, CommonArgs};
use jrs_component::{Outbox, PacketType};
use jrs_metrics::storage::SERVED;
use jrs_stream::Stanza;
use jrs_xdb::{Op, Refusal, Request};

use crate::archive::Archives;
use crate::config::StorageConfig;
use crate::spool::{Owner, Spool};

jrs_component::server_allocator!();

/// The jabberd-rs file storage component.
#[derive(Parser, Debug)]
#[command(name = "xdb-file", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "xdb-file")
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = load_and_init(&args.common, StorageConfig::load, |c| c.log.clone())? else {
        return Ok(());
    };
    std::sync::LazyLock::force(&SERVED);
    // Open archive files are cached: let the cache hold what the config asks.
    if let Some(limit) = jrs_component::service::raise_open_files_limit() {
        if (limit as usize) < config.archive_open_files + 64 {
            warn!(
                limit,
                open_files = config.archive_open_files,
                "the open files limit is below <archive open-files>: archive files will be reopened often"
            );
        }
    }
    let link = config.router.clone().for_instance(args.common.instance);
    // The hosts' default storage, or only their namespaces listed in the config.
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

    // File operations block, and a durable write waits for the disk. They run on
    // `workers` threads; each owner's requests always go to the same thread (by a hash of
    // the owner), so they are applied in the order they were sent, each thread has the
    // cache of its own owners, and the disk waits of different owners overlap.
    // Absolute, so logs and errors name the real place.
    let spool_dir = std::env::current_dir()?.join(&config.spool);
    let mut jobs = vec![];
    let syncer = std::sync::Arc::new(sync::Syncer::default());
    for n in 0..config.workers {
        let (tx, queue) = mpsc::channel::<Job>();
        let mut spool = Spool::new(
            spool_dir.clone(),
            config.cache_entries / config.workers + 1,
            syncer.clone(),
        );
        let open_files = (config.archive_open_files / config.workers).max(8);
        let segment_items = config.archive_segment_items;
        let hosts = config.hosts.clone();
        std::thread::Builder::new()
            .name(format!("spool-{n}"))
            .spawn(move || {
                // Open files are per thread (not `Send`): made here.
                let mut archives = Archives::new(ARCHIVES_PER_WORKER, open_files, segment_items);
                // Group commit: answer everything queued, make it durable at once, then
                // send the answers (none before its data is on disk).
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(_) => break,
                        }
                    }
                    let answers: Vec<_> = batch
                        .iter()
                        .map(|job| match job {
                            Job::Request(request, ..) => {
                                Some(answer(&mut spool, &mut archives, &hosts, request))
                            }
                            Job::Part(part) => {
                                part.apply(&mut spool, &mut archives, &hosts);
                                None
                            }
                        })
                        .collect();
                    let durable = spool.commit();
                    if durable.is_err() {
                        archives.clear();
                    }
                    for (job, reply) in batch.into_iter().zip(answers) {
                        match (job, &durable, reply) {
                            (Job::Request(request, outbox, start), Ok(()), Some((reply, ok))) => {
                                outbox.send(reply);
                                SERVED.answered(request.kind().unwrap_or(""), ok, start);
                            }
                            (Job::Request(request, outbox, start), Err(refusal), _) => {
                                SERVED.answered(request.kind().unwrap_or(""), false, start);
                                outbox.send(
                                    request
                                        .error_reply(refusal.condition, &refusal.text)
                                        .expect("requests are never errors or results"),
                                );
                            }
                            (Job::Part(part), durable, _) => part.done(durable.as_ref().err()),
                            (Job::Request(..), Ok(()), None) => unreachable!("requests answer"),
                        }
                    }
                }
            })?;
        jobs.push(tx);
    }
    info!(spool = %spool_dir.display(), hosts = ?config.hosts, "xdb-file starting");

    // One thread by default: without cross-thread wake-ups a lone message costs about
    // 40% less CPU, and 200 clients on two cores are no slower (docs/benchmarks.md, "Low
    // load"). JABBERD_RUNTIME(_PROGRAM)=multi:N changes it (crates/component/src/runtime.rs).
    let runtime =
        jrs_component::runtime::build("xdb-file", jrs_component::runtime::Shape::Current)?;
    runtime.block_on(run_component(
        link,
        config.limits,
        binds,
        |mut reader, outbox| {
            let jobs = jobs.clone();
            async move {
                loop {
                    let stanza = reader.next().await?;
                    if stanza.name() != "xdb" {
                        // Not ours to answer with data, but never silence.
                        if let Some(reply) = stanza.error_reply(
                            jrs_stream::StanzaErrorCondition::ServiceUnavailable,
                            "xdb-file only answers storage requests",
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
                    jobs[worker].send(Job::Request(stanza, outbox.clone(), Instant::now()))?;
                }
            }
        },
    ))
}

/// What a worker thread does: a request of one owner, or its part of a batch.
pub enum Job {
    /// With when it arrived (for the metrics).
    Request(Stanza, Outbox, Instant),
    Part(batch::Part),
}

/// Most requests answered by one group commit.
const MAX_BATCH: usize = 256;

/// Archives whose state (segments, last id) a worker thread keeps.
const ARCHIVES_PER_WORKER: usize = 256;

/// The worker thread of an owner: FNV-1a of the owner as written (case-folded, so
/// `Alice@x` and `alice@x` meet on the same thread).
pub fn worker_for(owner: &str, workers: usize) -> usize {
    let hash = owner.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b.to_ascii_lowercase() as u64).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % workers as u64) as usize
}

/// Serves one request; always returns an answer: a result (true) or an error.
fn answer(
    spool: &mut Spool,
    archives: &mut Archives,
    hosts: &[String],
    stanza: &Stanza,
) -> (bytes::Bytes, bool) {
    match serve(spool, archives, hosts, stanza) {
        Ok((request, content)) => (request.result(&content), true),
        Err(refusal) => {
            warn!(
                from = stanza.from().unwrap_or(""),
                to = stanza.to().unwrap_or(""),
                condition = refusal.condition.name(),
                "{}",
                refusal.text
            );
            let reply = stanza
                .error_reply(refusal.condition, &refusal.text)
                .expect("requests are never errors or results");
            (reply, false)
        }
    }
}

fn serve(
    spool: &mut Spool,
    archives: &mut Archives,
    hosts: &[String],
    stanza: &Stanza,
) -> Result<(Request, bytes::Bytes), Refusal> {
    let request = Request::parse(stanza)?;
    let owner = Owner::parse(&request.owner)?;
    if !hosts.iter().any(|h| h == "*" || *h == owner.host) {
        return Err(Refusal::new(
            jrs_stream::StanzaErrorCondition::NotAllowed,
            format!("this storage does not serve '{}'", owner.host),
        ));
    }
    let ns = request.ns.as_str();
    let content = match request.op {
        Op::Get => spool.get(&owner, ns)?,
        Op::Set => {
            spool.set(&owner, ns, &request.content)?;
            bytes::Bytes::new()
        }
        Op::Delete => {
            if ns == "*" {
                archives.forget_under(&spool.owner_dir(&owner));
                spool.delete(&owner, ns)?;
            } else {
                spool.delete(&owner, ns)?;
                let dir = spool.archive_dir(&owner, ns);
                archives.delete(spool, &dir)?;
            }
            bytes::Bytes::new()
        }
        Op::Append => {
            spool.append(&owner, ns, &request.content, request.max_items)?;
            bytes::Bytes::new()
        }
        Op::Take => spool.take(&owner, ns)?,
        Op::ArchiveAppend => {
            let dir = spool.archive_dir(&owner, ns);
            archives.append(spool, &dir, &request.content, retention(&request), now())?;
            bytes::Bytes::new()
        }
        Op::ArchiveQuery => {
            let dir = spool.archive_dir(&owner, ns);
            archives.query(spool, &dir, &request.content)?
        }
        Op::ArchiveTrim => {
            let dir = spool.archive_dir(&owner, ns);
            archives.trim(spool, &dir, retention(&request), now())?;
            bytes::Bytes::new()
        }
        Op::ArchiveRetract => {
            let dir = spool.archive_dir(&owner, ns);
            archives.retract(spool, &dir, &request.content)?;
            bytes::Bytes::new()
        }
        Op::List if ns == jrs_xdb::LIST_CONTENTS => spool.contents(&owner)?.to_xml(),
        Op::List => {
            let items: String = spool
                .list(&owner.host)?
                .iter()
                .map(|jid| format!("<owner jid='{}'/>", jrs_stream::xml::escape(jid)))
                .collect();
            bytes::Bytes::from(items)
        }
    };
    debug!(op = request.op.name(), owner = %request.owner, ns, "done");
    Ok((request, content))
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
