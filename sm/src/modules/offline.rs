//! Offline messages (XEP-0160): a message that no session can take now is kept, with a
//! delay stamp (XEP-0203), and delivered at the user's next initial presence with a
//! non-negative priority. They leave storage only once the client has them: c2s
//! confirms them (on the client's XEP-0198 acknowledgement, or once written to a client
//! without stream management), and the confirmed ones are removed from the front of the
//! list. A session that ends before confirming leaves them stored, for the next one.
//!
//! Stored under `urn:jabberd-rs:offline:0` as a list of `<message/>` elements (xdb
//! `append` with `max-items`; read with `get`, the confirmed front rewritten with `set`).

use std::sync::Arc;

use tracing::{debug, error, info, warn};

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::XdbError;

use crate::clock::{stamp, unix_now};
use crate::config::{count, SmConfig};
use crate::host::{
    Declaration, Disco, Flow, Hook, Module, Packet, Session, SessionKey, SessionState, User,
};
use crate::stanzas;
use crate::xml::{Element, NS_CLIENT};

pub const NS_OFFLINE: &str = "urn:jabberd-rs:offline:0";
pub const NS_DELAY: &str = "urn:xmpp:delay";
const NS_CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
const NS_HINTS: &str = "urn:xmpp:hints";

pub struct Offline {
    /// Messages kept per user; 0: none (senders get `service-unavailable`).
    max: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut max = 100;
    if let Some(n) = config.module_settings("offline")? {
        n.allow(&["max-messages"], &[])?;
        max = count(n, "max-messages", max)?;
    }
    Ok(Arc::new(Offline { max }))
}

/// Whether a message is worth keeping for later (XEP-0160 3, XEP-0334): chat-state
/// notifications alone are not, and neither are messages marked no-store.
fn storable(m: &Element) -> bool {
    if m.elements()
        .any(|c| c.ns == NS_HINTS && matches!(c.local_name(), "no-store" | "no-permanent-store"))
    {
        return false;
    }
    m.elements()
        .any(|c| !(c.ns == NS_CHATSTATES || c.ns == NS_HINTS || c.is("thread", NS_CLIENT)))
}

#[async_trait::async_trait]
impl Module for Offline {
    fn name(&self) -> &'static str {
        "offline"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .hook(Hook::Undeliverable, 0)
            .hook(Hook::InitialPresence, 0)
            .hook(Hook::OfflineConfirmed, 0)
            .hook(Hook::SessionEnded, 0)
            .hook(Hook::SessionRestored, 0)
            .feature(Disco::Server, "msgoffline")
    }

    /// What arrived while sm had no session for the user (it restarted) is stored:
    /// an available restored session gets it now, as after initial presence.
    async fn session_restored(&self, u: &mut User, s: SessionKey, _state: &SessionState) {
        let ready = u.session(s).is_some_and(|s| s.available && s.priority >= 0);
        if ready && u.state.get::<InFlight>().is_none() {
            self.deliver(u, s).await;
        }
    }

    async fn undeliverable(&self, u: &mut User, p: &Packet) -> Flow {
        self.store(u, p).await;
        Flow::Handled
    }

    async fn initial_presence(&self, u: &mut User, s: SessionKey) {
        if u.session(s).is_some_and(|s| s.priority >= 0) {
            self.deliver(u, s).await;
        }
    }

    async fn offline_confirmed(&self, u: &mut User, s: SessionKey, count: usize) {
        self.confirmed(u, s, count).await;
    }

    async fn session_ended(&self, u: &mut User, s: &Session) {
        let Some(flight) = u.state.get::<InFlight>() else {
            return;
        };
        if flight.session != s.key {
            return;
        }
        u.state.remove::<InFlight>();
        // Not confirmed: still stored. Another available session may take them now.
        let next = u
            .sessions
            .iter()
            .filter(|o| o.available && o.priority >= 0)
            .max_by_key(|o| o.priority)
            .map(|o| o.key);
        if let Some(next) = next {
            self.deliver(u, next).await;
        }
    }
}

/// Offline messages given to a session whose client has not confirmed them all yet:
/// they stay stored, and no other session gets them meanwhile.
struct InFlight {
    session: SessionKey,
    /// How many of the front of the stored list are still to be confirmed.
    unconfirmed: usize,
}

