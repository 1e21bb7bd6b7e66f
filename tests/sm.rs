//! End-to-end tests of sm: real router, xdb-file and sm processes; the test plays c2s over
//! a component link (session packets, docs/protocol.md) and creates accounts by writing
//! their credentials through an admin link.

use std::time::Duration;

use bytes::Bytes;

use jrs_auth::{Credentials, NS_AUTH};
use jrs_component::{ComponentReader, ComponentWriter};
use jrs_harness::{Options, Server};
use jrs_stream::Stanza;
use jrs_xdb::{Op, Request};

const WAIT: Duration = Duration::from_secs(10);

/// Whether `xml` has attribute `name` with `value` (either quote).
fn has_attr(xml: &str, name: &str, value: &str) -> bool {
    xml.contains(&format!("{name}='{value}'")) || xml.contains(&format!("{name}=\"{value}\""))
}

/// A fake c2s instance: sends session packets, collects what sm sends back.
struct C2s {
    name: String,
    r: ComponentReader,
    w: ComponentWriter,
    /// Packets received and not yet matched.
    inbox: Vec<Stanza>,
}

/// A session packet received from sm, summarised.
#[derive(Debug, Clone)]
struct Got {
    kind: String,
    sid: String,
    inner: String,
}

impl C2s {
    async fn connect(server: &Server, name: &str) -> C2s {
        let (r, w) = server.component(name, "c2s-secret").await.unwrap().split();
        C2s {
            name: name.into(),
            r,
            w,
            inbox: vec![],
        }
    }

    async fn packet(&mut self, kind: &str, jid: &str, sid: &str, inner: &str) {
        self.packet_with(kind, jid, sid, "", inner).await;
    }

    /// A session packet with more attributes (`attrs`: written as they are).
    async fn packet_with(&mut self, kind: &str, jid: &str, sid: &str, attrs: &str, inner: &str) {
        let bare = jid.split('/').next().unwrap();
        let head = format!(
            "<session type='{kind}' to='{bare}' from='{}' jid='{jid}' sid='{sid}' {attrs}",
            self.name
        );
        let p = if inner.is_empty() {
            format!("{head}/>")
        } else {
            format!("{head}>{inner}</session>")
        };
        self.w.send(p.as_bytes()).await.unwrap();
    }

    /// Starts a session and waits for `started`.
    async fn start(&mut self, jid: &str, sid: &str) {
        self.packet("start", jid, sid, "").await;
        self.expect(&format!("started for {sid}"), |g| {
            g.kind == "started" && g.sid == sid
        })
        .await;
    }

    async fn send(&mut self, jid: &str, sid: &str, stanza: &str) {
        self.packet("stanza", jid, sid, stanza).await;
    }

