//! Rosters (RFC 6121 section 2): get, set, remove, pushes to interested resources,
//! versioning (2.6), a size limit, and the stored form. Other modules reach the roster
//! through [`load`], [`save`] and [`push`]; its state lives on the user while the
//! user's task runs.
//!
//! Stored in xdb under `jabber:iq:roster`, one fragment per user:
//!
//! ```xml
//! <query xmlns='jabber:iq:roster' ver='7'>
//!   <item jid='bob@example.com' name='Bob' subscription='both'><group>Friends</group></item>
//!   <item jid='carol@example.com' subscription='none' ask='subscribe' approved='true'/>
//!   <item jid='dave@example.com' subscription='none' pending-in='true' hidden='true'>
//!     <presence xmlns='jabber:client' type='subscribe' from='dave@example.com'>...</presence>
//!   </item>
//! </query>
//! ```
//! `pending-in` marks an inbound subscription request not yet answered (the request kept
//! inside, to deliver again at the next initial presence); `hidden` marks entries that
//! exist only for such a request and are not part of the roster the client sees.

use std::collections::BTreeMap;

use std::sync::Arc;

use tracing::{info, warn};

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::XdbError;

use crate::config::{count, SmConfig};
use crate::host::{
    storage_error, Declaration, Hook, Iq, IqKind, Module, Reply, Scope, Session, SessionKey,
    SessionState, User,
};
use crate::stanzas;
use crate::xml::{Element, XmlError, NS_CLIENT};

pub const NS_ROSTER: &str = "jabber:iq:roster";
/// Longest name or group accepted (RFC 6121 2.1.2.2 leaves it to the server).
const MAX_TEXT: usize = 1023;
/// Groups per item.
const MAX_GROUPS: usize = 64;

/// Subscription state of one contact (RFC 6121 Appendix A, plus pre-approval).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sub {
    /// The user receives the contact's presence.
    pub to: bool,
    /// The contact receives the user's presence.
    pub from: bool,
    /// Pending out: the user asked to subscribe.
    pub ask: bool,
    /// Pending in: the contact asked to subscribe.
    pub pending_in: bool,
    /// The user pre-approved a subscription from the contact (3.4).
    pub approved: bool,
}

impl Sub {
    pub fn name(&self) -> &'static str {
        match (self.to, self.from) {
            (true, true) => "both",
            (true, false) => "to",
            (false, true) => "from",
            (false, false) => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Normalised bare JID.
    pub jid: String,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub sub: Sub,
    /// Not in the user's roster: kept only for a pending inbound request.
    pub hidden: bool,
    /// The pending inbound subscription request, to deliver again.
    pub request: Option<Element>,
}

impl Item {
    pub fn new(jid: &str) -> Item {
        Item {
            jid: jid.to_owned(),
            name: None,
            groups: vec![],
            sub: Sub::default(),
            hidden: false,
            request: None,
        }
    }

    /// The item as clients see it.
    pub fn to_element(&self) -> Element {
        let mut e = Element::new("item", NS_ROSTER)
            .with_attr("jid", self.jid.clone())
            .with_attr("subscription", self.sub.name());
        if let Some(n) = &self.name {
            e.set_attr("name", n.clone());
        }
        if self.sub.ask {
            e.set_attr("ask", "subscribe");
        }
        if self.sub.approved {
            e.set_attr("approved", "true");
        }
        for g in &self.groups {
            e.push(Element::new("group", NS_ROSTER).with_text(g.clone()));
        }
        e
    }

    fn to_storage(&self) -> Element {
        let mut e = self.to_element();
        if self.sub.pending_in {
            e.set_attr("pending-in", "true");
        }
        if self.hidden {
            e.set_attr("hidden", "true");
        }
        if let Some(r) = &self.request {
            e.push(r.clone());
        }
        e
    }

    fn from_storage(e: &Element) -> Option<Item> {
        let jid = e.attr("jid")?.to_owned();
        let flag = |k: &str| e.attr(k) == Some("true");
        let subscription = e.attr("subscription").unwrap_or("none");
        Some(Item {
            jid,
            name: e.attr("name").map(str::to_owned),
            groups: e
                .elements()
                .filter(|g| g.is("group", NS_ROSTER))
                .map(Element::text)
                .collect(),
            sub: Sub {
                to: matches!(subscription, "to" | "both"),
                from: matches!(subscription, "from" | "both"),
                ask: e.attr("ask") == Some("subscribe"),
                pending_in: flag("pending-in"),
                approved: flag("approved"),
            },
            hidden: flag("hidden"),
            request: e.elements().find(|r| r.is("presence", NS_CLIENT)).cloned(),
        })
    }

