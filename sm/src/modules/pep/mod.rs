//! Personal Eventing Protocol (XEP-0163): a XEP-0060 publish-subscribe service on every
//! account, where clients keep OMEMO keys, avatars, bookmarks and the like.
//!
//! - `node`: a node's configuration, its form and the publish-options preconditions
//!   (XEP-0223);
//! - `store`: the user's nodes and items in storage;
//! - `notify`: who gets an event (capabilities `+notify`, access model) and the event.
//!
//! Here: the IQs (publish, items, retract, create, and the owner's configure, delete,
//! purge), and the hooks that send last items: a contact's resource that becomes
//! available (its presence), the owner's own session (its initial presence), a new
//! subscriber, and events to the user's bare JID given to the sessions that want them.
//! Modules that convert the user's data (bookmarks, avatars) publish and retract through
//! [`publish_item`] and [`retract_item`]; every change runs [`Hook::Stored`].

pub mod node;
pub mod notify;
pub mod store;

use std::sync::Arc;

use jid::{FullJid, Jid};
use tracing::{debug, info};

use jrs_stream::xml::escape;
use jrs_stream::StanzaErrorCondition as Condition;

use crate::config::{count, SmConfig};
use crate::host::registry::Wake;
use crate::host::shared::Shared;
use crate::host::{
    hooks, storage_error, Change, Declaration, Disco, Flow, Hook, Identity, Iq, IqKind, Module,
    Packet, Reply, Scope, SessionKey, SessionState, Stanzas, Stored, User,
};
use crate::modules::caps::{self, Caps, Lookup, Resolved};
use crate::modules::pep::node::{Config, SendLast, Submitted};
use crate::modules::pep::notify::{Contacts, Refused, Resource, SessionCaps, MODULE};
use crate::modules::pep::store::Item;
use crate::modules::roster;

pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
pub const NS_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
pub const NS_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";

/// What PEP offers (XEP-0060 10), listed on every account.
const FEATURES: &[&str] = &[
    "http://jabber.org/protocol/pubsub#access-open",
    "http://jabber.org/protocol/pubsub#access-presence",
    "http://jabber.org/protocol/pubsub#access-roster",
    "http://jabber.org/protocol/pubsub#access-whitelist",
    "http://jabber.org/protocol/pubsub#auto-create",
    "http://jabber.org/protocol/pubsub#auto-subscribe",
    "http://jabber.org/protocol/pubsub#config-node",
    "http://jabber.org/protocol/pubsub#config-node-max",
    "http://jabber.org/protocol/pubsub#create-and-configure",
    "http://jabber.org/protocol/pubsub#create-nodes",
    "http://jabber.org/protocol/pubsub#delete-items",
    "http://jabber.org/protocol/pubsub#delete-nodes",
    "http://jabber.org/protocol/pubsub#filtered-notifications",
    "http://jabber.org/protocol/pubsub#item-ids",
    "http://jabber.org/protocol/pubsub#last-published",
    "http://jabber.org/protocol/pubsub#persistent-items",
    "http://jabber.org/protocol/pubsub#presence-notifications",
    "http://jabber.org/protocol/pubsub#publish",
    "http://jabber.org/protocol/pubsub#publish-options",
    "http://jabber.org/protocol/pubsub#purge-nodes",
    "http://jabber.org/protocol/pubsub#retract-items",
    "http://jabber.org/protocol/pubsub#retrieve-items",
];

/// Contacts' resources tracked per user (their presence and capabilities).
const MAX_RESOURCES: usize = 4096;

const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";

/// Longest node name accepted.
const MAX_NODE_NAME: usize = 1024;

#[derive(Clone)]
pub struct Pep {
    /// Nodes per user.
    max_nodes: usize,
    /// Items per node (`pubsub#max_items` = `max`).
    max_items: usize,
    /// Bytes of one item's payload.
    max_item_bytes: usize,
    /// Bytes of all of a user's items.
    max_bytes: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut m = Pep {
        max_nodes: 128,
        max_items: 256,
        max_item_bytes: 128 * 1024,
        max_bytes: 4 * 1024 * 1024,
    };
    if let Some(n) = config.module_settings("pep")? {
        n.allow(
            &["max-nodes", "max-items", "max-item-bytes", "max-bytes"],
            &[],
        )?;
        m.max_nodes = count(n, "max-nodes", m.max_nodes)?;
        m.max_items = count(n, "max-items", m.max_items)?.max(1);
        m.max_item_bytes = count(n, "max-item-bytes", m.max_item_bytes)?;
        m.max_bytes = count(n, "max-bytes", m.max_bytes)?;
    }
    // A node's items are one storage fragment.
    m.max_item_bytes = m.max_item_bytes.min(config.fragment_max());
    Ok(Arc::new(m))
}

