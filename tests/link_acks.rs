//! Acknowledged component links (docs/protocol.md, "Acknowledged links"), end to end with
//! the real `router` process: what a component did not acknowledge is delivered again
//! after its link drops; what the router did not acknowledge is sent again by the
//! component (`jrs-component`) on its next link; both sides agree on the byte counts.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use jrs_component::ack::LinkAcks;
use jrs_component::{Component, ComponentReader};
use jrs_harness::{plain_users, recv, Options, Server};
use jrs_stream::Limits;

async fn start(names: &[&str]) -> Server {
    Server::start(Options {
        extra_users: plain_users(names),
        grace_secs: 5.0,
        ..Options::default()
    })
    .await
    .expect("router starts")
}

/// A component link written by hand, counting every byte each way, as the acks do.
struct Raw {
    stream: TcpStream,
    stream_id: String,
    sent: u64,
    received: u64,
    text: String,
}

impl Raw {
    /// Opens a stream to the router as `name` and sends `<handshake acks='1' EXTRA>`;
    /// returns the link and the router's `<handshake/>` answer.
    async fn connect(port: u16, name: &str, extra: &str) -> (Raw, String) {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut raw = Raw {
            stream,
            stream_id: String::new(),
            sent: 0,
            received: 0,
            text: String::new(),
        };
        raw.send(&format!(
            "<stream:stream xmlns='jabber:component:accept' \
             xmlns:stream='http://etherx.jabber.org/streams' to='{name}'>"
        ))
        .await;
        let header = raw.expect("the stream header", "'>").await;
        raw.stream_id = header
            .split("id='")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .unwrap()
            .to_owned();
        let digest =
            jrs_component::protocol::handshake_digest(&raw.stream_id, &format!("{name}-secret"));
        raw.send(&format!("<handshake acks='1'{extra}>{digest}</handshake>"))
            .await;
        let answer = raw.expect("the handshake answer", "/>").await;
        (raw, answer)
    }

    /// [`Raw::connect`] again as soon as the router has noticed that the last link of
    /// `name` dropped (until then the name is taken: `conflict`).
    async fn reconnect(port: u16, name: &str, extra: &str) -> (Raw, String) {
        for _ in 0..250 {
            let (raw, answer) = Raw::connect(port, name, extra).await;
            if !answer.contains("conflict") {
                return (raw, answer);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("'{name}' stays connected at the router");
    }

    async fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).await.unwrap();
        self.sent += text.len() as u64;
    }

