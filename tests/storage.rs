//! End-to-end tests of xdb-file through the router: real processes, requests from a
//! component link.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use jrs_component::{ComponentReader, ComponentWriter};
use jrs_harness::{Options, Server};
use jrs_stream::Stanza;
use jrs_xdb::archive::{items_to_xml, Item, Page, Paging, Query};
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

/// A router with the given grace period, a running xdb-file, and an admin link.
async fn with_storage(grace_secs: f64) -> (Server, ComponentReader, ComponentWriter) {
    let mut server = Server::start(Options {
        grace_secs,
        ..Options::default()
    })
    .await
    .unwrap();
    server.start_storage().await.unwrap();
    let (r, w) = admin(&server).await;
    (server, r, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_get_append_take_delete_through_the_router() {
    let (server, mut r, mut w) = with_storage(2.0).await;

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

    // A corrupt file is reported and left in place.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let (mut server, mut r, mut w) = with_storage(10.0).await;
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
            server.kill9("xdb-file");
            killed = true;
        }
    }
    assert!(killed);
    let acked_at_kill = acked.lock().unwrap().len();
    // Restart within the grace period: the writes sent meanwhile were held, not lost.
    server.start_storage().await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_past_the_grace_period_gives_errors() {
    let (mut server, mut r, mut w) = with_storage(0.5).await;
    server.kill9("xdb-file");
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
async fn start_storage_with(server: &mut Server, extra: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_append_and_query_through_the_router() {
    let (_server, mut r, mut w) = with_storage(2.0).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_archive_appends_survive_kill_9() {
    let mut server = Server::start(Options {
        grace_secs: 10.0,
        ..Options::default()
    })
    .await
    .unwrap();
    // Small segments, so the stream crosses segment boundaries.
    const CONFIG: &str = "<archive segment-items='64'/>";
    start_storage_with(&mut server, CONFIG).await;
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
            server.kill9("xdb-file");
            killed = true;
        }
    }
    assert!(killed);
    let acked_at_kill = acked.lock().unwrap().len();
    start_storage_with(&mut server, CONFIG).await;
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
    server.kill9("xdb-file");
    start_storage_with(&mut server, CONFIG).await;
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