/// An error with a XEP-0060 application condition (`<name xmlns=#errors/>`).
fn refuse(condition: Condition, app: &str, text: impl Into<String>) -> Reply {
    Reply::Error {
        condition,
        text: text.into(),
        extra: (!app.is_empty()).then(|| format!("<{app} xmlns='{NS_ERRORS}'/>")),
    }
}

fn refused(r: Refused) -> Reply {
    match r {
        Refused::PresenceSubscriptionRequired => refuse(
            Condition::NotAuthorized,
            "presence-subscription-required",
            "only contacts subscribed to the owner's presence may read this node",
        ),
        Refused::NotInRosterGroup => refuse(
            Condition::NotAuthorized,
            "not-in-roster-group",
            "only contacts in the owner's chosen roster groups may read this node",
        ),
        Refused::ClosedNode => refuse(
            Condition::NotAllowed,
            "closed-node",
            "only the owner may read this node",
        ),
    }
}

fn unsupported(feature: &str) -> Reply {
    Reply::Error {
        condition: Condition::FeatureNotImplemented,
        text: format!("'{feature}' is not offered on personal eventing nodes"),
        extra: Some(format!(
            "<unsupported xmlns='{NS_ERRORS}' feature='{feature}'/>"
        )),
    }
}

fn no_node(node: &str) -> Reply {
    Reply::error(Condition::ItemNotFound, format!("no node '{node}'"))
}

fn items_xml(node: &str, items: &[&Item]) -> String {
    let mut s = format!("<items node='{}'>", escape(node));
    for i in items {
        s.push_str(&format!(
            "<item id='{}'>{}</item>",
            escape(&i.id),
            i.payload
        ));
    }
    s.push_str("</items>");
    s
}

/// The `<x/>` form inside `el` (publish-options, configure), if any.
fn form_in(el: Option<&minidom::Element>) -> Result<Option<Submitted>, Reply> {
    let Some(x) = el.and_then(|e| e.get_child("x", "jabber:x:data")) else {
        return Ok(None);
    };
    node::submitted(x)
        .map(Some)
        .map_err(|e| refuse(Condition::BadRequest, "invalid-options", e))
}

