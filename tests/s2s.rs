//! End-to-end tests of s2s: two complete installations (router, xdb-file, sm, s2s each)
//! with their own domains on loopback. The test plays c2s for each (session packets to
//! sm, as tests/sm.rs does), so users on both sides exchange subscriptions, presence and
//! messages through the real sm and s2s processes. Also: bounces for unresolvable and
//! silent remotes, raw remote streams that break the rules, and SRV resolution against
//! a small DNS server written here.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use jrs_auth::{Credentials, NS_AUTH};
use jrs_component::{ComponentReader, ComponentWriter};
use jrs_harness::{free_port, Options, Server};
use jrs_stream::Stanza;
use jrs_xdb::{Op, Request};

const WAIT: Duration = Duration::from_secs(10);

// -- a fake c2s ---------------------------------------------------------------------------

/// Plays c2s for one installation: starts sessions, sends session packets, collects what
/// sm sends back.
struct C2s {
    r: ComponentReader,
    w: ComponentWriter,
    inbox: Vec<Stanza>,
}

impl C2s {
    async fn connect(server: &Server) -> C2s {
        let (r, w) = server
            .component("c2s-1", "c2s-secret")
            .await
            .unwrap()
            .split();
        C2s {
            r,
            w,
            inbox: vec![],
        }
    }

    async fn packet(&mut self, kind: &str, jid: &str, sid: &str, inner: &str) {
        let bare = jid.split('/').next().unwrap();
        let head =
            format!("<session type='{kind}' to='{bare}' from='c2s-1' jid='{jid}' sid='{sid}'");
        let p = if inner.is_empty() {
            format!("{head}/>")
        } else {
            format!("{head}>{inner}</session>")
        };
        self.w.send(p.as_bytes()).await.unwrap();
    }

    async fn start(&mut self, jid: &str, sid: &str) {
        self.packet("start", jid, sid, "").await;
        self.expect(&format!("started for {sid}"), |s| {
            s.kind() == Some("started") && s.attr("sid").as_deref() == Some(sid)
        })
        .await;
    }

    async fn send(&mut self, jid: &str, sid: &str, stanza: &str) {
        self.packet("stanza", jid, sid, stanza).await;
    }

