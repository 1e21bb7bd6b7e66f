//! End-to-end tests of xdb-file through the router: real processes, requests from a
//! component link.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use jrs_component::{ComponentReader, ComponentWriter};
use jrs_harness::{Options, Server};
use jrs_stream::Stanza;
use jrs_xdb::{Op, Request};

fn request(op: Op, owner: &str, ns: &str, id: &str, content: &str) -> Vec<u8> {
    Request {
        op,
        owner: owner.into(),
        ns: ns.into(),
        id: id.into(),
        from: "admin".into(),
        max_items: None,
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
