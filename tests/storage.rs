//! End-to-end tests of the storage components through the router: real processes,
//! requests from a component link. Every test of the storage protocol runs against
//! both storage components, xdb-file and xdb-pg (`NAME::file` and `NAME::pg`); xdb-pg
//! runs on a throwaway PostgreSQL cluster (`jrs_harness::postgres`) shared by the
//! tests of this binary, a database for each test. Tests of xdb-file's own files are
//! `file_only_*`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use jrs_component::{ComponentReader, ComponentWriter};
use jrs_harness::postgres::PgCluster;
use jrs_harness::{Options, Server};
use jrs_stream::Stanza;
use jrs_xdb::archive::{
    items_to_xml, parse_failures, retraction_to_xml, select, BatchWriter, Item, Page, Paging, Query,
};
use jrs_xdb::{Op, Request};

fn request(op: Op, owner: &str, ns: &str, id: &str, content: &str) -> Vec<u8> {
    Request {
        op,
        owner: owner.into(),
        ns: ns.into(),
        id: id.into(),
        from: "admin".into(),
        max_items: None,
        max_age: None,
        flush: jrs_xdb::Flush::Now,
        content: Bytes::copy_from_slice(content.as_bytes()),
    }
    .to_xml()
    .into_bytes()
}

async fn recv(reader: &mut ComponentReader) -> Stanza {
    tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("an answer within 10 s")
        .expect("link up")
}

async fn admin(server: &Server) -> (ComponentReader, ComponentWriter) {
    server
        .component("admin", "admin-secret")
        .await
        .unwrap()
        .split()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    File,
    Pg,
}

/// A storage component of a test: xdb-file with its spool in the installation, or
/// xdb-pg on a database of its own in the shared cluster.
struct Store {
    backend: Backend,
    /// xdb-pg's database (the cluster is kept alive while the test runs).
    pg: Option<(Arc<PgCluster>, String)>,
}

impl Store {
    fn new(backend: Backend) -> Store {
        let pg = (backend == Backend::Pg).then(|| {
            let cluster = PgCluster::shared().expect("a PostgreSQL cluster");
            let db = cluster.create_database().expect("a database");
            (cluster, db)
        });
        Store { backend, pg }
    }

    /// The storage process's name in the installation (for `kill9`, logs).
    fn process(&self) -> &'static str {
        match self.backend {
            Backend::File => "xdb-file",
            Backend::Pg => "xdb-pg",
        }
    }

    /// Starts (or starts again) the storage component; `file_extra`: elements of
    /// xdb-file's configuration (xdb-pg has no equivalent).
    async fn start(&self, server: &mut Server, file_extra: &str) {
        match &self.pg {
            None => start_file_storage_with(server, file_extra).await,
            Some((cluster, db)) => {
                server.start_xdb_pg(&cluster.url(db), "").await.unwrap();
            }
        }
    }
}

/// Runs each named `async fn NAME(Backend)` as two tests, `NAME::file` and `NAME::pg`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn file() {
                    super::$name(super::Backend::File).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn pg() {
                    super::$name(super::Backend::Pg).await
                }
            }
        )*
    };
}

both_backends!(
    set_get_append_take_delete_through_the_router,
    fragments_lists_owners_and_account_removal,
    list_of_what_one_owner_has,
    acknowledged_writes_survive_kill_9,
    writes_flushed_later_are_answered_at_once_and_kept,
    storage_down_past_the_grace_period_gives_errors,
    archive_append_and_query_through_the_router,
    archive_retraction_retention_and_domain_batches,
    archive_queries_match_the_reference,
    acknowledged_archive_appends_survive_kill_9,
);

/// A router with the given grace period, a running storage component, and an admin
/// link.
async fn with_storage(
    backend: Backend,
    grace_secs: f64,
) -> (Server, Store, ComponentReader, ComponentWriter) {
    let mut server = Server::start(Options {
        grace_secs,
        ..Options::default()
    })
    .await
    .unwrap();
    let store = Store::new(backend);
    store.start(&mut server, "").await;
    let (r, w) = admin(&server).await;
    (server, store, r, w)
}

async fn set_get_append_take_delete_through_the_router(backend: Backend) {
    let (_server, _store, mut r, mut w) = with_storage(backend, 2.0).await;

    w.send(&request(
        Op::Set,
        "alice@localhost",
        "jabber:iq:roster",
        "1",
        "<query xmlns='jabber:iq:roster'><item jid='bob@localhost'/></query>",
    ))
    .await
    .unwrap();
    let a = recv(&mut r).await;
    assert_eq!(
        (a.id(), a.kind(), a.from()),
        (Some("1"), Some("result"), Some("alice@localhost"))
    );
    w.send(&request(
        Op::Get,
        "alice@localhost",
        "jabber:iq:roster",
        "2",
        "",
    ))
    .await
    .unwrap();
    let a = recv(&mut r).await;
    assert_eq!(
        a.inner(),
        b"<query xmlns='jabber:iq:roster'><item jid='bob@localhost'/></query>"
    );
    w.send(&request(
        Op::Append,
        "alice@localhost",
        "offline",
        "3",
        "<message id='o1'/>",
    ))
    .await
    .unwrap();
    w.send(&request(
        Op::Append,
        "alice@localhost",
        "offline",
        "4",
        "<message id='o2'/>",
    ))
    .await
    .unwrap();
    w.send(&request(Op::Take, "alice@localhost", "offline", "5", ""))
        .await
        .unwrap();
    assert_eq!(recv(&mut r).await.kind(), Some("result"));
    assert_eq!(recv(&mut r).await.kind(), Some("result"));
    assert_eq!(
        recv(&mut r).await.inner(),
        b"<message id='o1'/><message id='o2'/>"
    );
    w.send(&request(Op::Get, "alice@localhost", "offline", "6", ""))
        .await
        .unwrap();
    assert!(recv(&mut r).await.inner().is_empty());
    w.send(&request(
        Op::Delete,
        "alice@localhost",
        "jabber:iq:roster",
        "7",
        "",
    ))
    .await
    .unwrap();
    assert_eq!(recv(&mut r).await.kind(), Some("result"));
    w.send(&request(
        Op::Get,
        "alice@localhost",
        "jabber:iq:roster",
        "8",
        "",
    ))
    .await
    .unwrap();
    assert!(recv(&mut r).await.inner().is_empty());

    // Errors name the problem.
    w.send(
        b"<xdb xmlns='urn:jabberd-rs:xdb:0' type='get' to='alice@localhost' from='admin' id='9'/>",
    )
    .await
    .unwrap();
    let e = recv(&mut r).await;
    assert_eq!(e.kind(), Some("error"));
    assert!(String::from_utf8_lossy(e.inner()).contains("ns&apos; is required"));
    w.send(&request(
        Op::Set,
        "mallory@other.example",
        "x",
        "10",
        "<x/>",
    ))
    .await
    .unwrap();
    let e = recv(&mut r).await;
    assert_eq!(e.kind(), Some("error"), "no storage for other.example");
}

