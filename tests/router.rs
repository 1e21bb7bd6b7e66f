//! End-to-end tests of the router: real `router` process, components over loopback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jrs_component::{Component, PacketType};
use jrs_harness::{plain_users, recv, Options, RawComponent, Server};
use jrs_stream::Stanza;

const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

async fn start(names: &[&str]) -> Server {
    Server::start(Options {
        extra_users: plain_users(names),
        ..Options::default()
    })
    .await
    .expect("router starts")
}

fn condition_of(s: &Stanza) -> String {
    jrs_component::client::error_condition(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_then_wildcard_and_answers_no_route() {
    let server = start(&["a.localhost", "sender.localhost"]).await;
    let (mut a, _aw) = server
        .component("a.localhost", "a.localhost-secret")
        .await
        .unwrap()
        .split();
    let (mut sender, mut sw) = server
        .component("sender.localhost", "sender.localhost-secret")
        .await
        .unwrap()
        .split();

    // No default route yet: a remote domain is unknown.
    sw.send(b"<message to='bob@remote.example' from='u@sender.localhost' id='r1'><body>x</body></message>").await.unwrap();
    let bounce = recv(&mut sender).await;
    assert_eq!(bounce.kind(), Some("error"));
    assert_eq!(bounce.id(), Some("r1"));
    assert_eq!(condition_of(&bounce), "remote-server-not-found");
    assert!(std::str::from_utf8(bounce.inner())
        .unwrap()
        .contains(STANZA_ERRORS));

    // No storage bound: an xdb request (from one of the project's components: others
    // may send only normal packets) gets an error result.
    let (mut admin, mut admin_w) = server
        .component("admin", "admin-secret")
        .await
        .unwrap()
        .split();
    admin_w.send(b"<xdb xmlns='urn:jabberd-rs:xdb:0' type='get' to='alice@localhost' from='admin' ns='x' id='x1'/>").await.unwrap();
    let bounce = recv(&mut admin).await;
    assert_eq!((bounce.name(), bounce.kind()), ("xdb", Some("error")));
    assert_eq!(condition_of(&bounce), "service-unavailable");

    // Exact host.
    sw.send(b"<message to='bot@a.localhost' from='u@sender.localhost' id='m1'/>")
        .await
        .unwrap();
    let got = recv(&mut a).await;
    assert_eq!(
        (got.id(), got.from()),
        (Some("m1"), Some("u@sender.localhost"))
    );

    // Default route: s2s binds `*` and gets every remote domain, but not local hosts.
    let mut s2s = server.component("s2s", "s2s-secret").await.unwrap();
    s2s.bind(PacketType::Normal, "*", false).await.unwrap();
    let (mut s2s, mut s2s_w) = s2s.split();
    sw.send(b"<message to='bob@remote.example' from='u@sender.localhost' id='r2'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut s2s).await.id(), Some("r2"));
    sw.send(b"<message to='bot@a.localhost' from='u@sender.localhost' id='m2'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut a).await.id(), Some("m2"));

    // The default route may speak for remote domains, not for local ones.
    s2s_w
        .send(b"<message to='u@sender.localhost' from='bob@remote.example' id='in1'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut sender).await.id(), Some("in1"));
    s2s_w
        .send(b"<message to='u@sender.localhost' from='eve@a.localhost' id='in2'/>")
        .await
        .unwrap();
    let bounce = recv(&mut s2s).await;
    assert_eq!(
        (bounce.id(), condition_of(&bounce).as_str()),
        (Some("in2"), "not-allowed")
    );

    // Errors are never answered with errors.
    sw.send(b"<message to='bob@nowhere.example' from='u@sender.localhost' type='error' id='e1'/>")
        .await
        .unwrap();
    sw.send(b"<message to='bot@a.localhost' from='u@sender.localhost' id='after'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut a).await.id(), Some("after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_acl_refusals() {
    let server = Server::start(Options {
        extra_users: plain_users(&["plain.localhost"]),
        ..Options::default()
    })
    .await
    .unwrap();
    let mut plain = server
        .component("plain.localhost", "plain.localhost-secret")
        .await
        .unwrap();
    for (route, host) in [
        (PacketType::Xdb, "localhost"),
        (PacketType::Normal, "*"),
        (PacketType::Log, "*"),
    ] {
        let e = plain
            .bind(route, host, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not-allowed"), "{route} {host}: {e}");
    }
    // sm may bind any host, but not another connected component's name.
    let mut sm1 = server.component("sm-1", "sm-secret").await.unwrap();
    let e = sm1
        .bind(PacketType::Normal, "plain.localhost", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not-allowed"), "{e}");
    // Nor the default route.
    assert!(sm1.bind(PacketType::Normal, "*", false).await.is_err());
    // Shared routes take several instances; exclusive ones refuse a second holder.
    sm1.bind(PacketType::Session, "localhost", true)
        .await
        .unwrap();
    let mut sm2 = server.component("sm-2", "sm-secret").await.unwrap();
    sm2.bind(PacketType::Session, "localhost", true)
        .await
        .unwrap();
    let mut x1 = server.component("xdb-file-1", "xdb-secret").await.unwrap();
    x1.bind(PacketType::Xdb, "localhost", false).await.unwrap();
    let mut x2 = server.component("xdb-file-2", "xdb-secret").await.unwrap();
    let e = x2
        .bind(PacketType::Xdb, "localhost", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("conflict"), "{e}");
    // A second link with a connected name is refused at the handshake.
    let e = server
        .component("xdb-file-1", "xdb-secret")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("conflict"), "{e}");
    // Unbind then bind again works.
    x1.unbind(PacketType::Xdb, "localhost").await.unwrap();
    x2.bind(PacketType::Xdb, "localhost", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals() {
    let server = start(&["a.localhost"]).await;
    let mut c = RawComponent::connect(server.port, "a.localhost")
        .await
        .unwrap();
    c.send("<handshake>0000000000000000000000000000000000000000</handshake>")
        .await
        .unwrap();
    let got = c.read_to_close().await.unwrap();
    assert!(
        got.contains("<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"),
        "{got}"
    );

    let mut c = RawComponent::connect(server.port, "nobody.localhost")
        .await
        .unwrap();
    let got = c.read_to_close().await.unwrap();
    assert!(got.contains("<host-unknown"), "{got}");

    // The right secret works (and a different name's secret does not).
    assert!(server
        .raw("a.localhost", "a.localhost-secret")
        .await
        .is_ok());
    assert!(server.raw("sm", "a.localhost-secret").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_instances_split_users_stably() {
    let server = start(&[]).await;
    let (mut _admin_r, mut admin) = server
        .component("admin", "admin-secret")
        .await
        .unwrap()
        .split();
    let owners: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut writers = vec![];
    let join = |name: &'static str, owners: Arc<Mutex<HashMap<String, String>>>| {
        let server = &server;
        async move {
            let mut c = server.component(name, "sm-secret").await.unwrap();
            c.bind(PacketType::Session, "localhost", true)
                .await
                .unwrap();
            let (mut r, w) = c.split();
            tokio::spawn(async move {
                while let Ok(s) = r.next().await {
                    owners
                        .lock()
                        .unwrap()
                        .insert(s.to().unwrap().to_owned(), name.to_owned());
                }
            });
            w
        }
    };
    for name in ["sm-1", "sm-2", "sm-3"] {
        writers.push(join(name, owners.clone()).await);
    }
    const USERS: usize = 3000;
    let batch: String = (0..USERS)
        .map(|i| {
            format!(
                "<session xmlns='urn:jabberd-rs:session:0' to='user{i}@localhost' from='admin'/>"
            )
        })
        .collect();
    admin.send(batch.as_bytes()).await.unwrap();
    let all_owned = |what: &'static str| {
        let owners = owners.clone();
        jrs_harness::wait_for(what, Duration::from_secs(10), move || {
            let o = owners.lock().unwrap();
            (o.len() == USERS).then(|| o.clone())
        })
    };
    let before = all_owned("3 instances to get every user").await.unwrap();
    owners.lock().unwrap().clear();
    writers.push(join("sm-4", owners.clone()).await);
    admin.send(batch.as_bytes()).await.unwrap();
    let after = all_owned("4 instances to get every user").await.unwrap();
    let moved: Vec<_> = before.iter().filter(|(k, v)| after[*k] != **v).collect();
    let mut per: HashMap<&str, usize> = HashMap::new();
    for v in after.values() {
        *per.entry(v.as_str()).or_default() += 1;
    }
    println!(
        "rendezvous: adding a 4th instance moved {} of {USERS} users ({:.1}%, ideal 25%); per instance: {per:?}",
        moved.len(),
        100.0 * moved.len() as f64 / USERS as f64
    );
    assert!(
        moved.iter().all(|(k, _)| after[*k] == "sm-4"),
        "users only move to the new instance"
    );
    assert!(
        (USERS * 18 / 100..USERS * 32 / 100).contains(&moved.len()),
        "moved {}",
        moved.len()
    );
    // Every instance has a fair share.
    assert!(per.values().all(|&n| n > USERS / 8), "{per:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_fan_out_to_every_log_instance() {
    let server = Server::start(Options {
        extra_users:
            "<component name='logger' secret='log-secret'><allow type='log' host='*'/></component>"
                .into(),
        ..Options::default()
    })
    .await
    .unwrap();
    let mut readers = vec![];
    for name in ["logger-1", "logger-2"] {
        let mut c = server.component(name, "log-secret").await.unwrap();
        c.bind(PacketType::Log, "*", false).await.unwrap();
        readers.push(c.split().0);
    }
    let (_r, mut admin) = server
        .component("admin", "admin-secret")
        .await
        .unwrap()
        .split();
    admin
        .send(b"<log xmlns='urn:jabberd-rs:log:0' from='admin' level='notice'>user alice logged in</log>")
        .await
        .unwrap();
    for r in &mut readers {
        let s = recv(r).await;
        assert_eq!(s.name(), "log");
        assert_eq!(s.inner(), b"user alice logged in");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_from_is_bounced_not_delivered() {
    let server = start(&["a.localhost", "b.localhost"]).await;
    let mut a = server
        .raw("a.localhost", "a.localhost-secret")
        .await
        .unwrap();
    let (mut b, _bw) = server
        .component("b.localhost", "b.localhost-secret")
        .await
        .unwrap()
        .split();
    a.send("<message to='u@b.localhost' from='boss@b.localhost' id='forged'><body>pay</body></message>")
        .await
        .unwrap();
    let got = a
        .expect("the bounce", |s| s.contains("</message>"))
        .await
        .unwrap();
    assert!(
        got.contains("id='forged'") && got.contains("type='error'") && got.contains("<not-allowed"),
        "{got}"
    );
    a.send("<message to='u@b.localhost' from='me@a.localhost' id='honest'/>")
        .await
        .unwrap();
    assert_eq!(
        recv(&mut b).await.id(),
        Some("honest"),
        "the forged stanza never arrived"
    );
    // A missing from is refused too.
    a.send("<message to='u@b.localhost' id='nofrom'/>")
        .await
        .unwrap();
    let got = a
        .expect("the bounce", |s| s.contains("</message>"))
        .await
        .unwrap();
    assert!(got.contains("<bad-request"), "{got}");
}

/// A pair of components that keeps exchanging stanzas while others misbehave.
async fn assert_pair_still_talks(server: &Server, round: u32) {
    let (mut b, _bw) = server
        .component("b.localhost", "b.localhost-secret")
        .await
        .unwrap()
        .split();
    let (_cr, mut c) = server
        .component("c.localhost", "c.localhost-secret")
        .await
        .unwrap()
        .split();
    c.send(format!("<message to='u@b.localhost' from='v@c.localhost' id='ok{round}'/>").as_bytes())
        .await
        .unwrap();
    assert_eq!(recv(&mut b).await.id(), Some(format!("ok{round}").as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_ends_only_the_offending_link() {
    let server = start(&["a.localhost", "b.localhost", "c.localhost"]).await;
    // A healthy pair connected through the whole test.
    let (mut b, _bw) = server
        .component("b.localhost", "b.localhost-secret")
        .await
        .unwrap()
        .split();
    let (_cr, mut c) = server
        .component("c.localhost", "c.localhost-secret")
        .await
        .unwrap()
        .split();
    let mut round = 0;
    let mut exchange = async || {
        round += 1;
        c.send(
            format!("<message to='u@b.localhost' from='v@c.localhost' id='ok{round}'/>").as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(recv(&mut b).await.id(), Some(format!("ok{round}").as_str()));
    };
    exchange().await;

    let ten_mb = {
        let mut s = b"<message to='u@b.localhost' from='v@a.localhost'><body>".to_vec();
        s.extend(std::iter::repeat_n(b'a', 10 << 20));
        s.extend_from_slice(b"</body></message>");
        s
    };
    let deep = b"<a>".repeat(100_000);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "mismatched tags",
            b"<message to='u@b.localhost' from='v@a.localhost'><body>x</bod></message>".to_vec(),
            "not-well-formed",
        ),
        (
            "undeclared entity",
            b"<message to='u@b.localhost' from='v@a.localhost'>&xxe;</message>".to_vec(),
            "restricted-xml",
        ),
        (
            "comment",
            b"<message to='u@b.localhost' from='v@a.localhost'><!-- x --></message>".to_vec(),
            "restricted-xml",
        ),
        ("text at stream level", b"hello".to_vec(), "not-well-formed"),
        (
            // Relayed, a raw U+FFFF makes the recipient's parser reject its stream.
            "raw U+FFFF",
            "<message to='u@b.localhost' from='v@a.localhost'><body>ok \u{FFFF} ok</body></message>"
                .as_bytes()
                .to_vec(),
            "not-well-formed",
        ),
        ("10 MB stanza", ten_mb, "policy-violation"),
        ("100 000 levels deep", deep, "policy-violation"),
        (
            "unknown element",
            b"<frobnicate/>".to_vec(),
            "unsupported-stanza-type",
        ),
    ];
    for (what, bytes, condition) in cases {
        let mut offender = server
            .raw("a.localhost", "a.localhost-secret")
            .await
            .unwrap();
        // Write from a task: the router may close the link before all bytes are written.
        let RawComponent { stream, .. } = &mut offender;
        let (mut rd, mut wr) = stream.split();
        let write = async {
            use tokio::io::AsyncWriteExt;
            let _ = wr.write_all(&bytes).await;
        };
        let read = async {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got).into_owned()
        };
        let (_, got) = tokio::join!(write, read);
        assert!(
            got.contains(&format!(
                "<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            )),
            "{what}: expected {condition}, got {got}"
        );
        assert!(
            got.ends_with("</stream:stream>"),
            "{what}: stream closed after the error: {got}"
        );
        exchange().await;
    }
    // The offender's name is free again.
    assert!(server
        .raw("a.localhost", "a.localhost-secret")
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_holds_packets_then_bounces_them() {
    let server = Server::start(Options {
        extra_users: plain_users(&["c.localhost", "s.localhost"]),
        grace_secs: 1.0,
        ..Options::default()
    })
    .await
    .unwrap();
    let (mut sender, mut sw) = server
        .component("s.localhost", "s.localhost-secret")
        .await
        .unwrap()
        .split();
    let c = server
        .component("c.localhost", "c.localhost-secret")
        .await
        .unwrap();
    drop(c);
    // The router notices the close; packets sent now are held.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..3 {
        sw.send(
            format!("<message to='bot@c.localhost' from='u@s.localhost' id='held{i}'/>").as_bytes(),
        )
        .await
        .unwrap();
    }
    let (mut c, _cw) = server
        .component("c.localhost", "c.localhost-secret")
        .await
        .unwrap()
        .split();
    for i in 0..3 {
        assert_eq!(
            recv(&mut c).await.id(),
            Some(format!("held{i}").as_str()),
            "delivered in order"
        );
    }
    drop(c);
    drop(_cw);
    tokio::time::sleep(Duration::from_millis(100)).await;
    sw.send(b"<message to='bot@c.localhost' from='u@s.localhost' id='late'/>")
        .await
        .unwrap();
    sw.send(b"<iq to='bot@c.localhost' from='u@s.localhost' id='late-iq' type='get'><ping xmlns='urn:xmpp:ping'/></iq>").await.unwrap();
    // Past the grace period (1 s) the sender gets errors: nothing is dropped silently.
    let started = std::time::Instant::now();
    let bounce = recv(&mut sender).await;
    assert_eq!((bounce.id(), bounce.kind()), (Some("late"), Some("error")));
    assert_eq!(condition_of(&bounce), "service-unavailable");
    assert_eq!(recv(&mut sender).await.id(), Some("late-iq"));
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "bounced only after the grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_stops_reading_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(Options {
        extra_users: plain_users(&[
            "slow.localhost",
            "s.localhost",
            "b.localhost",
            "c.localhost",
        ]),
        max_queue_bytes: 1 << 20,
        ..Options::default()
    })
    .await
    .unwrap();
    // Authenticated, then never reads again.
    let _slow = server
        .raw("slow.localhost", "slow.localhost-secret")
        .await
        .unwrap();
    let sender = server
        .raw("s.localhost", "s.localhost-secret")
        .await
        .unwrap();
    let (mut rd, mut wr) = sender.stream.into_split();
    // Count our bounces without parsing them, so we keep up with the router.
    let reader = tokio::spawn(async move {
        let (mut errors, mut cut_off, mut tail) = (0usize, false, Vec::new());
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), rd.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&tail);
            errors += text.matches("<service-unavailable").count();
            cut_off |= text.contains("stopped reading and was disconnected");
            let keep = tail.len().saturating_sub(64);
            tail.drain(..keep);
        }
        (errors, cut_off)
    });
    let body = "x".repeat(1000);
    let flood: String = (0..20_000)
        .map(|i| format!("<message to='bot@slow.localhost' from='u@s.localhost' id='f{i}'><body>{body}</body></message>"))
        .collect();
    wr.write_all(flood.as_bytes()).await.unwrap();
    let (errors, cut_off) = reader.await.unwrap();
    println!("{errors} of 20000 messages bounced once the stuck component was cut off");
    assert!(cut_off, "the bounces say why");
    assert!(errors > 1000);
    // Everyone else is still served, and the sender, slowed down while it read its many
    // bounces (back-pressure), was never cut off.
    assert_pair_still_talks(&server, 1).await;
    let log = server.log("router");
    assert!(log.contains("disconnecting it component=slow.localhost"));
    assert!(
        !log.contains("disconnecting it component=s.localhost"),
        "the sender was cut off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_links_with_client_certificates() {
    let certs = std::env::temp_dir().join(format!("jrs-mtls-{}", std::process::id()));
    let ca = jrs_harness::TestCa::new(&certs.join("ca")).unwrap();
    let other_ca = jrs_harness::TestCa::new(&certs.join("other-ca")).unwrap();
    let (cert, key) = ca.issue(&certs, "router.test").unwrap();
    let (good_cert, good_key) = ca.issue(&certs, "sm").unwrap();
    let (bad_cert, bad_key) = other_ca.issue(&certs.join("other"), "sm").unwrap();
    let tls_port = jrs_harness::free_port();
    let mut server = Server::start(Options {
        extra_users: plain_users(&["t.localhost"]),
        extra_router: format!(
            "<listen address='127.0.0.1' port='{tls_port}' tls='true'/><tls cert='{}' key='{}' client-ca='{}'/>",
            cert.display(),
            key.display(),
            ca.ca_file.display()
        ),
        ..Options::default()
    })
    .await
    .unwrap();
    server.wait_listening(tls_port).await.unwrap();
    jrs_component::transport::install_crypto_provider();
    let base = jrs_config::RouterLink {
        tls: true,
        ca_file: Some(ca.ca_file.clone()),
        server_name: Some("router.test".into()),
        ..jrs_harness::link(tls_port, "t.localhost", "t.localhost-secret")
    };
    let limits = jrs_stream::Limits::default();
    // The right secret is not enough without a certificate, or with one of another CA.
    assert!(Component::connect(&base, limits).await.is_err());
    let stranger = jrs_config::RouterLink {
        client_cert: Some(jrs_config::TlsFiles {
            cert: bad_cert,
            key: bad_key,
        }),
        ..base.clone()
    };
    assert!(Component::connect(&stranger, limits).await.is_err());
    let member = jrs_config::RouterLink {
        client_cert: Some(jrs_config::TlsFiles {
            cert: good_cert,
            key: good_key,
        }),
        ..base
    };
    let (mut t, mut tw) = Component::connect(&member, limits).await.unwrap().split();
    tw.send(b"<message to='t.localhost' from='x@t.localhost' id='to-myself'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut t).await.id(), Some("to-myself"));
    assert!(server.log("router").contains("TLS handshake failed"));
    let _ = std::fs::remove_dir_all(certs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_unix_socket_links() {
    let certs = std::env::temp_dir().join(format!("jrs-certs-{}", std::process::id()));
    std::fs::create_dir_all(&certs).unwrap();
    let (cert, key) = jrs_harness::self_signed(&certs, "router.test").unwrap();
    let tls_port = jrs_harness::free_port();
    let sock = certs.join("router.sock");
    let mut server = Server::start(Options {
        extra_users: plain_users(&["t.localhost", "u.localhost"]),
        extra_router: format!(
            "<listen address='127.0.0.1' port='{tls_port}' tls='true'/><listen unix='{}'/><tls cert='{}' key='{}'/>",
            sock.display(),
            cert.display(),
            key.display()
        ),
        ..Options::default()
    })
    .await
    .unwrap();
    // Listeners are bound one after the other: wait for the TLS one too.
    server.wait_listening(tls_port).await.unwrap();
    jrs_component::transport::install_crypto_provider();
    let base = jrs_config::RouterLink {
        tls: true,
        ca_file: Some(cert.clone()),
        server_name: Some("router.test".into()),
        ..jrs_harness::link(tls_port, "t.localhost", "t.localhost-secret")
    };
    let limits = jrs_stream::Limits::default();
    let (mut t, mut tw) = Component::connect(&base, limits).await.unwrap().split();
    let unix_link = jrs_config::RouterLink {
        unix: Some(sock.clone()),
        tls: false,
        name: "u.localhost".into(),
        secret: "u.localhost-secret".into(),
        ..base.clone()
    };
    let (mut u, mut uw) = Component::connect(&unix_link, limits)
        .await
        .unwrap()
        .split();
    tw.send(b"<message to='x@u.localhost' from='y@t.localhost' id='over-tls'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut u).await.id(), Some("over-tls"));
    uw.send(b"<message to='y@t.localhost' from='x@u.localhost' id='over-unix'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut t).await.id(), Some("over-unix"));
    // A certificate for another name is refused by the component.
    let wrong = jrs_config::RouterLink {
        server_name: Some("other.test".into()),
        ..base
    };
    assert!(Component::connect(&wrong, limits).await.is_err());
    let _ = std::fs::remove_dir_all(certs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_without_to_are_answered_by_the_router() {
    let server = start(&["a.localhost"]).await;
    let mut a = server
        .raw("a.localhost", "a.localhost-secret")
        .await
        .unwrap();
    a.send("<iq type='get' from='a.localhost' id='q'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .unwrap();
    let got = a
        .expect("the error", |s| s.contains("</iq>"))
        .await
        .unwrap();
    assert!(
        got.contains("type='error'") && got.contains("service-unavailable"),
        "{got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_links_hear_when_components_bind_and_disconnect() {
    let server = start(&["a.localhost", "b.localhost"]).await;
    let mut a = server
        .component("a.localhost", "a.localhost-secret")
        .await
        .unwrap();
    a.subscribe_notices().await.unwrap();
    let (mut a, mut aw) = a.split();
    // A plain component that did not subscribe hears nothing (it would not understand).
    let (mut b, _bw) = server
        .component("b.localhost", "b.localhost-secret")
        .await
        .unwrap()
        .split();
    let c2s = server.component("c2s-1", "c2s-secret").await.unwrap();
    drop(c2s);
    // First what was bound when a subscribed (its own routes), then each new route as
    // it is bound, then the disconnection.
    let mut bound = vec![];
    let notice = loop {
        let n = recv(&mut a).await;
        assert_eq!(n.name(), "notice");
        if n.attr("event").as_deref() != Some("bound") {
            break n;
        }
        bound.push((
            n.attr("name").unwrap(),
            n.attr("route").unwrap(),
            n.attr("host").unwrap(),
        ));
    };
    for (name, host) in [
        ("a.localhost", "a.localhost"),
        ("b.localhost", "b.localhost"),
        ("c2s-1", "c2s-1"),
    ] {
        assert!(
            bound.contains(&(name.into(), "normal".into(), host.into())),
            "no bound notice for {name}: {bound:?}"
        );
    }
    assert_eq!(notice.attr("event").as_deref(), Some("disconnected"));
    assert_eq!(notice.attr("name").as_deref(), Some("c2s-1"));
    aw.send(b"<message to='x@b.localhost' from='y@a.localhost' id='first'/>")
        .await
        .unwrap();
    assert_eq!(
        recv(&mut b).await.id(),
        Some("first"),
        "no notice reached b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_components_send_only_normal_packets() {
    let server = start(&["gw.localhost"]).await;
    // Storage and a session manager stand in for the project's own components.
    let (mut storage, _s) = server
        .component("xdb-file", "xdb-secret")
        .await
        .unwrap()
        .split();
    let (mut gw, mut gw_w) = server
        .component("gw.localhost", "gw.localhost-secret")
        .await
        .unwrap()
        .split();
    // Reading a user's credentials, or starting a session as the user: refused.
    gw_w.send(b"<xdb xmlns='urn:jabberd-rs:xdb:0' type='get' to='alice@xdb-file' from='gw.localhost' ns='urn:jabberd-rs:auth:0' id='x1'/>")
        .await
        .unwrap();
    let r = recv(&mut gw).await;
    assert_eq!(
        (r.name(), r.kind(), r.id()),
        ("xdb", Some("error"), Some("x1"))
    );
    assert_eq!(condition_of(&r), "not-allowed");
    gw_w.send(b"<session type='start' to='alice@xdb-file' from='gw.localhost' jid='alice@localhost/x' sid='1'/>")
        .await
        .unwrap();
    let r = recv(&mut gw).await;
    assert_eq!((r.name(), r.kind()), ("session", Some("error")));
    // Ordinary stanzas still flow, and nothing of the above reached storage.
    gw_w.send(b"<message to='x@xdb-file' from='gw.localhost' id='m1'/>")
        .await
        .unwrap();
    assert_eq!(recv(&mut storage).await.id(), Some("m1"));
}
