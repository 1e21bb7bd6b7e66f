//! Message archive storage benchmark (the `archive-*` operations of xdb-file, or of
//! xdb-pg with `--storage pg`).
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
//!    one contact, `--runs` times each: min / median / max in ms, request to answer;
//! 4. (unless `--no-client`) the same two pages as a client sees them, through c2s,
//!    the router, sm and xdb-file: writes alice's credentials (the cached-keys SCRAM
//!    account of `loadgen`), starts sm (default modules, with mam) and c2s, then
//!    `--runs` times each restarts sm and xdb-file (both cold: no user task, no open
//!    archive), logs a fresh client in and times a XEP-0313 query from the IQ sent to
//!    its result (`<fin/>`, after the 50 result messages): (a) `<before/>` with
//!    `<max>50</max>`, (b) the same with a `with` form field; each answer is checked
//!    (50 results in increasing id order, the newest items, `count`, `complete`). The
//!    same query again on the warm session, `--steady` more back to back on the last
//!    session with the CPU time of each process per query, and a XEP-0199 ping of the
//!    server (the client's round trip through c2s, the router and sm), are printed for
//!    comparison.
//!
//! With `--storage pg` the storage is xdb-pg instead, on a throwaway PostgreSQL cluster
//! (`jrs_harness::postgres`, PostgreSQL's default settings; removed at the end) or on the
//! database at `--pg-url`; "xdb-file" above reads "xdb-pg", its CPU is reported with
//! PostgreSQL's (the postmaster and its children, those that exited included; with
//! `--pg-url`, every postmaster on this machine), the size on disk is the tables' and
//! indexes' (`pg_total_relation_size`), and `--drop-caches` also restarts the cluster
//! (so its shared buffers are empty too; not with `--pg-url`). A restarted xdb-pg
//! connects to the database again at its first request: that is part of the cold time.
//!
//! ```text
//! cargo build --release -p bench -p sm -p c2s -p router -p xdb-file -p xdb-pg
//! target/release/archivebench [--storage pg [--pg-url URL]]
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

use bench::client::{Client, ClientKeys};
use bench::procstat::{cpu_micros, per_process, server_pids};
use jrs_component::{ComponentReader, ComponentWriter};
use jrs_harness::postgres::{cluster_cpu_micros, pg_bin_dir, psql, PgCluster};
use jrs_harness::{Options, Server};
use jrs_stream::{Frame, Stanza};
use jrs_xdb::archive::{bare, items_to_xml, Item, Page, Paging, Query};
use jrs_xdb::{Op, Request};

const OWNER: &str = "alice@localhost";
const NS: &str = "urn:xmpp:mam:2";
/// The contact of the `with` queries.
const WITH: &str = "contact7@example.net";

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
    /// Skip the queries through a client (c2s, router, sm, xdb-file).
    #[arg(long)]
    no_client: bool,
    /// Queries of each kind sent back to back on the last warm client session, for the
    /// CPU time per query of each process (0: none). A large number makes a steady load
    /// to profile.
    #[arg(long, default_value_t = 500)]
    steady: usize,
    /// The storage component: xdb-file, or xdb-pg (PostgreSQL).
    #[arg(long, value_enum, default_value_t = StorageKind::File)]
    storage: StorageKind,
    /// With `--storage pg`: an existing database (a libpq-style URL, e.g.
    /// `postgresql://jabberd@/jabberd?host=/var/run/postgresql`) instead of a throwaway
    /// cluster. alice@localhost's archive there is deleted first.
    #[arg(long)]
    pg_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum StorageKind {
    File,
    Pg,
}

/// The storage component under test, and for xdb-pg its database.
struct Store {
    kind: StorageKind,
    /// xdb-pg's database.
    url: String,
    /// The throwaway cluster (none with `--pg-url`).
    cluster: Option<PgCluster>,
}

impl Store {
    fn new(args: &Args) -> anyhow::Result<Store> {
        if args.storage == StorageKind::File {
            if args.pg_url.is_some() {
                bail!("--pg-url goes with --storage pg");
            }
            return Ok(Store {
                kind: StorageKind::File,
                url: String::new(),
                cluster: None,
            });
        }
        let (url, cluster) = match &args.pg_url {
            Some(url) => (url.clone(), None),
            None => {
                let cluster = PgCluster::new()?;
                (cluster.url("postgres"), Some(cluster))
            }
        };
        Ok(Store {
            kind: StorageKind::Pg,
            url,
            cluster,
        })
    }