#[async_trait::async_trait]
impl Module for Pep {
    fn name(&self) -> &'static str {
        "pep"
    }

    fn declare(&self) -> Declaration {
        let mut d = Declaration::default()
            .requires("roster")
            .requires("caps")
            .iq(
                IqKind::Get,
                &[Scope::Own, Scope::Contact],
                NS_PUBSUB,
                "pubsub",
            )
            .iq(
                IqKind::Set,
                &[Scope::Own, Scope::Contact],
                NS_PUBSUB,
                "pubsub",
            )
            .iq(
                IqKind::Get,
                &[Scope::Own, Scope::Contact],
                NS_OWNER,
                "pubsub",
            )
            .iq(
                IqKind::Set,
                &[Scope::Own, Scope::Contact],
                NS_OWNER,
                "pubsub",
            )
            .stanzas(Hook::Outbound, Stanzas::Presence, 250)
            .stanzas(Hook::Inbound, Stanzas::Presence, 250)
            .stanzas(Hook::Inbound, Stanzas::Message, 350)
            .hook(Hook::AccountRemoved, 0)
            .hook(Hook::SessionRestored, 0)
            .identity(
                Disco::Account,
                Identity {
                    category: "pubsub",
                    kind: "pep",
                    name: None,
                },
            );
        for f in FEATURES {
            d = d.feature(Disco::Account, f);
        }
        d
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        let owner = iq.scope == Scope::Own;
        let Some(op) = iq.payload.children().next() else {
            return Reply::error(Condition::BadRequest, "an empty pubsub request");
        };
        let node = op.attr("node").unwrap_or("").to_owned();
        if iq.payload.ns() == NS_OWNER {
            if !owner {
                return Reply::error(Condition::Forbidden, "only the owner may do this");
            }
            if node.is_empty() && op.name() != "default" {
                return refuse(Condition::BadRequest, "nodeid-required", "name the node");
            }
            return match (iq.kind, op.name()) {
                (IqKind::Get, "configure") => self.configuration(u, &node).await,
                (IqKind::Set, "configure") => self.configure(u, &node, op).await,
                (IqKind::Get, "default") => {
                    let form = Config::default().form(self.max_items);
                    Reply::Result(Some(format!(
                        "<pubsub xmlns='{NS_OWNER}'><default>{}</default></pubsub>",
                        String::from(&minidom::Element::from(form))
                    )))
                }
                (IqKind::Set, "delete") => self.delete(u, &node).await,
                (IqKind::Set, "purge") => self.purge(u, &node).await,
                (_, other) => unsupported(other),
            };
        }
        match (iq.kind, op.name()) {
            (IqKind::Get, "items") => {
                if node.is_empty() {
                    return refuse(Condition::BadRequest, "nodeid-required", "name the node");
                }
                let reader = match (owner, &iq.from) {
                    (true, _) => None,
                    (false, Some(f)) => Some(f.to_bare().to_string()),
                    (false, None) => {
                        return Reply::error(Condition::Forbidden, "a request without a sender")
                    }
                };
                self.items(u, &node, op, reader).await
            }
            (IqKind::Set, _) if !owner => Reply::error(
                Condition::Forbidden,
                "only the owner publishes to a personal eventing node",
            ),
            (IqKind::Set, "publish") => {
                let options = iq.payload.get_child("publish-options", NS_PUBSUB);
                let options = match form_in(options) {
                    Ok(o) => o,
                    Err(r) => return r,
                };
                self.publish(u, &node, op, options).await
            }
            (IqKind::Set, "create") => {
                let configure = iq.payload.get_child("configure", NS_PUBSUB);
                let form = match form_in(configure) {
                    Ok(f) => f,
                    Err(r) => return r,
                };
                self.create(u, &node, form).await
            }
            (IqKind::Set, "retract") => self.retract(u, &node, op).await,
            (_, other) => unsupported(other),
        }
    }

    /// The restored session's capabilities, from its presence (its client has the last
    /// items already: none are sent).
    async fn session_restored(&self, u: &mut User, key: SessionKey, state: &SessionState) {
        let Some(presence) = state.presence.clone() else {
            return;
        };
        let Ok(stanza) = jrs_stream::Stanza::parse(presence) else {
            return;
        };
        let caps = Caps::of_packet(&Packet::new(stanza, None, None));
        if let Some(s) = u.session_mut(key) {
            s.state.entry::<SessionCaps>().caps = caps;
        }
    }

    async fn outbound(&self, u: &mut User, from: SessionKey, p: &mut Packet) -> Flow {
        match (&p.to, p.kind()) {
            // Available presence of the session: its capabilities.
            (None, None) => {
                let caps = Caps::of_packet(p);
                let Some(s) = u.session_mut(from) else {
                    return Flow::Pass;
                };
                let initial = !s.available;
                let state = s.state.entry::<SessionCaps>();
                let changed = state.caps != caps;
                state.caps = caps;
                if initial || changed {
                    own_last_items(u, from).await;
                }
            }
            // A new subscriber (RFC 6121 3.1.4: the user approves a pending request; a
            // pre-approval is not one yet): the last items, at its bare JID.
            (Some(to), Some("subscribed")) => {
                let to = to.to_bare();
                let requested = match roster::load(u).await {
                    Ok(r) => r.sub(&to.to_string()).pending_in,
                    Err(_) => false,
                };
                if requested {
                    self.last_items_to(u, &Jid::from(to), None, SendLast::OnSub, true)
                        .await;
                }
            }
            _ => {}
        }
        Flow::Pass
    }

    async fn inbound(&self, u: &mut User, p: &mut Packet) -> Flow {
        if p.name() == "message" {
            return inbound_event(u, p);
        }
        let Some(from) = p.from.clone() else {
            return Flow::Pass;
        };
        if u.is_same_user(&from) {
            return Flow::Pass;
        }
        match (p.kind(), from.try_as_full()) {
            // A group chat occupant is not a contact.
            (None, Ok(_)) if p.has("x", NS_MUC_USER) => {}
            (None, Ok(full)) => {
                let caps = Caps::of_packet(p);
                let known = u
                    .state
                    .get::<Contacts>()
                    .is_some_and(|c| c.0.iter().any(|r| &r.jid == full));
                // Only contacts whose presence the user subscribed to, and a bounded
                // number of their resources: anyone can send directed presence.
                if !known {
                    if caps.is_none() {
                        return Flow::Pass;
                    }
                    let bare = full.to_bare().to_string();
                    let subscribed = match roster::load(u).await {
                        Ok(r) => r.sub(&bare).to,
                        Err(_) => false,
                    };
                    let room = u
                        .state
                        .get::<Contacts>()
                        .is_none_or(|c| c.0.len() < MAX_RESOURCES);
                    if !subscribed || !room {
                        return Flow::Pass;
                    }
                }
                let contacts = u.state.entry::<Contacts>();
                let known = contacts.0.iter_mut().find(|r| &r.jid == full);
                let new = match known {
                    Some(r) if r.caps == caps => false,
                    Some(r) => {
                        r.caps = caps.clone();
                        true
                    }
                    None => {
                        contacts.0.push(Resource {
                            jid: full.clone(),
                            caps: caps.clone(),
                            awaiting: false,
                        });
                        true
                    }
                };
                if new {
                    if let Some(c) = caps {
                        self.contact_resource(u, full.clone(), c).await;
                    }
                }
            }
            (Some("unavailable"), Ok(full)) => {
                if let Some(c) = u.state.get_mut::<Contacts>() {
                    c.0.retain(|r| &r.jid != full);
                }
            }
            // A contact subscribed to the user that the user does not get presence
            // from logs in: its probe is all the user hears, so the last items go to its
            // bare JID (its server picks the resources).
            (Some("probe"), _) => {
                let bare = from.to_bare().to_string();
                let one_way = match roster::load(u).await {
                    Ok(r) => {
                        let s = r.sub(&bare);
                        s.from && !s.to
                    }
                    Err(_) => false,
                };
                if one_way {
                    let to = Jid::from(from.to_bare());
                    self.last_items_to(u, &to, None, SendLast::OnSubAndPresence, false)
                        .await;
                }
            }
            _ => {}
        }
        Flow::Pass
    }

    async fn woken(&self, u: &mut User, data: Wake) {
        let Ok(resolved) = data.0.downcast::<Resolved>() else {
            return;
        };
        let ver = &resolved.ver;
        let waiting_sessions: Vec<SessionKey> = u
            .sessions
            .iter_mut()
            .filter_map(|s| {
                let c = s.state.get_mut::<SessionCaps>()?;
                let due = c.awaiting && c.caps.as_ref().is_some_and(|c| &c.ver == ver);
                if due {
                    c.awaiting = false;
                }
                due.then_some(s.key)
            })
            .collect();
        for key in waiting_sessions {
            own_last_items(u, key).await;
        }
        let waiting_contacts: Vec<(FullJid, Caps)> = match u.state.get_mut::<Contacts>() {
            Some(c) => {
                c.0.iter_mut()
                    .filter(|r| r.awaiting && r.caps.as_ref().is_some_and(|c| &c.ver == ver))
                    .map(|r| {
                        r.awaiting = false;
                        (r.jid.clone(), r.caps.clone().expect("checked"))
                    })
                    .collect()
            }
            None => vec![],
        };
        for (jid, c) in waiting_contacts {
            self.contact_resource(u, jid, c).await;
        }
    }

    async fn account_removed(&self, u: &mut User) {
        // Storage removed every fragment of the account.
        u.state.remove::<store::Pep>();
    }

    fn install(&self, shared: &mut Shared) {
        // The limits, for the modules that publish through `publish_item`.
        shared.insert(Arc::new(self.clone()));
    }
}

