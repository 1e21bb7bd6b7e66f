//! Messages (RFC 6121 8.5): routing what the user sends, and delivering what the user
//! receives to the right sessions by type and priority. After a delivery the
//! [`Hook::Delivered`] chain runs (carbons); a message no session can take now goes to
//! the [`Hook::Undeliverable`] chain (offline storage), and is refused if nobody takes
//! it.

use std::sync::Arc;

use jid::Jid;
use tracing::debug;

use jrs_stream::StanzaErrorCondition;

use crate::config::SmConfig;
use crate::host::ending::EndedSession;
use crate::host::task;
use crate::host::{hooks, Declaration, Flow, Hook, Module, Packet, SessionKey, Stanzas, User};

pub struct Messages;

pub fn load_module(_config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    Ok(Arc::new(Messages))
}

#[async_trait::async_trait]
impl Module for Messages {
    fn name(&self) -> &'static str {
        "messages"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .stanzas(Hook::Outbound, Stanzas::Message, 0)
            .stanzas(Hook::Inbound, Stanzas::Message, 0)
            .hook(Hook::Undelivered, 0)
    }

    async fn outbound(&self, u: &mut User, _from: SessionKey, p: &mut Packet) -> Flow {
        match p.to.clone() {
            // RFC 6120 10.3.1: no 'to' means the user's own bare JID.
            None => {
                let own = Jid::from(u.jid.clone());
                let bytes = p.stanza().with_addresses(Some(u.bare.as_str()), None);
                let stanza = crate::stanzas::reparse(bytes);
                task::inbound(u, Packet::new(stanza, Some(own), p.from.clone())).await;
            }
            Some(to) if u.is_same_user(&to) => {
                let p = Packet::new(p.stanza().clone(), Some(to), p.from.clone());
                task::inbound(u, p).await;
            }
            Some(to) => u.route_stanza(&to, p.stanza().clone()),
        }
        Flow::Handled
    }

    async fn inbound(&self, u: &mut User, p: &mut Packet) -> Flow {
        deliver(u, p).await;
        Flow::Handled
    }

    /// A message the client of an ended session never got. RFC 6121 8.5.3.2.1 (a full
    /// JID without a session): a normal or chat message goes to the user's other
    /// sessions, or offline storage; others are dropped. One sent to the bare JID went
    /// to every session of the top priority when it came: sessions of at least the ended
    /// one's priority have it (and the archive has it) and do not get it twice.
    async fn undelivered(&self, u: &mut User, p: &Packet) -> Flow {
        if p.name() != "message" {
            return Flow::Pass;
        }
        let kind = p.kind().unwrap_or("normal");
        if !matches!(kind, "normal" | "chat") {
            debug!(kind, "undelivered message dropped (RFC 6121 8.5.3.2.1)");
            return Flow::Handled;
        }
        let ended = p.notes.get::<EndedSession>().map_or(0, |e| e.priority);
        let to_bare = p
            .stanza()
            .attr("to")
            .and_then(|t| Jid::new(&t).ok())
            .is_some_and(|t| t.resource().is_none());
        match route(u, &Jid::from(u.jid.clone()), kind) {
            Route::To(keys) => {
                let had_it = to_bare
                    && keys
                        .iter()
                        .filter_map(|k| u.session(*k))
                        .any(|s| s.priority >= ended);
                if had_it {
                    debug!("undelivered message: the other sessions had it");
                } else {
                    let bytes = p.for_client();
                    for key in keys {
                        u.deliver(key, bytes.clone());
                    }
                }
            }
            other => no_session(u, p, other).await,
        }
        Flow::Handled
    }
}

/// Which sessions get a message to the user, by RFC 6121 8.5.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// These sessions.
    To(Vec<SessionKey>),
    /// No session can take it now (stored offline, or refused).
    Nobody,
    /// Answered `service-unavailable`.
    Refuse,
    /// Dropped silently.
    Drop,
}

/// RFC 6121 8.5.2 (bare JID) and 8.5.3 (full JID), on session state alone.
pub fn route(u: &User, to: &Jid, kind: &str) -> Route {
    if let Ok(full) = to.try_as_full() {
        if let Some(key) = u.find_resource(full) {
            // 8.5.3.1: the resource has a session.
            return Route::To(vec![key]);
        }
        // 8.5.3.2.1: no such resource.
        match kind {
            "error" | "headline" => return Route::Drop,
            "groupchat" => return Route::Refuse,
            _ => {} // normal, chat: as if to the bare JID.
        }
    }
    // 8.5.2: to the bare JID. Resources with negative priority get nothing this way.
    let candidates: Vec<(SessionKey, i32)> = u
        .sessions
        .iter()
        .filter(|s| s.available && s.priority >= 0)
        .map(|s| (s.key, s.priority))
        .collect();
    match kind {
        "error" => Route::Drop,
        "groupchat" => Route::Refuse,
        "headline" if candidates.is_empty() => Route::Drop,
        "headline" => Route::To(candidates.into_iter().map(|(k, _)| k).collect()),
        _ if candidates.is_empty() => Route::Nobody,
        _ => {
            let top = candidates.iter().map(|(_, p)| *p).max().unwrap_or(0);
            Route::To(
                candidates
                    .into_iter()
                    .filter(|(_, p)| *p == top)
                    .map(|(k, _)| k)
                    .collect(),
            )
        }
    }
}