    /// The storage process's name (and program).
    fn name(&self) -> &'static str {
        match self.kind {
            StorageKind::File => "xdb-file",
            StorageKind::Pg => "xdb-pg",
        }
    }

    /// Starts (or starts again) the storage component; its pid once it is connected.
    async fn start(&self, server: &mut Server) -> anyhow::Result<u32> {
        let config = match self.kind {
            StorageKind::File => format!(
                "<xdb-file>{}<host>localhost</host><spool dir='spool'/><log level='info'/></xdb-file>",
                server.router_element("xdb-file", "xdb-secret")
            ),
            // The pool of etc/xdb-pg.xml.
            StorageKind::Pg => format!(
                "<xdb-pg>{}<host>localhost</host><postgresql url='{}' pool-size='4'/><log level='info'/></xdb-pg>",
                server.router_element("xdb-pg", "xdb-pg-secret"),
                jrs_stream::xml::escape(&self.url)
            ),
        };
        let name = self.name();
        server.write(&format!("{name}.xml"), &config)?;
        let since = server.log(name).len();
        let pid = server.spawn(name, name, &["-c", &format!("{name}.xml")])?;
        server.wait_connected(name, since).await?;
        Ok(pid)
    }

    /// The postmasters whose CPU counts as the storage's: the throwaway cluster's, or
    /// with `--pg-url` every one on this machine (none if the database is elsewhere).
    fn postmasters(&self) -> Vec<u32> {
        if self.kind != StorageKind::Pg {
            return vec![];
        }
        if let Some(c) = &self.cluster {
            return c.postmaster_pid().into_iter().collect();
        }
        let comm =
            |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let ppid = |pid: u32| -> Option<u32> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|&pid| {
                comm(pid).trim() == "postgres"
                    && ppid(pid).is_none_or(|p| comm(p).trim() != "postgres")
            })
            .collect()
    }

    /// CPU time (µs) PostgreSQL has spent so far (0 for xdb-file).
    fn db_cpu(&self) -> u64 {
        self.postmasters().into_iter().map(cluster_cpu_micros).sum()
    }

    /// Before a cold measurement, with `--drop-caches`: the kernel's page cache emptied
    /// and the throwaway cluster restarted (its shared buffers emptied).
    fn drop_caches(&self) -> anyhow::Result<()> {
        if let Some(c) = &self.cluster {
            c.stop()?;
        }
        std::process::Command::new("sync").status()?;
        std::fs::write("/proc/sys/vm/drop_caches", "3")
            .context("dropping the page cache (needs root)")?;
        if let Some(c) = &self.cluster {
            c.start()?;
        }
        Ok(())
    }

    fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let bin = pg_bin_dir().unwrap_or_default();
        psql(&bin, &self.url, sql)
    }
}

