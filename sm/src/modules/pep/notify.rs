//! Who gets a PEP event, and the event itself (XEP-0163 4.3): the owner's sessions and
//! the contacts' resources whose capabilities say `NODE+notify` and whom the node's
//! access model lets read it.
//!
//! The resources of contacts are known from their presence (for contacts whose presence
//! the user receives). A contact subscribed to the user without the user subscribed back
//! sends the user no presence; it gets events at its bare JID, and its own server picks
//! the resources (sm does, by their capabilities: `inbound_event`).

use std::collections::HashSet;

use jid::{FullJid, Jid};
use tracing::debug;

use jrs_stream::xml::escape;

use crate::host::{SessionKey, User};
use crate::modules::caps::{self, Caps, Features, Lookup};
use crate::modules::pep::node::{Access, Config};
use crate::modules::roster::{self, Roster};

pub const NS_EVENT: &str = "http://jabber.org/protocol/pubsub#event";

/// What the woken PEP module is called for when capabilities arrive.
pub const MODULE: &str = "pep";

/// A contact's resource known to be available, from its presence.
#[derive(Debug)]
pub struct Resource {
    pub jid: FullJid,
    pub caps: Option<Caps>,
    /// Its capabilities are being asked: the last items are due when they are known.
    pub awaiting: bool,
}

/// The contacts' available resources (user state).
#[derive(Debug, Default)]
pub struct Contacts(pub Vec<Resource>);

/// The capabilities of one of the user's sessions (session state).
#[derive(Debug, Default)]
pub struct SessionCaps {
    pub caps: Option<Caps>,
    pub awaiting: bool,
}

/// Why a contact may not read a node: the XEP-0060 6.5 error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    PresenceSubscriptionRequired,
    NotInRosterGroup,
    ClosedNode,
}

/// Whether `contact` (a bare JID, not the owner) may read a node of `config`.
pub fn may_read(roster: Option<&Roster>, config: &Config, contact: &str) -> Result<(), Refused> {
    let item = roster.and_then(|r| r.get(contact));
    match config.access {
        Access::Open => Ok(()),
        Access::Presence if item.is_some_and(|i| i.sub.from) => Ok(()),
        Access::Presence => Err(Refused::PresenceSubscriptionRequired),
        Access::Roster
            if item.is_some_and(|i| {
                !i.hidden && i.groups.iter().any(|g| config.groups.contains(g))
            }) =>
        {
            Ok(())
        }
        Access::Roster => Err(Refused::NotInRosterGroup),
        Access::Whitelist => Err(Refused::ClosedNode),
    }
}

/// `<message type='headline'>` with a pubsub event; `inner` goes inside `<event/>`,
/// `delay` (a publication time, microseconds) marks a last item sent again.
pub fn message(u: &mut User, to: &str, inner: &str, delay: Option<u64>) -> String {
    let id = u.next_id();
    let delay = delay
        .map(|t| {
            format!(
                "<delay xmlns='urn:xmpp:delay' stamp='{}' from='{}'/>",
                crate::clock::stamp_micros(t),
                escape(&u.bare)
            )
        })
        .unwrap_or_default();
    format!(
        "<message type='headline' from='{}' to='{}' id='{id}'><event xmlns='{NS_EVENT}'>{inner}</event>{delay}</message>",
        escape(&u.bare),
        escape(to)
    )
}

/// The features of the user's session `key`, if known (starting a lookup otherwise).
pub fn session_features(u: &User, key: SessionKey) -> Lookup {
    let Some(s) = u.session(key) else {
        return Lookup::Failed;
    };
    match s.state.get::<SessionCaps>().and_then(|c| c.caps.as_ref()) {
        Some(c) => caps::lookup(u, c, &Jid::from(s.jid.clone()), MODULE),
        None => Lookup::Failed,
    }
}

/// Sends the event `inner` about `node` to everyone who gets it.
pub async fn broadcast(u: &mut User, node: &str, config: &Config, inner: &str) {
    // The owner's sessions.
    let keys: Vec<SessionKey> = u.available();
    for key in keys {
        if let Lookup::Known(f) = session_features(u, key) {
            if f.notifies(node) {
                let full = u.session(key).map(|s| s.full.clone()).unwrap_or_default();
                let m = message(u, &full, inner, None);
                u.deliver(key, m);
            }
        }
    }
    if config.access == Access::Whitelist {
        return;
    }
    let roster = match roster::load(u).await {
        Ok(r) => r,
        Err(e) => {
            debug!("PEP event not sent to contacts, the roster is unavailable: {e}");
            return;
        }
    };
    // Contacts that may read it and are subscribed to the user's presence (the implied
    // subscription of XEP-0163); those the user gets no presence from, at their bare JID.
    let mut bare = vec![];
    let mut readers = HashSet::new();
    for item in roster.subscribers() {
        if may_read(Some(roster), config, &item.jid).is_ok() {
            if item.sub.to {
                readers.insert(item.jid.clone());
            } else {
                bare.push(item.jid.clone());
            }
        }
    }
    let mut full = vec![];
    if let Some(contacts) = u.state.get::<Contacts>() {
        for r in &contacts.0 {
            if let Some(c) = &r.caps {
                if readers.contains(r.jid.to_bare().as_str()) {
                    full.push((r.jid.clone(), c.clone()));
                }
            }
        }
    }
    for (jid, c) in full {
        let jid = Jid::from(jid);
        if let Lookup::Known(f) = caps::lookup(u, &c, &jid, MODULE) {
            if f.notifies(node) {
                let m = message(u, jid.as_str(), inner, None);
                u.route(&jid, m);
            }
        }
    }
    for contact in bare {
        if let Ok(jid) = Jid::new(&contact) {
            let m = message(u, &contact, inner, None);
            u.route(&jid, m);
        }
    }
}

/// Whether `f` (None: unknown, the receiving server decides) wants `node`.
pub fn wants(f: Option<&Features>, node: &str) -> bool {
    f.is_none_or(|f| f.notifies(node))
}