async fn deliver(u: &mut User, p: &Packet) {
    let Some(to) = p.to.clone() else { return };
    let kind = p.kind().unwrap_or("normal");
    match route(u, &to, kind) {
        Route::To(keys) => {
            let bytes = p.for_client();
            for key in &keys {
                u.deliver(*key, bytes.clone());
            }
            hooks::delivered(u, p, &keys).await;
        }
        other => no_session(u, p, other).await,
    }
}

/// A message no session takes: offline storage (the [`Hook::Undeliverable`] chain) or
/// `service-unavailable` for [`Route::Nobody`], refused or dropped as routed.
async fn no_session(u: &mut User, p: &Packet, route: Route) {
    match route {
        Route::To(_) => {}
        Route::Nobody => {
            if hooks::undeliverable(u, p).await == Flow::Pass {
                u.refuse(
                    p.stanza(),
                    StanzaErrorCondition::ServiceUnavailable,
                    "the recipient is offline",
                );
            }
        }
        Route::Refuse => u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, ""),
        Route::Drop => debug!(kind = ?p.kind(), "message dropped (RFC 6121 8.5)"),
    }
}

#[cfg(test)]
mod tests {
    use crate::modules::offline::NS_OFFLINE;
    use crate::modules::testing::*;

    const CHAT: &str = "<message from='bob@example.com/x' to='alice@localhost' type='chat' id='m1'><body>hi</body></message>";

    #[tokio::test]
    async fn bare_jid_messages_go_to_the_highest_priority() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "high", 5).await;
        online(&mut u, "low", 1).await;
        online(&mut u, "away", -1).await;
        take(&mut u);
        inbound(&mut u, CHAT).await;
        let out = take(&mut u);
        assert_eq!(to(&out, "high", &["<body>hi</body>"]).len(), 1, "{out:?}");
        assert!(to(&out, "low", &["<body>"]).is_empty(), "{out:?}");
        assert!(to(&out, "away", &["<body>"]).is_empty(), "{out:?}");
        // A tie: every resource of the top priority.
        send(&mut u, "low", "<presence><priority>5</priority></presence>").await;
        take(&mut u);
        inbound(&mut u, CHAT).await;
        let out = take(&mut u);
        assert_eq!(to(&out, "high", &["<body>"]).len(), 1);
        assert_eq!(to(&out, "low", &["<body>"]).len(), 1);
    }

    #[tokio::test]
    async fn full_jid_messages_and_the_other_types() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 5).await;
        online(&mut u, "laptop", 0).await;
        take(&mut u);
        // To a full JID: that resource, whatever the priorities.
        inbound(
            &mut u,
            &CHAT.replace("to='alice@localhost'", "to='alice@localhost/laptop'"),
        )
        .await;
        let out = take(&mut u);
        assert_eq!(to(&out, "laptop", &["<body>"]).len(), 1, "{out:?}");
        assert!(to(&out, "phone", &["<body>"]).is_empty());
        // To a resource that is not there: chat as if to the bare JID, headline dropped.
        inbound(
            &mut u,
            &CHAT.replace("to='alice@localhost'", "to='alice@localhost/gone'"),
        )
        .await;
        assert_eq!(to(&take(&mut u), "phone", &["<body>"]).len(), 1);
        let headline = CHAT
            .replace("to='alice@localhost'", "to='alice@localhost/gone'")
            .replace("type='chat'", "type='headline'");
        inbound(&mut u, &headline).await;
        assert!(take(&mut u).is_empty());
        // Group chat to the bare JID is refused.
        inbound(&mut u, &CHAT.replace("type='chat'", "type='groupchat'")).await;
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "",
                &[
                    "type='error'",
                    "service-unavailable",
                    "to='bob@example.com/x'"
                ]
            )
            .len(),
            1,
            "{out:?}"
        );
        // Headlines to the bare JID: every available resource.
        inbound(&mut u, &CHAT.replace("type='chat'", "type='headline'")).await;
        let out = take(&mut u);
        assert_eq!(out.len(), 2, "{out:?}");
    }

    #[tokio::test]
    async fn nobody_online_means_offline_storage_and_no_account_an_error() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        inbound(&mut u, CHAT).await;
        assert!(take(&mut u).is_empty());
        let stored = ctx.store.get("alice@localhost", NS_OFFLINE).await.unwrap();
        let stored = String::from_utf8_lossy(&stored);
        assert!(
            stored.contains("<body>hi</body>") && stored.contains("Offline storage"),
            "{stored}"
        );
        ctx.accounts.remember("nobody@localhost", false);
        let mut n =
            crate::host::User::new(ctx.clone(), jid::BareJid::new("nobody@localhost").unwrap());
        inbound(&mut n, &CHAT.replace("alice@", "nobody@")).await;
        let out = take(&mut n);
        assert_eq!(
            to(&out, "", &["type='error'", "service-unavailable"]).len(),
            1,
            "{out:?}"
        );
    }
}