/// What the fill wrote, to check the answers against.
#[derive(Default)]
struct Filled {
    count: u64,
    newest: String,
    /// Items with [`WITH`] and the newest of them.
    with_count: u64,
    with_newest: String,
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
/// digits (as sm's MAM module makes them), a few seconds apart, from November 2023, so
/// what sm archives later gets greater ids (it takes the newest id from storage and
/// goes past it); payloads are `jabber:client` messages, as sm stores them and
/// forwards them in query results unchanged.
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
        flush: jrs_xdb::Flush::Now,
        content: Bytes::from(content),
    }
    .to_xml()
    .into_bytes()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let store = Store::new(&args)?;
    let mut server = Server::start(Options {
        max_queue_bytes: 64 << 20,
        max_stanza_bytes: 1 << 20,
        ..Options::default()
    })
    .await?;
    let pid = store.start(&mut server).await?;
    let (mut r, mut w) = server.component("admin", "admin-secret").await?.split();
    eprintln!("server up in {}", server.dir.display());
    let storage = store.name();
    if store.kind == StorageKind::Pg {
        println!(
            "storage: xdb-pg on {} ({})",
            if store.cluster.is_some() {
                "a throwaway cluster, default settings"
            } else {
                "--pg-url"
            },
            store
                .psql("SELECT version()")
                .unwrap_or_else(|e| format!("{e:#}"))
        );
        // An existing database may hold an archive from an earlier run.
        w.send(&request(Op::Delete, "clear", String::new())).await?;
        answer(&mut r, "clear").await?;
    }

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
    let mut filled = Filled::default();
    let cpu_before = cpu_micros(&[pid]);
    let db_cpu_before = store.db_cpu();
    let start = Instant::now();
    for n in 0..requests {
        wait_answered(&answered, &wake, (n + 1).saturating_sub(args.inflight)).await?;
        let size = args.batch.min(args.messages - made);
        let items: Vec<Item> = (0..size).map(|_| messages.next()).collect();
        for i in &items {
            if bare(&i.with) == WITH {
                filled.with_count += 1;
                filled.with_newest.clone_from(&i.id);
            }
        }
        if let Some(i) = items.last() {
            filled.newest.clone_from(&i.id);
        }
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
    let cpu = cpu_micros(&[pid]) - cpu_before;
    let db_cpu = store.db_cpu() - db_cpu_before;
    eprintln!();
    let mut r = reader.await??;
    filled.count = made;
    let db = if store.kind == StorageKind::Pg {
        format!(
            " + PostgreSQL CPU {:.2} µs/item = {:.2} µs/item",
            db_cpu as f64 / made as f64,
            (cpu + db_cpu) as f64 / made as f64
        )
    } else {
        String::new()
    };
    println!(
        "fill: {made} messages in {requests} archive-append requests of {} items, {} in flight: {:.1} s, {:.0} items/s, {storage} CPU {:.2} µs/item{db}",
        args.batch,
        args.inflight,
        elapsed.as_secs_f64(),
        made as f64 / elapsed.as_secs_f64(),
        cpu as f64 / made as f64
    );

    // 2. Size on disk.
    if store.kind == StorageKind::Pg {
        let sizes = store.psql(
            "SELECT pg_relation_size('archive_items'), pg_indexes_size('archive_items'), \
             pg_total_relation_size('archive_items') + pg_total_relation_size('archives')",
        )?;
        let sizes: Vec<f64> = sizes
            .split('|')
            .map(|v| v.trim().parse().unwrap_or(0.0))
            .collect();
        println!(
            "disk: {:.1} MiB ({:.0} bytes/message: table {:.0}, indexes {:.0}, the rest TOAST and the archives row; WAL not counted); stanzas alone {:.0} bytes/message",
            sizes[2] / (1 << 20) as f64,
            sizes[2] / made as f64,
            sizes[0] / made as f64,
            sizes[1] / made as f64,
            payload_bytes as f64 / made as f64
        );
    } else {
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
    }

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
        with: Some(WITH.into()),
        ..last.clone()
    };
    for (name, q) in [
        ("last page of 50", &last),
        ("last page of 50 with one contact", &with),
    ] {
        let mut cold = vec![];
        let mut warm = vec![];
        for run in 0..args.runs {
            server.kill9(storage);
            if args.drop_caches {
                store.drop_caches()?;
            }
            store.start(&mut server).await?;
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

    // 4. The same pages through a client.
    if !args.no_client {
        // alice's account: the credentials of loadgen's bench accounts (cached keys).
        let keys = ClientKeys::new();
        w.send(&request_ns(
            Op::Set,
            jrs_auth::NS_AUTH,
            "account",
            keys.credentials(),
        ))
        .await?;
        answer(&mut r, "account").await?;
        drop((r, w));
        let result = through_client(&mut server, &store, &args, &keys, &filled).await;
        if result.is_err() {
            server.print_log_tails(20);
        }
        result?;
    }
    Ok(())
}

/// A XEP-0313 query as a client sends it: the last page of 50 (`<before/>`), with a
/// `with` form field when given.
fn mam_query(id: &str, with: Option<&str>) -> String {
    let form = with
        .map(|w| {
            format!(
                "<x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE' type='hidden'><value>{NS}</value></field>\
                 <field var='with'><value>{w}</value></field></x>"
            )
        })
        .unwrap_or_default();
    format!(
        "<iq type='set' id='{id}'><query xmlns='{NS}' queryid='q'>{form}\
         <set xmlns='http://jabber.org/protocol/rsm'><max>50</max><before/></set></query></iq>"
    )
}

/// What a right answer to a [`mam_query`] has: `count` matching items, the newest of
/// them `newest`, and (as there are more than 50) `complete` false.
struct Expected<'a> {
    count: u64,
    newest: &'a str,
    with: Option<&'a str>,
}

