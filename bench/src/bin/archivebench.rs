//! Message archive storage benchmark (xdb-file's `archive-*` operations).
//!
//! Starts a router and xdb-file (release binaries next to this one) in a temporary
//! directory, then, over a component link through the router:
//! 1. fills one user's archive with `--messages` chat messages (~250 bytes each, with
//!    `--contacts` contacts and a few resources each), `--batch` items per
//!    `archive-append`, `--inflight` requests outstanding; reports items per second and
//!    xdb-file's CPU time per item (user + system, from /proc/PID/stat);
//! 2. reports the archive's size on disk per message;
//! 3. restarts xdb-file before every measurement (a cold process: no open files, no
//!    cached archive state; the kernel's page cache stays warm unless `--drop-caches`)
//!    and times (a) the last page (`from-end`, `max` 50) and (b) the last page `with`
//!    one contact, `--runs` times each: min / median / max in ms, request to answer.
//!
//! ```text
//! cargo build --release -p bench -p router -p xdb-file
//! target/release/archivebench
//! ```
//! Figures go into docs/benchmarks.md by hand; tests never assert them.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use tokio::sync::Notify;

use jrs_component::{ComponentReader, ComponentWriter};
use jrs_harness::{Options, Server};
use jrs_xdb::archive::{items_to_xml, Item, Page, Paging, Query};
use jrs_xdb::{Op, Request};

const OWNER: &str = "alice@localhost";
const NS: &str = "urn:xmpp:mam:2";

#[derive(Parser, Debug)]
#[command(about = "Message archive storage: fill, size on disk, cold page times")]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Items per archive-append request.
    #[arg(long, default_value_t = 300)]
    batch: u64,
    /// Requests outstanding while filling.
    #[arg(long, default_value_t = 8)]
    inflight: u64,
    #[arg(long, default_value_t = 20)]
    contacts: u64,
    /// Measurements of each page.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Also empty the kernel's page cache before each measurement (needs root).
    #[arg(long)]
    drop_caches: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// A deterministic generator (xorshift64*), so every run archives the same messages.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "ok", "see", "you", "tomorrow", "the", "meeting", "is", "at", "ten", "thanks", "lunch",
    "sounds", "good", "did", "read", "my", "mail", "about", "release", "call", "me", "later",
    "train", "late", "again", "coffee", "weekend", "plans", "yes", "no", "maybe", "sure",
];

/// Chat messages as sm archives them: ids are the time in microseconds in 16 hex
/// digits (as sm's MAM module makes them), a few seconds apart.
struct Messages {
    rng: Rng,
    time: u64,
    contacts: u64,
}

impl Messages {
    fn new(contacts: u64) -> Messages {
        Messages {
            rng: Rng(0x5eed_1234_abcd_0001),
            time: 1_700_000_000_000_000,
            contacts,
        }
    }

    fn next(&mut self) -> Item {
        self.time += 1 + self.rng.below(5_000_000);
        let id = format!("{:016x}", self.time);
        let contact = self.rng.below(self.contacts);
        let resource = ["phone", "laptop", "desktop"][self.rng.below(3) as usize];
        let with = format!("contact{contact}@example.net/{resource}");
        let mine = format!("{OWNER}/laptop");
        let (from, to) = if self.rng.below(2) == 0 {
            (mine.as_str(), with.as_str())
        } else {
            (with.as_str(), mine.as_str())
        };
        let mut body = String::new();
        let words = 4 + self.rng.below(14);
        for i in 0..words {
            if i > 0 {
                body.push(' ');
            }
            body.push_str(WORDS[self.rng.below(WORDS.len() as u64) as usize]);
        }
        let payload = format!(
            "<message xmlns='jabber:client' from='{from}' to='{to}' type='chat' id='m{:x}'><body>{body}</body><origin-id xmlns='urn:xmpp:sid:0' id='o{:x}'/></message>",
            self.rng.next() >> 16,
            self.rng.next() >> 16
        );
        Item {
            id,
            time: self.time,
            with,
            payload: Bytes::from(payload),
        }
    }
}

fn request(op: Op, id: &str, content: String) -> Vec<u8> {
    request_ns(op, NS, id, content)
}