    /// Nothing left worth keeping for a hidden entry.
    pub fn is_void(&self) -> bool {
        self.hidden
            && !self.sub.pending_in
            && !self.sub.to
            && !self.sub.from
            && !self.sub.ask
            && !self.sub.approved
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roster {
    /// Version (RFC 6121 2.6): a counter bumped by every change.
    pub ver: u64,
    pub items: BTreeMap<String, Item>,
}

impl Roster {
    pub fn parse(fragment: &[u8]) -> Result<Roster, XmlError> {
        if fragment.iter().all(u8::is_ascii_whitespace) {
            return Ok(Roster::default());
        }
        let q = Element::parse(fragment, "")?;
        if !q.is("query", NS_ROSTER) {
            return Err(XmlError(
                "the stored roster is not a jabber:iq:roster query".into(),
            ));
        }
        let mut r = Roster {
            ver: q.attr("ver").and_then(|v| v.parse().ok()).unwrap_or(0),
            items: BTreeMap::new(),
        };
        for e in q.elements().filter(|e| e.is("item", NS_ROSTER)) {
            if let Some(item) = Item::from_storage(e) {
                r.items.insert(item.jid.clone(), item);
            }
        }
        Ok(r)
    }

    pub fn to_storage(&self) -> String {
        let mut q = Element::new("query", NS_ROSTER).with_attr("ver", self.ver.to_string());
        for item in self.items.values() {
            q.push(item.to_storage());
        }
        q.to_xml()
    }

    pub fn get(&self, bare: &str) -> Option<&Item> {
        self.items.get(bare)
    }

    /// The state towards `bare` (default when not in the roster).
    pub fn sub(&self, bare: &str) -> Sub {
        self.items.get(bare).map(|i| i.sub).unwrap_or_default()
    }

    /// Contacts that receive the user's presence.
    pub fn subscribers(&self) -> impl Iterator<Item = &Item> {
        self.items.values().filter(|i| i.sub.from)
    }

    /// Contacts whose presence the user receives.
    pub fn subscriptions(&self) -> impl Iterator<Item = &Item> {
        self.items.values().filter(|i| i.sub.to)
    }

    /// The roster as a result query (hidden entries left out).
    pub fn query(&self) -> Element {
        let mut q = Element::new("query", NS_ROSTER).with_attr("ver", self.ver.to_string());
        for item in self.items.values().filter(|i| !i.hidden) {
            q.push(item.to_element());
        }
        q
    }
}

/// The roster module and its settings (`<roster max-items=..>`).
pub struct RosterModule {
    max_items: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    Ok(Arc::new(RosterModule {
        max_items: max_items(config)?,
    }))
}

/// Roster entries per user (`<roster max-items>`, contacts plus pending inbound
/// requests), for every module that adds entries.
pub fn max_items(config: &SmConfig) -> jrs_config::Result<usize> {
    let mut max = 1000;
    if let Some(n) = config.module_settings("roster")? {
        n.allow(&["max-items"], &[])?;
        max = count(n, "max-items", max)?;
    }
    Ok(max)
}

/// A session that asked for the roster: it gets roster pushes (RFC 6121 2.1.6).
#[derive(Debug, Default)]
pub struct Interested;

pub fn is_interested(s: &Session) -> bool {
    s.state.get::<Interested>().is_some()
}

/// The roster, loaded from storage on first use.
pub async fn load(u: &mut User) -> Result<&mut Roster, XdbError> {
    if u.state.get::<Roster>().is_none() {
        let fragment = u.ctx.store.get(&u.bare, NS_ROSTER).await?;
        let roster = Roster::parse(&fragment).map_err(|e| {
            warn!("stored roster unreadable: {e}");
            XdbError::Refused(jrs_xdb::Refusal::new(
                StanzaErrorCondition::InternalServerError,
                format!("stored roster unreadable: {e}"),
            ))
        })?;
        u.state.insert(roster);
    }
    Ok(u.state.get_mut::<Roster>().expect("loaded above"))
}

/// The roster if it is loaded.
pub fn cached(u: &User) -> Option<&Roster> {
    u.state.get::<Roster>()
}

/// Forgets the cached roster (the next use reads storage).
pub fn forget(u: &mut User) {
    u.state.remove::<Roster>();
}

/// Writes the roster (after a change). On failure the cached copy is dropped, so the
/// next use reads what storage really holds.
pub async fn save(u: &mut User) -> Result<(), XdbError> {
    let Some(r) = u.state.get::<Roster>() else {
        return Ok(());
    };
    let data = r.to_storage();
    let max = u.ctx.config.fragment_max();
    if data.len() > max {
        warn!(
            bytes = data.len(),
            max, "roster change refused: too large to store"
        );
        forget(u);
        return Err(stanzas::too_large("the roster", max));
    }
    match u.ctx.store.set(&u.bare, NS_ROSTER, data).await {
        Ok(()) => Ok(()),
        Err(e) => {
            warn!("saving the roster failed: {e}");
            forget(u);
            Err(e)
        }
    }
}

/// Marks a change: bumps the version. Call before saving and pushing.
pub fn bump(u: &mut User) {
    if let Some(r) = u.state.get_mut::<Roster>() {
        r.ver += 1;
    }
}

/// Pushes the (visible) state of `bare` to every interested session; an absent or
/// hidden entry is pushed as `subscription='remove'`.
pub fn push(u: &mut User, bare: &str) {
    let Some(r) = u.state.get::<Roster>() else {
        return;
    };
    let item = match r.get(bare) {
        Some(i) if !i.hidden => i.to_element(),
        _ => Element::new("item", NS_ROSTER)
            .with_attr("jid", bare)
            .with_attr("subscription", "remove"),
    };
    let ver = r.ver.to_string();
    let targets: Vec<(u32, String)> = u
        .sessions
        .iter()
        .filter(|s| is_interested(s))
        .map(|s| (s.key, s.full.clone()))
        .collect();
    for (key, full) in targets {
        let id = u.next_id();
        let iq = Element::new("iq", NS_CLIENT)
            .with_attr("type", "set")
            .with_attr("id", id)
            .with_attr("to", full)
            .with_child(
                Element::new("query", NS_ROSTER)
                    .with_attr("ver", ver.clone())
                    .with_child(item.clone()),
            );
        u.deliver(key, iq.to_stanza());
    }
}

#[async_trait::async_trait]
impl Module for RosterModule {
    fn name(&self) -> &'static str {
        "roster"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(IqKind::Get, &[Scope::Own], NS_ROSTER, "query")
            .iq(IqKind::Set, &[Scope::Own], NS_ROSTER, "query")
            .hook(Hook::SessionRestored, 0)
    }

    fn session_state(&self, s: &Session, state: &mut SessionState) {
        state.roster = is_interested(s);
    }

    async fn session_restored(&self, u: &mut User, key: SessionKey, state: &SessionState) {
        if let Some(s) = u.session_mut(key).filter(|_| state.roster) {
            s.state.insert(Interested);
        }
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        let Some(key) = iq.session else {
            return Reply::not_handled();
        };
        let query: xmpp_parsers::roster::Roster = match iq.parse() {
            Ok(q) => q,
            Err(r) => return r,
        };
        if iq.is_get() {
            if let Some(s) = u.session_mut(key) {
                s.state.insert(Interested);
            }
            let roster = match load(u).await {
                Ok(r) => r,
                Err(e) => return storage_error(&e),
            };
            if query.ver.as_deref() == Some(roster.ver.to_string().as_str()) {
                // 2.6.3: the client's copy is current; changes come as pushes.
                return Reply::empty();
            }
            return Reply::with(roster.query());
        }
        self.set(u, query).await
    }
}

impl RosterModule {
    /// RFC 6121 2.3, 2.5: add, update or remove one item.
    async fn set(&self, u: &mut User, query: xmpp_parsers::roster::Roster) -> Reply {
        let [item] = query.items.as_slice() else {
            return Reply::error(
                StanzaErrorCondition::BadRequest,
                "a roster set carries exactly one <item/>",
            );
        };
        let contact = item.jid.to_string();
        if item.subscription == xmpp_parsers::roster::Subscription::Remove {
            return remove(u, &contact).await;
        }
        if contact == u.bare {
            return Reply::error(
                StanzaErrorCondition::NotAllowed,
                "the roster cannot hold the user's own JID",
            );
        }
        let name = item.name.clone().filter(|n| !n.is_empty());
        if name.as_ref().is_some_and(|n| n.len() > MAX_TEXT) {
            return Reply::error(
                StanzaErrorCondition::NotAcceptable,
                format!("names are limited to {MAX_TEXT} bytes"),
            );
        }
        let mut groups: Vec<String> = vec![];
        for g in &item.groups {
            let g = g.0.clone();
            if g.is_empty() {
                return Reply::error(StanzaErrorCondition::NotAcceptable, "empty group name");
            }
            if g.len() > MAX_TEXT {
                return Reply::error(
                    StanzaErrorCondition::NotAcceptable,
                    format!("group names are limited to {MAX_TEXT} bytes"),
                );
            }
            if groups.contains(&g) {
                return Reply::error(
                    StanzaErrorCondition::BadRequest,
                    format!("group '{g}' given twice"),
                );
            }
            groups.push(g);
        }
        if groups.len() > MAX_GROUPS {
            return Reply::error(
                StanzaErrorCondition::NotAcceptable,
                format!("at most {MAX_GROUPS} groups per item"),
            );
        }
        let max = self.max_items;
        let roster = match load(u).await {
            Ok(r) => r,
            Err(e) => return storage_error(&e),
        };
        if !roster.items.contains_key(&contact) && roster.items.len() >= max {
            return Reply::error(
                StanzaErrorCondition::NotAllowed,
                format!("the roster is full: at most {max} items"),
            );
        }
        let entry = roster
            .items
            .entry(contact.clone())
            .or_insert_with(|| Item::new(&contact));
        entry.name = name;
        entry.groups = groups;
        entry.hidden = false;
        bump(u);
        if let Err(e) = save(u).await {
            return storage_error(&e);
        }
        info!(contact = %contact, "roster item set");
        push(u, &contact);
        Reply::empty()
    }
}

/// RFC 6121 2.5: removes the item and cancels the subscriptions both ways.
async fn remove(u: &mut User, contact: &str) -> Reply {
    let roster = match load(u).await {
        Ok(r) => r,
        Err(e) => return storage_error(&e),
    };
    let Some(item) = roster.items.get(contact).filter(|i| !i.hidden).cloned() else {
        return Reply::error(StanzaErrorCondition::ItemNotFound, "no such roster item");
    };
    roster.items.remove(contact);
    bump(u);
    if let Err(e) = save(u).await {
        return storage_error(&e);
    }
    info!(contact = %contact, "roster item removed");
    let s = item.sub;
    let Ok(to) = jid::Jid::new(contact) else {
        return Reply::empty();
    };
    if s.to || s.ask {
        let p = stanzas::presence(Some("unsubscribe"), &u.bare, contact);
        u.route(&to, p.to_stanza());
    }
    if s.from || s.pending_in {
        let p = stanzas::presence(Some("unsubscribed"), &u.bare, contact);
        u.route(&to, p.to_stanza());
    }
    if s.from {
        u.send_unavailable_to(&to);
    }
    push(u, contact);
    Reply::empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_round_trip() {
        let mut r = Roster {
            ver: 7,
            ..Roster::default()
        };
        let mut bob = Item::new("bob@example.com");
        bob.name = Some("Bob & co".into());
        bob.groups = vec!["Friends".into(), "Work".into()];
        bob.sub = Sub {
            to: true,
            from: true,
            ..Sub::default()
        };
        r.items.insert(bob.jid.clone(), bob);
        let mut dave = Item::new("dave@example.com");
        dave.hidden = true;
        dave.sub.pending_in = true;
        dave.request = Some(
            Element::new("presence", NS_CLIENT)
                .with_attr("type", "subscribe")
                .with_child(Element::new("status", NS_CLIENT).with_text("hi")),
        );
        r.items.insert(dave.jid.clone(), dave);
        let stored = r.to_storage();
        assert!(
            stored.contains("<presence xmlns='jabber:client' type='subscribe'>"),
            "{stored}"
        );
        let back = Roster::parse(stored.as_bytes()).unwrap();
        assert_eq!(back, r);
        let q = back.query().to_xml();
        assert!(q.contains("bob@example.com") && !q.contains("dave@"), "{q}");
        assert!(q.contains("subscription='both'"));
        assert_eq!(Roster::parse(b"").unwrap(), Roster::default());
    }
}