/// Sends the [`mam_query`] for `expected` (IQ id `id`) and reads until its result; returns the time from
/// sending to the `<fin/>` and the bytes the client received. Fails unless the answer
/// is right: 50 results for query `q` in increasing id order ending with the newest
/// matching item, each a message with the contact when filtered by `with`, then the
/// IQ result with a `<fin/>` whose `<first>`, `<last>`, `<count>` and `complete` agree.
async fn timed_client_query(
    client: &mut Client,
    id: &str,
    expected: &Expected<'_>,
) -> anyhow::Result<(Duration, usize)> {
    let query = mam_query(id, expected.with);
    let mut ids: Vec<String> = Vec::with_capacity(50);
    let mut received = 0;
    let t = Instant::now();
    client.send(query.as_bytes()).await?;
    let fin = loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), client.reader.next_frame())
            .await
            .context("no answer for 30 s")??;
        let Frame::Element(bytes) = frame else {
            bail!("expected a stanza, got {frame:?}");
        };
        received += bytes.len();
        let s = Stanza::parse(bytes)?;
        match s.name() {
            "message" => {
                let Ok(result) = Stanza::parse_slice(s.inner()) else {
                    continue;
                };
                if result.name() != "result" || result.xmlns() != Some(NS) {
                    continue;
                }
                if result.attr("queryid").as_deref() != Some("q") {
                    bail!(
                        "a result for another query: {}",
                        String::from_utf8_lossy(s.bytes())
                    );
                }
                let item = result.attr("id").context("a result without an id")?;
                if let Some(with) = expected.with {
                    let text = String::from_utf8_lossy(result.inner());
                    if !text.contains(&format!("'{with}/")) {
                        bail!("a result not with {with}: {text}");
                    }
                }
                ids.push(item);
            }
            "iq" if s.id() == Some(id) => {
                if s.kind() != Some("result") {
                    bail!("query refused: {}", String::from_utf8_lossy(s.bytes()));
                }
                break Stanza::parse_slice(s.inner())?.to_owned();
            }
            _ => {}
        }
    };
    let elapsed = t.elapsed();
    let fin_text = String::from_utf8_lossy(fin.bytes()).into_owned();
    if fin.name() != "fin" || fin.xmlns() != Some(NS) {
        bail!("the IQ result is not a <fin/>: {fin_text}");
    }
    if ids.len() != 50 {
        bail!("{} results, not 50", ids.len());
    }
    if !ids.windows(2).all(|p| p[0] < p[1]) {
        bail!("result ids not increasing: {ids:?}");
    }
    if ids.last().map(String::as_str) != Some(expected.newest) {
        bail!(
            "the last result is {:?}, the newest item {}",
            ids.last(),
            expected.newest
        );
    }
    let complete = fin.attr("complete");
    if !matches!(complete.as_deref(), None | Some("false")) {
        bail!("complete='{complete:?}' on a page of 50 out of more: {fin_text}");
    }
    let text = |name: &str| element_text(&fin_text, name);
    if text("count") != Some(expected.count.to_string().as_str())
        || text("first") != Some(ids[0].as_str())
        || text("last") != Some(ids[49].as_str())
    {
        bail!(
            "a <fin/> that does not agree (count {}, results {} to {}): {fin_text}",
            expected.count,
            ids[0],
            ids[49]
        );
    }
    Ok((elapsed, received))
}

/// The text of the first element named `name` in `xml` (no nested elements).
fn element_text<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}");
    let mut from = 0;
    loop {
        let at = from + xml[from..].find(&open)?;
        let rest = &xml[at + open.len()..];
        if rest.starts_with(['>', ' ', '/']) {
            let start = rest.find('>')? + 1;
            let body = &rest[start..];
            return Some(&body[..body.find(&format!("</{name}>"))?]);
        }
        from = at + open.len();
    }
}