fn request_ns(op: Op, ns: &str, id: &str, content: String) -> Vec<u8> {
    Request {
        op,
        owner: OWNER.into(),
        ns: ns.into(),
        id: id.into(),
        from: "admin".into(),
        max_items: None,
        max_age: None,
        content: Bytes::from(content),
    }
    .to_xml()
    .into_bytes()
}

async fn start_storage(server: &mut Server) -> anyhow::Result<u32> {
    server.write(
        "xdb-file.xml",
        &format!(
            "<xdb-file>{}<host>localhost</host><spool dir='spool'/><log level='info'/></xdb-file>",
            server.router_element("xdb-file", "xdb-secret")
        ),
    )?;
    let since = server.log("xdb-file").len();
    let pid = server.spawn("xdb-file", "xdb-file", &["-c", "xdb-file.xml"])?;
    server.wait_connected("xdb-file", since).await?;
    Ok(pid)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut server = Server::start(Options {
        max_queue_bytes: 64 << 20,
        max_stanza_bytes: 1 << 20,
        ..Options::default()
    })
    .await?;
    let pid = start_storage(&mut server).await?;
    let (r, mut w) = server.component("admin", "admin-secret").await?.split();
    eprintln!("server up in {}", server.dir.display());

    // 1. Fill.
    let answered = Arc::new(AtomicU64::new(0));
    let wake = Arc::new(Notify::new());
    let requests = args.messages.div_ceil(args.batch);
    let reader = tokio::spawn({
        let (answered, wake) = (answered.clone(), wake.clone());
        async move { count_answers(r, requests, answered, wake).await }
    });
    let mut messages = Messages::new(args.contacts);
    let (mut payload_bytes, mut made) = (0u64, 0u64);
    let cpu_before = cpu_micros(pid);
    let start = Instant::now();
    for n in 0..requests {
        wait_answered(&answered, &wake, (n + 1).saturating_sub(args.inflight)).await?;
        let size = args.batch.min(args.messages - made);
        let items: Vec<Item> = (0..size).map(|_| messages.next()).collect();
        payload_bytes += items.iter().map(|i| i.payload.len() as u64).sum::<u64>();
        made += size;
        w.send(&request(
            Op::ArchiveAppend,
            &format!("a{n}"),
            items_to_xml(&items),
        ))
        .await?;
        if n % 500 == 0 && n > 0 {
            eprint!("\r{made} messages");
        }
    }
    wait_answered(&answered, &wake, requests).await?;
    let elapsed = start.elapsed();
    let cpu = cpu_micros(pid) - cpu_before;
    eprintln!();
    let mut r = reader.await??;
    println!(
        "fill: {made} messages in {requests} archive-append requests of {} items, {} in flight: {:.1} s, {:.0} items/s, xdb-file CPU {:.2} µs/item",
        args.batch,
        args.inflight,
        elapsed.as_secs_f64(),
        made as f64 / elapsed.as_secs_f64(),
        cpu as f64 / made as f64
    );

    // 2. Size on disk.
    let dir = server.path("spool/localhost/alice");
    let (apparent, allocated, files) = disk_usage(&dir)?;
    println!(
        "disk: {} files, {:.1} MiB ({:.0} bytes/message; allocated {:.0} bytes/message); stanzas alone {:.0} bytes/message",
        files,
        apparent as f64 / (1 << 20) as f64,
        apparent as f64 / made as f64,
        allocated as f64 / made as f64,
        payload_bytes as f64 / made as f64
    );

    // 3. Cold pages.
    let last = Query {
        paging: Paging {
            from_end: true,
            max: 50,
            ..Paging::default()
        },
        ..Query::default()
    };
    let with = Query {
        with: Some("contact7@example.net".into()),
        ..last.clone()
    };
    for (name, q) in [
        ("last page of 50", &last),
        ("last page of 50 with one contact", &with),
    ] {
        let mut cold = vec![];
        let mut warm = vec![];
        for run in 0..args.runs {
            server.kill9("xdb-file");
            if args.drop_caches {
                std::process::Command::new("sync").status()?;
                std::fs::write("/proc/sys/vm/drop_caches", "3")
                    .context("dropping the page cache (needs root)")?;
            }
            start_storage(&mut server).await?;
            let (t, page) = timed(&mut r, &mut w, &format!("c{run}"), q).await?;
            if page.items.len() != 50 {
                bail!("{name}: {} items", page.items.len());
            }
            cold.push(t);
            let (t, _) = timed(&mut r, &mut w, &format!("w{run}"), q).await?;
            warm.push(t);
            if run == 0 {
                println!(
                    "{name}: count {}, first-index {:?}, {} bytes of answer",
                    page.count,
                    page.first_index,
                    page.to_xml().len()
                );
            }
        }
        println!("  cold process: {}", summary(&mut cold));
        println!("  same query again (warm): {}", summary(&mut warm));
    }
    // The router round trip alone, for comparison: a get of nothing stored.
    let mut base = vec![];
    for n in 0..args.runs {
        let t = Instant::now();
        w.send(&request_ns(
            Op::Get,
            "none",
            &format!("g{n}"),
            String::new(),
        ))
        .await?;
        answer(&mut r, &format!("g{n}")).await?;
        base.push(t.elapsed());
    }
    println!(
        "router round trip (get of an empty ns): {}",
        summary(&mut base)
    );
    Ok(())
}