/// Publishes `payload` (one element, self-contained XML) as item `id` of the user's
/// node `node` for module `by` (a conversion: bookmarks, avatars), as a publish of the
/// user's own would be: `options` are its publish-options (the node is created with
/// them, or must meet them: XEP-0223), with the same limits, notifications and
/// [`Hook::Stored`]. `Err` is what the user's client would have been answered.
pub async fn publish_item(
    u: &mut User,
    by: &'static str,
    node: &str,
    id: &str,
    payload: &str,
    options: &[(&str, &str)],
) -> Result<(), Reply> {
    let pep = service(u)?;
    let options: Submitted = options
        .iter()
        .map(|(var, value)| (var.to_string(), vec![value.to_string()]))
        .collect();
    let options = (!options.is_empty()).then_some(options);
    pep.put(u, Some(by), node, id, payload.to_owned(), options.as_ref())
        .await
}

/// Retracts item `id` of the user's node `node` for module `by`, notifying as the node
/// is configured (`notify_retract`), and runs [`Hook::Stored`].
pub async fn retract_item(
    u: &mut User,
    by: &'static str,
    node: &str,
    id: &str,
) -> Result<(), Reply> {
    let pep = service(u)?;
    pep.withdraw(u, Some(by), node, &[id.to_owned()], None)
        .await
}

/// The loaded PEP module (its limits).
fn service(u: &User) -> Result<Arc<Pep>, Reply> {
    u.ctx.shared.get::<Pep>().ok_or_else(|| {
        Reply::error(
            Condition::ServiceUnavailable,
            "personal eventing is not loaded",
        )
    })
}

/// The owner's own last items to session `key`, once its capabilities are known.
async fn own_last_items(u: &mut User, key: SessionKey) {
    let f = match notify::session_features(u, key) {
        Lookup::Known(f) => f,
        Lookup::Pending => {
            if let Some(s) = u.session_mut(key) {
                s.state.entry::<SessionCaps>().awaiting = true;
            }
            return;
        }
        Lookup::Failed => return,
    };
    let Ok(pep) = store::load(u).await else {
        return;
    };
    // As for contacts: only nodes that send their last item on presence (XEP-0402's
    // bookmarks say `never`: clients fetch them).
    let wanted: Vec<usize> = (0..pep.nodes.len())
        .filter(|&i| {
            let n = &pep.nodes[i];
            f.notifies(&n.name) && n.config.send_last == SendLast::OnSubAndPresence
        })
        .collect();
    for at in wanted {
        let Some((node, item)) = last_item(u, at).await else {
            continue;
        };
        let Some(full) = u.session(key).map(|s| s.full.clone()) else {
            return;
        };
        let inner = items_xml(&node, &[&item]);
        let m = notify::message(u, &full, &inner, Some(item.stamp));
        u.deliver(key, m);
    }
}

