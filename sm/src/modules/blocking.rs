//! Blocking Command (XEP-0191, `urn:xmpp:blocking`): the user's blocklist, kept in
//! storage, so it holds before login, after it and across restarts.
//!
//! - From a blocked entity: presence is dropped, messages and IQ requests are answered
//!   `service-unavailable` (the user appears offline), IQ answers dropped.
//! - To a blocked entity: what the user's client sends is refused with `not-acceptable`
//!   and `<blocked xmlns='urn:xmpp:blocking:errors'/>`; what sm sends on the user's
//!   behalf (presence broadcasts, probes) is dropped.
//! - Blocking sends unavailable presence to the contacts that saw the user's presence;
//!   unblocking sends them the current presence. Changes are pushed to every session
//!   that asked for the list.
//!
//! A blocklist item matches an address as privacy lists do (XEP-0016 2.1): a full JID
//! only itself, a bare JID every resource of it, a domain everything at that domain.
//! Stored under `urn:xmpp:blocking` as `<blocklist xmlns='urn:xmpp:blocking'>` with one
//! `<item jid=..>` per entry.

use std::collections::BTreeSet;
use std::sync::Arc;

use jid::Jid;
use tracing::{info, warn};
use xmpp_parsers::blocking::{Block, BlocklistResult, Unblock};
use xmpp_parsers::ns::{BLOCKING as NS_BLOCKING, BLOCKING_ERRORS};

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::XdbError;

use crate::config::{positive, SmConfig};
use crate::host::{
    storage_error, Declaration, Disco, Flow, Hook, Iq, IqKind, Module, Packet, Reply, Scope,
    Session, SessionKey, SessionState, User,
};
use crate::modules::presence::Directed;
use crate::modules::roster;
use crate::xml::{Element, NS_CLIENT};

pub struct Blocking {
    max_items: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut max_items = 1000;
    if let Some(n) = config.module_settings("blocking")? {
        n.allow(&["max-items"], &[])?;
        max_items = positive(n, "max-items", max_items)?;
    }
    Ok(Arc::new(Blocking { max_items }))
}

/// The user's blocklist (normalised JIDs as text), once loaded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Blocklist(BTreeSet<String>);

impl Blocklist {
    pub fn parse(stored: &[u8]) -> Blocklist {
        if stored.iter().all(u8::is_ascii_whitespace) {
            return Blocklist::default();
        }
        match Element::parse(stored, "") {
            Ok(list) => Blocklist(
                list.elements()
                    .filter_map(|i| i.attr("jid"))
                    .filter_map(|j| Jid::new(j).ok())
                    .map(|j| j.to_string())
                    .collect(),
            ),
            Err(e) => {
                warn!("stored blocklist unreadable, taken as empty: {e}");
                Blocklist::default()
            }
        }
    }

    pub fn to_storage(&self) -> String {
        let mut list = Element::new("blocklist", NS_BLOCKING);
        for j in &self.0 {
            list.push(Element::new("item", NS_BLOCKING).with_attr("jid", j.clone()));
        }
        list.to_xml()
    }

    /// Whether `who` is blocked: its full JID, its bare JID or its domain is listed.
    pub fn blocks(&self, who: &Jid) -> bool {
        crate::host::broadcasts::blocked_by(&self.0, who)
    }
}

/// A session that asked for the blocklist: it gets pushes.
#[derive(Debug, Default)]
struct Requested;

/// The blocklist, loaded from storage on first use.
async fn load(u: &mut User) -> Result<&mut Blocklist, XdbError> {
    if u.state.get::<Blocklist>().is_none() {
        let stored = u.ctx.store.get(&u.bare, NS_BLOCKING).await?;
        u.state.insert(Blocklist::parse(&stored));
    }
    Ok(u.state.get_mut::<Blocklist>().expect("loaded above"))
}

/// Whether the (loaded) blocklist blocks `who`.
fn blocked(u: &User, who: &Jid) -> bool {
    u.state.get::<Blocklist>().is_some_and(|b| b.blocks(who))
}

use crate::host::broadcasts::Admit;