/// Restarts sm and storage (SIGKILL, then storage first so sm finds it): both cold, no
/// user task in sm, no open archive in xdb-file (no connection to the database in
/// xdb-pg).
async fn restart_sm_and_storage(
    server: &mut Server,
    store: &Store,
    drop_caches: bool,
) -> anyhow::Result<()> {
    server.kill9("sm");
    server.kill9(store.name());
    if drop_caches {
        store.drop_caches()?;
    }
    store.start(server).await?;
    server.start_sm("").await
}

async fn through_client(
    server: &mut Server,
    store: &Store,
    args: &Args,
    keys: &ClientKeys,
    filled: &Filled,
) -> anyhow::Result<()> {
    server.start_sm("").await?;
    let (port, _) = server
        .start_c2s("<tls required='false'/><timeouts idle='3600'/>")
        .await?;
    let all = Expected {
        count: filled.count,
        newest: &filled.newest,
        with: None,
    };
    let with = Expected {
        count: filled.with_count,
        newest: &filled.with_newest,
        with: Some(WITH),
    };
    let mut pings = vec![];
    for (name, expected) in [
        ("last page of 50", &all),
        ("last page of 50 with one contact", &with),
    ] {
        let mut cold = vec![];
        let mut warm = vec![];
        let mut steady = None;
        for run in 0..args.runs {
            restart_sm_and_storage(server, store, args.drop_caches).await?;
            let mut client = Client::login(port, "alice", &format!("r{run}"), keys, None)
                .await
                .context("logging in as alice")?;
            let (t, bytes) = timed_client_query(&mut client, &format!("c{run}"), expected).await?;
            cold.push(t);
            let (t, _) = timed_client_query(&mut client, &format!("w{run}"), expected).await?;
            warm.push(t);
            for n in 0..3 {
                let t = Instant::now();
                client
                    .send(format!("<iq type='get' id='p{n}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>").as_bytes())
                    .await?;
                let answer = client.expect("iq").await?;
                if answer.id() != Some(format!("p{n}").as_str()) || answer.kind() != Some("result")
                {
                    bail!("ping: {}", String::from_utf8_lossy(answer.bytes()));
                }
                pings.push(t.elapsed());
            }
            if run + 1 == args.runs && args.steady > 0 {
                steady =
                    Some(steady_load(server, store, &mut client, args.steady, expected).await?);
            }
            client.close().await;
            if run == 0 {
                println!(
                    "client, {name}: count {}, 50 results, complete false, {bytes} bytes to the client",
                    expected.count
                );
            }
        }
        println!("  cold sm and {}: {}", store.name(), summary(&mut cold));
        println!("  same query again (warm session): {}", summary(&mut warm));
        if let Some(line) = steady.take() {
            println!("{line}");
        }
    }
    println!(
        "client round trip (XEP-0199 ping of the server, warm session): {}",
        summary(&mut pings)
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

/// Sends `n` queries back to back on a warm session; returns their times and the CPU
/// time (user + system) each process spent per query: the server's (every process
/// whose working directory is the installation, and PostgreSQL's for xdb-pg) and this
/// program's (the client).
async fn steady_load(
    server: &Server,
    store: &Store,
    client: &mut Client,
    n: usize,
    expected: &Expected<'_>,
) -> anyhow::Result<String> {
    let mut pids = server_pids(&server.dir);
    pids.push(std::process::id());
    let before: Vec<u64> = pids.iter().map(|p| cpu_micros(&[*p])).collect();
    let db_before = store.db_cpu();
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        times.push(
            timed_client_query(client, &format!("s{i}"), expected)
                .await?
                .0,
        );
    }
    let after: Vec<u64> = pids.iter().map(|p| cpu_micros(&[*p])).collect();
    let db = store.db_cpu() - db_before;
    let spent: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum::<u64>() + db;
    let at = |pid: u32| {
        let i = pids.iter().position(|p| *p == pid).expect("known pid");
        (after[i] - before[i]) as f64 / n as f64
    };
    let db = if store.kind == StorageKind::Pg {
        format!(", postgres {:.1}", db as f64 / n as f64)
    } else {
        String::new()
    };
    Ok(format!(
        "  {n} more back to back (warm session): {}; CPU {:.0} µs per query: {}{db}",
        summary(&mut times),
        spent as f64 / n as f64,
        per_process(&pids, at, "")
    ))
}