/// xdb-file's files: one it cannot read is reported and left in place (not
/// overwritten by a `set`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_only_a_corrupt_file_is_reported_and_left_in_place() {
    let (server, _store, mut r, mut w) = with_storage(Backend::File, 2.0).await;
    let path = server.path("spool/localhost/carol/vcard-temp.xml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "<stored><vCard>").unwrap();
    w.send(&request(Op::Get, "carol@localhost", "vcard-temp", "11", ""))
        .await
        .unwrap();
    let e = recv(&mut r).await;
    assert_eq!(e.kind(), Some("error"));
    let text = String::from_utf8_lossy(e.inner()).into_owned();
    assert!(
        text.contains("internal-server-error") && text.contains("corrupt"),
        "{text}"
    );
    w.send(&request(
        Op::Set,
        "carol@localhost",
        "vcard-temp",
        "12",
        "<vCard xmlns='vcard-temp'/>",
    ))
    .await
    .unwrap();
    assert_eq!(recv(&mut r).await.kind(), Some("error"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "<stored><vCard>");
}

async fn acknowledged_writes_survive_kill_9(backend: Backend) {
    let (mut server, store, mut r, mut w) = with_storage(backend, 10.0).await;
    let acked: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let reader = tokio::spawn({
        let acked = acked.clone();
        async move {
            // Storage answers different owners in any order: collect acknowledgements
            // until none has come for a while after the restart.
            loop {
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), r.next()).await else {
                    return r;
                };
                if s.kind() == Some("result") && s.name() == "xdb" {
                    if let Some(i) = s
                        .id()
                        .and_then(|id| id.strip_prefix('w'))
                        .and_then(|n| n.parse().ok())
                    {
                        acked.lock().unwrap().insert(i);
                    }
                }
            }
        }
    });
    // A stream of writes, 20 in flight at a time; kill -9 storage in the middle of it.
    const WRITES: u32 = 400;
    let mut killed = false;
    for i in 0..WRITES {
        while i as usize >= acked.lock().unwrap().len() + 20 && !killed {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w.send(&request(
            Op::Set,
            &format!("user{}@localhost", i % 37),
            &format!("k{i}"),
            &format!("w{i}"),
            &format!("<v n='{i}'/>"),
        ))
        .await
        .unwrap();
        if !killed && acked.lock().unwrap().len() >= 150 {
            server.kill9(store.process());
            killed = true;
        }
    }
    assert!(killed);
    let acked_at_kill = acked.lock().unwrap().len();
    // Restart within the grace period: the writes sent meanwhile were held, not lost.
    store.start(&mut server, "").await;
    let mut r = reader.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    // Requests already written to the killed process's socket die with it, unanswered (the
    // requester times out and retries); every *acknowledged* write must be on disk.
    println!(
        "kill -9 after {acked_at_kill} acknowledged writes; {} of {WRITES} acknowledged in all",
        acked.len()
    );
    assert!(
        acked.len() > acked_at_kill,
        "writes held during the restart were answered"
    );
    for &i in &acked {
        w.send(&request(
            Op::Get,
            &format!("user{}@localhost", i % 37),
            &format!("k{i}"),
            &format!("g{i}"),
            "",
        ))
        .await
        .unwrap();
        let mut got = recv(&mut r).await;
        while got.id().is_some_and(|id| id.starts_with('w')) {
            got = recv(&mut r).await; // a late acknowledgement
        }
        assert_eq!(got.id(), Some(format!("g{i}").as_str()));
        assert_eq!(
            got.inner(),
            format!("<v n='{i}'/>").as_bytes(),
            "write {i} lost"
        );
    }
}

/// The answer to `id`, the one request in flight. Answers to earlier ones may come
/// again first: after a restart the router delivers again what storage had not
/// acknowledged (at least once, docs/protocol.md).
async fn answer_to(r: &mut ComponentReader, id: &str) -> Stanza {
    loop {
        let a = recv(r).await;
        if a.id() == Some(id) {
            return a;
        }
    }
}

/// alice's fragment `ns`, asked for with id `id`.
async fn get_from(r: &mut ComponentReader, w: &mut ComponentWriter, ns: &str, id: &str) -> Stanza {
    w.send(&request(Op::Get, "alice@localhost", ns, id, ""))
        .await
        .unwrap();
    answer_to(r, id).await
}

/// `set` and `archive-append` with `flush='later'` (the last activity at logout, the
/// archive copies of messages): answered once readable, on disk when storage stops, and
/// within a second (xdb-file) or PostgreSQL's `wal_writer_delay` (xdb-pg) otherwise.
/// Other types refuse it.
async fn writes_flushed_later_are_answered_at_once_and_kept(backend: Backend) {
    let (mut server, store, mut r, mut w) = with_storage(backend, 10.0).await;
    let later = |ns: &str, id: &str, content: &str| {
        let mut req = Request::parse(
            &Stanza::parse(Bytes::from(request(
                Op::Set,
                "alice@localhost",
                ns,
                id,
                content,
            )))
            .unwrap(),
        )
        .unwrap();
        req.flush = jrs_xdb::Flush::Later;
        req.to_xml()
    };
    // Answered, and what reads return at once.
    w.send(later("jabber:iq:last", "s1", "<query logout='1'/>").as_bytes())
        .await
        .unwrap();
    assert_eq!(answer_to(&mut r, "s1").await.kind(), Some("result"));
    assert_eq!(
        get_from(&mut r, &mut w, "jabber:iq:last", "g1")
            .await
            .inner(),
        b"<query logout='1'/>"
    );

    // An archive batch for the domain (as sm sends them) likewise: answered, and found by
    // the next query.
    let mut batch = BatchWriter::default();
    let archived = [chat(1, "bob@localhost/r"), chat(2, "bob@localhost/r")];
    for item in &archived {
        batch.push("alice@localhost", &item.id, item.time, &item.with, |b| {
            b.extend_from_slice(&item.payload)
        });
    }
    let mut append = Request::parse(
        &Stanza::parse(Bytes::from(request(
            Op::ArchiveAppend,
            "localhost",
            MAM,
            "b1",
            "",
        )))
        .unwrap(),
    )
    .unwrap();
    append.flush = jrs_xdb::Flush::Later;
    append.content = batch.take();
    w.send(&append.to_bytes()).await.unwrap();
    let a = answer_to(&mut r, "b1").await;
    assert_eq!(a.kind(), Some("result"));
    assert!(parse_failures(&Bytes::copy_from_slice(a.inner()))
        .unwrap()
        .is_empty());
    assert_eq!(whole_archive(&mut r, &mut w).await, archived);

    // Stopping storage puts it on disk.
    w.send(later("jabber:iq:last", "s2", "<query logout='2'/>").as_bytes())
        .await
        .unwrap();
    assert_eq!(answer_to(&mut r, "s2").await.kind(), Some("result"));
    let status = server
        .terminate(store.process(), Duration::from_secs(10))
        .await
        .expect("storage stops on SIGTERM");
    assert!(status.success(), "{status}");
    if backend == Backend::File {
        // On disk before the process ended (the router's redelivery after the restart
        // must not be what brings it back).
        let file = server.path("spool/localhost/alice/jabber%3Aiq%3Alast.xml");
        assert_eq!(
            std::fs::read(file).unwrap(),
            b"<stored><query logout='2'/></stored>"
        );
    }
    store.start(&mut server, "").await;
    assert_eq!(
        get_from(&mut r, &mut w, "jabber:iq:last", "g2")
            .await
            .inner(),
        b"<query logout='2'/>"
    );
    assert_eq!(whole_archive(&mut r, &mut w).await, archived);

    // Otherwise within a second: then it survives kill -9 (for xdb-file, the swap into
    // place is the last step of the flush; for xdb-pg, the data is in PostgreSQL).
    w.send(later("urn:x:other", "s3", "<v n='3'/>").as_bytes())
        .await
        .unwrap();
    assert_eq!(answer_to(&mut r, "s3").await.kind(), Some("result"));
    if backend == Backend::File {
        let file = server.path("spool/localhost/alice/urn%3Ax%3Aother.xml");
        jrs_harness::wait_for("the deferred write's flush", Duration::from_secs(5), || {
            file.exists().then_some(())
        })
        .await
        .unwrap();
    }
    server.kill9(store.process());
    store.start(&mut server, "").await;
    assert_eq!(
        get_from(&mut r, &mut w, "urn:x:other", "g3").await.inner(),
        b"<v n='3'/>"
    );

    // A flush later is for `set` and `archive-append` only.
    let append = request(Op::Append, "alice@localhost", "x", "a1", "<x/>");
    let append = String::from_utf8(append)
        .unwrap()
        .replacen(" id=", " flush='later' id=", 1);
    w.send(append.as_bytes()).await.unwrap();
    let e = answer_to(&mut r, "a1").await;
    assert_eq!(e.kind(), Some("error"));
    assert!(String::from_utf8_lossy(e.as_slice()).contains("bad-request"));
}