/// Counts acknowledgements of the fill's `total` requests; any refusal stops the bench.
async fn count_answers(
    mut r: ComponentReader,
    total: u64,
    answered: Arc<AtomicU64>,
    wake: Arc<Notify>,
) -> anyhow::Result<ComponentReader> {
    while answered.load(Ordering::Acquire) < total {
        let s = tokio::time::timeout(Duration::from_secs(60), r.next())
            .await
            .context("no answer for 60 s")??;
        if s.kind() != Some("result") {
            bail!("refused: {}", String::from_utf8_lossy(s.inner()));
        }
        answered.fetch_add(1, Ordering::AcqRel);
        wake.notify_one();
    }
    Ok(r)
}

/// Waits until `answered` passes `n`; fails if nothing moves for a minute.
async fn wait_answered(answered: &AtomicU64, wake: &Notify, n: u64) -> anyhow::Result<()> {
    while answered.load(Ordering::Acquire) < n {
        tokio::time::timeout(Duration::from_secs(60), wake.notified())
            .await
            .context("the fill stalled (see the reader's error)")?;
    }
    Ok(())
}

async fn answer(r: &mut ComponentReader, id: &str) -> anyhow::Result<Bytes> {
    loop {
        let s = tokio::time::timeout(Duration::from_secs(30), r.next())
            .await
            .context("no answer for 30 s")??;
        if s.id() == Some(id) {
            if s.kind() != Some("result") {
                bail!("refused: {}", String::from_utf8_lossy(s.inner()));
            }
            return Ok(Bytes::copy_from_slice(s.inner()));
        }
    }
}

async fn timed(
    r: &mut ComponentReader,
    w: &mut ComponentWriter,
    id: &str,
    q: &Query,
) -> anyhow::Result<(Duration, Page)> {
    let t = Instant::now();
    w.send(&request(Op::ArchiveQuery, id, q.to_xml())).await?;
    let content = answer(r, id).await?;
    let elapsed = t.elapsed();
    Ok((
        elapsed,
        Page::parse(&content).map_err(|e| anyhow::anyhow!("{}", e.text))?,
    ))
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "min {:.2} ms, median {:.2} ms, max {:.2} ms ({} runs)",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

/// (apparent bytes, allocated bytes, files) of everything under `dir`.
fn disk_usage(dir: &Path) -> anyhow::Result<(u64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (a, b, c) = disk_usage(&entry.path())?;
            total = (total.0 + a, total.1 + b, total.2 + c);
        } else {
            total = (
                total.0 + meta.len(),
                total.1 + meta.blocks() * 512,
                total.2 + 1,
            );
        }
    }
    Ok(total)
}

/// User + system CPU time of a process, in microseconds.
fn cpu_micros(pid: u32) -> u64 {
    let hz = 100; // USER_HZ on Linux
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) * 1_000_000 / hz
}
