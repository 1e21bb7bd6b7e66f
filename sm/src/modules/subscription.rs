//! Presence subscriptions (RFC 6121 section 3 and the state tables of Appendix A):
//! subscribe / subscribed / unsubscribe / unsubscribed, outbound (from the user) and
//! inbound (from a contact), pre-approval (3.4), roster pushes on every change, and
//! pending inbound requests kept until answered (delivered again at each initial
//! presence), and the contacts told when the account is removed.

use std::sync::Arc;

use jid::Jid;
use tracing::{debug, info, warn};

use jrs_stream::StanzaErrorCondition;

use crate::config::SmConfig;
use crate::host::{
    storage_error, Declaration, Flow, Hook, Module, Packet, SessionKey, Stanzas, User,
};
use crate::modules::roster::{self, Item, Roster, Sub};
use crate::stanzas;
use crate::xml::Element;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "subscribe" => Kind::Subscribe,
            "subscribed" => Kind::Subscribed,
            "unsubscribe" => Kind::Unsubscribe,
            "unsubscribed" => Kind::Unsubscribed,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Subscribe => "subscribe",
            Kind::Subscribed => "subscribed",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Unsubscribed => "unsubscribed",
        }
    }
}

/// What the user's server does with an outbound subscription stanza.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    pub state: Sub,
    /// Send the stanza on to the contact.
    pub route: bool,
    /// The contact just became a subscriber: send it the user's current presence.
    pub send_presence: bool,
    /// The contact just lost its subscription: send it unavailable presence.
    pub send_unavailable: bool,
}

/// RFC 6121 3.1.2, 3.1.5, 3.2.2, 3.3.2, 3.4 (user to contact).
pub fn outbound(s: Sub, kind: Kind) -> Outbound {
    let mut out = Outbound {
        state: s,
        route: true,
        send_presence: false,
        send_unavailable: false,
    };
    let n = &mut out.state;
    match kind {
        Kind::Subscribe => {
            if !n.to {
                n.ask = true;
            }
        }
        Kind::Unsubscribe => {
            n.to = false;
            n.ask = false;
        }
        Kind::Subscribed => {
            if n.pending_in {
                n.from = true;
                n.pending_in = false;
                n.approved = false;
                out.send_presence = true;
            } else if !n.from {
                // Pre-approval: remembered, not sent (3.4).
                n.approved = true;
                out.route = false;
            } else {
                out.route = false;
            }
        }
        Kind::Unsubscribed => {
            if n.from || n.pending_in || n.approved {
                out.send_unavailable = n.from;
                n.from = false;
                n.pending_in = false;
                n.approved = false;
            } else {
                out.route = false;
            }
        }
    }
    out
}

/// What the contact's server does with an inbound subscription stanza.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundOutcome {
    pub state: Sub,
    /// Deliver the stanza to the user's interested resources.
    pub deliver: bool,
    /// Answer the contact with `subscribed` on the user's behalf.
    pub auto_subscribed: bool,
    /// Send the contact the user's current presence (pre-approved subscription).
    pub send_presence: bool,
}

/// RFC 6121 3.1.3, 3.1.6, 3.2.3, 3.3.3 (contact to user).
pub fn inbound(s: Sub, kind: Kind) -> InboundOutcome {
    let mut out = InboundOutcome {
        state: s,
        deliver: false,
        auto_subscribed: false,
        send_presence: false,
    };
    let n = &mut out.state;
    match kind {
        Kind::Subscribe => {
            if n.from {
                out.auto_subscribed = true;
            } else if n.approved {
                n.from = true;
                n.approved = false;
                out.auto_subscribed = true;
                out.send_presence = true;
            } else {
                n.pending_in = true;
                out.deliver = true;
            }
        }
        Kind::Subscribed => {
            if n.ask {
                n.to = true;
                n.ask = false;
                out.deliver = true;
            }
        }
        Kind::Unsubscribe => {
            if n.from || n.pending_in {
                n.from = false;
                n.pending_in = false;
                out.deliver = true;
            }
        }
        Kind::Unsubscribed => {
            if n.to || n.ask {
                n.to = false;
                n.ask = false;
                out.deliver = true;
            }
        }
    }
    out
}