async fn storage_down_past_the_grace_period_gives_errors(backend: Backend) {
    let (mut server, store, mut r, mut w) = with_storage(backend, 0.5).await;
    server.kill9(store.process());
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.send(&request(Op::Get, "alice@localhost", "x", "late", ""))
        .await
        .unwrap();
    let e = recv(&mut r).await;
    assert_eq!((e.id(), e.kind()), (Some("late"), Some("error")));
    assert!(String::from_utf8_lossy(e.inner()).contains("service-unavailable"));
}

/// Starts xdb-file with `extra` elements in its configuration (the harness's own
/// configuration has none).
async fn start_file_storage_with(server: &mut Server, extra: &str) {
    server
        .write(
            "xdb-file.xml",
            &format!(
                "<xdb-file>{}<host>localhost</host><spool dir='spool'/>{extra}<log level='debug'/></xdb-file>",
                server.router_element("xdb-file", "xdb-secret")
            ),
        )
        .unwrap();
    let since = server.log("xdb-file").len();
    server
        .spawn("xdb-file", "xdb-file", &["-c", "xdb-file.xml"])
        .unwrap();
    server.wait_connected("xdb-file", since).await.unwrap();
}

const MAM: &str = "urn:xmpp:mam:2";

fn chat(n: u32, with: &str) -> Item {
    Item {
        id: format!("{n:08}"),
        time: 1_700_000_000_000_000 + n as u64 * 1000,
        with: with.into(),
        payload: Bytes::from(format!(
            "<message xmlns='jabber:client' type='chat'><body>message {n}</body></message>"
        )),
    }
}

async fn archive_query(
    r: &mut ComponentReader,
    w: &mut ComponentWriter,
    id: &str,
    q: &Query,
) -> Page {
    w.send(&request(
        Op::ArchiveQuery,
        "alice@localhost",
        MAM,
        id,
        &q.to_xml(),
    ))
    .await
    .unwrap();
    let mut a = recv(r).await;
    while a.id() != Some(id) {
        a = recv(r).await; // a late acknowledgement
    }
    assert_eq!(
        a.kind(),
        Some("result"),
        "{}",
        String::from_utf8_lossy(a.inner())
    );
    Page::parse(&Bytes::copy_from_slice(a.inner())).unwrap()
}

/// Every item of the archive, page by page.
async fn whole_archive(r: &mut ComponentReader, w: &mut ComponentWriter) -> Vec<Item> {
    let mut out: Vec<Item> = vec![];
    for n in 0.. {
        let q = Query {
            paging: Paging {
                after: out.last().map(|i| i.id.clone()),
                max: 250,
                ..Paging::default()
            },
            ..Query::default()
        };
        let page = archive_query(r, w, &format!("all{n}"), &q).await;
        out.extend(page.items);
        if page.complete {
            break;
        }
    }
    out
}