#[async_trait::async_trait]
impl Module for Blocking {
    fn name(&self) -> &'static str {
        "blocking"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .requires("roster")
            .requires("presence")
            .iq(IqKind::Get, &[Scope::Own], NS_BLOCKING, "blocklist")
            .iq(IqKind::Set, &[Scope::Own], NS_BLOCKING, "block")
            .iq(IqKind::Set, &[Scope::Own], NS_BLOCKING, "unblock")
            .feature(Disco::Server, NS_BLOCKING)
            // Before anything else sees a stanza either way.
            .hook(Hook::Outbound, 1000)
            .hook(Hook::Inbound, 1000)
            .hook(Hook::Routing, 0)
            .hook(Hook::SessionRestored, 0)
    }

    fn session_state(&self, s: &Session, state: &mut SessionState) {
        state.blocklist = s.state.get::<Requested>().is_some();
    }

    async fn session_restored(&self, u: &mut User, key: SessionKey, state: &SessionState) {
        if let Some(s) = u.session_mut(key).filter(|_| state.blocklist) {
            s.state.insert(Requested);
        }
    }

    /// Room broadcasts skip the inbound hook only once the list is known.
    fn room_broadcasts(&self, u: &User) -> Admit {
        match u.state.get::<Blocklist>() {
            Some(list) if list.0.is_empty() => Admit::All,
            Some(list) => Admit::AllBut(list.0.clone()),
            None => Admit::None,
        }
    }

    async fn inbound(&self, u: &mut User, p: &mut Packet) -> Flow {
        let Some(from) = p.from.clone() else {
            return Flow::Pass;
        };
        match load(u).await {
            Ok(list) if list.blocks(&from) => {}
            Ok(_) => return Flow::Pass,
            Err(e) => {
                warn!("blocklist unavailable, stanza from {from} let through: {e}");
                return Flow::Pass;
            }
        }
        let kind = p.kind().unwrap_or("");
        match p.name() {
            // XEP-0191 3.4: presence dropped without a word; messages and IQ requests
            // answered as if the user were not there; IQ answers dropped.
            "presence" => {}
            "message" => u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, ""),
            _ if matches!(kind, "get" | "set") => {
                u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, "")
            }
            _ => {}
        }
        Flow::Handled
    }

    async fn outbound(&self, u: &mut User, from: SessionKey, p: &mut Packet) -> Flow {
        // Loaded before anything the session sends goes on: the routing filter, which
        // also sees what sm sends in reply (presence broadcasts), reads it without
        // waiting for storage.
        if let Err(e) = load(u).await {
            warn!("blocklist unavailable: {e}");
        }
        let Some(to) = p.to.clone() else {
            return Flow::Pass;
        };
        if !blocked(u, &to) {
            return Flow::Pass;
        }
        let blocked = format!("<blocked xmlns='{BLOCKING_ERRORS}'/>");
        if let Some(reply) =
            p.stanza()
                .error_reply_with(StanzaErrorCondition::NotAcceptable, "", &blocked)
        {
            u.deliver(from, reply);
        }
        Flow::Handled
    }

    fn routing(&self, u: &User, to: &Jid, _stanza: &[u8]) -> Flow {
        if blocked(u, to) {
            Flow::Handled
        } else {
            Flow::Pass
        }
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        let Some(key) = iq.session else {
            return Reply::not_handled();
        };
        match iq.payload.name() {
            "blocklist" => {
                if let Some(s) = u.session_mut(key) {
                    s.state.insert(Requested);
                }
                match load(u).await {
                    Ok(list) => Reply::typed(BlocklistResult {
                        items: list.0.iter().filter_map(|j| Jid::new(j).ok()).collect(),
                    }),
                    Err(e) => storage_error(&e),
                }
            }
            "block" => match iq.parse::<Block>() {
                Ok(b) if b.items.is_empty() => Reply::error(
                    StanzaErrorCondition::BadRequest,
                    "<block/> needs at least one <item/>",
                ),
                Ok(b) => self.block(u, b.items).await,
                Err(r) => r,
            },
            _ => match iq.parse::<Unblock>() {
                Ok(b) => unblock(u, b.items).await,
                Err(r) => r,
            },
        }
    }
}