    /// Waits for a packet satisfying `f`; other packets stay in the inbox.
    async fn expect(&mut self, what: &str, f: impl Fn(&Got) -> bool) -> Got {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(i) = self.inbox.iter().position(|s| f(&summary(s))) {
                return summary(&self.inbox.remove(i));
            }
            match tokio::time::timeout_at(deadline, self.r.next()).await {
                Ok(Ok(s)) => self.inbox.push(s),
                Ok(Err(e)) => panic!("link lost waiting for {what}: {e}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; inbox: {:#?}",
                    self.inbox.iter().map(summary).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// A stanza to session `sid` whose text contains every one of `parts`.
    async fn stanza(&mut self, sid: &str, parts: &[&str]) -> String {
        let what = format!("a stanza to {sid} with {parts:?}");
        self.expect(&what, |g| {
            g.kind == "stanza" && g.sid == sid && parts.iter().all(|p| g.inner.contains(p))
        })
        .await
        .inner
    }

    /// Waits for the answer to a ping from `sid` to the server: everything sm sent to that
    /// session before it has arrived by then.
    async fn barrier(&mut self, jid: &str, sid: &str) {
        let id = format!("barrier-{sid}-{}", self.inbox.len());
        self.send(
            jid,
            sid,
            &format!("<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"),
        )
        .await;
        self.stanza(sid, &[&format!("id='{id}'"), "type='result'"])
            .await;
    }

    /// Whether anything for `sid` matching `parts` is in the inbox.
    fn has(&self, sid: &str, parts: &[&str]) -> bool {
        self.inbox
            .iter()
            .map(summary)
            .any(|g| g.sid == sid && parts.iter().all(|p| g.inner.contains(p)))
    }

    /// An IQ from `sid` and its answer (result or error).
    async fn iq(&mut self, jid: &str, sid: &str, id: &str, iq_rest: &str) -> String {
        self.send(jid, sid, &format!("<iq id='{id}' {iq_rest}</iq>"))
            .await;
        self.stanza(sid, &[&format!("id='{id}'")]).await
    }
}

fn summary(s: &Stanza) -> Got {
    Got {
        kind: s.kind().unwrap_or("").into(),
        sid: s.attr("sid").unwrap_or_default(),
        inner: String::from_utf8_lossy(s.inner()).into_owned(),
    }
}

/// Storage requests from the admin link.
struct Admin {
    r: ComponentReader,
    w: ComponentWriter,
    next: u32,
}

impl Admin {
    async fn request(&mut self, op: Op, owner: &str, ns: &str, content: &str) -> Stanza {
        self.next += 1;
        let id = format!("a{}", self.next);
        let req = Request {
            op,
            owner: owner.into(),
            ns: ns.into(),
            id: id.clone(),
            from: "admin".into(),
            max_items: None,
            max_age: None,
            flush: jrs_xdb::Flush::Now,
            content: Bytes::copy_from_slice(content.as_bytes()),
        };
        self.w.send(req.to_xml().as_bytes()).await.unwrap();
        loop {
            let s = tokio::time::timeout(WAIT, self.r.next())
                .await
                .expect("storage answers")
                .unwrap();
            if s.id() == Some(id.as_str()) {
                assert_eq!(
                    s.kind(),
                    Some("result"),
                    "{:?}",
                    String::from_utf8_lossy(s.as_slice())
                );
                return s;
            }
        }
    }

    async fn create_account(&mut self, jid: &str, password: &str) {
        let creds = Credentials::from_password(password).to_xml();
        self.request(Op::Set, jid, NS_AUTH, &creds).await;
    }

    /// Stores a roster directly: `items` as `(jid, subscription)`.
    async fn roster(&mut self, owner: &str, items: &[(&str, &str)]) {
        let items: String = items
            .iter()
            .map(|(j, s)| format!("<item jid='{j}' subscription='{s}'/>"))
            .collect();
        self.request(
            Op::Set,
            owner,
            "jabber:iq:roster",
            &format!("<query xmlns='jabber:iq:roster' ver='1'>{items}</query>"),
        )
        .await;
    }

    async fn get(&mut self, owner: &str, ns: &str) -> String {
        let s = self.request(Op::Get, owner, ns, "").await;
        String::from_utf8_lossy(s.inner()).into_owned()
    }
}

struct Env {
    server: Server,
    c2s: C2s,
    admin: Admin,
}

/// Router, storage, sm (with `sm_extra` configuration), a fake c2s and an admin link;
/// accounts alice, bob, carol and dave exist.
async fn env(sm_extra: &str) -> Env {
    let mut server = Server::start(Options::default()).await.unwrap();
    server.start_storage().await.unwrap();
    server.start_sm(sm_extra).await.unwrap();
    let (r, w) = server
        .component("admin", "admin-secret")
        .await
        .unwrap()
        .split();
    let mut admin = Admin { r, w, next: 0 };
    for u in ["alice", "bob", "carol", "dave"] {
        admin
            .create_account(&format!("{u}@localhost"), "secret")
            .await;
    }
    let c2s = C2s::connect(&server, "c2s-1").await;
    Env { server, c2s, admin }
}

const ALICE: &str = "alice@localhost/phone";
const BOB: &str = "bob@localhost/desk";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_start_and_unknown_sessions_are_reset() {
    let Env {
        mut c2s,
        server: _server,
        ..
    } = env("").await;
    c2s.start(ALICE, "1").await;
    // A stanza and an end for sessions sm never started: end with <reset/>.
    c2s.send(
        "alice@localhost/other",
        "99",
        "<message to='bob@localhost'><body>x</body></message>",
    )
    .await;
    let g = c2s
        .expect("end for sid 99", |g| g.kind == "end" && g.sid == "99")
        .await;
    assert!(
        g.inner
            .contains("<reset xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"),
        "{g:?}"
    );
    c2s.packet("end", "bob@localhost/x", "98", "").await;
    let g = c2s
        .expect("end for sid 98", |g| g.kind == "end" && g.sid == "98")
        .await;
    assert!(g.inner.contains("reset"));
    // The same sid with another resource is not that session either.
    c2s.send("alice@localhost/laptop", "1", "<presence/>").await;
    c2s.expect("end for the wrong jid", |g| g.kind == "end" && g.sid == "1")
        .await;
    // The real session still works.
    c2s.barrier(ALICE, "1").await;
    // A start for a domain no sm serves is bounced by the router.
    c2s.packet("start", "eve@elsewhere.example/x", "5", "")
        .await;
    c2s.expect("bounce", |g| g.kind == "error" && g.sid == "5")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_presence_probes_broadcast_and_unavailable() {
    let Env {
        mut c2s,
        mut admin,
        server: _server,
    } = env("").await;
    admin
        .roster("alice@localhost", &[("bob@localhost", "both")])
        .await;
    admin
        .roster("bob@localhost", &[("alice@localhost", "both")])
        .await;

    c2s.start(BOB, "b").await;
    c2s.send(BOB, "b", "<presence><status>at work</status></presence>")
        .await;
    // Bob's own presence comes back to him (4.2.2); no contact is online yet.
    c2s.stanza("b", &["from='bob@localhost/desk'", "at work"])
        .await;

    c2s.start(ALICE, "a").await;
    c2s.send(
        ALICE,
        "a",
        "<presence><priority>3</priority><status>hello</status></presence>",
    )
    .await;
    // Bob, subscribed to alice, gets her initial presence from her full JID.
    let p = c2s
        .stanza("b", &["from='alice@localhost/phone'", "hello"])
        .await;
    assert!(p.contains("to='bob@localhost'"), "{p}");
    // Alice's probe to bob is answered with bob's last presence.
    let p = c2s
        .stanza("a", &["from='bob@localhost/desk'", "at work"])
        .await;
    assert!(!p.contains("type="), "available presence: {p}");
    // A second resource of alice gets the presence of the first, and the first its.
    c2s.start("alice@localhost/laptop", "a2").await;
    c2s.send("alice@localhost/laptop", "a2", "<presence/>")
        .await;
    c2s.stanza("a2", &["from='alice@localhost/phone'", "hello"])
        .await;
    c2s.stanza("a", &["from='alice@localhost/laptop'"]).await;
    c2s.stanza("b", &["from='alice@localhost/laptop'"]).await;

    // Presence update and unavailable reach bob.
    c2s.send(ALICE, "a", "<presence><show>away</show></presence>")
        .await;
    c2s.stanza("b", &["from='alice@localhost/phone'", "<show>away</show>"])
        .await;
    c2s.send(
        ALICE,
        "a",
        "<presence type='unavailable'><status>bye</status></presence>",
    )
    .await;
    c2s.stanza(
        "b",
        &["from='alice@localhost/phone'", "type='unavailable'", "bye"],
    )
    .await;
    c2s.stanza(
        "a2",
        &["from='alice@localhost/phone'", "type='unavailable'"],
    )
    .await;

    // Directed presence to a non-contact is remembered and told when the session ends.
    c2s.start("carol@localhost/c", "c").await;
    c2s.send("carol@localhost/c", "c", "<presence/>").await;
    c2s.send(
        "carol@localhost/c",
        "c",
        "<presence to='dave@localhost/x'/>",
    )
    .await;
    c2s.start("dave@localhost/x", "d").await;
    c2s.send(
        "carol@localhost/c",
        "c",
        "<presence to='dave@localhost/x'><status>psst</status></presence>",
    )
    .await;
    c2s.stanza("d", &["from='carol@localhost/c'", "psst"]).await;
    c2s.packet("end", "carol@localhost/c", "c", "").await;
    c2s.stanza("d", &["from='carol@localhost/c'", "type='unavailable'"])
        .await;

    // Bob's session ends (c2s end): alice's laptop hears unavailable.
    c2s.packet("end", BOB, "b", "").await;
    c2s.stanza("a2", &["from='bob@localhost/desk'", "type='unavailable'"])
        .await;
    // A probe for bob now gets unavailable presence from his bare JID.
    c2s.send(
        "alice@localhost/laptop",
        "a2",
        "<presence type='probe' to='bob@localhost'/>",
    )
    .await;
    c2s.stanza("a2", &["from='bob@localhost'", "type='unavailable'"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_handshake_with_roster_pushes() {
    let Env {
        mut c2s,
        mut admin,
        server: _server,
    } = env("").await;
    c2s.start(ALICE, "a").await;
    c2s.start(BOB, "b").await;
    for (jid, sid) in [(ALICE, "a"), (BOB, "b")] {
        let r = c2s
            .iq(
                jid,
                sid,
                "r0",
                "type='get'><query xmlns='jabber:iq:roster'/>",
            )
            .await;
        assert!(r.contains("type='result'") && r.contains("ver="), "{r}");
        c2s.send(jid, sid, "<presence/>").await;
        c2s.stanza(sid, &[&format!("from='{jid}'")]).await;
    }

    // Alice asks.
    c2s.send(
        ALICE,
        "a",
        "<presence type='subscribe' to='bob@localhost'><status>it is me</status></presence>",
    )
    .await;
    let push = c2s
        .stanza(
            "a",
            &["type='set'", "jabber:iq:roster", "jid='bob@localhost'"],
        )
        .await;
    assert!(
        push.contains("subscription='none'") && push.contains("ask='subscribe'"),
        "{push}"
    );
    let req = c2s.stanza("b", &["type='subscribe'"]).await;
    assert!(
        req.contains("from='alice@localhost'") && req.contains("it is me"),
        "{req}"
    );
    assert!(
        !req.contains("alice@localhost/phone"),
        "stamped with the bare JID: {req}"
    );
    // Bob's roster does not show a mere request.
    let r = c2s
        .iq(
            BOB,
            "b",
            "r1",
            "type='get'><query xmlns='jabber:iq:roster'/>",
        )
        .await;
    assert!(!r.contains("alice@localhost"), "{r}");

    // Bob approves.
    c2s.send(
        BOB,
        "b",
        "<presence type='subscribed' to='alice@localhost'/>",
    )
    .await;
    let push = c2s
        .stanza("b", &["type='set'", "jid='alice@localhost'"])
        .await;
    assert!(push.contains("subscription='from'"), "{push}");
    let push = c2s
        .stanza(
            "a",
            &["type='set'", "jid='bob@localhost'", "subscription='to'"],
        )
        .await;
    assert!(!push.contains("ask="), "{push}");
    c2s.stanza("a", &["type='subscribed'", "from='bob@localhost'"])
        .await;
    // ... and alice gets bob's current presence.
    c2s.stanza("a", &["from='bob@localhost/desk'"]).await;

    let r = c2s
        .iq(
            ALICE,
            "a",
            "r2",
            "type='get'><query xmlns='jabber:iq:roster'/>",
        )
        .await;
    assert!(
        r.contains("jid='bob@localhost'") && r.contains("subscription='to'"),
        "{r}"
    );
    let r = c2s
        .iq(
            BOB,
            "b",
            "r3",
            "type='get'><query xmlns='jabber:iq:roster'/>",
        )
        .await;
    assert!(
        r.contains("jid='alice@localhost'") && r.contains("subscription='from'"),
        "{r}"
    );

    // Bob asks back; alice approves: both.
    c2s.send(
        BOB,
        "b",
        "<presence type='subscribe' to='alice@localhost'/>",
    )
    .await;
    c2s.stanza("a", &["type='subscribe'", "from='bob@localhost'"])
        .await;
    c2s.send(
        ALICE,
        "a",
        "<presence type='subscribed' to='bob@localhost'/>",
    )
    .await;
    c2s.stanza(
        "a",
        &["type='set'", "jid='bob@localhost'", "subscription='both'"],
    )
    .await;
    c2s.stanza(
        "b",
        &["type='set'", "jid='alice@localhost'", "subscription='both'"],
    )
    .await;
    let stored = admin.get("alice@localhost", "jabber:iq:roster").await;
    assert!(stored.contains("subscription='both'"), "{stored}");

    // Unsubscribe: alice stops receiving bob's presence.
    c2s.send(
        ALICE,
        "a",
        "<presence type='unsubscribe' to='bob@localhost'/>",
    )
    .await;
    c2s.stanza(
        "a",
        &["type='set'", "jid='bob@localhost'", "subscription='from'"],
    )
    .await;
    c2s.stanza(
        "b",
        &["type='set'", "jid='alice@localhost'", "subscription='to'"],
    )
    .await;
    c2s.stanza("b", &["type='unsubscribe'", "from='alice@localhost'"])
        .await;

    // A request to an offline user is kept and delivered at their initial presence.
    c2s.start("carol@localhost/c", "c").await;
    c2s.iq(
        "carol@localhost/c",
        "c",
        "r5",
        "type='get'><query xmlns='jabber:iq:roster'/>",
    )
    .await;
    c2s.send("carol@localhost/c", "c", "<presence/>").await;
    c2s.send(
        "carol@localhost/c",
        "c",
        "<presence type='subscribe' to='dave@localhost'><status>hi dave</status></presence>",
    )
    .await;
    c2s.barrier("carol@localhost/c", "c").await;
    c2s.start("dave@localhost/d", "d").await;
    c2s.iq(
        "dave@localhost/d",
        "d",
        "r4",
        "type='get'><query xmlns='jabber:iq:roster'/>",
    )
    .await;
    c2s.send("dave@localhost/d", "d", "<presence/>").await;
    let req = c2s
        .stanza("d", &["type='subscribe'", "from='carol@localhost'"])
        .await;
    assert!(req.contains("hi dave"), "{req}");
    // Dave denies: carol's pending request is cancelled.
    c2s.send(
        "dave@localhost/d",
        "d",
        "<presence type='unsubscribed' to='carol@localhost'/>",
    )
    .await;
    c2s.stanza("c", &["type='unsubscribed'", "from='dave@localhost'"])
        .await;
    c2s.stanza(
        "c",
        &["type='set'", "jid='dave@localhost'", "subscription='none'"],
    )
    .await;

    // Pre-approval: bob pre-approves carol; carol's request is answered at once.
    c2s.send(
        BOB,
        "b",
        "<presence type='subscribed' to='carol@localhost'/>",
    )
    .await;
    c2s.stanza(
        "b",
        &["type='set'", "jid='carol@localhost'", "approved='true'"],
    )
    .await;
    c2s.send(
        "carol@localhost/c",
        "c",
        "<presence type='subscribe' to='bob@localhost'/>",
    )
    .await;
    c2s.stanza("c", &["type='subscribed'", "from='bob@localhost'"])
        .await;
    c2s.stanza(
        "b",
        &["type='set'", "jid='carol@localhost'", "subscription='from'"],
    )
    .await;
    assert!(!c2s.has("b", &["type='subscribe'", "from='carol@localhost'"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roster_set_remove_pushes_versioning_and_limit() {
    let Env {
        mut c2s,
        server: _server,
        ..
    } = env("<roster max-items='3'/>").await;
    const LAPTOP: &str = "alice@localhost/laptop";
    c2s.start(ALICE, "p").await;
    c2s.start(LAPTOP, "l").await;
    let r = c2s
        .iq(
            ALICE,
            "p",
            "g1",
            "type='get'><query xmlns='jabber:iq:roster'/>",
        )
        .await;
    assert!(r.contains("ver='0'"), "{r}");
    c2s.iq(
        LAPTOP,
        "l",
        "g2",
        "type='get'><query xmlns='jabber:iq:roster'/>",
    )
    .await;

    let r = c2s
        .iq(ALICE, "p", "s1", "type='set'><query xmlns='jabber:iq:roster'><item jid='carol@localhost' name='Carol'><group>Friends</group></item></query>")
        .await;
    assert!(r.contains("type='result'"), "{r}");
    for sid in ["p", "l"] {
        let push = c2s
            .stanza(sid, &["type='set'", "jid='carol@localhost'", "ver='1'"])
            .await;
        assert!(
            push.contains("name='Carol'") && push.contains("<group>Friends</group>"),
            "{push}"
        );
        assert!(push.contains("subscription='none'"), "{push}");
    }
    // Versioning: the current version gets an empty result, an old one the roster.
    let r = c2s
        .iq(
            LAPTOP,
            "l",
            "g3",
            "type='get'><query xmlns='jabber:iq:roster' ver='1'/>",
        )
        .await;
    assert!(r.contains("type='result'") && !r.contains("<query"), "{r}");
    let r = c2s
        .iq(
            LAPTOP,
            "l",
            "g4",
            "type='get'><query xmlns='jabber:iq:roster' ver='0'/>",
        )
        .await;
    assert!(
        r.contains("ver='1'") && r.contains("jid='carol@localhost'"),
        "{r}"
    );

    // Update the item: name changes, version moves.
    c2s.iq(ALICE, "p", "s2", "type='set'><query xmlns='jabber:iq:roster'><item jid='carol@localhost' name='C.'/></query>").await;
    c2s.stanza("l", &["type='set'", "name='C.'", "ver='2'"])
        .await;

    // Invalid sets.
    let r = c2s.iq(ALICE, "p", "e1", "type='set'><query xmlns='jabber:iq:roster'><item jid='x@localhost'/><item jid='y@localhost'/></query>").await;
    assert!(r.contains("bad-request"), "{r}");
    let r = c2s.iq(ALICE, "p", "e2", "type='set'><query xmlns='jabber:iq:roster'><item jid='x@localhost'><group></group></item></query>").await;
    assert!(r.contains("not-acceptable"), "{r}");
    let r = c2s.iq(ALICE, "p", "e3", "type='set'><query xmlns='jabber:iq:roster'><item jid='nobody@localhost' subscription='remove'/></query>").await;
    assert!(r.contains("item-not-found"), "{r}");

    // The limit: three items fit, the fourth is refused with a reason.
    for (i, who) in ["dave", "erin"].iter().enumerate() {
        let r = c2s
            .iq(ALICE, "p", &format!("f{i}"), &format!("type='set'><query xmlns='jabber:iq:roster'><item jid='{who}@localhost'/></query>"))
            .await;
        assert!(r.contains("type='result'"), "{r}");
    }
    let r = c2s
        .iq(
            ALICE,
            "p",
            "f9",
            "type='set'><query xmlns='jabber:iq:roster'><item jid='frank@localhost'/></query>",
        )
        .await;
    assert!(
        r.contains("not-allowed") && r.contains("at most 3 items"),
        "{r}"
    );

    // Remove: pushed to both resources.
    let r = c2s.iq(LAPTOP, "l", "s3", "type='set'><query xmlns='jabber:iq:roster'><item jid='carol@localhost' subscription='remove'/></query>").await;
    assert!(r.contains("type='result'"), "{r}");
    for sid in ["p", "l"] {
        c2s.stanza(
            sid,
            &[
                "type='set'",
                "jid='carol@localhost'",
                "subscription='remove'",
            ],
        )
        .await;
    }
    let r = c2s
        .iq(
            ALICE,
            "p",
            "g5",
            "type='get'><query xmlns='jabber:iq:roster'/>",
        )
        .await;
    assert!(
        !r.contains("carol") && r.contains("dave") && r.contains("erin"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_to_the_highest_priority_resources() {
    let Env {
        mut c2s,
        server: _server,
        ..
    } = env("").await;
    const BOB2: &str = "bob@localhost/phone";
    c2s.start(ALICE, "a").await;
    c2s.start(BOB, "b1").await;
    c2s.start(BOB2, "b2").await;
    c2s.send(BOB, "b1", "<presence><priority>5</priority></presence>")
        .await;
    c2s.send(BOB2, "b2", "<presence><priority>1</priority></presence>")
        .await;
    c2s.barrier(BOB2, "b2").await;

    c2s.send(
        ALICE,
        "a",
        "<message to='bob@localhost' type='chat' id='m1'><body>first</body></message>",
    )
    .await;
    let m = c2s.stanza("b1", &["first"]).await;
    assert!(m.contains("from='alice@localhost/phone'"), "{m}");
    c2s.barrier(BOB2, "b2").await;
    assert!(
        !c2s.has("b2", &["first"]),
        "the lower priority resource got the message"
    );

    // To a full JID: that resource, whatever its priority.
    c2s.send(
        ALICE,
        "a",
        "<message to='bob@localhost/phone' type='chat'><body>direct</body></message>",
    )
    .await;
    c2s.stanza("b2", &["direct"]).await;
    // To a resource that does not exist: as to the bare JID.
    c2s.send(
        ALICE,
        "a",
        "<message to='bob@localhost/gone' type='chat'><body>fallback</body></message>",
    )
    .await;
    c2s.stanza("b1", &["fallback"]).await;

    // Equal priorities: both.
    c2s.send(BOB2, "b2", "<presence><priority>5</priority></presence>")
        .await;
    c2s.barrier(BOB2, "b2").await;
    c2s.send(
        ALICE,
        "a",
        "<message to='bob@localhost'><body>both</body></message>",
    )
    .await;
    c2s.stanza("b1", &["both"]).await;
    c2s.stanza("b2", &["both"]).await;
    // Headlines go to every resource.
    c2s.send(BOB2, "b2", "<presence><priority>0</priority></presence>")
        .await;
    c2s.barrier(BOB2, "b2").await;
    c2s.send(
        ALICE,
        "a",
        "<message to='bob@localhost' type='headline'><body>news</body></message>",
    )
    .await;
    c2s.stanza("b1", &["news"]).await;
    c2s.stanza("b2", &["news"]).await;
    // Groupchat to a bare JID is refused.
    c2s.send(
        ALICE,
        "a",
        "<message to='bob@localhost' type='groupchat' id='gc'><body>x</body></message>",
    )
    .await;
    let e = c2s.stanza("a", &["id='gc'", "type='error'"]).await;
    assert!(e.contains("service-unavailable"), "{e}");
    // No such user.
    c2s.send(
        ALICE,
        "a",
        "<message to='nobody@localhost' id='nu'><body>x</body></message>",
    )
    .await;
    let e = c2s.stanza("a", &["id='nu'", "type='error'"]).await;
    assert!(e.contains("service-unavailable"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_are_stored_delivered_with_delay_and_limited() {
    let Env {
        mut c2s,
        server: _server,
        ..
    } = env("<offline max-messages='2'/>").await;
    c2s.start(ALICE, "a").await;
    for i in 1..=2 {
        c2s.send(ALICE, "a", &format!("<message to='bob@localhost' type='chat' id='o{i}'><body>offline {i}</body></message>")).await;
    }
    // Chat states alone are not stored (and not refused).
    c2s.send(ALICE, "a", "<message to='bob@localhost' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>").await;
    c2s.send(
        ALICE,
        "a",
        "<message to='bob@localhost' type='chat' id='o3'><body>offline 3</body></message>",
    )
    .await;
    let e = c2s.stanza("a", &["id='o3'", "type='error'"]).await;
    assert!(
        e.contains("service-unavailable") && e.contains("full"),
        "{e}"
    );

    // Bob logs in; a negative priority does not fetch them.
    c2s.start(BOB, "b").await;
    c2s.send(BOB, "b", "<presence><priority>-1</priority></presence>")
        .await;
    c2s.barrier(BOB, "b").await;
    assert!(!c2s.has("b", &["offline"]));
    c2s.packet("end", BOB, "b", "").await;
    c2s.start(BOB, "b2").await;
    c2s.send(BOB, "b2", "<presence/>").await;
    for i in 1..=2 {
        let m = c2s.stanza("b2", &[&format!("offline {i}")]).await;
        assert!(
            m.contains("<delay xmlns='urn:xmpp:delay' from='localhost' stamp='"),
            "{m}"
        );
        assert!(
            m.contains("from='alice@localhost/phone'") && m.contains("Z'"),
            "{m}"
        );
    }
    c2s.barrier(BOB, "b2").await;
    assert!(!c2s.has("b2", &["composing"]));
    // Not confirmed by b2's client: still stored, and the next login gets them again.
    c2s.packet("end", BOB, "b2", "").await;
    c2s.start(BOB, "b3").await;
    c2s.send(BOB, "b3", "<presence/>").await;
    c2s.stanza("b3", &["offline 1"]).await;
    c2s.stanza("b3", &["offline 2"]).await;
    // The client confirms the first: only the second stays.
    c2s.packet_with("delivered", BOB, "b3", "count='1'", "")
        .await;
    c2s.barrier(BOB, "b3").await;
    c2s.packet("end", BOB, "b3", "").await;
    c2s.start(BOB, "b4").await;
    c2s.send(BOB, "b4", "<presence/>").await;
    c2s.stanza("b4", &["offline 2"]).await;
    c2s.barrier(BOB, "b4").await;
    assert!(!c2s.has("b4", &["offline 1"]));
    c2s.packet_with("delivered", BOB, "b4", "count='1'", "")
        .await;
    c2s.barrier(BOB, "b4").await;
    // Confirmed, all of them: the next login gets nothing more.
    c2s.packet("end", BOB, "b4", "").await;
    c2s.start(BOB, "b5").await;
    c2s.send(BOB, "b5", "<presence/>").await;
    c2s.barrier(BOB, "b5").await;
    assert!(!c2s.has("b5", &["offline"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_iq_is_answered() {
    let Env {
        mut c2s,
        mut admin,
        server: _server,
    } = env("<modules defaults='true'><module name='register'/></modules>").await;
    admin
        .roster("bob@localhost", &[("alice@localhost", "from")])
        .await;
    c2s.start(ALICE, "a").await;

    // Server disco: every feature listed is then exercised below.
    let r = c2s
        .iq(
            ALICE,
            "a",
            "d1",
            "type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/>",
        )
        .await;
    for f in [
        "http://jabber.org/protocol/disco#info",
        "http://jabber.org/protocol/disco#items",
        "urn:xmpp:ping",
        "jabber:iq:version",
        "urn:xmpp:time",
        "jabber:iq:last",
        "vcard-temp",
        "msgoffline",
        "jabber:iq:register",
        "urn:xmpp:carbons:2",
        "urn:xmpp:blocking",
    ] {
        assert!(has_attr(&r, "var", f), "{f} in {r}");
    }
    assert!(has_attr(&r, "category", "server"), "{r}");
    let r = c2s
        .iq(
            ALICE,
            "a",
            "d2",
            "type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/>",
        )
        .await;
    assert!(
        r.contains("type='result'") && r.contains("disco#items"),
        "{r}"
    );
    let r = c2s
        .iq(
            ALICE,
            "a",
            "d3",
            "type='get' to='bob@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/>",
        )
        .await;
    assert!(
        has_attr(&r, "category", "account") && r.contains("from='bob@localhost'"),
        "{r}"
    );
    for f in [
        "urn:xmpp:mam:2",
        "urn:xmpp:mam:2#extended",
        "urn:xmpp:sid:0",
    ] {
        assert!(has_attr(&r, "var", f), "{f} in {r}");
    }
    let r = c2s
        .iq(
            ALICE,
            "a",
            "d4",
            "type='get' to='bob@localhost'><query xmlns='http://jabber.org/protocol/disco#items'/>",
        )
        .await;
    assert!(r.contains("type='result'"), "{r}");

    // Ping: server, account, no 'to'.
    for (id, to) in [
        ("p1", " to='localhost'"),
        ("p2", " to='bob@localhost'"),
        ("p3", ""),
    ] {
        let r = c2s
            .iq(
                ALICE,
                "a",
                id,
                &format!("type='get'{to}><ping xmlns='urn:xmpp:ping'/>"),
            )
            .await;
        assert!(r.contains("type='result'"), "{r}");
    }
    // Version and time.
    let r = c2s
        .iq(
            ALICE,
            "a",
            "v1",
            "type='get' to='localhost'><query xmlns='jabber:iq:version'/>",
        )
        .await;
    assert!(
        r.contains("<name>jabberd-rs</name>") && r.contains("<version>"),
        "{r}"
    );
    let r = c2s
        .iq(
            ALICE,
            "a",
            "t1",
            "type='get' to='localhost'><time xmlns='urn:xmpp:time'/>",
        )
        .await;
    assert!(
        r.contains("<tzo>+00:00</tzo>") && r.contains("<utc>") && r.contains("Z</utc>"),
        "{r}"
    );

    // Last activity: server uptime; a subscribed contact's last logout; others refused.
    let r = c2s
        .iq(
            ALICE,
            "a",
            "l1",
            "type='get' to='localhost'><query xmlns='jabber:iq:last'/>",
        )
        .await;
    assert!(r.contains("seconds='"), "{r}");
    c2s.start(BOB, "b").await;
    c2s.send(BOB, "b", "<presence/>").await;
    c2s.send(
        BOB,
        "b",
        "<presence type='unavailable'><status>gone fishing</status></presence>",
    )
    .await;
    c2s.packet("end", BOB, "b", "").await;
    let r = c2s
        .iq(
            ALICE,
            "a",
            "l2",
            "type='get' to='bob@localhost'><query xmlns='jabber:iq:last'/>",
        )
        .await;
    assert!(
        r.contains("type='result'") && r.contains("seconds='") && r.contains("gone fishing"),
        "{r}"
    );
    let r = c2s
        .iq(
            ALICE,
            "a",
            "l3",
            "type='get' to='carol@localhost'><query xmlns='jabber:iq:last'/>",
        )
        .await;
    assert!(r.contains("forbidden"), "{r}");

    // vCard: set own, get own, get another's (empty).
    let r = c2s
        .iq(
            ALICE,
            "a",
            "vc1",
            "type='set'><vCard xmlns='vcard-temp'><FN>Alice A.</FN><NICKNAME>al</NICKNAME></vCard>",
        )
        .await;
    assert!(r.contains("type='result'"), "{r}");
    let r = c2s
        .iq(ALICE, "a", "vc2", "type='get'><vCard xmlns='vcard-temp'/>")
        .await;
    assert!(r.contains("<FN>Alice A.</FN>"), "{r}");
    c2s.start(BOB, "b2").await;
    let r = c2s
        .iq(
            BOB,
            "b2",
            "vc3",
            "type='get' to='alice@localhost'><vCard xmlns='vcard-temp'/>",
        )
        .await;
    assert!(
        r.contains("<NICKNAME>al</NICKNAME>") && r.contains("from='alice@localhost'"),
        "{r}"
    );
    let r = c2s
        .iq(
            BOB,
            "b2",
            "vc4",
            "type='set' to='alice@localhost'><vCard xmlns='vcard-temp'><FN>x</FN></vCard>",
        )
        .await;
    assert!(r.contains("type='error'"), "{r}");
    let r = c2s
        .iq(
            ALICE,
            "a",
            "vc5",
            "type='get' to='carol@localhost'><vCard xmlns='vcard-temp'/>",
        )
        .await;
    assert!(r.contains("<vCard xmlns='vcard-temp'/>"), "{r}");
    let r = c2s
        .iq(
            ALICE,
            "a",
            "vc6",
            "type='get' to='localhost'><vCard xmlns='vcard-temp'/>",
        )
        .await;
    assert!(r.contains("type='result'"), "{r}");

    // Private XML storage.
    let r = c2s.iq(ALICE, "a", "x1", "type='set'><query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'><conference jid='room@muc.localhost'/></storage></query>").await;
    assert!(r.contains("type='result'"), "{r}");
    let r = c2s.iq(ALICE, "a", "x2", "type='get'><query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'/></query>").await;
    assert!(r.contains("room@muc.localhost"), "{r}");
    let r = c2s
        .iq(
            ALICE,
            "a",
            "x3",
            "type='get'><query xmlns='jabber:iq:private'><other xmlns='urn:example'/></query>",
        )
        .await;
    assert!(
        r.contains("<other xmlns='urn:example'/>") && r.contains("type='result'"),
        "{r}"
    );
    let r = c2s
        .iq(
            ALICE,
            "a",
            "x4",
            "type='get'><query xmlns='jabber:iq:private'><x/></query>",
        )
        .await;
    assert!(r.contains("not-acceptable"), "{r}");
    let r = c2s.iq(BOB, "b2", "x5", "type='get' to='alice@localhost'><query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'/></query>").await;
    assert!(r.contains("service-unavailable"), "{r}");

    // Unknown payloads are refused, never dropped.
    let r = c2s
        .iq(
            ALICE,
            "a",
            "u1",
            "type='get' to='localhost'><query xmlns='urn:example:nothing'/>",
        )
        .await;
    assert!(r.contains("service-unavailable"), "{r}");
    let r = c2s
        .iq(
            ALICE,
            "a",
            "u2",
            "type='set' to='bob@localhost'><query xmlns='urn:example:nothing'/>",
        )
        .await;
    assert!(r.contains("service-unavailable"), "{r}");
    let r = c2s
        .iq(
            ALICE,
            "a",
            "u3",
            "type='get' to='bob@localhost/nowhere'><ping xmlns='urn:xmpp:ping'/>",
        )
        .await;
    assert!(r.contains("service-unavailable"), "{r}");
    // An IQ to another resource of the same user reaches that client.
    c2s.start("alice@localhost/laptop", "a3").await;
    c2s.send(
        ALICE,
        "a",
        "<iq type='get' id='own' to='alice@localhost/laptop'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    c2s.stanza("a3", &["id='own'", "from='alice@localhost/phone'"])
        .await;
    c2s.packet("end", "alice@localhost/laptop", "a3", "").await;
    // An IQ to a full JID with a session reaches that client; its answer goes back.
    c2s.send(
        ALICE,
        "a",
        "<iq type='get' id='fj' to='bob@localhost/desk'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    c2s.stanza("b2", &["id='fj'", "from='alice@localhost/phone'"])
        .await;
    c2s.send(
        BOB,
        "b2",
        "<iq type='result' id='fj' to='alice@localhost/phone'/>",
    )
    .await;
    c2s.stanza(
        "a",
        &["id='fj'", "type='result'", "from='bob@localhost/desk'"],
    )
    .await;

    // Registration: password change, then removal of the account.
    let r = c2s
        .iq(
            ALICE,
            "a",
            "rg1",
            "type='get' to='localhost'><query xmlns='jabber:iq:register'/>",
        )
        .await;
    assert!(
        r.contains("<registered/>") && r.contains("<username>alice</username>"),
        "{r}"
    );
    let before = admin.get("alice@localhost", NS_AUTH).await;
    let r = c2s.iq(ALICE, "a", "rg2", "type='set' to='localhost'><query xmlns='jabber:iq:register'><username>alice</username><password>n3w</password></query>").await;
    assert!(r.contains("type='result'"), "{r}");
    let after = admin.get("alice@localhost", NS_AUTH).await;
    assert_ne!(before, after);
    let creds = Credentials::parse(after.as_bytes()).unwrap().unwrap();
    assert!(creds.check_password("n3w"));
    let r = c2s.iq(ALICE, "a", "rg3", "type='set' to='localhost'><query xmlns='jabber:iq:register'><username>bob</username><password>x</password></query>").await;
    assert!(r.contains("bad-request"), "{r}");

    c2s.start("alice@localhost/laptop", "a2").await;
    let r = c2s
        .iq(
            ALICE,
            "a",
            "rg4",
            "type='set' to='localhost'><query xmlns='jabber:iq:register'><remove/></query>",
        )
        .await;
    assert!(r.contains("type='result'"), "{r}");
    for sid in ["a", "a2"] {
        let g = c2s
            .expect("end with not-authorized", |g| {
                g.kind == "end" && g.sid == sid
            })
            .await;
        assert!(g.inner.contains("not-authorized"), "{g:?}");
    }
    assert_eq!(admin.get("alice@localhost", NS_AUTH).await, "");
    assert_eq!(admin.get("alice@localhost", "vcard-temp").await, "");
    // Gone: messages to alice bounce.
    c2s.send(
        BOB,
        "b2",
        "<message to='alice@localhost' id='gone'><body>x</body></message>",
    )
    .await;
    let e = c2s.stanza("b2", &["id='gone'", "type='error'"]).await;
    assert!(e.contains("service-unavailable"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_for_the_same_resource_replaces_the_old() {
    let Env {
        mut c2s,
        mut server,
        ..
    } = env("").await;
    c2s.start(ALICE, "1").await;
    c2s.send(ALICE, "1", "<presence/>").await;
    // The new session comes through another c2s instance.
    let mut other = C2s::connect(&server, "c2s-2").await;
    other.start(ALICE, "7").await;
    let g = c2s
        .expect("end with conflict", |g| g.kind == "end" && g.sid == "1")
        .await;
    assert!(
        g.inner
            .contains("<conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"),
        "{g:?}"
    );
    // The old one is gone, the new one works.
    c2s.send(ALICE, "1", "<presence/>").await;
    c2s.expect("reset for the replaced session", |g| {
        g.kind == "end" && g.sid == "1"
    })
    .await;
    other.barrier(ALICE, "7").await;
    assert!(server.exited("sm").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c2s_that_disconnects_ends_its_sessions() {
    let Env {
        mut c2s,
        mut admin,
        server,
    } = env("").await;
    admin
        .roster("alice@localhost", &[("bob@localhost", "both")])
        .await;
    admin
        .roster("bob@localhost", &[("alice@localhost", "both")])
        .await;
    c2s.start(BOB, "b").await;
    c2s.send(BOB, "b", "<presence/>").await;
    c2s.stanza("b", &["from='bob@localhost/desk'"]).await;
    {
        let mut other = C2s::connect(&server, "c2s-2").await;
        other.start(ALICE, "a").await;
        other.send(ALICE, "a", "<presence/>").await;
        c2s.stanza("b", &["from='alice@localhost/phone'"]).await;
        // `other` dropped: its link closes.
    }
    c2s.stanza("b", &["from='alice@localhost/phone'", "type='unavailable'"])
        .await;
    // Alice's session is gone with it.
    let mut again = C2s::connect(&server, "c2s-2").await;
    again.send(ALICE, "a", "<presence/>").await;
    let g = again
        .expect("reset", |g| g.kind == "end" && g.sid == "a")
        .await;
    assert!(g.inner.contains("reset"), "{g:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_survive_an_sm_restart() {
    let Env {
        mut c2s,
        mut server,
        ..
    } = env("").await;
    c2s.start(ALICE, "a").await;
    c2s.send(
        ALICE,
        "a",
        "<message to='bob@localhost' id='k1'><body>before the crash</body></message>",
    )
    .await;
    c2s.barrier(ALICE, "a").await;
    // Bob's task stores it; wait until storage has it on disk.
    let spool = server.path("spool");
    jrs_harness::wait_for("the offline message on disk", WAIT, || {
        std::fs::read_dir(spool.join("localhost").join("bob"))
            .ok()?
            .flatten()
            .any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                !name.starts_with('.') && name.contains("offline")
            })
            .then_some(())
    })
    .await
    .unwrap();

    server.kill9("sm");
    server.start_sm("").await.unwrap();
    // Sessions were in memory only: alice's is unknown now.
    c2s.send(ALICE, "a", "<presence/>").await;
    let g = c2s
        .expect("reset after the restart", |g| {
            g.kind == "end" && g.sid == "a"
        })
        .await;
    assert!(g.inner.contains("reset"));
    c2s.start(BOB, "b").await;
    c2s.send(BOB, "b", "<presence/>").await;
    let m = c2s.stanza("b", &["before the crash"]).await;
    assert!(m.contains("urn:xmpp:delay"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_outage_is_an_error_not_a_crash() {
    let Env {
        mut c2s,
        mut server,
        ..
    } = env("").await;
    c2s.start(ALICE, "a").await;
    let r = c2s
        .iq(
            ALICE,
            "a",
            "v1",
            "type='set'><vCard xmlns='vcard-temp'><FN>A</FN></vCard>",
        )
        .await;
    assert!(r.contains("type='result'"), "{r}");
    server.kill9("xdb-file");
    // Held by the router for its grace period, then bounced: the client hears why.
    let r = c2s
        .iq(ALICE, "a", "v2", "type='get'><vCard xmlns='vcard-temp'/>")
        .await;
    assert!(
        r.contains("internal-server-error") && r.contains("type='wait'"),
        "{r}"
    );
    let before = server
        .log("xdb-file")
        .matches("connected to the router")
        .count();
    server.start_storage().await.unwrap();
    jrs_harness::wait_for("xdb-file to reconnect", WAIT, || {
        (server
            .log("xdb-file")
            .matches("connected to the router")
            .count()
            > before)
            .then_some(())
    })
    .await
    .unwrap();
    let r = c2s
        .iq(ALICE, "a", "v3", "type='get'><vCard xmlns='vcard-temp'/>")
        .await;
    assert!(r.contains("<FN>A</FN>"), "{r}");
    assert!(server.exited("sm").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_users_and_still_talk() {
    let Env {
        mut c2s,
        mut admin,
        mut server,
    } = env("").await;
    server
        .spawn("sm-2", "sm", &["-c", "sm.xml", "--instance", "2"])
        .unwrap();
    jrs_harness::wait_for("sm-2 to connect", WAIT, || {
        server
            .log("sm-2")
            .contains("connected to the router")
            .then_some(())
    })
    .await
    .unwrap();
    let users = ["alice", "bob", "carol", "dave"];
    for u in users {
        let others: Vec<String> = users
            .iter()
            .filter(|o| **o != u)
            .map(|o| format!("{o}@localhost"))
            .collect();
        let items: Vec<(&str, &str)> = others.iter().map(|o| (o.as_str(), "both")).collect();
        admin.roster(&format!("{u}@localhost"), &items).await;
    }
    for u in users {
        let jid = format!("{u}@localhost/r");
        c2s.start(&jid, u).await;
        c2s.send(&jid, u, "<presence/>").await;
    }
    // Everyone sees everyone's presence, whichever instance holds whom.
    for u in users {
        for o in users.iter().filter(|o| **o != u) {
            c2s.stanza(u, &[&format!("from='{o}@localhost/r'")]).await;
        }
    }
    for u in users {
        c2s.send(
            &format!("{u}@localhost/r"),
            u,
            &format!("<message to='dave@localhost' type='chat'><body>from {u}</body></message>"),
        )
        .await;
    }
    for u in users {
        c2s.stanza("dave", &[&format!("from {u}")]).await;
    }
    // Both instances served someone (rendezvous hashing spread the four users).
    let started = |log: &str| log.matches("session started").count();
    assert_eq!(started(&server.log("sm")) + started(&server.log("sm-2")), 4);
    assert!(
        started(&server.log("sm-2")) > 0 && started(&server.log("sm")) > 0,
        "all users on one instance: hashing did not split them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_records_stay_under_the_stanza_limit() {
    // Storage answers travel through the router and sm's link: with an 8 KiB stanza limit
    // no record sm writes may exceed about 6 KiB.
    let Env {
        mut c2s,
        server: _server,
        ..
    } = env("<limits max-stanza-bytes='8192'/>").await;
    c2s.start(ALICE, "a").await;
    let body = "x".repeat(2500);
    for i in 1..=2 {
        c2s.send(
            ALICE,
            "a",
            &format!("<message to='bob@localhost' id='big{i}'><body>{body}</body></message>"),
        )
        .await;
    }
    c2s.send(
        ALICE,
        "a",
        &format!("<message to='bob@localhost' id='big3'><body>{body}</body></message>"),
    )
    .await;
    let e = c2s.stanza("a", &["id='big3'", "type='error'"]).await;
    assert!(
        e.contains("service-unavailable") && e.contains("bytes"),
        "{e}"
    );
    assert!(!c2s.has("a", &["id='big1'"]) && !c2s.has("a", &["id='big2'"]));

    let name = "n".repeat(1000);
    let mut refused = None;
    for i in 0..10 {
        let r = c2s
            .iq(
                ALICE,
                "a",
                &format!("r{i}"),
                &format!("type='set'><query xmlns='jabber:iq:roster'><item jid='c{i}@localhost' name='{name}'/></query>"),
            )
            .await;
        if r.contains("type='error'") {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the roster stops growing before 10 KiB");
    assert!(
        r.contains("resource-constraint") && r.contains("bytes"),
        "{r}"
    );
    // What was stored is intact and still served.
    let r = c2s
        .iq(
            ALICE,
            "a",
            "g",
            "type='get'><query xmlns='jabber:iq:roster'/>",
        )
        .await;
    assert!(r.contains("jid='c0@localhost'"), "{r}");
    // Bob gets the two that fit.
    c2s.start(BOB, "b").await;
    c2s.send(BOB, "b", "<presence/>").await;
    c2s.stanza("b", &["id='big1'"]).await;
    c2s.stanza("b", &["id='big2'"]).await;
}