async fn archive_append_and_query_through_the_router(backend: Backend) {
    let (_server, _store, mut r, mut w) = with_storage(backend, 2.0).await;
    let items: Vec<Item> = (1..=30)
        .map(|n| chat(n, if n % 3 == 0 { "bob@b/phone" } else { "carol@c" }))
        .collect();
    for (i, batch) in items.chunks(10).enumerate() {
        w.send(&request(
            Op::ArchiveAppend,
            "alice@localhost",
            MAM,
            &format!("a{i}"),
            &items_to_xml(batch),
        ))
        .await
        .unwrap();
    }
    for i in 0..3 {
        let a = recv(&mut r).await;
        assert_eq!(
            (a.id(), a.kind()),
            (Some(format!("a{i}").as_str()), Some("result"))
        );
        assert!(a.inner().is_empty());
    }
    // The last page, then the one before it.
    let mut q = Query {
        paging: Paging {
            from_end: true,
            max: 4,
            ..Paging::default()
        },
        ..Query::default()
    };
    let last = archive_query(&mut r, &mut w, "q1", &q).await;
    assert_eq!(last.items, items[26..]);
    assert_eq!(
        (last.count, last.first_index, last.complete),
        (30, Some(26), false)
    );
    assert_eq!(last.oldest, Some((items[0].id.clone(), items[0].time)));
    assert_eq!(last.newest, Some((items[29].id.clone(), items[29].time)));
    q.paging.before = Some(items[26].id.clone());
    let before = archive_query(&mut r, &mut w, "q2", &q).await;
    assert_eq!(before.items, items[22..26]);
    // With bob only.
    let bob = Query {
        with: Some("bob@b".into()),
        paging: Paging {
            max: 50,
            ..Paging::default()
        },
        ..Query::default()
    };
    let page = archive_query(&mut r, &mut w, "q3", &bob).await;
    assert_eq!(page.count, 10);
    assert!(page.items.iter().all(|i| i.with == "bob@b/phone"));
    // A retried append is harmless; an older id that is not there is a conflict.
    w.send(&request(
        Op::ArchiveAppend,
        "alice@localhost",
        MAM,
        "a9",
        &items_to_xml(&items[25..]),
    ))
    .await
    .unwrap();
    assert_eq!(recv(&mut r).await.kind(), Some("result"));
    let mut stray = chat(5, "eve@e");
    stray.id.push('x');
    w.send(&request(
        Op::ArchiveAppend,
        "alice@localhost",
        MAM,
        "a10",
        &items_to_xml(&[stray]),
    ))
    .await
    .unwrap();
    let e = recv(&mut r).await;
    assert_eq!(e.kind(), Some("error"));
    assert!(String::from_utf8_lossy(e.inner()).contains("conflict"));
    assert_eq!(whole_archive(&mut r, &mut w).await, items);
    // Retention, then removal of the archive.
    let mut trim = request(Op::ArchiveTrim, "alice@localhost", MAM, "t1", "");
    let at = trim.windows(3).position(|w| w == b" id").unwrap();
    trim.splice(at..at, b" max-items='5'".iter().copied());
    w.send(&trim).await.unwrap();
    assert_eq!(recv(&mut r).await.kind(), Some("result"));
    assert_eq!(whole_archive(&mut r, &mut w).await, items[25..]);
    w.send(&request(Op::Delete, "alice@localhost", MAM, "d1", ""))
        .await
        .unwrap();
    assert_eq!(recv(&mut r).await.kind(), Some("result"));
    assert!(whole_archive(&mut r, &mut w).await.is_empty());
    // An unknown id is item-not-found.
    q.paging.before = Some("nope".into());
    w.send(&request(
        Op::ArchiveQuery,
        "alice@localhost",
        MAM,
        "q4",
        &q.to_xml(),
    ))
    .await
    .unwrap();
    let e = recv(&mut r).await;
    assert!(String::from_utf8_lossy(e.inner()).contains("item-not-found"));
}

async fn acknowledged_archive_appends_survive_kill_9(backend: Backend) {
    let mut server = Server::start(Options {
        grace_secs: 10.0,
        ..Options::default()
    })
    .await
    .unwrap();
    // xdb-file: small segments, so the stream crosses segment boundaries.
    const CONFIG: &str = "<archive segment-items='64'/>";
    let store = Store::new(backend);
    store.start(&mut server, CONFIG).await;
    let (mut r, mut w) = admin(&server).await;
    let acked: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let reader = tokio::spawn({
        let acked = acked.clone();
        async move {
            loop {
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), r.next()).await else {
                    return r;
                };
                if s.kind() == Some("result") {
                    if let Some(i) = s
                        .id()
                        .and_then(|id| id.strip_prefix('w'))
                        .and_then(|n| n.parse().ok())
                    {
                        acked.lock().unwrap().insert(i);
                    }
                }
            }
        }
    });
    // Requests of 5 items each, 20 requests in flight; kill -9 storage in the middle.
    const REQUESTS: u32 = 300;
    const PER: u32 = 5;
    let batch = |i: u32| -> Vec<Item> {
        (0..PER)
            .map(|k| {
                chat(
                    i * PER + k,
                    ["bob@b/r", "carol@c", "dave@d/x"][(k % 3) as usize],
                )
            })
            .collect()
    };
    let mut killed = false;
    for i in 0..REQUESTS {
        while i as usize >= acked.lock().unwrap().len() + 20 && !killed {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w.send(&request(
            Op::ArchiveAppend,
            "alice@localhost",
            MAM,
            &format!("w{i}"),
            &items_to_xml(&batch(i)),
        ))
        .await
        .unwrap();
        if !killed && acked.lock().unwrap().len() >= 100 {
            server.kill9(store.process());
            killed = true;
        }
    }
    assert!(killed);
    let acked_at_kill = acked.lock().unwrap().len();
    store.start(&mut server, CONFIG).await;
    let mut r = reader.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    println!(
        "kill -9 after {acked_at_kill} acknowledged appends; {} of {REQUESTS} acknowledged in all",
        acked.len()
    );
    assert!(
        acked.len() > acked_at_kill,
        "appends held during the restart were answered"
    );
    let stored = whole_archive(&mut r, &mut w).await;
    let ids: HashSet<&str> = stored.iter().map(|i| i.id.as_str()).collect();
    assert!(stored.windows(2).all(|p| p[0].id < p[1].id), "ids increase");
    for &i in &acked {
        for item in batch(i) {
            assert!(
                ids.contains(item.id.as_str()),
                "acknowledged item {} lost",
                item.id
            );
            let got = stored.iter().find(|s| s.id == item.id).unwrap();
            assert_eq!(*got, item);
        }
    }
    // The archive as it is survives a restart, and the with-index agrees with it.
    server.kill9(store.process());
    store.start(&mut server, CONFIG).await;
    assert_eq!(whole_archive(&mut r, &mut w).await, stored);
    let bob = Query {
        with: Some("bob@b".into()),
        paging: Paging {
            max: 0,
            ..Paging::default()
        },
        ..Query::default()
    };
    let count = archive_query(&mut r, &mut w, "bob", &bob).await.count;
    assert_eq!(count, stored.iter().filter(|i| i.with == "bob@b/r").count());
}

/// An admin link asking one request at a time.
struct Admin {
    r: ComponentReader,
    w: ComponentWriter,
    next: u32,
}

/// A request of `op` for `owner` (no id yet: [`Admin::ask`] gives one).
fn req(op: Op, owner: &str, ns: &str, content: impl AsRef<[u8]>) -> Request {
    Request {
        op,
        owner: owner.into(),
        ns: ns.into(),
        id: String::new(),
        from: "admin".into(),
        max_items: None,
        max_age: None,
        flush: jrs_xdb::Flush::Now,
        content: Bytes::copy_from_slice(content.as_ref()),
    }
}

impl Admin {
    fn new((r, w): (ComponentReader, ComponentWriter)) -> Admin {
        Admin { r, w, next: 0 }
    }

    /// Sends `request` and returns its answer.
    async fn ask(&mut self, mut request: Request) -> Stanza {
        self.next += 1;
        request.id = format!("x{}", self.next);
        self.w.send(&request.to_bytes()).await.unwrap();
        loop {
            let a = recv(&mut self.r).await;
            if a.id() == Some(request.id.as_str()) {
                return a;
            }
        }
    }

