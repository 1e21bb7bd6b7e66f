//! Messages (RFC 6121 8.5): delivery to the right resources by type and priority, and
//! offline storage (XEP-0160) with a delay stamp (XEP-0203) when no resource can take
//! them, delivered at the next initial presence with non-negative priority.
//!
//! Offline messages are stored under `urn:jabberd-rs:offline:0` as a list of
//! `<message/>` elements (xdb `append` with `max-items`, read back with `take`).

use jid::Jid;
use tracing::{debug, error, info, warn};

use jrs_stream::{Stanza, StanzaErrorCondition};
use jrs_xdb::XdbError;

use crate::stanzas;
use crate::time::{stamp, unix_now};
use crate::user::User;
use crate::users::Inbound;
use crate::xml::{Element, NS_CLIENT};

pub const NS_OFFLINE: &str = "urn:jabberd-rs:offline:0";
pub const NS_DELAY: &str = "urn:xmpp:delay";
const NS_CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
const NS_HINTS: &str = "urn:xmpp:hints";

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

impl User {
    /// A message from the user's client.
    pub async fn message_from_client(&mut self, idx: usize, stanza: Stanza, to: Option<Jid>) {
        let full = self.sessions[idx].full.clone();
        let from = Jid::new(&full).ok();
        match to {
            // RFC 6120 10.3.1: no 'to' means the user's own bare JID.
            None => {
                let stanza = stanzas::reparse(stanza.with_addresses(Some(&self.bare), None));
                let to = Jid::from(self.jid.clone());
                self.message_inbound(Inbound { stanza, to, from }).await;
            }
            Some(to) if self.is_same_user(&to) => {
                self.message_inbound(Inbound { stanza, to, from }).await;
            }
            Some(_) => self.ctx.send(stanza.bytes().clone()),
        }
    }

    /// A message addressed to this user.
    pub async fn message_inbound(&mut self, inb: Inbound) {
        let kind = inb.stanza.kind().unwrap_or("normal").to_owned();
        match self.exists().await {
            Ok(true) => {}
            Ok(false) => {
                // 8.5.1: no such user.
                self.refuse(&inb.stanza, StanzaErrorCondition::ServiceUnavailable, "");
                return;
            }
            Err(e) => {
                warn!("message not delivered: {e}");
                self.refuse(
                    &inb.stanza,
                    StanzaErrorCondition::InternalServerError,
                    "storage is not available right now",
                );
                return;
            }
        }
        if let Ok(full) = inb.to.try_as_full() {
            if let Some(idx) = self.find_resource(full) {
                // 8.5.3.1: the resource has a session.
                self.deliver(idx, &stanzas::for_client(&inb.stanza));
                return;
            }
            // 8.5.3.2.1: no such resource.
            match kind.as_str() {
                "error" | "headline" => return,
                "groupchat" => {
                    self.refuse(&inb.stanza, StanzaErrorCondition::ServiceUnavailable, "");
                    return;
                }
                _ => {} // normal, chat: as if to the bare JID.
            }
        }
        // 8.5.2: to the bare JID. Resources with negative priority get nothing this way.
        let candidates: Vec<usize> = self
            .available()
            .into_iter()
            .filter(|&i| self.sessions[i].priority >= 0)
            .collect();
        let bytes = stanzas::for_client(&inb.stanza);
        match kind.as_str() {
            "error" => debug!("error message to the bare JID ignored"),
            "groupchat" => self.refuse(&inb.stanza, StanzaErrorCondition::ServiceUnavailable, ""),
            "headline" => {
                for i in candidates {
                    self.deliver(i, &bytes);
                }
            }
            _ if candidates.is_empty() => self.store_offline(&inb.stanza).await,
            _ => {
                let top = candidates
                    .iter()
                    .map(|&i| self.sessions[i].priority)
                    .max()
                    .unwrap_or(0);
                for i in candidates {
                    if self.sessions[i].priority == top {
                        self.deliver(i, &bytes);
                    }
                }
            }
        }
    }

    /// Answers the sender with an error (never an error to an error).
    fn refuse(&self, stanza: &Stanza, condition: StanzaErrorCondition, text: &str) {
        if let Some(reply) = stanza.error_reply(condition, text) {
            self.ctx.send(reply);
        }
    }

    /// XEP-0160: keeps the message, stamped with XEP-0203 delay, until the next login.
    async fn store_offline(&mut self, stanza: &Stanza) {
        let max = self.ctx.config.offline_max;
        if max == 0 {
            self.refuse(
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
                .with_attr("from", self.jid.domain().as_str())
                .with_attr("stamp", stamp(unix_now()))
                .with_text("Offline storage"),
        );
        // The whole store comes back in one storage answer: keep it under the limit.
        let data = m.to_stanza();
        let budget = self.ctx.config.fragment_max();
        let stored = match self.ctx.xdb.get(&self.bare, NS_OFFLINE).await {
            Ok(s) => s.len(),
            Err(e) => {
                error!("reading the offline store failed: {e}");
                self.refuse(
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
                budget, "offline store full (bytes): message refused"
            );
            self.refuse(
                stanza,
                StanzaErrorCondition::ServiceUnavailable,
                &format!("the recipient is offline and their offline message store is full ({budget} bytes)"),
            );
            return;
        }
        match self
            .ctx
            .xdb
            .append(&self.bare, NS_OFFLINE, data, Some(max))
            .await
        {
            Ok(()) => info!(from = stanza.from().unwrap_or(""), "message stored offline"),
            Err(XdbError::Refused(r))
                if r.condition == StanzaErrorCondition::ResourceConstraint =>
            {
                info!(max, "offline store full: message refused");
                self.refuse(
                    stanza,
                    StanzaErrorCondition::ServiceUnavailable,
                    &format!("the recipient is offline and their offline message store is full ({max} messages)"),
                );
            }
            Err(e) => {
                error!("storing an offline message failed: {e}");
                self.refuse(
                    stanza,
                    StanzaErrorCondition::InternalServerError,
                    "the message could not be stored",
                );
            }
        }
    }

    /// Delivers (and removes) the stored messages to session `idx`.
    pub async fn deliver_offline(&mut self, idx: usize) {
        if self.ctx.config.offline_max == 0 {
            return;
        }
        let data = match self.ctx.xdb.take(&self.bare, NS_OFFLINE).await {
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
                for m in messages {
                    self.deliver(idx, m.to_stanza().as_bytes());
                }
            }
            Err(e) => error!(
                bytes = data.len(),
                "stored offline messages unreadable, dropped: {e}"
            ),
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