pub struct Subscriptions {
    roster_max: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    Ok(Arc::new(Subscriptions {
        roster_max: roster::max_items(config)?,
    }))
}

/// The roster as it was before the account's data went, to tell the contacts.
struct RemovedRoster(Roster);

#[async_trait::async_trait]
impl Module for Subscriptions {
    fn name(&self) -> &'static str {
        "subscription"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .requires("roster")
            .stanzas(Hook::Outbound, Stanzas::Presence, 200)
            .stanzas(Hook::Inbound, Stanzas::Presence, 200)
            .hook(Hook::InitialPresence, 100)
            .hook(Hook::AccountRemoving, 0)
            .hook(Hook::AccountRemoved, 0)
    }

    async fn outbound(&self, u: &mut User, from: SessionKey, p: &mut Packet) -> Flow {
        let Some(kind) = subscription_kind(p) else {
            return Flow::Pass;
        };
        match crate::stanzas::parse(p.stanza()) {
            Ok(el) => self.outbound_request(u, from, p, el, kind).await,
            Err(e) => debug!("unreadable presence from the client: {e}"),
        }
        Flow::Handled
    }

    async fn inbound(&self, u: &mut User, p: &mut Packet) -> Flow {
        let Some(kind) = subscription_kind(p) else {
            return Flow::Pass;
        };
        match crate::stanzas::parse(p.stanza()) {
            Ok(el) => self.inbound_request(u, p, el, kind).await,
            Err(e) => debug!("unreadable subscription stanza: {e}"),
        }
        Flow::Handled
    }

    async fn initial_presence(&self, u: &mut User, s: SessionKey) {
        deliver_pending_requests(u, s);
    }

    async fn account_removing(&self, u: &mut User) {
        // Best effort: the account goes either way.
        if let Ok(r) = roster::load(u).await {
            let r = r.clone();
            u.state.insert(RemovedRoster(r));
        }
    }

    async fn account_removed(&self, u: &mut User) {
        let Some(RemovedRoster(r)) = u.state.remove::<RemovedRoster>() else {
            return;
        };
        roster::forget(u);
        for item in r.items.values() {
            let Ok(to) = Jid::new(&item.jid) else {
                continue;
            };
            if item.sub.to || item.sub.ask {
                let p = stanzas::presence(Some("unsubscribe"), &u.bare, &item.jid);
                u.route(&to, p.to_stanza());
            }
            if item.sub.from || item.sub.pending_in {
                let p = stanzas::presence(Some("unsubscribed"), &u.bare, &item.jid);
                u.route(&to, p.to_stanza());
            }
        }
    }
}

/// The subscription type of a presence stanza, if it is one.
fn subscription_kind(p: &Packet) -> Option<Kind> {
    if p.name() != "presence" {
        return None;
    }
    p.kind().and_then(Kind::parse)
}