    /// The content of the answer, which must be a result.
    async fn ok(&mut self, request: Request) -> Vec<u8> {
        let what = format!("{} {} {}", request.op.name(), request.owner, request.ns);
        let a = self.ask(request).await;
        assert_eq!(
            a.kind(),
            Some("result"),
            "{what}: {}",
            String::from_utf8_lossy(a.inner())
        );
        a.inner().to_vec()
    }

    /// The text of the answer, which must be an error naming `condition`.
    async fn refused(&mut self, request: Request, condition: &str) -> String {
        let what = format!("{} {} {}", request.op.name(), request.owner, request.ns);
        let a = self.ask(request).await;
        let text = String::from_utf8_lossy(a.inner()).into_owned();
        assert_eq!(a.kind(), Some("error"), "{what}: {text}");
        assert!(
            text.contains(condition),
            "{what}: {condition} expected: {text}"
        );
        text
    }

    async fn get(&mut self, owner: &str, ns: &str) -> String {
        String::from_utf8(self.ok(req(Op::Get, owner, ns, "")).await).unwrap()
    }

    async fn list(&mut self) -> String {
        String::from_utf8(self.ok(req(Op::List, "localhost", "", "")).await).unwrap()
    }

    /// What `owner` has stored (`list` with `ns='*'`), as answered.
    async fn contents(&mut self, owner: &str) -> String {
        String::from_utf8(self.ok(req(Op::List, owner, "*", "")).await).unwrap()
    }

    async fn query(&mut self, owner: &str, q: &Query) -> Page {
        let content = self.ok(req(Op::ArchiveQuery, owner, MAM, q.to_xml())).await;
        Page::parse(&Bytes::from(content)).unwrap()
    }

    /// Every item of `owner`'s archive, page by page.
    async fn archive(&mut self, owner: &str) -> Vec<Item> {
        let mut out: Vec<Item> = vec![];
        loop {
            let q = Query {
                paging: Paging {
                    after: out.last().map(|i| i.id.clone()),
                    max: 250,
                    ..Paging::default()
                },
                ..Query::default()
            };
            let page = self.query(owner, &q).await;
            out.extend(page.items);
            if page.complete {
                return out;
            }
        }
    }
}

fn with_max_items(mut r: Request, n: usize) -> Request {
    r.max_items = Some(n);
    r
}

/// `list` with `ns='*'`: the namespaces (fragments and appended lists) and archives of
/// one owner, a user or the host itself, each in byte order, kept up to date by every
/// change (what `jabberctl dump` reads).
async fn list_of_what_one_owner_has(backend: Backend) {
    let (_server, _store, r, w) = with_storage(backend, 2.0).await;
    let mut a = Admin::new((r, w));
    const ALICE: &str = "alice@localhost";
    assert_eq!(a.contents(ALICE).await, "");
    assert_eq!(a.contents("localhost").await, "");

    a.ok(req(Op::Set, "Alice@LocalHost", "vcard-temp", "<vCard/>"))
        .await;
    a.ok(req(Op::Set, ALICE, "jabber:iq:roster", "<query/>"))
        .await;
    // Names that are not file names as they are.
    a.ok(req(Op::Set, ALICE, "urn:x:a/b c'd", "<x/>")).await;
    // A list made by appends only, and an archive only.
    a.ok(req(Op::Append, ALICE, "msgoffline", "<message/>"))
        .await;
    a.ok(req(
        Op::ArchiveAppend,
        ALICE,
        MAM,
        items_to_xml(&[chat(1, "bob@localhost/pc")]),
    ))
    .await;
    // Written and removed again: not listed.
    a.ok(req(Op::Set, ALICE, "gone", "<g/>")).await;
    a.ok(req(Op::Set, ALICE, "gone", "")).await;
    // The host's own data, and another user's, are apart.
    a.ok(req(Op::Set, "localhost", "urn:x:host", "<h/>")).await;
    a.ok(req(Op::Set, "bob@localhost", "urn:x:bob", "<b/>"))
        .await;

    assert_eq!(
        a.contents("ALICE@localhost").await,
        "<ns name='jabber:iq:roster'/><ns name='msgoffline'/><ns name='urn:x:a/b c&apos;d'/>\
         <ns name='vcard-temp'/><archive ns='urn:xmpp:mam:2'/>"
    );
    assert_eq!(a.contents("localhost").await, "<ns name='urn:x:host'/>");
    assert_eq!(a.contents("bob@localhost").await, "<ns name='urn:x:bob'/>");
    // The domain's list of owners is unchanged by it.
    assert_eq!(
        a.list().await,
        "<owner jid='alice@localhost'/><owner jid='bob@localhost'/>"
    );

    // take empties a list; delete removes a namespace with its archive.
    a.ok(req(Op::Take, ALICE, "msgoffline", "")).await;
    a.ok(req(Op::Delete, ALICE, MAM, "")).await;
    a.ok(req(Op::Delete, ALICE, "vcard-temp", "")).await;
    assert_eq!(
        a.contents(ALICE).await,
        "<ns name='jabber:iq:roster'/><ns name='urn:x:a/b c&apos;d'/>"
    );
    // Account removal leaves nothing to list.
    a.ok(req(Op::Delete, ALICE, "*", "")).await;
    assert_eq!(a.contents(ALICE).await, "");
    assert_eq!(a.contents("localhost").await, "<ns name='urn:x:host'/>");
    // Another domain than the store's is refused, as any request.
    a.refused(req(Op::List, "x@example.net", "*", ""), "").await;
}

