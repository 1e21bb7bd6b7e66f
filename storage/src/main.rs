//! xdb-file: the storage component. Answers `xdb` requests (get, set, delete, append,
//! take, list, and the archive operations) from files under a spool directory. See `docs/protocol.md` and
//! `docs/storage.md`.

mod archive;
mod batch;
mod config;
mod spool;
mod sync;
mod worker;

use std::sync::mpsc;
use std::time::Instant;

use clap::Parser;
use tracing::{debug, info, warn};

use jrs_component::service::{exit_code, load_and_init, run_component, Bind, CommonArgs};
use jrs_component::PacketType;
use jrs_metrics::storage::SERVED;
use jrs_xdb::Request;

use crate::archive::Archives;
use crate::config::StorageConfig;
use crate::spool::Spool;

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
    // `workers` threads (one by default, see `config::DEFAULT_WORKERS`); each owner's
    // requests always go to the same thread (by a hash of the owner), so they are
    // applied in the order they were sent, and each thread has the cache of its own
    // owners.
    // Absolute, so logs and errors name the real place.
    let spool_dir = std::env::current_dir()?.join(&config.spool);
    let mut jobs = vec![];
    let mut threads = vec![];
    let syncer = std::sync::Arc::new(sync::Syncer::default());
    for n in 0..config.workers {
        let (tx, queue) = mpsc::channel::<worker::Job>();
        let spool = Spool::new(
            spool_dir.clone(),
            config.cache_entries / config.workers + 1,
            syncer.clone(),
        );
        let open_files = (config.archive_open_files / config.workers).max(8);
        let segment_items = config.archive_segment_items;
        let hosts = config.hosts.clone();
        let handle = std::thread::Builder::new()
            .name(format!("spool-{n}"))
            .spawn(move || {
                // Open files are per thread (not `Send`): made here.
                let archives = Archives::new(ARCHIVES_PER_WORKER, open_files, segment_items);
                worker::run(queue, spool, archives, hosts)
            })?;
        threads.push(handle);
        jobs.push(tx);
    }
    info!(spool = %spool_dir.display(), hosts = ?config.hosts, "xdb-file starting");

    // One thread by default: without cross-thread wake-ups a lone message costs about
    // 40% less CPU, and 200 clients on two cores are no slower (docs/benchmarks.md, "Low
    // load"). JABBERD_RUNTIME(_PROGRAM)=multi:N changes it (crates/component/src/runtime.rs).
    let runtime =
        jrs_component::runtime::build("xdb-file", jrs_component::runtime::Shape::Current)?;
    let served = runtime.block_on(run_component(
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
                        for (worker, part) in batch::split(stanza, &outbox, jobs.len()) {
                            jobs[worker].send(worker::Job::Part(part))?;
                        }
                        continue;
                    }
                    let worker = worker_for(stanza.to().unwrap_or(""), jobs.len());
                    jobs[worker].send(worker::Job::Request(
                        stanza,
                        outbox.clone(),
                        Instant::now(),
                    ))?;
                }
            }
        },
    ));
    // Stopping: the workers finish what they were sent and flush the writes they
    // answered before flushing (`flush='later'`), then end.
    drop(runtime);
    drop(jobs);
    for thread in threads {
        if thread.join().is_err() {
            warn!("a spool thread panicked");
        }
    }
    served
}

/// Archives whose state (segments, last id) a worker thread keeps (`worker::run`).
const ARCHIVES_PER_WORKER: usize = 256;

/// The worker thread of an owner: FNV-1a of the owner as written (case-folded, so
/// `Alice@x` and `alice@x` meet on the same thread).
pub fn worker_for(owner: &str, workers: usize) -> usize {
    let hash = owner.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b.to_ascii_lowercase() as u64).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % workers as u64) as usize
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