    /// Reads until the text received contains `until`; returns it all and clears it.
    async fn expect(&mut self, what: &str, until: &str) -> String {
        let mut buf = vec![0u8; 65536];
        while !self.text.contains(until) {
            let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {what} within 5 s; got {}", self.text))
                .unwrap();
            assert!(n > 0, "closed while waiting for {what}; got {}", self.text);
            self.received += n as u64;
            self.text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let cut = self.text.find(until).unwrap() + until.len();
        let rest = self.text.split_off(cut);
        std::mem::replace(&mut self.text, rest)
    }
}

fn message(to: &str, from: &str, id: &str) -> String {
    format!("<message to='{to}' from='{from}' id='{id}'><body>{id}</body></message>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_delivers_again_what_a_component_did_not_acknowledge() {
    let server = start(&["b.localhost", "s.localhost"]).await;
    let (mut b, answer) = Raw::connect(server.port, "b.localhost", "").await;
    assert!(answer.contains("<handshake acks='1'/>"), "{answer}");
    let mut s = server
        .component("s.localhost", "s.localhost-secret")
        .await
        .unwrap();
    for id in ["m1", "m2", "m3"] {
        s.send(message("x@b.localhost", "y@s.localhost", id).as_bytes())
            .await
            .unwrap();
    }
    let got = b.expect("the three messages", "id='m3'").await;
    assert!(got.contains("id='m1'") && got.contains("id='m2'"), "{got}");
    // The router acknowledges every byte b sent once b sent a packet (the handshake
    // alone needs no ack).
    b.send(&message("x@b.localhost", "x@b.localhost", "self"))
        .await;
    // (Written short; b writes its own as earlier versions did: both are read.)
    let ack = format!("<a h='{}'/>", b.sent);
    let got = b.expect("the router's ack", &ack).await;
    assert!(got.contains("id='self'") || b.expect("the echo", "id='self'").await.contains("self"));
    // b never acknowledges, and its link drops: the messages are held for its return.
    drop(b);
    let (mut b, answer) = Raw::reconnect(server.port, "b.localhost", "").await;
    assert!(answer.contains("acks='1'"), "{answer}");
    let got = b.expect("the three messages again", "id='m3'").await;
    assert!(got.contains("id='m1'") && got.contains("id='m2'"), "{got}");
    // Acknowledged this time (every byte received): nothing comes a third time.
    let h = b.received;
    b.send(&format!("<a xmlns='urn:jabberd-rs:router:0' h='{h}'/>"))
        .await;
    s.send(message("x@b.localhost", "y@s.localhost", "m4").as_bytes())
        .await
        .unwrap();
    b.expect("m4", "id='m4'").await;
    b.send(&format!(
        "<a xmlns='urn:jabberd-rs:router:0' h='{}'/>",
        b.received
    ))
    .await;
    // Let the router read the ack before the link goes (it reads in order: an echo of a
    // message to b's own name comes back only after the ack was handled).
    b.send(&message("x@b.localhost", "x@b.localhost", "echo"))
        .await;
    b.expect("the echo", "id='echo'").await;
    b.send(&format!(
        "<a xmlns='urn:jabberd-rs:router:0' h='{}'/>",
        b.received
    ))
    .await;
    b.send(&message("x@b.localhost", "x@b.localhost", "echo2"))
        .await;
    b.expect("the second echo", "id='echo2'").await;
    drop(b);
    let (mut b, _) = Raw::reconnect(server.port, "b.localhost", "").await;
    b.send(&message("x@b.localhost", "x@b.localhost", "probe"))
        .await;
    let got = b.expect("the probe", "id='probe'").await;
    for id in ["m1", "m2", "m3", "m4", "'echo'"] {
        assert!(
            !got.contains(id),
            "{id} came again after it was acknowledged: {got}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_component_learns_how_much_of_its_last_link_the_router_handled() {
    let server = start(&["b.localhost"]).await;
    let (mut b, _) = Raw::connect(server.port, "b.localhost", "").await;
    let old_id = b.stream_id.clone();
    b.send(&message("x@b.localhost", "x@b.localhost", "one"))
        .await;
    b.expect("the echo", "id='one'").await;
    let sent = b.sent;
    b.expect("the router's ack", &format!("<a h='{sent}'/>"))
        .await;
    // Acks alone are not acknowledged: once b acknowledged the echo, the link is quiet
    // (two idle ends must not ack each other's acks forever).
    b.send(&format!(
        "<a xmlns='urn:jabberd-rs:router:0' h='{}'/>",
        b.received
    ))
    .await;
    let mut buf = [0u8; 256];
    let quiet = tokio::time::timeout(Duration::from_millis(100), b.stream.read(&mut buf)).await;
    assert!(quiet.is_err(), "the router answered an ack: {quiet:?}");
    let sent = b.sent;
    drop(b);
    let (b, answer) = Raw::reconnect(
        server.port,
        "b.localhost",
        &format!(" previd='{old_id}' h='0'"),
    )
    .await;
    assert!(
        answer.contains(&format!("<handshake acks='1' h='{sent}'/>")),
        "the router handled all {sent} bytes of the last link: {answer}"
    );
    // A stream id the router does not know: no count.
    drop(b);
    let (_b, answer) = Raw::reconnect(server.port, "b.localhost", " previd='nope' h='0'").await;
    assert!(answer.contains("<handshake acks='1'/>"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_sends_again_what_a_dead_router_had_not_acknowledged() {
    let mut server = start(&["a.localhost", "b.localhost"]).await;
    let limits = Limits::default();
    let acks = Arc::new(LinkAcks::default());
    let link = jrs_harness::link(server.port, "a.localhost", "a.localhost-secret");
    let a = Component::connect_with_acks(&link, limits, Some(acks.clone()))
        .await
        .unwrap();
    assert!(a.acknowledged());
    let (a_reader, a_writer) = a.split();
    let a_out = a_writer.spawn();
    drain(a_reader);
    let b = server
        .component("b.localhost", "b.localhost-secret")
        .await
        .unwrap();
    let (mut b_reader, _b_writer) = b.split();
    a_out.send(message("x@b.localhost", "y@a.localhost", "before"));
    assert_eq!(recv(&mut b_reader).await.id(), Some("before"));
    wait_acknowledged(&acks).await;

    // The router stops reading (frozen), a sends, the router dies: what a sent is in
    // the dead router's socket, never acknowledged.
    let pid = server.pid("router").expect("the router runs") as libc::pid_t;
    // SAFETY: a signal to the router process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for i in 0..5 {
        a_out.send(message(
            "x@b.localhost",
            "y@a.localhost",
            &format!("during{i}"),
        ));
    }
    a_out.flushed().await;
    assert!(
        acks.kept() > 0,
        "a keeps what the router did not acknowledge"
    );
    server.kill9("router");
    server
        .spawn("router", "router", &["-c", "router.xml"])
        .unwrap();
    server.wait_listening(server.port).await.unwrap();

    // a comes back first and sends again, first, what the router lost; b is not back
    // yet, but the new router keeps what a returning component sends for it (it
    // settles for one grace period after its start).
    let a = Component::connect_with_acks(&link, limits, Some(acks.clone()))
        .await
        .unwrap();
    let (a_reader, a_writer) = a.split();
    let a_out = a_writer.spawn();
    drain(a_reader);
    a_out.send(message("x@b.localhost", "y@a.localhost", "after"));
    jrs_harness::wait_for(
        "the router to find no route for b",
        Duration::from_secs(5),
        || server.log("router").contains("no route").then_some(()),
    )
    .await
    .unwrap();
    let b = server
        .component("b.localhost", "b.localhost-secret")
        .await
        .unwrap();
    let (mut b_reader, _b_writer) = b.split();
    let ids: Vec<String> = futures_ids(&mut b_reader, 6).await;
    assert_eq!(
        ids,
        ["during0", "during1", "during2", "during3", "during4", "after"],
        "what the router lost, in order, then what came after"
    );
    // Acknowledged by the new router soon after.
    wait_acknowledged(&acks).await;
}

/// Reads a's link as a component does (acks from the router are read on the way).
fn drain(mut reader: ComponentReader) {
    tokio::spawn(async move { while reader.next().await.is_ok() {} });
}

async fn wait_acknowledged(acks: &LinkAcks) {
    jrs_harness::wait_for("the router's ack", Duration::from_secs(5), || {
        (acks.kept() == 0).then_some(())
    })
    .await
    .unwrap();
}

async fn futures_ids(reader: &mut ComponentReader, n: usize) -> Vec<String> {
    let mut ids = vec![];
    while ids.len() < n {
        ids.push(recv(reader).await.id().unwrap_or_default().to_owned());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_router_restart_a_remote_stanza_waits_for_its_local_component() {
    // s2s holds the wildcard route; after a router restart it comes back before b.
    let mut server = start(&["b.localhost"]).await;
    let limits = Limits::default();
    let acks = Arc::new(LinkAcks::default());
    let link = jrs_harness::link(server.port, "s2s", "s2s-secret");
    let s2s = Component::connect_with_acks(&link, limits, Some(acks.clone()))
        .await
        .unwrap();
    let (s2s_reader, _w) = s2s.split();
    drain(s2s_reader);
    server.kill9("router");
    server
        .spawn("router", "router", &["-c", "router.xml"])
        .unwrap();
    server.wait_listening(server.port).await.unwrap();
    let mut s2s = Component::connect_with_acks(&link, limits, Some(acks.clone()))
        .await
        .unwrap();
    s2s.bind(jrs_component::PacketType::Normal, "*", false)
        .await
        .unwrap();
    let (mut s2s_reader, s2s_writer) = s2s.split();
    let s2s_out = s2s_writer.spawn();
    // From a remote server, for a local component that is not back yet: the wildcard
    // route would take it straight back to s2s.
    s2s_out.send(message("x@b.localhost", "someone@remote.example", "remote"));
    jrs_harness::wait_for("the router to hold it", Duration::from_secs(5), || {
        server.log("router").contains("no route").then_some(())
    })
    .await
    .unwrap();
    let b = server
        .component("b.localhost", "b.localhost-secret")
        .await
        .unwrap();
    let (mut b_reader, _b_writer) = b.split();
    assert_eq!(recv(&mut b_reader).await.id(), Some("remote"));
    // Nothing came back to s2s.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), s2s_reader.next())
            .await
            .is_err(),
        "s2s got its own stanza back"
    );
}