async fn fragments_lists_owners_and_account_removal(backend: Backend) {
    let (_server, _store, r, w) = with_storage(backend, 2.0).await;
    let mut a = Admin::new((r, w));
    const ALICE: &str = "alice@localhost";

    // The same JID written differently is the same owner; the host's own data (owner
    // `localhost`) is apart from its users'.
    a.ok(req(
        Op::Set,
        "Alice@LocalHost",
        "prefs",
        "<p xmlns='x'>1</p>",
    ))
    .await;
    a.ok(req(Op::Set, "localhost", "prefs", "<host/>")).await;
    assert_eq!(a.get(ALICE, "prefs").await, "<p xmlns='x'>1</p>");
    assert_eq!(a.get("LocalHost", "prefs").await, "<host/>");
    // A set replaces the fragment.
    a.ok(req(Op::Set, ALICE, "prefs", "<p xmlns='x'>2</p><q/>"))
        .await;
    assert_eq!(a.get(ALICE, "prefs").await, "<p xmlns='x'>2</p><q/>");

    // append goes after the fragment; max-items counts every stored element.
    a.ok(req(Op::Set, ALICE, "offline", "<m n='1'/>")).await;
    a.ok(with_max_items(
        req(Op::Append, ALICE, "offline", "<m n='2'/><m n='3'>x</m>"),
        3,
    ))
    .await;
    a.refused(
        with_max_items(req(Op::Append, ALICE, "offline", "<m n='4'/>"), 3),
        "resource-constraint",
    )
    .await;
    assert_eq!(
        a.get(ALICE, "offline").await,
        "<m n='1'/><m n='2'/><m n='3'>x</m>"
    );
    a.ok(with_max_items(
        req(Op::Append, ALICE, "offline", "<m n='4'/>"),
        4,
    ))
    .await;
    a.ok(req(Op::Append, ALICE, "offline", "<m n='5'/>")).await;
    // take answers the whole list and removes it.
    assert_eq!(
        a.ok(req(Op::Take, ALICE, "offline", "")).await,
        b"<m n='1'/><m n='2'/><m n='3'>x</m><m n='4'/><m n='5'/>"
    );
    assert!(a.ok(req(Op::Take, ALICE, "offline", "")).await.is_empty());
    assert_eq!(a.get(ALICE, "offline").await, "");
    // Appends to nothing make a list; an empty set removes it all.
    a.ok(req(Op::Append, ALICE, "drafts", "<d n='1'/>")).await;
    a.ok(req(Op::Append, "ALICE@localhost", "drafts", "<d n='2'/>"))
        .await;
    assert_eq!(a.get(ALICE, "drafts").await, "<d n='1'/><d n='2'/>");
    a.ok(req(Op::Set, ALICE, "drafts", "")).await;
    assert_eq!(a.get(ALICE, "drafts").await, "");
    a.ok(req(Op::Append, ALICE, "drafts", "<d n='3'/>")).await;
    assert_eq!(a.get(ALICE, "drafts").await, "<d n='3'/>");
    // delete of one namespace, then of one that holds nothing.
    a.ok(req(Op::Delete, ALICE, "drafts", "")).await;
    a.ok(req(Op::Delete, ALICE, "never-stored", "")).await;
    assert_eq!(a.get(ALICE, "drafts").await, "");
    assert_eq!(a.get(ALICE, "prefs").await, "<p xmlns='x'>2</p><q/>");

    // list: the users with a fragment (alice), an appended list only (carol) or an
    // archive only (bob); not dave, whose only fragment was removed, nor the host.
    a.ok(req(Op::Append, "carol@localhost", "offline", "<m/>"))
        .await;
    a.ok(req(
        Op::ArchiveAppend,
        "bob@localhost",
        MAM,
        items_to_xml(&[chat(1, "alice@localhost/a")]),
    ))
    .await;
    a.ok(req(Op::Set, "dave@localhost", "vcard-temp", "<vCard/>"))
        .await;
    a.ok(req(Op::Set, "dave@localhost", "vcard-temp", "")).await;
    assert_eq!(
        a.list().await,
        "<owner jid='alice@localhost'/><owner jid='bob@localhost'/><owner jid='carol@localhost'/>"
    );

    // delete with ns='*' removes everything of the owner, its archive too.
    a.ok(req(Op::Set, "bob@localhost", "roster", "<r/>")).await;
    a.ok(req(Op::Delete, "Bob@localhost", "*", "")).await;
    assert_eq!(a.get("bob@localhost", "roster").await, "");
    assert!(a.archive("bob@localhost").await.is_empty());
    a.ok(req(Op::Delete, ALICE, "*", "")).await;
    assert_eq!(a.get(ALICE, "prefs").await, "");
    assert_eq!(a.list().await, "<owner jid='carol@localhost'/>");
    // The host's own data stays.
    assert_eq!(a.get("localhost", "prefs").await, "<host/>");
    // A new account of the same name starts empty, and is listed again.
    a.ok(req(Op::Set, ALICE, "roster", "<r/>")).await;
    assert_eq!(
        a.list().await,
        "<owner jid='alice@localhost'/><owner jid='carol@localhost'/>"
    );
}