impl Subscriptions {
    /// A subscription stanza from the user's client (directed to the contact).
    async fn outbound_request(
        &self,
        u: &mut User,
        from: SessionKey,
        p: &Packet,
        el: Element,
        kind: Kind,
    ) {
        let stanza = p.stanza();
        let Some(to) = p.to.clone() else {
            if let Some(r) = stanza.error_reply(
                StanzaErrorCondition::BadRequest,
                "a subscription request needs 'to'",
            ) {
                u.deliver(from, r);
            }
            return;
        };
        let contact = to.to_bare().to_string();
        if contact == u.bare {
            debug!("subscription stanza to the user's own JID ignored");
            return;
        }
        let max = self.roster_max;
        let roster = match roster::load(u).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(r) = storage_error(&e).into_bytes(stanza) {
                    u.deliver(from, r);
                }
                return;
            }
        };
        let before = roster.get(&contact).cloned();
        let old = before.as_ref().map(|i| i.sub).unwrap_or_default();
        let out = outbound(old, kind);
        // Subscribing, or approving, puts the contact in the roster (3.1.2, 3.1.5, 3.4).
        let adds = matches!(kind, Kind::Subscribe | Kind::Subscribed)
            && before.as_ref().is_none_or(|i| i.hidden)
            && out.state != Sub::default();
        if before.is_none() && adds && roster.items.len() >= max {
            if let Some(r) = stanza.error_reply(
                StanzaErrorCondition::NotAllowed,
                &format!("the roster is full: at most {max} items"),
            ) {
                u.deliver(from, r);
            }
            return;
        }
        let mut changed = out.state != old;
        if changed || adds {
            let item = roster
                .items
                .entry(contact.clone())
                .or_insert_with(|| Item::new(&contact));
            item.sub = out.state;
            if adds {
                item.hidden = false;
                changed = true;
            }
            if !item.sub.pending_in {
                item.request = None;
            }
            if item.is_void() {
                roster.items.remove(&contact);
            }
        }
        if changed {
            roster::bump(u);
            if let Err(e) = roster::save(u).await {
                if let Some(r) = storage_error(&e).into_bytes(stanza) {
                    u.deliver(from, r);
                }
                return;
            }
            info!(contact = %contact, kind = kind.name(), subscription = out.state.name(),
                  ask = out.state.ask, "outbound subscription");
            let visible_before = before.as_ref().is_some_and(|i| !i.hidden);
            let visible_now = roster::cached(u)
                .and_then(|r| r.get(&contact))
                .is_some_and(|i| !i.hidden);
            if visible_before || visible_now {
                roster::push(u, &contact);
            }
        }
        let contact_jid = Jid::from(to.to_bare());
        if out.route {
            // 3.1.2: stamped with the user's bare JID, addressed to the contact's.
            let mut p = el;
            p.set_attr("from", u.bare.clone());
            p.set_attr("to", contact.clone());
            p.remove_attr("id");
            if let Some(id) = stanza.attr("id") {
                p.set_attr("id", id);
            }
            u.route(&contact_jid, p.to_stanza());
        }
        if out.send_presence {
            u.send_presence_to(&contact_jid);
        }
        if out.send_unavailable {
            u.send_unavailable_to(&contact_jid);
        }
    }

    /// A subscription stanza from a contact.
    async fn inbound_request(&self, u: &mut User, p: &Packet, el: Element, kind: Kind) {
        let Some(from) = p.from.as_ref() else {
            debug!("subscription stanza without 'from' ignored");
            return;
        };
        let contact = from.to_bare().to_string();
        if contact == u.bare {
            return;
        }
        let contact_jid = Jid::from(from.to_bare());
        let max = self.roster_max;
        let bare = u.bare.clone();
        let roster = match roster::load(u).await {
            Ok(r) => r,
            Err(e) => {
                warn!("subscription from {contact} not processed: {e}");
                return;
            }
        };
        let before = roster.get(&contact).cloned();
        let old = before.as_ref().map(|i| i.sub).unwrap_or_default();
        let out = inbound(old, kind);
        // The request as the user will see it: from the contact's bare JID.
        let mut shown = el;
        shown.set_attr("from", contact.clone());
        shown.set_attr("to", bare);
        let mut changed = out.state != old;
        if changed {
            if before.is_none() && roster.items.len() >= max {
                // No room to remember the request: it is still delivered now.
                warn!(contact = %contact, "roster full: inbound subscription request not stored");
                changed = false;
            } else {
                let item = roster.items.entry(contact.clone()).or_insert_with(|| {
                    let mut i = Item::new(&contact);
                    i.hidden = true;
                    i
                });
                item.sub = out.state;
                item.request = if item.sub.pending_in {
                    let mut keep = shown.clone();
                    keep.remove_attr("to");
                    keep.remove_attr("id");
                    Some(keep)
                } else {
                    None
                };
                if item.is_void() {
                    roster.items.remove(&contact);
                }
            }
        }
        if changed {
            roster::bump(u);
            if let Err(e) = roster::save(u).await {
                warn!("subscription from {contact} not stored: {e}");
                return;
            }
            info!(contact = %contact, kind = kind.name(), subscription = out.state.name(),
                  pending_in = out.state.pending_in, "inbound subscription");
            let visible = |i: Option<&Item>| i.is_some_and(|i| !i.hidden);
            if visible(before.as_ref()) || visible(roster::cached(u).and_then(|r| r.get(&contact)))
            {
                roster::push(u, &contact);
            }
        }
        if out.auto_subscribed {
            let p = stanzas::presence(Some("subscribed"), &u.bare, &contact);
            u.route(&contact_jid, p.to_stanza());
        }
        if out.send_presence {
            u.send_presence_to(&contact_jid);
        }
        if out.deliver {
            let bytes = bytes::Bytes::from(shown.to_stanza());
            // RFC 6121 3.1.3, 3.1.6, 3.2.3, 3.3.3: to the available resources (the
            // roster change itself is pushed to the interested ones above).
            for key in u.available() {
                u.deliver(key, bytes.clone());
            }
        }
    }
}