/// The name and last item of node `at`, if it has one.
async fn last_item(u: &mut User, at: usize) -> Option<(String, Item)> {
    let items = store::items(u, at).await.ok()?;
    let item = items.last()?.clone();
    let pep = u.state.get::<store::Pep>()?;
    Some((pep.nodes[at].name.clone(), item))
}

/// Events to the user's bare JID (from contacts that get no presence from the user)
/// go to the available sessions whose capabilities want the node, or are not known yet.
fn inbound_event(u: &mut User, p: &Packet) -> Flow {
    let to_bare = p.to.as_ref().is_some_and(|t| t.resource().is_none());
    // From another account's PEP (a bare JID with a local part): a pubsub service's
    // notifications follow the subscriptions made with it.
    let from_account = p
        .from
        .as_ref()
        .is_some_and(|f| f.node().is_some() && f.resource().is_none());
    if p.kind() != Some("headline")
        || !to_bare
        || !from_account
        || !p.has("event", notify::NS_EVENT)
    {
        return Flow::Pass;
    }
    let Some(child) = p.child("event", notify::NS_EVENT) else {
        return Flow::Pass;
    };
    let event = crate::xml::Element::parse(p.child_bytes(child), "").ok();
    let node = event
        .as_ref()
        .and_then(|e| e.elements().next())
        .and_then(|e| e.attr("node"))
        .unwrap_or("")
        .to_owned();
    let bytes = p.for_client();
    for key in u.available() {
        let deliver = match notify::session_features(u, key) {
            Lookup::Known(f) => f.notifies(&node),
            Lookup::Pending => true,
            Lookup::Failed => false,
        };
        if deliver {
            u.deliver(key, bytes.clone());
        }
    }
    Flow::Handled
}

impl Pep {
    /// A contact's resource came online (or changed capabilities): the last items of
    /// the nodes it wants and may read.
    async fn contact_resource(&self, u: &mut User, full: FullJid, c: Caps) {
        let jid = Jid::from(full.clone());
        let f = match caps::lookup(u, &c, &jid, MODULE) {
            Lookup::Known(f) => f,
            Lookup::Pending => {
                if let Some(r) = u
                    .state
                    .get_mut::<Contacts>()
                    .and_then(|cs| cs.0.iter_mut().find(|r| r.jid == full))
                {
                    r.awaiting = true;
                }
                return;
            }
            Lookup::Failed => return,
        };
        self.last_items_to(u, &jid, Some(&f), SendLast::OnSubAndPresence, false)
            .await;
    }