impl Blocking {
    async fn block(&self, u: &mut User, items: Vec<Jid>) -> Reply {
        let old = match load(u).await {
            Ok(l) => l.clone(),
            Err(e) => return storage_error(&e),
        };
        let mut new = old.clone();
        let added: Vec<Jid> = items
            .into_iter()
            .filter(|j| new.0.insert(j.to_string()))
            .collect();
        if new.0.len() > self.max_items {
            return Reply::error(
                StanzaErrorCondition::PolicyViolation,
                format!("a blocklist holds at most {} items", self.max_items),
            );
        }
        if !added.is_empty() {
            // Who saw the user's presence: the subscribers in the roster.
            if let Err(e) = roster::load(u).await {
                warn!("roster unavailable, blocked contacts not sent unavailable presence: {e}");
            }
            if let Err(e) = save(u, &new).await {
                return storage_error(&e);
            }
            info!(count = added.len(), "blocked");
            // While the list in memory is the old one, so the routing filter lets
            // these through (XEP-0191 3.3).
            for contact in presence_seen_by(u, &new, &old) {
                u.send_unavailable_to(&contact);
            }
            u.state.insert(new);
        }
        push(u, "block", &added);
        Reply::empty()
    }
}

async fn unblock(u: &mut User, items: Vec<Jid>) -> Reply {
    let old = match load(u).await {
        Ok(l) => l.clone(),
        Err(e) => return storage_error(&e),
    };
    let mut new = old.clone();
    let all = items.is_empty();
    if all {
        new.0.clear();
    } else {
        for j in &items {
            new.0.remove(j.as_str());
        }
    }
    if new != old {
        if let Err(e) = roster::load(u).await {
            warn!("roster unavailable, unblocked contacts not sent presence: {e}");
        }
        if let Err(e) = save(u, &new).await {
            return storage_error(&e);
        }
        info!(all, "unblocked");
        u.state.insert(new.clone());
        // XEP-0191 3.5: the contacts that may see it get the current presence.
        for contact in presence_seen_by(u, &old, &new) {
            u.send_presence_to(&contact);
        }
    }
    push(u, "unblock", &items);
    Reply::empty()
}

async fn save(u: &mut User, list: &Blocklist) -> Result<(), XdbError> {
    if list.0.is_empty() {
        u.ctx.store.delete(&u.bare, NS_BLOCKING).await
    } else {
        u.ctx
            .store
            .set(&u.bare, NS_BLOCKING, list.to_storage())
            .await
    }
}

/// Contacts entitled to the user's presence (subscribed, or sent directed presence)
/// that `now` blocks and `before` did not.
fn presence_seen_by(u: &User, now: &Blocklist, before: &Blocklist) -> Vec<Jid> {
    let mut seen: Vec<Jid> = roster::cached(u)
        .map(|r| {
            r.subscribers()
                .filter_map(|c| Jid::new(&c.jid).ok())
                .collect()
        })
        .unwrap_or_default();
    for s in &u.sessions {
        if let Some(d) = s.state.get::<Directed>() {
            seen.extend(d.0.iter().cloned());
        }
    }
    seen.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    seen.dedup();
    seen.retain(|j| now.blocks(j) && !before.blocks(j));
    seen
}

