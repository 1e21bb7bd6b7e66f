//! Presence subscriptions (RFC 6121 section 3 and the state tables of Appendix A):
//! subscribe / subscribed / unsubscribe / unsubscribed, outbound (from the user) and
//! inbound (from a contact), pre-approval (3.4), roster pushes on every change, and
//! pending inbound requests kept until answered.

use jid::Jid;
use tracing::{debug, info, warn};

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::roster::{Item, Sub};
use crate::stanzas;
use crate::user::User;
use crate::users::Inbound;
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

impl User {
    /// A subscription stanza from the user's client (directed to the contact).
    pub async fn subscription_from_client(
        &mut self,
        idx: usize,
        stanza: &Stanza,
        el: Element,
        to: Option<Jid>,
        kind: Kind,
    ) {
        let Some(to) = to else {
            if let Some(r) = stanza.error_reply(
                StanzaErrorCondition::BadRequest,
                "a subscription request needs 'to'",
            ) {
                self.deliver(idx, &r);
            }
            return;
        };
        let contact = to.to_bare().to_string();
        if contact == self.bare {
            debug!("subscription stanza to the user's own JID ignored");
            return;
        }
        let max = self.ctx.config.roster_max;
        let roster = match self.roster().await {
            Ok(r) => r,
            Err(e) => {
                if let Some(r) = stanzas::storage_error(&e).into_bytes(stanza) {
                    self.deliver(idx, &r);
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
                self.deliver(idx, &r);
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
            self.bump();
            if let Err(e) = self.save_roster().await {
                if let Some(r) = stanzas::storage_error(&e).into_bytes(stanza) {
                    self.deliver(idx, &r);
                }
                return;
            }
            info!(contact = %contact, kind = kind.name(), subscription = out.state.name(),
                  ask = out.state.ask, "outbound subscription");
            let visible_before = before.as_ref().is_some_and(|i| !i.hidden);
            let visible_now = self
                .roster
                .as_ref()
                .and_then(|r| r.get(&contact))
                .is_some_and(|i| !i.hidden);
            if visible_before || visible_now {
                self.push(&contact);
            }
        }
        if out.route {
            // 3.1.2: stamped with the user's bare JID, addressed to the contact's.
            let mut p = el;
            p.set_attr("from", self.bare.clone());
            p.set_attr("to", contact.clone());
            p.remove_attr("id");
            if let Some(id) = stanza.attr("id") {
                p.set_attr("id", id);
            }
            self.ctx.send(p.to_stanza());
        }
        if out.send_presence {
            self.send_presence_to(&contact);
        }
        if out.send_unavailable {
            self.send_unavailable_to(&contact);
        }
    }

    /// A subscription stanza from a contact.
    pub async fn subscription_inbound(&mut self, inb: Inbound, el: Element, kind: Kind) {
        let Some(from) = inb.from.as_ref() else {
            debug!("subscription stanza without 'from' ignored");
            return;
        };
        let contact = from.to_bare().to_string();
        if contact == self.bare {
            return;
        }
        match self.exists().await {
            Ok(true) => {}
            Ok(false) => {
                // 3.1.3: no such user: the request is refused.
                if kind == Kind::Subscribe {
                    let p = stanzas::presence(Some("unsubscribed"), &self.bare, &contact);
                    self.ctx.send(p.to_stanza());
                }
                return;
            }
            Err(e) => {
                warn!("subscription from {contact} not processed: {e}");
                return;
            }
        }
        let max = self.ctx.config.roster_max;
        let bare = self.bare.clone();
        let roster = match self.roster().await {
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
            self.bump();
            if let Err(e) = self.save_roster().await {
                warn!("subscription from {contact} not stored: {e}");
                return;
            }
            info!(contact = %contact, kind = kind.name(), subscription = out.state.name(),
                  pending_in = out.state.pending_in, "inbound subscription");
            let visible = |i: Option<&Item>| i.is_some_and(|i| !i.hidden);
            if visible(before.as_ref())
                || visible(self.roster.as_ref().and_then(|r| r.get(&contact)))
            {
                self.push(&contact);
            }
        }
        if out.auto_subscribed {
            let p = stanzas::presence(Some("subscribed"), &self.bare, &contact);
            self.ctx.send(p.to_stanza());
        }
        if out.send_presence {
            self.send_presence_to(&contact);
        }
        if out.deliver {
            let bytes = shown.to_stanza();
            // RFC 6121 3.1.3, 3.1.6, 3.2.3, 3.3.3: to the available resources (the
            // roster change itself is pushed to the interested ones above).
            for idx in self.available() {
                self.deliver(idx, bytes.as_bytes());
            }
        }
    }

    /// Delivers the stored, unanswered subscription requests to session `idx` (at its
    /// initial presence, RFC 6121 3.1.3).
    pub fn deliver_pending_requests(&self, idx: usize) {
        let Some(r) = &self.roster else { return };
        for item in r.items.values().filter(|i| i.sub.pending_in) {
            let mut p = item
                .request
                .clone()
                .unwrap_or_else(|| stanzas::presence(Some("subscribe"), &item.jid, ""));
            p.set_attr("from", item.jid.clone());
            p.set_attr("to", self.bare.clone());
            self.deliver(idx, p.to_stanza().as_bytes());
        }
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