async fn archive_retraction_retention_and_domain_batches(backend: Backend) {
    let (_server, _store, r, w) = with_storage(backend, 2.0).await;
    let mut a = Admin::new((r, w));
    const ALICE: &str = "alice@localhost";
    let mut items: Vec<Item> = (1..=10).map(|n| chat(n, "bob@b/r")).collect();
    a.ok(req(Op::ArchiveAppend, ALICE, MAM, items_to_xml(&items)))
        .await;

    // Retraction replaces the stanza in place; again changes nothing.
    let tomb =
        "<message xmlns='jabber:client' type='chat'><retracted xmlns='urn:xmpp:x'/></message>";
    for _ in 0..2 {
        a.ok(req(
            Op::ArchiveRetract,
            ALICE,
            MAM,
            retraction_to_xml(&items[2].id, tomb.as_bytes()),
        ))
        .await;
    }
    items[2].payload = Bytes::from(tomb);
    assert_eq!(a.archive(ALICE).await, items);
    a.refused(
        req(
            Op::ArchiveRetract,
            ALICE,
            MAM,
            retraction_to_xml("nope", tomb.as_bytes()),
        ),
        "item-not-found",
    )
    .await;
    a.refused(
        req(Op::ArchiveRetract, ALICE, MAM, "<item id='00000003'/>"),
        "bad-request",
    )
    .await;
    a.refused(
        req(
            Op::ArchiveRetract,
            "nobody@localhost",
            MAM,
            retraction_to_xml(&items[2].id, tomb.as_bytes()),
        ),
        "item-not-found",
    )
    .await;

    // A time before the last item's, an item without an id: refused, nothing kept.
    let mut early = chat(12, "bob@b/r");
    early.time = items[9].time - 1;
    a.refused(
        req(
            Op::ArchiveAppend,
            ALICE,
            MAM,
            items_to_xml(&[chat(11, "carol@c"), early]),
        ),
        "bad-request",
    )
    .await;
    let mut nameless = chat(13, "carol@c");
    nameless.id.clear();
    a.refused(
        req(Op::ArchiveAppend, ALICE, MAM, items_to_xml(&[nameless])),
        "bad-request",
    )
    .await;
    assert_eq!(a.archive(ALICE).await, items);

    // Retention with an append keeps the newest max-items.
    let more = [chat(11, "carol@c"), chat(12, "carol@c/x")];
    a.ok(with_max_items(
        req(Op::ArchiveAppend, ALICE, MAM, items_to_xml(&more)),
        5,
    ))
    .await;
    items.extend(more);
    assert_eq!(a.archive(ALICE).await, items[7..]);
    let page = a
        .query(
            ALICE,
            &Query {
                paging: Paging {
                    max: 0,
                    ..Paging::default()
                },
                ..Query::default()
            },
        )
        .await;
    assert_eq!(page.count, 5);
    assert_eq!(page.oldest, Some((items[7].id.clone(), items[7].time)));
    // A removed item's id is unknown to queries.
    a.refused(
        req(
            Op::ArchiveQuery,
            ALICE,
            MAM,
            Query {
                after_id: Some(items[1].id.clone()),
                ..Query::default()
            }
            .to_xml(),
        ),
        "item-not-found",
    )
    .await;
    // max-age: every item is from 2023, older than a day: all go.
    let mut trim = req(Op::ArchiveTrim, ALICE, MAM, "");
    trim.max_age = Some(86_400);
    a.ok(trim).await;
    assert!(a.archive(ALICE).await.is_empty());
    let page = a.query(ALICE, &Query::default()).await;
    assert_eq!((page.count, page.oldest, page.newest), (0, None, None));
    // Ids keep increasing after retention emptied the archive: an older id that was
    // never there is a conflict, a newer one is taken.
    let mut stray = chat(5, "eve@e");
    stray.id.push('x');
    a.refused(
        req(Op::ArchiveAppend, ALICE, MAM, items_to_xml(&[stray])),
        "conflict",
    )
    .await;
    a.ok(req(
        Op::ArchiveAppend,
        ALICE,
        MAM,
        items_to_xml(&[chat(20, "bob@b/r")]),
    ))
    .await;
    assert_eq!(a.archive(ALICE).await, [chat(20, "bob@b/r")]);

    // The archive's namespace also holds a fragment (MAM preferences), apart from the
    // items; delete of the namespace removes both.
    let prefs = "<prefs xmlns='urn:xmpp:mam:2' default='always'/>";
    a.ok(req(Op::Set, ALICE, MAM, prefs)).await;
    assert_eq!(a.get(ALICE, MAM).await, prefs);
    assert_eq!(a.archive(ALICE).await.len(), 1);
    a.ok(req(Op::Delete, ALICE, MAM, "")).await;
    assert_eq!(a.get(ALICE, MAM).await, "");
    assert!(a.archive(ALICE).await.is_empty());

    // A batch for the domain: each owner's items to its archive (owners normalised);
    // an owner of another domain is refused alone, in the result.
    let mut batch = BatchWriter::default();
    for (owner, item) in [
        (ALICE, chat(30, "bob@b/r")),
        ("Bob@LocalHost", chat(31, "alice@localhost/a")),
        ("eve@other.example", chat(32, "bob@b/r")),
        (ALICE, chat(33, "carol@c")),
    ] {
        batch.push(owner, &item.id, item.time, &item.with, |b| {
            b.extend_from_slice(&item.payload)
        });
    }
    let answer = a
        .ok(req(Op::ArchiveAppend, "localhost", MAM, batch.take()))
        .await;
    let failed = parse_failures(&answer).unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "eve@other.example");
    assert_eq!(
        failed[0].1.condition,
        jrs_stream::StanzaErrorCondition::NotAllowed
    );
    assert_eq!(
        a.archive(ALICE).await,
        [chat(30, "bob@b/r"), chat(33, "carol@c")]
    );
    assert_eq!(
        a.archive("bob@localhost").await,
        [chat(31, "alice@localhost/a")]
    );
    // A retried batch is harmless.
    for (owner, item) in [(ALICE, chat(30, "bob@b/r")), (ALICE, chat(33, "carol@c"))] {
        batch.push(owner, &item.id, item.time, &item.with, |b| {
            b.extend_from_slice(&item.payload)
        });
    }
    let answer = a
        .ok(req(Op::ArchiveAppend, "localhost", MAM, batch.take()))
        .await;
    assert!(parse_failures(&answer).unwrap().is_empty());
    assert_eq!(a.archive(ALICE).await.len(), 2);
    // Items that do not name their owner refuse the whole batch.
    a.refused(
        req(
            Op::ArchiveAppend,
            "localhost",
            MAM,
            items_to_xml(&[chat(40, "bob@b/r")]),
        ),
        "bad-request",
    )
    .await;
    assert_eq!(a.archive(ALICE).await.len(), 2);
}

/// Many queries (filters by `with`, time, id bounds and ids; paging forwards and
/// backwards; `max` 0 to 250; `max-bytes`) on an archive after a retried append,
/// retention and a retraction: each answer is what `jrs_xdb::archive::select`, the
/// reference, gives.
async fn archive_queries_match_the_reference(backend: Backend) {
    let (_server, _store, r, w) = with_storage(backend, 2.0).await;
    let mut a = Admin::new((r, w));
    const OWNER: &str = "reference@localhost";
    let withs = ["bob@x/a", "bob@x/b", "carol@x", ""];
    let mut all: Vec<Item> = (0..60u64)
        .map(|n| Item {
            id: format!("{:016x}", 1000 + n),
            time: 100 + n / 3,
            with: withs[(n * 7 % 4) as usize].into(),
            payload: Bytes::from(format!(
                "<message xmlns='jabber:client'><body>{n}</body></message>"
            )),
        })
        .collect();
    a.ok(req(Op::ArchiveAppend, OWNER, MAM, items_to_xml(&all)))
        .await;
    // Retried: harmless; an older unknown id: conflict.
    a.ok(req(Op::ArchiveAppend, OWNER, MAM, items_to_xml(&all[50..])))
        .await;
    let mut stale = all[3].clone();
    stale.id = "0000000000000001".into();
    a.refused(
        req(Op::ArchiveAppend, OWNER, MAM, items_to_xml(&[stale])),
        "conflict",
    )
    .await;
    a.ok(with_max_items(req(Op::ArchiveTrim, OWNER, MAM, ""), 50))
        .await;
    all.drain(..10);
    a.ok(req(
        Op::ArchiveRetract,
        OWNER,
        MAM,
        retraction_to_xml(&all[5].id, b"<gone/>"),
    ))
    .await;
    all[5].payload = Bytes::from_static(b"<gone/>");

    let id = |i: usize| all[i].id.clone();
    let mut queries = vec![];
    for with in [
        None,
        Some("bob@x"),
        Some("bob@x/b"),
        Some("carol@x"),
        Some("nobody@x"),
    ] {
        for (after, before, from_end) in [
            (None, None, false),
            (None, None, true),
            (Some(id(7)), None, false),
            (None, Some(id(40)), false),
            (Some(id(7)), Some(id(40)), false),
            (Some(id(7)), None, true),
        ] {
            for max in [0, 1, 5, 250] {
                queries.push(Query {
                    with: with.map(str::to_owned),
                    start: Some(105),
                    end: if max == 5 { Some(112) } else { None },
                    after_id: (max == 1).then(|| id(2)),
                    before_id: (max == 250).then(|| id(45)),
                    ids: if max == 0 {
                        vec![id(8), id(9), id(30)]
                    } else {
                        vec![]
                    },
                    paging: Paging {
                        after: after.clone(),
                        before: before.clone(),
                        from_end,
                        max,
                        max_bytes: (max == 250).then_some(500),
                    },
                });
            }
        }
    }
    // Without filters but id bounds and a bare `with` (xdb-pg counts these from
    // sequence numbers, not by reading the items).
    for with in [
        None,
        Some("bob@x"),
        Some("carol@x"),
        Some(""),
        Some("nobody@x"),
    ] {
        for (after, before, from_end) in [
            (None, None, false),
            (None, None, true),
            (Some(id(7)), None, false),
            (None, Some(id(40)), false),
            (Some(id(7)), Some(id(40)), false),
            (Some(id(7)), None, true),
            (Some(id(49)), None, false),
            (None, Some(id(0)), false),
        ] {
            for (after_id, before_id) in [
                (None, None),
                (Some(id(2)), None),
                (None, Some(id(45))),
                (Some(id(2)), Some(id(45))),
                (Some(id(30)), Some(id(20))),
            ] {
                for max in [0, 3, 250] {
                    queries.push(Query {
                        with: with.map(str::to_owned),
                        after_id: after_id.clone(),
                        before_id: before_id.clone(),
                        paging: Paging {
                            after: after.clone(),
                            before: before.clone(),
                            from_end,
                            max,
                            max_bytes: None,
                        },
                        ..Query::default()
                    });
                }
            }
        }
    }
    for max_bytes in [None, Some(1), Some(300), Some(100_000)] {
        queries.push(Query {
            paging: Paging {
                max: 250,
                max_bytes,
                ..Paging::default()
            },
            ..Query::default()
        });
    }
    queries.push(Query {
        ids: vec!["missing".into()],
        ..Default::default()
    });
    queries.push(Query {
        after_id: Some(format!("{:016x}", 1000)),
        ..Default::default()
    });
    queries.push(Query {
        paging: Paging {
            before: Some(format!("{:016x}", 1001)),
            ..Paging::default()
        },
        ..Default::default()
    });
    check_queries(&mut a, OWNER, &all, &queries).await;
}