/// Sends `<KIND><item jid=../>..</KIND>` to every session that asked for the list.
fn push(u: &mut User, kind: &str, items: &[Jid]) {
    let targets: Vec<(SessionKey, String)> = u
        .sessions
        .iter()
        .filter(|s| s.state.get::<Requested>().is_some())
        .map(|s| (s.key, s.full.clone()))
        .collect();
    for (key, full) in targets {
        let mut change = Element::new(kind, NS_BLOCKING);
        for j in items {
            change.push(Element::new("item", NS_BLOCKING).with_attr("jid", j.to_string()));
        }
        let id = u.next_id();
        let iq = Element::new("iq", NS_CLIENT)
            .with_attr("type", "set")
            .with_attr("id", id)
            .with_attr("to", full)
            .with_child(change);
        u.deliver(key, iq.to_stanza());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Blocklist {
        Blocklist(items.iter().map(|s| s.to_string()).collect())
    }

    fn jid(s: &str) -> Jid {
        Jid::new(s).unwrap()
    }

    #[test]
    fn matches_as_privacy_lists_do() {
        let l = list(&[
            "romeo@montague.net",
            "spam.example",
            "tybalt@capulet.com/sword",
            "nurse.example/phone",
        ]);
        assert!(l.blocks(&jid("romeo@montague.net")));
        assert!(l.blocks(&jid("romeo@montague.net/orchard")));
        assert!(!l.blocks(&jid("mercutio@montague.net")));
        assert!(l.blocks(&jid("anyone@spam.example/x")));
        assert!(l.blocks(&jid("spam.example")));
        assert!(!l.blocks(&jid("sub.spam.example")));
        assert!(l.blocks(&jid("tybalt@capulet.com/sword")));
        assert!(!l.blocks(&jid("tybalt@capulet.com/dagger")));
        assert!(!l.blocks(&jid("tybalt@capulet.com")));
        assert!(l.blocks(&jid("nurse.example/phone")));
        assert!(!l.blocks(&jid("nurse.example")));
        assert!(!Blocklist::default().blocks(&jid("a@b")));
    }

    #[test]
    fn storage_round_trip() {
        let l = list(&["a@b", "c.example"]);
        assert_eq!(Blocklist::parse(l.to_storage().as_bytes()), l);
        assert_eq!(Blocklist::parse(b""), Blocklist::default());
    }

    use crate::modules::testing::*;

    const ROSTER: &str = "<query xmlns='jabber:iq:roster' ver='1'><item jid='romeo@montague.net' subscription='both'/></query>";

    async fn juliet() -> crate::host::User {
        let ctx = ctx(None, "");
        ctx.store
            .set("juliet@localhost", "jabber:iq:roster", ROSTER)
            .await
            .unwrap();
        let mut u = user(&ctx, "juliet@localhost");
        online(&mut u, "balcony", 1).await;
        start(&mut u, "chamber").await;
        send(
            &mut u,
            "chamber",
            "<iq type='get' id='l1'><blocklist xmlns='urn:xmpp:blocking'/></iq>",
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "chamber", &["id='l1'", "type='result'", "blocklist"]).len(),
            1,
            "{out:?}"
        );
        u
    }

    #[tokio::test]
    async fn blocking_refuses_both_ways_and_pushes() {
        let mut u = juliet().await;
        send(&mut u, "balcony", "<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='romeo@montague.net'/></block></iq>").await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "balcony", &["id='b1'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        // Pushed to the session that asked for the list, not to the other.
        assert_eq!(
            to(
                &out,
                "chamber",
                &[
                    "type='set'",
                    "<block xmlns='urn:xmpp:blocking'>",
                    "romeo@montague.net"
                ]
            )
            .len(),
            1,
            "{out:?}"
        );
        assert!(to(&out, "balcony", &["<block "]).is_empty());
        // The contact saw juliet's presence: now it sees her leave.
        assert_eq!(
            to(
                &out,
                "",
                &[
                    "type='unavailable'",
                    "to='romeo@montague.net'",
                    "from='juliet@localhost/balcony'"
                ]
            )
            .len(),
            1,
            "{out:?}"
        );

        // Inbound: a message bounced as if she were not there, presence dropped, IQ
        // requests refused, answers dropped.
        inbound(&mut u, "<message from='romeo@montague.net/orchard' to='juliet@localhost' type='chat'><body>hi</body></message>").await;
        let out = take(&mut u);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(
            out[0].0.is_empty() && out[0].1.contains("service-unavailable"),
            "{out:?}"
        );
        inbound(
            &mut u,
            "<presence from='romeo@montague.net/orchard' to='juliet@localhost'/>",
        )
        .await;
        inbound(
            &mut u,
            "<presence from='romeo@montague.net' to='juliet@localhost' type='subscribe'/>",
        )
        .await;
        inbound(&mut u, "<iq from='romeo@montague.net/orchard' to='juliet@localhost/balcony' type='result' id='r'/>").await;
        assert!(take(&mut u).is_empty());
        inbound(&mut u, "<iq from='romeo@montague.net/orchard' to='juliet@localhost' type='get' id='v'><vCard xmlns='vcard-temp'/></iq>").await;
        assert_eq!(
            to(&take(&mut u), "", &["service-unavailable", "id='v'"]).len(),
            1
        );

        // Outbound: refused with the blocking error; broadcasts skip the contact.
        send(
            &mut u,
            "balcony",
            "<message to='romeo@montague.net' type='chat' id='o1'><body>x</body></message>",
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "balcony",
                &[
                    "type='error'",
                    "not-acceptable",
                    "<blocked xmlns='urn:xmpp:blocking:errors'/>"
                ]
            )
            .len(),
            1,
            "{out:?}"
        );
        assert!(to(&out, "", &[]).is_empty(), "{out:?}");
        send(&mut u, "balcony", "<presence><show>away</show></presence>").await;
        assert!(to(&take(&mut u), "", &["romeo"]).is_empty());

        // Unblocking sends the current presence and lets everything through again.
        send(
            &mut u,
            "chamber",
            "<iq type='set' id='u1'><unblock xmlns='urn:xmpp:blocking'/></iq>",
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "chamber", &["<unblock xmlns='urn:xmpp:blocking'/>"]).len(),
            1,
            "{out:?}"
        );
        assert_eq!(
            to(&out, "", &["to='romeo@montague.net'", "<show>away</show>"]).len(),
            1,
            "{out:?}"
        );
        inbound(&mut u, "<message from='romeo@montague.net/orchard' to='juliet@localhost' type='chat'><body>hi</body></message>").await;
        assert_eq!(to(&take(&mut u), "balcony", &["<body>hi</body>"]).len(), 1);
    }

    #[tokio::test]
    async fn domains_lists_limits_and_storage() {
        let ctx = ctx(None, "<blocking max-items='2'/>");
        let mut u = user(&ctx, "juliet@localhost");
        online(&mut u, "balcony", 1).await;
        take(&mut u);
        send(
            &mut u,
            "balcony",
            "<iq type='set' id='e'><block xmlns='urn:xmpp:blocking'/></iq>",
        )
        .await;
        assert_eq!(to(&take(&mut u), "balcony", &["bad-request"]).len(), 1);
        send(&mut u, "balcony", "<iq type='set' id='b'><block xmlns='urn:xmpp:blocking'><item jid='spam.example'/><item jid='tybalt@capulet.com'/></block></iq>").await;
        take(&mut u);
        inbound(
            &mut u,
            "<message from='x@spam.example' to='juliet@localhost'><body>buy</body></message>",
        )
        .await;
        assert!(to(&take(&mut u), "balcony", &[]).is_empty());
        send(&mut u, "balcony", "<iq type='set' id='c'><block xmlns='urn:xmpp:blocking'><item jid='third@x.example'/></block></iq>").await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "balcony", &["policy-violation", "at most 2"]).len(),
            1,
            "{out:?}"
        );
        // Kept in storage: a new task (after a restart, before login) still blocks.
        let stored = ctx
            .store
            .get("juliet@localhost", "urn:xmpp:blocking")
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&stored).contains("spam.example"));
        let mut offline = user(&ctx, "juliet@localhost");
        inbound(&mut offline, "<message from='tybalt@capulet.com/x' to='juliet@localhost' type='chat'><body>hi</body></message>").await;
        let out = take(&mut offline);
        assert_eq!(to(&out, "", &["service-unavailable"]).len(), 1, "{out:?}");
        let offline_store = ctx
            .store
            .get("juliet@localhost", "urn:jabberd-rs:offline:0")
            .await
            .unwrap();
        assert!(
            offline_store.is_empty(),
            "a blocked message was stored offline"
        );
    }
}