    /// The last item of each node `to` may read and wants (`features`; None: every
    /// node), where the node sends it `when`. `subscribing`: `to` is becoming a
    /// subscriber (the roster does not say so yet).
    async fn last_items_to(
        &self,
        u: &mut User,
        to: &Jid,
        features: Option<&caps::Features>,
        when: SendLast,
        subscribing: bool,
    ) {
        let contact = to.to_bare().to_string();
        let Ok(pep) = store::load(u).await else {
            return;
        };
        if pep.nodes.is_empty() {
            return;
        }
        let candidates: Vec<(usize, Config)> = pep
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| notify::wants(features, &n.name))
            .filter(|(_, n)| match when {
                SendLast::OnSub => n.config.send_last != SendLast::Never,
                _ => n.config.send_last == SendLast::OnSubAndPresence,
            })
            .map(|(i, n)| (i, n.config.clone()))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let roster = match roster::load(u).await {
            Ok(r) => r,
            Err(_) => return,
        };
        let allowed: Vec<usize> = candidates
            .into_iter()
            .filter(|(_, config)| {
                let ok = notify::may_read(Some(roster), config, &contact);
                ok.is_ok() || (subscribing && ok == Err(Refused::PresenceSubscriptionRequired))
            })
            .map(|(i, _)| i)
            .collect();
        for at in allowed {
            let Some((node, item)) = last_item(u, at).await else {
                continue;
            };
            let inner = items_xml(&node, &[&item]);
            let m = notify::message(u, to.as_str(), &inner, Some(item.stamp));
            u.route(to, m);
        }
    }

    async fn items(
        &self,
        u: &mut User,
        node: &str,
        op: &minidom::Element,
        reader: Option<String>,
    ) -> Reply {
        let at = match store::load(u).await {
            Ok(pep) => match pep.find(node) {
                Some(at) => at,
                None => return no_node(node),
            },
            Err(e) => return storage_error(&e),
        };
        if let Some(reader) = &reader {
            let config = u.state.get::<store::Pep>().expect("loaded").nodes[at]
                .config
                .clone();
            let roster = match roster::load(u).await {
                Ok(r) => r,
                Err(e) => return storage_error(&e),
            };
            if let Err(r) = notify::may_read(Some(roster), &config, reader) {
                return refused(r);
            }
        }
        let max = op.attr("max_items").map(|m| m.parse::<usize>()).transpose();
        let Ok(max) = max else {
            return Reply::error(Condition::BadRequest, "max_items is not a number");
        };
        let ids: Vec<&str> = op
            .children()
            .filter(|c| c.name() == "item")
            .filter_map(|c| c.attr("id"))
            .collect();
        let items = match store::items(u, at).await {
            Ok(items) => items,
            Err(e) => return storage_error(&e),
        };
        let chosen: Vec<&Item> = if !ids.is_empty() {
            items
                .iter()
                .filter(|i| ids.contains(&i.id.as_str()))
                .collect()
        } else {
            let skip = max.map(|m| items.len().saturating_sub(m)).unwrap_or(0);
            // Newest first (XEP-0060 6.5.7 leaves the order open; clients read the first
            // as the latest).
            items.iter().skip(skip).rev().collect()
        };
        Reply::Result(Some(format!(
            "<pubsub xmlns='{NS_PUBSUB}'>{}</pubsub>",
            items_xml(node, &chosen)
        )))
    }

    /// Creates node `node` with `config`; `Err` is the answer.
    async fn new_node(&self, u: &mut User, node: &str, config: Config) -> Result<usize, Reply> {
        if node.len() > MAX_NODE_NAME {
            return Err(Reply::error(
                Condition::NotAcceptable,
                format!("node names are limited to {MAX_NODE_NAME} bytes"),
            ));
        }
        let max_nodes = self.max_nodes;
        let pep = store::load(u).await.map_err(|e| storage_error(&e))?;
        if pep.nodes.len() >= max_nodes {
            return Err(Reply::error(
                Condition::ResourceConstraint,
                format!("at most {max_nodes} nodes per account"),
            ));
        }
        pep.nodes.push(store::Node {
            name: node.to_owned(),
            config,
            items: Some(vec![]),
            bytes: 0,
        });
        Ok(pep.nodes.len() - 1)
    }

    async fn create(&self, u: &mut User, node: &str, form: Option<Submitted>) -> Reply {
        if node.is_empty() {
            return unsupported("instant-nodes");
        }
        match store::load(u).await {
            Ok(pep) if pep.find(node).is_some() => {
                return Reply::error(Condition::Conflict, format!("node '{node}' exists"))
            }
            Ok(_) => {}
            Err(e) => return storage_error(&e),
        }
        let mut config = Config::default();
        if let Some(f) = &form {
            if let Err(e) = config.apply(f, self.max_items) {
                return refuse(Condition::NotAcceptable, "invalid-options", e);
            }
        }
        if let Err(r) = self.new_node(u, node, config).await {
            return r;
        }
        if let Err(e) = store::save_index(u).await {
            return storage_error(&e);
        }
        info!(node, "PEP node created");
        Reply::empty()
    }

    async fn publish(
        &self,
        u: &mut User,
        node: &str,
        op: &minidom::Element,
        options: Option<Submitted>,
    ) -> Reply {
        if node.is_empty() {
            return refuse(Condition::BadRequest, "nodeid-required", "name the node");
        }
        let items: Vec<&minidom::Element> = op.children().filter(|c| c.name() == "item").collect();
        let item = match items.as_slice() {
            [one] => *one,
            [] => return refuse(Condition::BadRequest, "item-required", "publish one item"),
            _ => {
                return refuse(
                    Condition::BadRequest,
                    "invalid-payload",
                    "publish one item at a time",
                )
            }
        };
        let payloads: Vec<&minidom::Element> = item.children().collect();
        let payload = match payloads.as_slice() {
            [one] => String::from(*one),
            [] => {
                return refuse(
                    Condition::BadRequest,
                    "payload-required",
                    "the item is empty",
                )
            }
            _ => {
                return refuse(
                    Condition::BadRequest,
                    "invalid-payload",
                    "an item holds one payload element",
                )
            }
        };
        let id = match item.attr("id") {
            Some(id) if !id.is_empty() && id.len() <= 256 => id.to_owned(),
            Some(id) if !id.is_empty() => {
                return Reply::error(
                    Condition::NotAcceptable,
                    "item ids are limited to 256 bytes",
                )
            }
            _ => format!("{:x}-{}", crate::clock::now_micros(), u.next_id()),
        };
        if let Err(r) = self
            .put(u, None, node, &id, payload, options.as_ref())
            .await
        {
            return r;
        }
        Reply::Result(Some(format!(
            "<pubsub xmlns='{NS_PUBSUB}'><publish node='{}'><item id='{}'/></publish></pubsub>",
            escape(node),
            escape(&id)
        )))
    }

    /// Publishes `payload` as item `id` of `node` for `by` (a module; `None`: the
    /// user's client): creates the node with `options` (publish-options) or checks them
    /// against it (XEP-0223), stores the item, notifies, and runs [`Hook::Stored`].
    async fn put(
        &self,
        u: &mut User,
        by: Option<&'static str>,
        node: &str,
        id: &str,
        payload: String,
        options: Option<&Submitted>,
    ) -> Result<(), Reply> {
        if payload.len() > self.max_item_bytes {
            return Err(refuse(
                Condition::NotAcceptable,
                "payload-too-big",
                format!("items are limited to {} bytes", self.max_item_bytes),
            ));
        }
        let found = match store::load(u).await {
            Ok(pep) => pep.find(node),
            Err(e) => return Err(storage_error(&e)),
        };
        let (at, created) = match found {
            Some(at) => {
                if let Some(o) = &options {
                    let config = &u.state.get::<store::Pep>().expect("loaded").nodes[at].config;
                    if let Err(field) = config.meets(o, self.max_items) {
                        return Err(refuse(
                            Condition::Conflict,
                            "precondition-not-met",
                            format!("the node's {field} differs from the publish-options"),
                        ));
                    }
                }
                (at, false)
            }
            None => {
                let mut config = Config::default();
                if let Some(o) = &options {
                    if let Err(e) = config.apply(o, self.max_items) {
                        return Err(refuse(Condition::Conflict, "precondition-not-met", e));
                    }
                }
                (self.new_node(u, node, config).await?, true)
            }
        };
        let item = Item {
            id: id.to_owned(),
            stamp: crate::clock::now_micros(),
            payload,
        };
        let (config, before) = {
            let pep = u.state.get::<store::Pep>().expect("loaded");
            (pep.nodes[at].config.clone(), pep.bytes())
        };
        // A node's items are one storage fragment.
        let per_node = u.ctx.config.fragment_max();
        let items = store::items(u, at).await.map_err(|e| storage_error(&e))?;
        let old: usize = items.iter().map(|i| i.payload.len()).sum();
        let mut next = items.clone();
        next.retain(|i| i.id != id);
        next.push(item.clone());
        let keep = config.keep(self.max_items);
        let drop = next.len().saturating_sub(keep);
        next.drain(..drop);
        let new: usize = next.iter().map(|i| i.payload.len()).sum();
        if new > old && new > per_node {
            if created {
                u.state.remove::<store::Pep>();
            }
            return Err(Reply::error(
                Condition::ResourceConstraint,
                format!("a node's items are limited to {per_node} bytes: retract some or lower max_items"),
            ));
        }
        if new > old && (before + new).saturating_sub(old) > self.max_bytes {
            if created {
                u.state.remove::<store::Pep>();
            }
            return Err(Reply::error(
                Condition::ResourceConstraint,
                format!(
                    "personal eventing data is limited to {} bytes per account",
                    self.max_bytes
                ),
            ));
        }
        *items = next;
        store::save_items(u, at)
            .await
            .map_err(|e| storage_error(&e))?;
        store::save_index(u).await.map_err(|e| storage_error(&e))?;
        debug!(node, id, by, "PEP item published");
        notify::broadcast(u, node, &config, &items_xml(node, &[&item])).await;
        let what = Stored::PepPublished {
            node,
            id,
            payload: &item.payload,
        };
        hooks::stored(u, Change { by, what }).await;
        Ok(())
    }

    async fn retract(&self, u: &mut User, node: &str, op: &minidom::Element) -> Reply {
        if node.is_empty() {
            return refuse(Condition::BadRequest, "nodeid-required", "name the node");
        }
        let ids: Vec<String> = op
            .children()
            .filter(|c| c.name() == "item")
            .filter_map(|c| c.attr("id").map(str::to_owned))
            .collect();
        if ids.is_empty() {
            return refuse(Condition::BadRequest, "item-required", "name the item");
        }
        let asked = op.attr("notify").map(|n| n == "1" || n == "true");
        match self.withdraw(u, None, node, &ids, asked).await {
            Ok(()) => Reply::empty(),
            Err(r) => r,
        }
    }

    /// Retracts items `ids` of `node` for `by` (a module; `None`: the user's client),
    /// notifies as `notify` says (`None`: as the node is configured), and runs
    /// [`Hook::Stored`].
    async fn withdraw(
        &self,
        u: &mut User,
        by: Option<&'static str>,
        node: &str,
        ids: &[String],
        notify: Option<bool>,
    ) -> Result<(), Reply> {
        let at = match store::load(u).await {
            Ok(pep) => match pep.find(node) {
                Some(at) => at,
                None => return Err(no_node(node)),
            },
            Err(e) => return Err(storage_error(&e)),
        };
        let items = store::items(u, at).await.map_err(|e| storage_error(&e))?;
        if !items.iter().any(|i| ids.contains(&i.id)) {
            return Err(Reply::error(Condition::ItemNotFound, "no such item"));
        }
        items.retain(|i| !ids.contains(&i.id));
        store::save_items(u, at)
            .await
            .map_err(|e| storage_error(&e))?;
        store::save_index(u).await.map_err(|e| storage_error(&e))?;
        let config = u.state.get::<store::Pep>().expect("loaded").nodes[at]
            .config
            .clone();
        if notify.unwrap_or(config.notify_retract) {
            let mut inner = format!("<items node='{}'>", escape(node));
            for id in ids {
                inner.push_str(&format!("<retract id='{}'/>", escape(id)));
            }
            inner.push_str("</items>");
            notify::broadcast(u, node, &config, &inner).await;
        }
        hooks::stored(
            u,
            Change {
                by,
                what: Stored::PepRetracted { node, ids },
            },
        )
        .await;
        Ok(())
    }

    async fn configuration(&self, u: &mut User, node: &str) -> Reply {
        let pep = match store::load(u).await {
            Ok(p) => p,
            Err(e) => return storage_error(&e),
        };
        let Some(at) = pep.find(node) else {
            return no_node(node);
        };
        let form = pep.nodes[at].config.form(self.max_items);
        Reply::Result(Some(format!(
            "<pubsub xmlns='{NS_OWNER}'><configure node='{}'>{}</configure></pubsub>",
            escape(node),
            String::from(&minidom::Element::from(form))
        )))
    }

    async fn configure(&self, u: &mut User, node: &str, op: &minidom::Element) -> Reply {
        let form = match form_in(Some(op)) {
            Ok(Some(f)) => f,
            Ok(None) => return Reply::error(Condition::BadRequest, "no configuration form"),
            Err(r) => return r,
        };
        let at = match store::load(u).await {
            Ok(pep) => match pep.find(node) {
                Some(at) => at,
                None => return no_node(node),
            },
            Err(e) => return storage_error(&e),
        };
        let pep = u.state.get_mut::<store::Pep>().expect("loaded");
        let mut config = pep.nodes[at].config.clone();
        if let Err(e) = config.apply(&form, self.max_items) {
            return refuse(Condition::NotAcceptable, "invalid-options", e);
        }
        let keep = config.keep(self.max_items);
        pep.nodes[at].config = config;
        let items = match store::items(u, at).await {
            Ok(items) => items,
            Err(e) => {
                // The new configuration is not stored: forget it with the rest.
                u.state.remove::<store::Pep>();
                return storage_error(&e);
            }
        };
        if items.len() > keep {
            let drop = items.len() - keep;
            items.drain(..drop);
            if let Err(e) = store::save_items(u, at).await {
                return storage_error(&e);
            }
        }
        if let Err(e) = store::save_index(u).await {
            return storage_error(&e);
        }
        info!(node, "PEP node configured");
        Reply::empty()
    }

    async fn delete(&self, u: &mut User, node: &str) -> Reply {
        let at = match store::load(u).await {
            Ok(pep) => match pep.find(node) {
                Some(at) => at,
                None => return no_node(node),
            },
            Err(e) => return storage_error(&e),
        };
        let config = u.state.get::<store::Pep>().expect("loaded").nodes[at]
            .config
            .clone();
        if let Err(e) = store::remove(u, at).await {
            return storage_error(&e);
        }
        info!(node, "PEP node deleted");
        let inner = format!("<delete node='{}'/>", escape(node));
        notify::broadcast(u, node, &config, &inner).await;
        let what = Stored::PepCleared { node };
        hooks::stored(u, Change { by: None, what }).await;
        Reply::empty()
    }

    async fn purge(&self, u: &mut User, node: &str) -> Reply {
        let at = match store::load(u).await {
            Ok(pep) => match pep.find(node) {
                Some(at) => at,
                None => return no_node(node),
            },
            Err(e) => return storage_error(&e),
        };
        match store::items(u, at).await {
            Ok(items) => items.clear(),
            Err(e) => return storage_error(&e),
        }
        if let Err(e) = store::save_items(u, at).await {
            return storage_error(&e);
        }
        if let Err(e) = store::save_index(u).await {
            return storage_error(&e);
        }
        let config = u.state.get::<store::Pep>().expect("loaded").nodes[at]
            .config
            .clone();
        let inner = format!("<purge node='{}'/>", escape(node));
        notify::broadcast(u, node, &config, &inner).await;
        let what = Stored::PepCleared { node };
        hooks::stored(u, Change { by: None, what }).await;
        Reply::empty()
    }
}

#[cfg(test)]
mod tests;