/// Delivers the stored, unanswered subscription requests to session `key` (at its
/// initial presence, RFC 6121 3.1.3).
fn deliver_pending_requests(u: &mut User, key: SessionKey) {
    let Some(r) = roster::cached(u) else { return };
    let requests: Vec<String> = r
        .items
        .values()
        .filter(|i| i.sub.pending_in)
        .map(|item| {
            let mut p = item
                .request
                .clone()
                .unwrap_or_else(|| stanzas::presence(Some("subscribe"), &item.jid, ""));
            p.set_attr("from", item.jid.clone());
            p.set_attr("to", u.bare.clone());
            p.to_stanza()
        })
        .collect();
    for p in requests {
        u.deliver(key, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(to: bool, from: bool, ask: bool, pending_in: bool) -> Sub {
        Sub {
            to,
            from,
            ask,
            pending_in,
            approved: false,
        }
    }

    #[test]
    fn full_handshake() {
        // alice subscribes to bob.
        let a = outbound(Sub::default(), Kind::Subscribe);
        assert!(a.route && a.state.ask);
        let b = inbound(Sub::default(), Kind::Subscribe);
        assert!(b.deliver && b.state.pending_in);
        // bob approves.
        let b2 = outbound(b.state, Kind::Subscribed);
        assert!(b2.route && b2.send_presence);
        assert_eq!(b2.state, sub(false, true, false, false));
        let a2 = inbound(a.state, Kind::Subscribed);
        assert!(a2.deliver);
        assert_eq!(a2.state, sub(true, false, false, false));
        // A second subscribe from alice to bob, already subscribed, is auto-answered.
        let b3 = inbound(b2.state, Kind::Subscribe);
        assert!(b3.auto_subscribed && !b3.deliver);
    }

    #[test]
    fn cancellations() {
        let both = sub(true, true, false, false);
        let o = outbound(both, Kind::Unsubscribe);
        assert_eq!(o.state, sub(false, true, false, false));
        let o = outbound(both, Kind::Unsubscribed);
        assert!(o.route && o.send_unavailable);
        assert_eq!(o.state, sub(true, false, false, false));
        let i = inbound(both, Kind::Unsubscribed);
        assert!(i.deliver);
        assert_eq!(i.state, sub(false, true, false, false));
        // Nothing to cancel: nothing delivered.
        assert!(!inbound(Sub::default(), Kind::Unsubscribe).deliver);
        assert!(!inbound(Sub::default(), Kind::Subscribed).deliver);
        assert!(!outbound(Sub::default(), Kind::Unsubscribed).route);
        // Denying a pending request.
        let o = outbound(sub(false, false, false, true), Kind::Unsubscribed);
        assert!(o.route && !o.send_unavailable);
        assert_eq!(o.state, Sub::default());
    }

    #[test]
    fn pre_approval() {
        let o = outbound(Sub::default(), Kind::Subscribed);
        assert!(!o.route && o.state.approved);
        let i = inbound(o.state, Kind::Subscribe);
        assert!(i.auto_subscribed && i.send_presence && !i.deliver);
        assert_eq!(i.state, sub(false, true, false, false));
    }
}