impl Offline {
    /// XEP-0160: keeps the message, stamped with XEP-0203 delay, until the next login.
    async fn store(&self, u: &mut User, p: &Packet) {
        let stanza = p.stanza();
        let max = self.max;
        if max == 0 {
            u.refuse(
                stanza,
                StanzaErrorCondition::ServiceUnavailable,
                "the recipient is offline",
            );
            return;
        }
        let mut m = match stanzas::parse(stanza) {
            Ok(m) => m,
            Err(e) => {
                debug!("unreadable message not stored: {e}");
                return;
            }
        };
        if !storable(&m) {
            debug!("message without content worth storing dropped");
            return;
        }
        m.push(
            Element::new("delay", NS_DELAY)
                .with_attr("from", u.jid.domain().as_str())
                .with_attr("stamp", stamp(unix_now()))
                .with_text("Offline storage"),
        );
        // The whole store comes back in one storage answer: keep it under the limit.
        let data = m.to_stanza();
        let budget = u.ctx.config.fragment_max();
        let stored = match u.ctx.store.get(&u.bare, NS_OFFLINE).await {
            Ok(s) => s.len(),
            Err(e) => {
                error!("reading the offline store failed: {e}");
                u.refuse(
                    stanza,
                    StanzaErrorCondition::InternalServerError,
                    "the message could not be stored",
                );
                return;
            }
        };
        if stored + data.len() > budget {
            info!(
                stored,
                budget,
                from = stanza.from().unwrap_or(""),
                "offline store full (bytes): message refused"
            );
            u.refuse(
                stanza,
                StanzaErrorCondition::ServiceUnavailable,
                &format!("the recipient is offline and their offline message store is full ({budget} bytes)"),
            );
            return;
        }
        match u
            .ctx
            .store
            .append(&u.bare, NS_OFFLINE, data, Some(max))
            .await
        {
            Ok(()) => info!(from = stanza.from().unwrap_or(""), "message stored offline"),
            Err(XdbError::Refused(r))
                if r.condition == StanzaErrorCondition::ResourceConstraint =>
            {
                info!(
                    max,
                    from = stanza.from().unwrap_or(""),
                    "offline store full: message refused"
                );
                u.refuse(
                    stanza,
                    StanzaErrorCondition::ServiceUnavailable,
                    &format!("the recipient is offline and their offline message store is full ({max} messages)"),
                );
            }
            Err(e) => {
                error!("storing an offline message failed: {e}");
                u.refuse(
                    stanza,
                    StanzaErrorCondition::InternalServerError,
                    "the message could not be stored",
                );
            }
        }
    }

    /// Delivers the stored messages to session `key` (they are removed as its client
    /// confirms them).
    async fn deliver(&self, u: &mut User, key: SessionKey) {
        if self.max == 0 || u.state.get::<InFlight>().is_some() {
            return;
        }
        let data = match u.ctx.store.get(&u.bare, NS_OFFLINE).await {
            Ok(d) => d,
            Err(e) => {
                warn!("offline messages not delivered now: {e}");
                return;
            }
        };
        if data.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match Element::parse_fragment(&data, NS_CLIENT) {
            Ok(messages) => {
                info!(count = messages.len(), "delivering offline messages");
                u.state.insert(InFlight {
                    session: key,
                    unconfirmed: messages.len(),
                });
                for m in messages {
                    u.deliver_offline(key, m.to_stanza());
                }
            }
            Err(e) => error!(
                bytes = data.len(),
                "stored offline messages unreadable, dropped: {e}"
            ),
        }
    }

    /// Session `key`'s client has `count` more of its offline messages: they leave the
    /// front of the stored list.
    async fn confirmed(&self, u: &mut User, key: SessionKey, count: usize) {
        let Some(flight) = u.state.get_mut::<InFlight>() else {
            return;
        };
        if flight.session != key || count == 0 {
            return;
        }
        let count = count.min(flight.unconfirmed);
        flight.unconfirmed -= count;
        if flight.unconfirmed == 0 {
            u.state.remove::<InFlight>();
        }
        let data = match u.ctx.store.get(&u.bare, NS_OFFLINE).await {
            Ok(d) => d,
            Err(e) => {
                error!("confirmed offline messages not removed (they may come again): {e}");
                return;
            }
        };
        let kept = match Element::parse_fragment(&data, NS_CLIENT) {
            Ok(messages) => messages
                .into_iter()
                .skip(count)
                .map(|m| m.to_stanza())
                .collect::<String>(),
            Err(e) => {
                error!("stored offline messages unreadable, left as they are: {e}");
                return;
            }
        };
        match u.ctx.store.set(&u.bare, NS_OFFLINE, kept).await {
            Ok(()) => debug!(count, "confirmed offline messages removed"),
            Err(e) => error!("confirmed offline messages not removed (they may come again): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_states_alone_are_not_stored() {
        let m = |s: &str| Element::parse(s.as_bytes(), NS_CLIENT).unwrap();
        assert!(storable(&m("<message><body>hi</body></message>")));
        assert!(!storable(&m(
            "<message><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
        )));
        assert!(!storable(&m(
            "<message><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>"
        )));
        assert!(!storable(&m("<message/>")));
    }
}