/// Each query's answer from storage is what `select` gives on `all`.
async fn check_queries(a: &mut Admin, owner: &str, all: &[Item], queries: &[Query]) {
    for q in queries {
        let answer = a.ask(req(Op::ArchiveQuery, owner, MAM, q.to_xml())).await;
        match select(all, q) {
            Ok(page) => {
                assert_eq!(
                    answer.kind(),
                    Some("result"),
                    "{}: {}",
                    q.to_xml(),
                    String::from_utf8_lossy(answer.inner())
                );
                let got = Page::parse(&Bytes::copy_from_slice(answer.inner())).unwrap();
                assert_eq!(got, page, "{}", q.to_xml());
            }
            Err(refusal) => {
                let text = String::from_utf8_lossy(answer.inner()).into_owned();
                assert_eq!(answer.kind(), Some("error"), "{}: {text}", q.to_xml());
                assert!(
                    text.contains(refusal.condition.name()),
                    "{}: {} expected: {text}",
                    q.to_xml(),
                    refusal.condition.name()
                );
            }
        }
    }
}

/// xdb-pg's schema: a database of the first schema version (made by putting the
/// current one back: the with-index without `with_seq`, version 1) is migrated at
/// start, and its archives answer as before, and take appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_only_schema_migration_keeps_archives() {
    let (mut server, store, r, w) = with_storage(Backend::Pg, 10.0).await;
    let (cluster, db) = store.pg.as_ref().unwrap();
    let mut a = Admin::new((r, w));
    const OWNER: &str = "migrated@localhost";
    let withs = ["bob@x/a", "carol@x", "bob@x/b", "dave@x/phone", ""];
    let item = |n: u64| Item {
        id: format!("{:016x}", 5000 + n),
        time: 100 + n,
        with: withs[(n * 3 % 5) as usize].into(),
        payload: Bytes::from(format!(
            "<message xmlns='jabber:client'><body>{n}</body></message>"
        )),
    };
    let mut all: Vec<Item> = (0..40).map(item).collect();
    a.ok(req(Op::ArchiveAppend, OWNER, MAM, items_to_xml(&all)))
        .await;
    a.ok(with_max_items(req(Op::ArchiveTrim, OWNER, MAM, ""), 33))
        .await;
    all.drain(..7);
    server.kill9(store.process());
    cluster
        .psql(
            db,
            "ALTER TABLE archive_items DROP COLUMN with_seq;
             CREATE INDEX archive_items_by_with ON archive_items (archive, with_bare, seq);
             ALTER TABLE archive_items ADD CONSTRAINT archive_items_archive_fkey
                 FOREIGN KEY (archive) REFERENCES archives ON DELETE CASCADE;
             UPDATE schema_version SET version = 1;",
        )
        .unwrap();
    store.start(&mut server, "").await;
    assert!(server
        .log("xdb-pg")
        .contains("migrating the database schema"));
    assert_eq!(
        cluster
            .psql(db, "SELECT version FROM schema_version")
            .unwrap(),
        "2"
    );
    let bare_queries = |all: &[Item]| -> Vec<Query> {
        let mut queries = vec![];
        for with in ["bob@x", "carol@x", "dave@x", "", "bob@x/b"] {
            for paging in [
                Paging {
                    max: 250,
                    ..Paging::default()
                },
                Paging {
                    from_end: true,
                    max: 2,
                    ..Paging::default()
                },
                Paging {
                    after: Some(all[3].id.clone()),
                    max: 3,
                    ..Paging::default()
                },
                Paging {
                    before: Some(all[all.len() - 4].id.clone()),
                    max: 3,
                    ..Paging::default()
                },
            ] {
                queries.push(Query {
                    with: Some(with.into()),
                    paging,
                    ..Query::default()
                });
            }
        }
        queries
    };
    check_queries(&mut a, OWNER, &all, &bare_queries(&all)).await;
    // Appends after the migration go on numbering each contact's items.
    let more: Vec<Item> = (40..55).map(item).collect();
    a.ok(req(Op::ArchiveAppend, OWNER, MAM, items_to_xml(&more)))
        .await;
    all.extend(more);
    check_queries(&mut a, OWNER, &all, &bare_queries(&all)).await;
    // Items have no foreign key to their archive any more: deleting the archive (of
    // one namespace, or everything of the owner) deletes them.
    let items = |cluster: &PgCluster| {
        cluster
            .psql(db, "SELECT COUNT(*) FROM archive_items")
            .unwrap()
    };
    a.ok(req(
        Op::ArchiveAppend,
        "other@localhost",
        MAM,
        items_to_xml(&all[..3]),
    ))
    .await;
    a.ok(req(
        Op::ArchiveAppend,
        "other@localhost",
        "urn:example:log",
        items_to_xml(&all[..2]),
    ))
    .await;
    assert_eq!(items(cluster), (all.len() + 5).to_string());
    a.ok(req(Op::Delete, OWNER, MAM, "")).await;
    assert_eq!(items(cluster), "5");
    a.ok(req(Op::Delete, "other@localhost", "*", "")).await;
    assert_eq!(items(cluster), "0");
    assert_eq!(
        cluster.psql(db, "SELECT COUNT(*) FROM archives").unwrap(),
        "0"
    );
}