    async fn expect(&mut self, what: &str, f: impl Fn(&Stanza) -> bool) -> Stanza {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(i) = self.inbox.iter().position(&f) {
                return self.inbox.remove(i);
            }
            match tokio::time::timeout_at(deadline, self.r.next()).await {
                Ok(Ok(s)) => self.inbox.push(s),
                Ok(Err(e)) => panic!("link lost waiting for {what}: {e}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; inbox: {:#?}",
                    self.inbox
                        .iter()
                        .map(|s| String::from_utf8_lossy(s.as_slice()).into_owned())
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    /// A stanza for session `sid` whose text contains every one of `parts`.
    async fn stanza(&mut self, sid: &str, parts: &[&str]) -> String {
        let what = format!("a stanza to {sid} with {parts:?}");
        let s = self
            .expect(&what, |s| {
                let inner = String::from_utf8_lossy(s.inner());
                s.kind() == Some("stanza")
                    && s.attr("sid").as_deref() == Some(sid)
                    && parts.iter().all(|p| inner.contains(p))
            })
            .await;
        String::from_utf8_lossy(s.inner()).into_owned()
    }
}

async fn create_account(server: &Server, jid: &str) {
    let (mut r, mut w) = server
        .component("admin", "admin-secret")
        .await
        .unwrap()
        .split();
    let req = Request {
        op: Op::Set,
        owner: jid.into(),
        ns: NS_AUTH.into(),
        id: "acct".into(),
        from: "admin".into(),
        max_items: None,
        max_age: None,
        flush: jrs_xdb::Flush::Now,
        content: Bytes::from(Credentials::from_password("secret").to_xml()),
    };
    w.send(req.to_xml().as_bytes()).await.unwrap();
    loop {
        let s = tokio::time::timeout(WAIT, r.next())
            .await
            .expect("storage answers")
            .unwrap();
        if s.id() == Some("acct") {
            assert_eq!(s.kind(), Some("result"));
            return;
        }
    }
}

// -- installations ------------------------------------------------------------------------

/// One installation serving `domain`, with its s2s listening on `s2s_port`.
struct Domain {
    server: Server,
    domain: String,
    c2s: C2s,
}

fn secret_of(domain: &str) -> String {
    format!("dialback-secret-of-{domain}")
}

/// Starts router, xdb-file, sm and s2s for `domain`; `s2s_extra` goes into s2s.xml
/// (routes, dns, tls, queue settings).
async fn start_domain(domain: &str, s2s_port: u16, s2s_extra: &str, users: &[&str]) -> Domain {
    start_domain_with(&[domain], s2s_port, s2s_extra, users, None).await
}

/// The same for several local domains (users are created on the first), with s2s's
/// certificates issued by `ca` instead of self-signed when given.
async fn start_domain_with(
    domains: &[&str],
    s2s_port: u16,
    s2s_extra: &str,
    users: &[&str],
    ca: Option<&jrs_harness::TestCa>,
) -> Domain {
    let domain = domains[0];
    let mut server = Server::start(Options::default()).await.unwrap();
    if let Some(ca) = ca {
        for d in domains {
            ca.issue(&server.path("certs"), d).unwrap();
        }
    }
    let hosts: String = domains
        .iter()
        .map(|d| format!("<host>{d}</host>"))
        .collect();
    let s2s_hosts: String = domains
        .iter()
        .map(|d| {
            format!(
                "<host name='{d}' cert='certs/{d}.crt' key='certs/{d}.key' self-signed='true'/>"
            )
        })
        .collect();
    let xdb = format!(
        "<xdb-file>{}{hosts}<spool dir='spool'/><log level='debug'/></xdb-file>",
        server.router_element("xdb-file", "xdb-secret")
    );
    server.write("xdb-file.xml", &xdb).unwrap();
    server
        .spawn("xdb-file", "xdb-file", &["-c", "xdb-file.xml"])
        .unwrap();
    let sm = format!(
        "<sm>{}{hosts}<log level='debug'/></sm>",
        server.router_element("sm", "sm-secret")
    );
    server.write("sm.xml", &sm).unwrap();
    server.spawn("sm", "sm", &["-c", "sm.xml"]).unwrap();
    let s2s = format!(
        "<s2s>{}{s2s_hosts}\
         <listen address='127.0.0.1' port='{s2s_port}'/><dialback secret='{}'/>{s2s_extra}\
         <log level='debug'/></s2s>",
        server.router_element("s2s", "s2s-secret"),
        secret_of(domain)
    );
    server.write("s2s.xml", &s2s).unwrap();
    server.spawn("s2s", "s2s", &["-c", "s2s.xml"]).unwrap();
    for name in ["xdb-file", "sm", "s2s"] {
        let deadline = Instant::now() + WAIT;
        while !server.log(name).contains("connected to the router") {
            if let Some(status) = server.exited(name) {
                panic!("{name} exited ({status}):\n{}", server.log(name));
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not connect:\n{}",
                server.log(name)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for user in users {
        create_account(&server, &format!("{user}@{domain}")).await;
    }
    let c2s = C2s::connect(&server).await;
    Domain {
        server,
        domain: domain.into(),
        c2s,
    }
}

fn route(domain: &str, port: u16) -> String {
    format!("<route domain='{domain}' address='127.0.0.1' port='{port}'/>")
}

// -- a fake DNS server --------------------------------------------------------------------

enum Rr {
    Srv(u16, u16, u16, &'static str),
    A(Ipv4Addr),
}

/// Answers SRV and A questions from `table` (lower-case names without the final dot);
/// anything else is NXDOMAIN.
async fn fake_dns(table: Vec<(&'static str, Rr)>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            if let Some(answer) = dns_answer(&buf[..n], &table) {
                let _ = socket.send_to(&answer, peer).await;
            }
        }
    });
    addr
}

fn encode_name(name: &str, out: &mut Vec<u8>) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

fn dns_answer(query: &[u8], table: &[(&'static str, Rr)]) -> Option<Vec<u8>> {
    // The question: labels from byte 12, then type and class.
    let mut pos = 12;
    let mut labels = vec![];
    loop {
        let len = *query.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question_end = pos + 4;
    let name = labels.join(".");
    let mut answers = vec![];
    let mut known = false;
    for (n, rr) in table {
        if *n != name {
            continue;
        }
        known = true;
        let (rtype, rdata) = match rr {
            Rr::Srv(priority, weight, port, target) => {
                let mut d = vec![];
                for v in [priority, weight, port] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
                encode_name(target, &mut d);
                (33u16, d)
            }
            Rr::A(ip) => (1u16, ip.octets().to_vec()),
        };
        if rtype != qtype {
            continue;
        }
        let mut a = vec![0xc0, 0x0c];
        a.extend_from_slice(&rtype.to_be_bytes());
        a.extend_from_slice(&1u16.to_be_bytes());
        a.extend_from_slice(&60u32.to_be_bytes());
        a.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        a.extend_from_slice(&rdata);
        answers.push(a);
    }
    let rcode = if known { 0 } else { 3 };
    let mut out = vec![query[0], query[1], 0x81, 0x80 | rcode];
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(query.get(12..question_end)?);
    for a in answers {
        out.extend_from_slice(&a);
    }
    Some(out)
}

// -- tests --------------------------------------------------------------------------------

/// Two domains: a.test finds b.test through SRV records on a fake DNS server, b.test
/// finds a.test through its static map. Subscriptions both ways, presence, messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_exchange_subscriptions_presence_and_messages() {
    let (port_a, port_b) = (free_port(), free_port());
    let dns = fake_dns(vec![
        (
            "_xmpp-server._tcp.b.test",
            Rr::Srv(20, 0, 1, "nothing.b.test"),
        ),
        (
            "_xmpp-server._tcp.b.test",
            Rr::Srv(10, 5, port_b, "xmpp.b.test"),
        ),
        ("xmpp.b.test", Rr::A(Ipv4Addr::LOCALHOST)),
    ])
    .await;
    let mut a = start_domain(
        "a.test",
        port_a,
        &format!(
            "<dns><nameserver address='127.0.0.1' port='{}'/></dns>",
            dns.port()
        ),
        &["alice"],
    )
    .await;
    let mut b = start_domain("b.test", port_b, &route("a.test", port_a), &["bob"]).await;
    const ALICE: &str = "alice@a.test/phone";
    const BOB: &str = "bob@b.test/desk";
    a.c2s.start(ALICE, "a").await;
    b.c2s.start(BOB, "b").await;
    a.c2s.send(ALICE, "a", "<presence/>").await;
    b.c2s
        .send(BOB, "b", "<presence><status>at work</status></presence>")
        .await;

    // alice subscribes to bob, bob approves: alice sees bob's presence.
    let started = Instant::now();
    a.c2s
        .send(ALICE, "a", "<presence type='subscribe' to='bob@b.test'/>")
        .await;
    b.c2s
        .stanza("b", &["type='subscribe'", "from='alice@a.test'"])
        .await;
    eprintln!(
        "first stanza across (connect, TLS, dialback both ways): {:?}",
        started.elapsed()
    );
    b.c2s
        .send(BOB, "b", "<presence type='subscribed' to='alice@a.test'/>")
        .await;
    a.c2s
        .stanza("a", &["type='subscribed'", "from='bob@b.test'"])
        .await;
    a.c2s
        .stanza("a", &["from='bob@b.test/desk'", "at work"])
        .await;

    // bob subscribes to alice, alice approves: bob sees alice's presence.
    b.c2s
        .send(BOB, "b", "<presence type='subscribe' to='alice@a.test'/>")
        .await;
    a.c2s
        .stanza("a", &["type='subscribe'", "from='bob@b.test'"])
        .await;
    a.c2s
        .send(ALICE, "a", "<presence type='subscribed' to='bob@b.test'/>")
        .await;
    b.c2s.stanza("b", &["from='alice@a.test/phone'"]).await;

    // Messages both ways.
    let sent = Instant::now();
    a.c2s
        .send(
            ALICE,
            "a",
            "<message to='bob@b.test' type='chat'><body>hello b</body></message>",
        )
        .await;
    b.c2s
        .stanza("b", &["from='alice@a.test/phone'", "hello b"])
        .await;
    eprintln!("message over established streams: {:?}", sent.elapsed());
    b.c2s
        .send(
            BOB,
            "b",
            "<message to='alice@a.test/phone' type='chat'><body>hello a</body></message>",
        )
        .await;
    a.c2s
        .stanza("a", &["from='bob@b.test/desk'", "hello a"])
        .await;

    // Presence updates flow to the subscriber on the other side.
    b.c2s
        .send(BOB, "b", "<presence><show>away</show></presence>")
        .await;
    a.c2s
        .stanza("a", &["from='bob@b.test/desk'", "<show>away</show>"])
        .await;

    // TLS was used, and dialback authenticated (self-signed certificates).
    let log = a.server.log("s2s");
    assert!(log.contains("authenticated with dialback"), "{log}");
    assert!(log.contains("tls=true"), "{log}");
    assert_eq!(a.domain, "a.test");
    assert_eq!(b.domain, "b.test");
}

/// A domain that does not resolve (NXDOMAIN, or SRV target '.') bounces
/// remote-server-not-found; a remote that accepts TCP and never answers bounces
/// remote-server-timeout after the configured queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_remotes_bounce() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let dns = fake_dns(vec![("_xmpp-server._tcp.none.test", Rr::Srv(0, 0, 0, "."))]).await;
    let mut a = start_domain(
        "a.test",
        free_port(),
        &format!(
            "{}<dns><nameserver address='127.0.0.1' port='{}'/></dns><queue timeout='1.5'/>",
            route("silent.test", silent_port),
            dns.port()
        ),
        &["alice"],
    )
    .await;
    const ALICE: &str = "alice@a.test/phone";
    a.c2s.start(ALICE, "a").await;

    let t = Instant::now();
    a.c2s
        .send(
            ALICE,
            "a",
            "<message to='x@nowhere.test' id='m1'><body>1</body></message>",
        )
        .await;
    let e = a.c2s.stanza("a", &["id='m1'", "type='error'"]).await;
    assert!(e.contains("remote-server-not-found"), "{e}");
    eprintln!("NXDOMAIN bounce after {:?}", t.elapsed());

    a.c2s
        .send(
            ALICE,
            "a",
            "<message to='x@none.test' id='m2'><body>2</body></message>",
        )
        .await;
    let e = a.c2s.stanza("a", &["id='m2'", "type='error'"]).await;
    assert!(e.contains("remote-server-not-found"), "{e}");

    let t = Instant::now();
    a.c2s
        .send(
            ALICE,
            "a",
            "<message to='x@silent.test' id='m3'><body>3</body></message>",
        )
        .await;
    let e = a.c2s.stanza("a", &["id='m3'", "type='error'"]).await;
    let waited = t.elapsed();
    assert!(e.contains("remote-server-timeout"), "{e}");
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "bounced after {waited:?}"
    );
    eprintln!("silent remote bounced after {waited:?}");
    holder.abort();
}

/// A raw stream that plays b.test (the test knows b.test's dialback secret, so it can
/// authenticate through the real db:verify round trip to b.test's s2s).
struct Raw {
    stream: TcpStream,
    received: String,
    id: String,
}

impl Raw {
    async fn open(port: u16, from: &str, to: &str) -> Raw {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(
                format!(
                    "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
                     xmlns:stream='http://etherx.jabber.org/streams' \
                     xmlns:db='jabber:server:dialback' from='{from}' to='{to}' version='1.0'>"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut raw = Raw {
            stream,
            received: String::new(),
            id: String::new(),
        };
        let got = raw
            .expect("features", |s| s.contains("</stream:features>"))
            .await;
        raw.id = got
            .split(" id='")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .expect("stream id")
            .to_owned();
        raw
    }

    async fn send(&mut self, data: &str) {
        self.stream.write_all(data.as_bytes()).await.unwrap();
    }

    async fn expect(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut buf = vec![0u8; 16384];
        while !done(&self.received) {
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}: {}", self.received))
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            self.received.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(
            done(&self.received),
            "closed waiting for {what}: {}",
            self.received
        );
        std::mem::take(&mut self.received)
    }

    /// Authenticates `from` with dialback, computing the key with `secret`.
    async fn dialback(&mut self, from: &str, to: &str, secret: &str) {
        let hashed = hex::encode(Sha256::digest(secret.as_bytes()));
        let mut mac = Hmac::<Sha256>::new_from_slice(hashed.as_bytes()).unwrap();
        mac.update(format!("{to} {from} {}", self.id).as_bytes());
        let key = hex::encode(mac.finalize().into_bytes());
        self.send(&format!(
            "<db:result from='{from}' to='{to}'>{key}</db:result>"
        ))
        .await;
        let got = self
            .expect("dialback result", |s| s.contains("<db:result"))
            .await;
        assert!(got.contains("type='valid'"), "{got}");
    }
}

/// Raw remote streams against a.test: forged from, malformed XML and an oversize stanza
/// each get a stream error, while another authenticated stream keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_breaking_remote_streams_get_stream_errors() {
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start_domain(
        "a.test",
        port_a,
        &format!(
            "{}<tls require-encryption='false'/><limits max-stanza-bytes='4096'/>",
            route("b.test", port_b)
        ),
        &["alice"],
    )
    .await;
    let _b = start_domain("b.test", port_b, &route("a.test", port_a), &["bob"]).await;
    const ALICE: &str = "alice@a.test/phone";
    a.c2s.start(ALICE, "a").await;

    let mut good = Raw::open(port_a, "b.test", "a.test").await;
    good.dialback("b.test", "a.test", &secret_of("b.test"))
        .await;
    good.send("<message from='bob@b.test/x' to='alice@a.test/phone' xmlns='jabber:server'><body>one</body></message>")
        .await;
    a.c2s.stanza("a", &["from='bob@b.test/x'", "one"]).await;

    // Forged from on an authenticated stream.
    let mut forged = Raw::open(port_a, "b.test", "a.test").await;
    forged
        .dialback("b.test", "a.test", &secret_of("b.test"))
        .await;
    forged
        .send("<message from='mallory@evil.test' to='alice@a.test/phone'><body>forged</body></message>")
        .await;
    let got = forged
        .expect("stream error", |s| s.contains("</stream:error>"))
        .await;
    assert!(got.contains("invalid-from"), "{got}");

    // Stanzas before authentication.
    let mut early = Raw::open(port_a, "b.test", "a.test").await;
    early
        .send("<message from='bob@b.test' to='alice@a.test'><body>early</body></message>")
        .await;
    let got = early
        .expect("stream error", |s| s.contains("</stream:error>"))
        .await;
    assert!(got.contains("not-authorized"), "{got}");

    // Malformed XML.
    let mut bad = Raw::open(port_a, "b.test", "a.test").await;
    bad.send("<message><body>x</message>").await;
    let got = bad
        .expect("stream error", |s| s.contains("</stream:error>"))
        .await;
    assert!(got.contains("not-well-formed"), "{got}");

    // Oversize stanza.
    let mut big = Raw::open(port_a, "b.test", "a.test").await;
    big.send(&format!(
        "<message><body>{}</body></message>",
        "x".repeat(8192)
    ))
    .await;
    let got = big
        .expect("stream error", |s| s.contains("</stream:error>"))
        .await;
    assert!(got.contains("policy-violation"), "{got}");

    // The good stream is unaffected.
    good.send("<message from='bob@b.test/x' to='alice@a.test/phone'><body>two</body></message>")
        .await;
    a.c2s.stanza("a", &["from='bob@b.test/x'", "two"]).await;
    // The forged stanza never arrived.
    assert!(!a
        .c2s
        .inbox
        .iter()
        .any(|s| String::from_utf8_lossy(s.as_slice()).contains("forged")));
}

/// SIGTERM: every stream, incoming and outgoing, gets `<system-shutdown/>` and is
/// closed; s2s exits well inside the supervisor's stop timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_stream_with_system_shutdown() {
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start_domain(
        "a.test",
        port_a,
        &format!(
            "{}<tls require-encryption='false'/>",
            route("b.test", port_b)
        ),
        &["alice"],
    )
    .await;
    let _b = start_domain("b.test", port_b, &route("a.test", port_a), &["bob"]).await;
    a.c2s.start("alice@a.test/phone", "a").await;
    // An incoming stream (a raw remote) ...
    let mut remote = Raw::open(port_a, "b.test", "a.test").await;
    remote
        .dialback("b.test", "a.test", &secret_of("b.test"))
        .await;
    // ... and an outgoing one (to b.test, carrying a message).
    a.c2s
        .send(
            "alice@a.test/phone",
            "a",
            "<message to='bob@b.test' type='chat' id='m1'><body>hi</body></message>",
        )
        .await;
    let started = Instant::now();
    let status = a
        .server
        .terminate("s2s", Duration::from_secs(8))
        .await
        .expect("s2s did not stop within 8 s");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let got = remote
        .expect("stream error", |s| s.contains("</stream:error>"))
        .await;
    assert!(got.contains("system-shutdown"), "{got}");
}

/// With certificates from a CA both servers trust, the streams authenticate with SASL
/// EXTERNAL (no dialback), in both directions; a.test reaches b.test over direct TLS
/// (XEP-0368) and b.test reaches a.test with STARTTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_external_and_direct_tls_with_certificates_from_a_trusted_ca() {
    let dir = std::env::temp_dir().join(format!("jrs-s2s-ca-{}", std::process::id()));
    let ca = jrs_harness::TestCa::new(&dir).unwrap();
    let trust = format!("<tls ca-file='{}'/>", ca.ca_file.display());
    let (port_a, port_b, direct_b) = (free_port(), free_port(), free_port());
    let mut a = start_domain_with(
        &["a.test"],
        port_a,
        &format!(
            "{trust}<route domain='b.test' address='127.0.0.1' port='{direct_b}' mode='tls'/>"
        ),
        &["alice"],
        Some(&ca),
    )
    .await;
    let mut b = start_domain_with(
        &["b.test"],
        port_b,
        &format!(
            "{trust}<listen address='127.0.0.1' port='{direct_b}' mode='tls'/>{}",
            route("a.test", port_a)
        ),
        &["bob"],
        Some(&ca),
    )
    .await;
    const ALICE: &str = "alice@a.test/phone";
    const BOB: &str = "bob@b.test/desk";
    a.c2s.start(ALICE, "a").await;
    b.c2s.start(BOB, "b").await;
    a.c2s.send(ALICE, "a", "<presence/>").await;
    b.c2s.send(BOB, "b", "<presence/>").await;
    a.c2s
        .send(
            ALICE,
            "a",
            "<message to='bob@b.test' type='normal'><body>over direct TLS</body></message>",
        )
        .await;
    b.c2s
        .stanza("b", &["from='alice@a.test/phone'", "over direct TLS"])
        .await;
    b.c2s
        .send(
            BOB,
            "b",
            "<message to='alice@a.test' type='normal'><body>over STARTTLS</body></message>",
        )
        .await;
    a.c2s
        .stanza("a", &["from='bob@b.test/desk'", "over STARTTLS"])
        .await;
    for side in [&a, &b] {
        let log = side.server.log("s2s");
        assert!(
            log.matches("authenticated with SASL EXTERNAL").count() >= 2,
            "{}: outgoing and incoming streams use SASL EXTERNAL:\n{log}",
            side.domain
        );
        assert!(!log.contains("authenticated with dialback"), "{log}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The queue for a remote that is not reachable yet is bounded: past `max-stanzas`,
/// stanzas bounce at once with resource-constraint (the ones queued wait for the
/// connection, then time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_for_a_remote_is_bounded() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut a = start_domain(
        "a.test",
        free_port(),
        &format!(
            "{}<queue max-stanzas='2' timeout='30'/>",
            route("silent.test", silent_port)
        ),
        &["alice"],
    )
    .await;
    const ALICE: &str = "alice@a.test/phone";
    a.c2s.start(ALICE, "a").await;
    for i in 1..=4 {
        a.c2s
            .send(
                ALICE,
                "a",
                &format!("<message to='x@silent.test' id='q{i}'><body>{i}</body></message>"),
            )
            .await;
    }
    for i in [3, 4] {
        let e = a
            .c2s
            .stanza("a", &[&format!("id='q{i}'"), "type='error'"])
            .await;
        assert!(e.contains("resource-constraint"), "{e}");
    }
    holder.abort();
}

/// An outgoing connection with no traffic closes after the configured idle time, and
/// the next stanza opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_reopen() {
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start_domain(
        "a.test",
        port_a,
        &format!("{}<timeouts idle='1'/>", route("b.test", port_b)),
        &["alice"],
    )
    .await;
    let mut b = start_domain("b.test", port_b, &route("a.test", port_a), &["bob"]).await;
    const ALICE: &str = "alice@a.test/phone";
    const BOB: &str = "bob@b.test/desk";
    a.c2s.start(ALICE, "a").await;
    b.c2s.start(BOB, "b").await;
    b.c2s.send(BOB, "b", "<presence/>").await;
    for round in 1..=2 {
        a.c2s
            .send(
                ALICE,
                "a",
                &format!(
                    "<message to='bob@b.test' type='normal'><body>round {round}</body></message>"
                ),
            )
            .await;
        b.c2s.stanza("b", &[&format!("round {round}")]).await;
        if round == 1 {
            jrs_harness::wait_for(
                "the idle connection to close",
                Duration::from_secs(10),
                || {
                    a.server
                        .log("s2s")
                        .contains("closing the idle connection")
                        .then_some(())
                },
            )
            .await
            .unwrap();
        }
    }
    assert!(
        a.server
            .log("s2s")
            .matches("authenticated with dialback")
            .count()
            >= 2
    );
}

/// Two local domains sending to the same remote share one connection: each local domain
/// authenticates on it with dialback (XEP-0220 section 2.5, piggybacking).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_domains_share_a_connection_to_a_remote() {
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start_domain_with(
        &["a.test", "a2.test"],
        port_a,
        &route("b.test", port_b),
        &["alice"],
        None,
    )
    .await;
    create_account(&a.server, "carol@a2.test").await;
    let mut b = start_domain(
        "b.test",
        port_b,
        &format!("{}{}", route("a.test", port_a), route("a2.test", port_a)),
        &["bob"],
    )
    .await;
    const ALICE: &str = "alice@a.test/phone";
    const CAROL: &str = "carol@a2.test/laptop";
    const BOB: &str = "bob@b.test/desk";
    a.c2s.start(ALICE, "a").await;
    a.c2s.start(CAROL, "c").await;
    b.c2s.start(BOB, "b").await;
    b.c2s.send(BOB, "b", "<presence/>").await;
    a.c2s
        .send(
            ALICE,
            "a",
            "<message to='bob@b.test' type='normal'><body>from a</body></message>",
        )
        .await;
    b.c2s
        .stanza("b", &["from='alice@a.test/phone'", "from a"])
        .await;
    a.c2s
        .send(
            CAROL,
            "c",
            "<message to='bob@b.test' type='normal'><body>from a2</body></message>",
        )
        .await;
    b.c2s
        .stanza("b", &["from='carol@a2.test/laptop'", "from a2"])
        .await;
    let log = a.server.log("s2s");
    assert_eq!(
        log.matches("connected sasl=").count(),
        1,
        "one connection to b.test:\n{log}"
    );
    for local in ["a.test", "a2.test"] {
        assert!(
            log.lines()
                .any(|l| l.contains("authenticated with dialback")
                    && l.contains(&format!("local={local}"))),
            "{local} authenticated on it:\n{log}"
        );
    }
}
