//! The router's shared state and the routing decision for every packet.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, info, warn};

use jrs_component::protocol::{bind_error, bind_result, disconnected_notice, route_notice};
use jrs_component::{fanout, PacketType};
use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::config::{RouterConfig, Users};
use crate::gather::{self, Gathers};
use crate::outbox::{Outbox, PushError};
use crate::tree::{BindRefusal, ConnId, Instance, Target, Tree};

/// What the router knows of one authenticated link.
struct LinkInfo {
    name: Arc<str>,
    outbox: Arc<Outbox>,
    /// Routes this link bound, including the automatic ones for its own name.
    bound: HashSet<(PacketType, String)>,
    /// The link asked for notices about other links.
    notices: bool,
    /// One of this project's own components (`trusted` in router-users.xml).
    trusted: bool,
    /// Our stream id, on an acknowledged link: the component names it when it comes
    /// back, to learn how much of this link the router handled.
    ack_stream_id: Option<String>,
    /// The component named a previous link (`previd`): it is coming back after losing
    /// its router, so what it sends may be for components not back yet (see settling).
    returning: bool,
}

/// How a link was authenticated, which decides what `register` answers.
pub enum Accepted {
    /// The router dialed the component: the component said `<handshake/>`.
    Dialed,
    /// A plain XEP-0114 link: answered `<handshake/>`.
    Plain,
    /// The component asked for an acknowledged link (`<handshake acks='1'>`).
    WithAcks(AckLink),
}

/// What a component asks for in its `<handshake acks='1'>`.
pub struct AckLink {
    /// The router's stream id of this link.
    pub stream_id: String,
    /// The stream id of the component's previous link, if it had one.
    pub previd: Option<String>,
}

/// What the router remembers of an acknowledged link that ended, for the component
/// coming back (one per component name, replaced by the next).
struct Departed {
    stream_id: String,
    /// Bytes of the component's stream the router had handled.
    handled: u64,
}

impl LinkInfo {
    /// Whether this link may send packets of type `route` at all: `normal` anyone;
    /// `session`, `xdb` and `log` only the project's own (trusted) components and those
    /// router-users.xml allows that type. A third-party component must not start
    /// sessions for users, or read and write their storage.
    fn may_send(&self, route: PacketType, users: &Users) -> bool {
        route == PacketType::Normal
            || self.trusted
            || users
                .find(&self.name)
                .is_some_and(|u| u.allow.iter().any(|a| a.route == route))
    }

    /// Whether this link may send this `xdb` packet: a store bound to some namespaces
    /// only (its `allow` entries all have `ns`) answers anything, but requests only in
    /// those namespaces.
    fn may_send_xdb<B: AsRef<[u8]>>(&self, stanza: &Stanza<B>, users: &Users) -> bool {
        if matches!(stanza.kind(), Some("result" | "error")) {
            return true;
        }
        match users.find(&self.name).and_then(|u| u.xdb_namespaces()) {
            None => true,
            Some(allowed) => stanza
                .attr("ns")
                .is_some_and(|ns| allowed.iter().any(|a| *a == ns)),
        }
    }

    /// Whether this link may send packets of `route` from `domain`.
    fn may_send_from(&self, route: PacketType, domain: &str, tree: &Tree) -> bool {
        if domain == &*self.name || self.bound.iter().any(|(_, h)| route_host(h) == domain) {
            return true;
        }
        // The default route (s2s) speaks for every remote domain: any domain no local
        // component serves.
        route != PacketType::Log
            && self
                .bound
                .iter()
                .any(|(t, h)| *t == PacketType::Normal && h == "*")
            && !tree.serves(PacketType::Normal, domain)
    }
}

struct State {
    tree: Tree,
    /// foldhash, as the tree's routes (a lookup for every packet).
    links: foldhash::HashMap<ConnId, LinkInfo>,
    /// Storage requests sent to every store of a host, awaiting their answers.
    gathers: Gathers,
    /// Connected component names, for conflict detection.
    names: HashMap<Arc<str>, ConnId>,
    /// The last acknowledged link of each component name that ended.
    departed: HashMap<Arc<str>, Departed>,
    /// Bounces made where none could be sent (under a bind), sent by the next
    /// `expire_held`.
    deferred: Vec<Bounce>,
}

/// A packet that could not be delivered and must be answered with an error.
struct Bounce {
    packet: Bytes,
    condition: StanzaErrorCondition,
    text: String,
}

pub struct Router {
    pub config: RouterConfig,
    users: RwLock<Arc<Users>>,
    state: Mutex<State>,
    next_conn: AtomicU64,
}

/// Routes a component gets for its own name, so replies addressed to it arrive whatever
/// their type (a plain XEP-0114 component only ever sees `normal`).
const OWN_NAME_ROUTES: [PacketType; 3] = [PacketType::Normal, PacketType::Session, PacketType::Xdb];

use jrs_stream::addr::{bare as jid_bare, domain as jid_domain};

/// A domain or bare JID as the key the router routes and hashes by: normalised exactly
/// as sm and c2s normalise JIDs (the `jid` crate's stringprep: nodeprep, nameprep), so
/// `Alice@LocalHost`, `alice@localhost` and a non-NFKC form of a Unicode name all reach
/// the same sm instance. ASCII, the usual case, only needs lowercasing (what nodeprep and
/// nameprep do to valid ASCII); anything else that is not a valid JID is lowercased.
fn lower(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_ascii() {
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return s.to_ascii_lowercase().into();
        }
        return s.into();
    }
    match jid::BareJid::new(s) {
        Ok(j) => j.to_string().into(),
        Err(_) => s.to_lowercase().into(),
    }
}

impl Router {
    pub fn new(config: RouterConfig, users: Users) -> Router {
        let mut tree = Tree::new(config.grace, config.grace_max_packets);
        tree.start_settling(Instant::now());
        Router {
            users: RwLock::new(Arc::new(users)),
            state: Mutex::new(State {
                tree,
                links: Default::default(),
                gathers: Gathers::default(),
                names: HashMap::new(),
                departed: HashMap::new(),
                deferred: vec![],
            }),
            config,
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn users(&self) -> Arc<Users> {
        self.users.read().expect("users lock").clone()
    }

    pub fn replace_users(&self, users: Users) {
        *self.users.write().expect("users lock") = Arc::new(users);
    }

    /// Registers an authenticated link and binds its own name. Fails if a component of
    /// that name is connected already. The `<handshake/>` that accepts it (for an
    /// accepted link) is queued first, under the lock, so it precedes any packet held for
    /// the name; on an acknowledged link it says how much of the component's previous
    /// link the router handled, and packets written from then on are kept until acked.
    pub fn register(
        &self,
        conn: ConnId,
        name: &str,
        trusted: bool,
        outbox: Arc<Outbox>,
        accepted: Accepted,
    ) -> Result<(), String> {
        let name: Arc<str> = name.into();
        let mut st = self.state.lock().expect("router lock");
        if let Some(other) = st.names.get(&name) {
            return Err(format!(
                "a component named '{name}' is already connected (link {other})"
            ));
        }
        let returning = matches!(&accepted, Accepted::WithAcks(a) if a.previd.is_some());
        let ack_stream_id = match accepted {
            Accepted::WithAcks(AckLink { stream_id, previd }) => {
                let handled = st
                    .departed
                    .get(&name)
                    .filter(|d| previd.as_deref() == Some(d.stream_id.as_str()))
                    .map(|d| d.handled);
                let _ = outbox.push(
                    match handled {
                        Some(h) => format!("<handshake acks='1' h='{h}'/>"),
                        None => "<handshake acks='1'/>".to_owned(),
                    }
                    .as_bytes(),
                );
                outbox.enable_acks();
                debug!(resumed_from = ?handled, "acknowledged link");
                Some(stream_id)
            }
            Accepted::Plain => {
                let _ = outbox.push(b"<handshake/>");
                None
            }
            Accepted::Dialed => None,
        };
        st.names.insert(name.clone(), conn);
        st.links.insert(
            conn,
            LinkInfo {
                name: name.clone(),
                outbox: outbox.clone(),
                bound: HashSet::new(),
                notices: false,
                trusted,
                ack_stream_id,
                returning,
            },
        );
        for route in OWN_NAME_ROUTES {
            // Cannot conflict: the name is unique among connected links, and nobody else
            // may bind another component's name (see `bind`).
            let _ = bind_locked(&mut st, conn, route, &name, false, false);
        }
        Ok(())
    }

    /// Handles a `<bind/>` or `<unbind/>` request and answers it on the link.
    pub fn handle_bind<B: AsRef<[u8]>>(&self, conn: ConnId, request: &Stanza<B>, unbind: bool) {
        let element = if unbind { "unbind" } else { "bind" };
        let id = request.id().unwrap_or("");
        let route = request.attr("route").and_then(|r| PacketType::parse(&r));
        let host = request.attr("host").map(|h| h.to_ascii_lowercase());
        let flag = |name: &str| request.attr(name).is_some_and(|s| s == "true" || s == "1");
        let (shared, fanout) = (flag("shared"), flag("fanout"));
        let ns = request.attr("ns").filter(|n| !n.is_empty());
        let users = self.users();
        let mut st = self.state.lock().expect("router lock");
        let Some(link) = st.links.get(&conn) else {
            return;
        };
        let (outbox, name) = (link.outbox.clone(), link.name.clone());
        let answer = match (route, host) {
            (None, _) | (_, None) => bind_error(
                element,
                id,
                StanzaErrorCondition::BadRequest,
                "route must be normal, session, xdb or log, and host is required",
            ),
            (Some(route), Some(_)) if ns.is_some() && route != PacketType::Xdb => bind_error(
                element,
                id,
                StanzaErrorCondition::BadRequest,
                "only xdb routes have namespaces",
            ),
            (Some(route), Some(host)) => {
                let allowed = users
                    .find(&name)
                    .is_some_and(|u| u.may_bind(route, &host, ns.as_deref()));
                let someone_elses_name = host != *name && st.names.contains_key(host.as_str());
                // A namespace's route lives beside the host's: `HOST NS`.
                let host = match &ns {
                    Some(ns) => ns_route(&host, ns),
                    None => host,
                };
                if unbind {
                    let now = Instant::now();
                    if let Some(link) = st.links.get_mut(&conn) {
                        link.bound.remove(&(route, host.clone()));
                    }
                    if st.tree.unbind(route, &host, conn, now) {
                        info!(%route, %host, "unbound");
                        notify(&st, &route_notice("unbound", &name, route, &host));
                        bind_result(element, id)
                    } else {
                        bind_error(element, id, StanzaErrorCondition::ItemNotFound, "not bound")
                    }
                } else if !allowed || someone_elses_name {
                    warn!(%route, %host, "bind refused by the ACL");
                    bind_error(
                        element,
                        id,
                        StanzaErrorCondition::NotAllowed,
                        &format!("component '{name}' may not bind {route} for '{host}'"),
                    )
                } else {
                    match bind_locked(&mut st, conn, route, &host, shared, fanout) {
                        Ok(()) => {
                            info!(%route, %host, shared, fanout, "bound");
                            bind_result(element, id)
                        }
                        Err(BindRefusal::Conflict(holder)) => bind_error(
                            element,
                            id,
                            StanzaErrorCondition::Conflict,
                            &format!("{route} for '{host}' is held by '{holder}' and not shared"),
                        ),
                    }
                }
            }
        };
        // Pushed under the lock so the answer precedes any packet the new route brings.
        let _ = outbox.push(answer.as_bytes());
    }

    /// Handles `<notices/>`: from now on the link hears when other links bind, unbind
    /// or disconnect, starting with a `bound` notice for every route bound now.
    pub fn subscribe_notices<B: AsRef<[u8]>>(&self, conn: ConnId, request: &Stanza<B>) {
        let mut st = self.state.lock().expect("router lock");
        let current: Vec<String> = st
            .links
            .values()
            .flat_map(|l| {
                l.bound
                    .iter()
                    .map(|(route, host)| route_notice("bound", &l.name, *route, host))
            })
            .collect();
        if let Some(link) = st.links.get_mut(&conn) {
            link.notices = true;
            let _ = link
                .outbox
                .push(bind_result("notices", request.id().unwrap_or("")).as_bytes());
            for n in current {
                let _ = link.outbox.push(n.as_bytes());
            }
        }
    }

    /// Routes the packets one link sent in one read, under one lock: from checks, the
    /// routing decision, and one push per destination.
    pub fn route_batch(&self, conn: ConnId, packets: &[(PacketType, Stanza<&[u8]>)]) {
        if packets.is_empty() {
            return;
        }
        let mut bounces = vec![];
        let users = self.users();
        {
            let mut st = self.state.lock().expect("router lock");
            let State {
                tree,
                links,
                gathers,
                ..
            } = &mut *st;
            let Some(link) = links.get(&conn) else { return };
            let mut plan = Plan {
                settle: link.returning && tree.is_settling(),
                sender: Some(conn),
                ..Plan::default()
            };
            let mut refused = vec![];
            let mut gathered = vec![];
            for (route, stanza) in packets {
                if !link.may_send(*route, &users) {
                    warn!(%route, to = stanza.to().unwrap_or(""), "packet type not allowed for this component: bounced");
                    refused.extend(stanza.error_reply(
                        StanzaErrorCondition::NotAllowed,
                        &format!("component '{}' may not send {route} packets", link.name),
                    ));
                    continue;
                }
                let domain = lower(jid_domain(stanza.from().unwrap_or("")));
                if domain.is_empty() || !link.may_send_from(*route, &domain, tree) {
                    let (condition, text) = if domain.is_empty() {
                        (
                            StanzaErrorCondition::BadRequest,
                            "a component must set 'from'".to_owned(),
                        )
                    } else {
                        (
                            StanzaErrorCondition::NotAllowed,
                            format!("'{domain}' is not an address this component bound"),
                        )
                    };
                    warn!(%route, from = stanza.from().unwrap_or(""), "forged or missing from: bounced");
                    // The reply goes straight back on the sender's link: its `to` is forged.
                    refused.extend(stanza.error_reply(condition, &text));
                    continue;
                }
                if stanza.name() == fanout::ELEMENT {
                    // The stanza inside must come from the same domain as the packet.
                    let parsed = if fanout::has_other_attributes(stanza) {
                        Err(fanout::FanoutError(
                            "only 'from' and 'to' may stand on <fanout>",
                        ))
                    } else {
                        fanout::parse(stanza.inner())
                    };
                    match parsed {
                        Ok(f) if f.stanza.from().is_none() => {
                            refused.extend(stanza.error_reply(
                                StanzaErrorCondition::BadRequest,
                                "the stanza of a fan-out packet must have 'from'",
                            ));
                        }
                        Ok(f) if lower(jid_domain(f.stanza.from().unwrap_or(""))) == domain => {
                            plan.decide_fanout(tree, *route, stanza, &f, &mut bounces);
                        }
                        Ok(_) => {
                            warn!(
                                from = stanza.from().unwrap_or(""),
                                "fan-out stanza from another domain: refused"
                            );
                            refused.extend(stanza.error_reply(
                                StanzaErrorCondition::NotAllowed,
                                "the stanza of a fan-out packet must be from the packet's domain",
                            ));
                        }
                        Err(e) => {
                            warn!(from = stanza.from().unwrap_or(""), error = %e, "malformed fan-out packet: refused");
                            refused.extend(
                                stanza
                                    .error_reply(StanzaErrorCondition::BadRequest, &e.to_string()),
                            );
                        }
                    }
                    continue;
                }
                if *route == PacketType::Xdb {
                    // An answer to a request sent to several stores: held back until
                    // all answered, then one answer instead.
                    match gathers.answer(stanza, Some(conn)) {
                        Some(Some(answer)) => {
                            gathered.push(answer);
                            continue;
                        }
                        Some(None) => continue,
                        None => {}
                    }
                    if !link.may_send_xdb(stanza, &users) {
                        warn!(
                            ns = stanza.attr("ns").unwrap_or_default(),
                            "storage request outside the namespaces this component serves: refused"
                        );
                        refused.extend(stanza.error_reply(
                            StanzaErrorCondition::NotAllowed,
                            "a store of some namespaces may send requests of those only",
                        ));
                        continue;
                    }
                    if gather::concerns_every_store(stanza) {
                        match plan.decide_every_store(tree, gathers, stanza, &mut bounces) {
                            Gathered::No => {}
                            Gathered::Yes => continue,
                            Gathered::Busy => {
                                refused.extend(stanza.error_reply(
                                    StanzaErrorCondition::Conflict,
                                    "a request with this id is still being answered",
                                ));
                                continue;
                            }
                        }
                    }
                }
                plan.decide(tree, *route, stanza, &mut bounces);
            }
            let sender = link.outbox.clone();
            plan.execute(links, &mut bounces);
            let mut pusher = sender.pusher();
            for reply in refused {
                let _ = pusher.push(&reply, true);
            }
            drop(pusher);
            for answer in gathered {
                if let Ok(answer) = Stanza::parse(answer) {
                    route_locked(&mut st, PacketType::Xdb, &answer, &mut bounces);
                }
            }
        }
        self.bounce_all(bounces);
    }

    /// Routes an error reply produced by the router itself.
    fn bounce_all(&self, mut bounces: Vec<Bounce>) {
        // Bounces of bounces are impossible (errors are never answered), so this ends.
        while !bounces.is_empty() {
            crate::metrics::M.bounced.inc_by(bounces.len() as u64);
            let mut next = vec![];
            for b in bounces {
                let Ok(stanza) = Stanza::parse(b.packet) else {
                    continue;
                };
                if stanza.name() == fanout::ELEMENT {
                    // Answered recipient by recipient, each from its own address.
                    if let Ok(f) = fanout::parse(stanza.inner()) {
                        next.extend(f.recipients.iter().map(|r| Bounce {
                            packet: fanout::addressed(&f.stanza, r.to),
                            condition: b.condition,
                            text: b.text.clone(),
                        }));
                    }
                    continue;
                }
                let Some(reply) = stanza.error_reply(b.condition, &b.text) else {
                    warn!(element = stanza.name(), to = stanza.to().unwrap_or(""), reason = %b.text,
                        "undeliverable packet dropped (an error or result is never answered with an error)");
                    continue;
                };
                let Some(route) = packet_type(&stanza) else {
                    continue;
                };
                let Ok(reply) = Stanza::parse(reply) else {
                    continue;
                };
                let mut st = self.state.lock().expect("router lock");
                // A store of a gathered request that could not be reached answers too.
                let reply = match st.gathers.answer(&reply, None) {
                    None => reply,
                    Some(None) => continue,
                    Some(Some(answer)) => match Stanza::parse(answer) {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                route_locked(&mut st, route, &reply, &mut next);
            }
            bounces = next;
        }
    }

    /// Removes a link: unbinds everything (starting the grace period for routes it held
    /// alone) and re-routes or bounces the packets still queued for it (on an
    /// acknowledged link: not acknowledged). `handled` is how much of the component's
    /// stream the router handled, remembered for its return.
    pub fn unregister(&self, conn: ConnId, handled: u64) {
        let mut bounces = vec![];
        {
            let mut st = self.state.lock().expect("router lock");
            let Some(link) = st.links.remove(&conn) else {
                return;
            };
            st.names.remove(&link.name);
            if let Some(stream_id) = link.ack_stream_id.clone() {
                st.departed
                    .insert(link.name.clone(), Departed { stream_id, handled });
            }
            let now = Instant::now();
            for (route, host) in &link.bound {
                st.tree.unbind(*route, host, conn, now);
            }
            notify(&st, &disconnected_notice(&link.name));
            // Killing under the lock: no packet can slip in between, and those queued keep
            // their order, held for the component's return or passed to another instance.
            let queued = link.outbox.kill();
            if !queued.is_empty() {
                info!(component = %link.name, packets = queued.len(), "re-routing packets queued for a closed link");
            }
            for packet in queued {
                let Ok(stanza) = Stanza::parse(packet) else {
                    continue;
                };
                if let Some(route) = packet_type(&stanza) {
                    route_locked(&mut st, route, &stanza, &mut bounces);
                }
            }
        }
        self.bounce_all(bounces);
    }

    /// Bounces what routes held past their grace period.
    pub fn expire_held(&self) {
        let (held, unanswered, settled_bounces) = {
            let mut st = self.state.lock().expect("router lock");
            let mut settled_bounces = std::mem::take(&mut st.deferred);
            let now = Instant::now();
            let unanswered = st.gathers.expire(now);
            if st.tree.is_settling() {
                let settled = st.tree.take_settled(Some(now));
                let still = st.tree.is_settling();
                if !settled.is_empty() && !still {
                    info!(
                        packets = settled.len(),
                        "settled after start: routing or bouncing what waited for its component"
                    );
                }
                reroute_settled(&mut st, settled, still, &mut settled_bounces);
            }
            (st.tree.expire(now), unanswered, settled_bounces)
        };
        self.bounce_all(settled_bounces);
        if !unanswered.is_empty() {
            warn!(
                requests = unanswered.len(),
                "storage requests not answered by every store: answered with an error"
            );
            self.bounce_all(
                unanswered
                    .into_iter()
                    .map(|packet| Bounce {
                        packet,
                        condition: StanzaErrorCondition::ServiceUnavailable,
                        text: "not every store answered".into(),
                    })
                    .collect(),
            );
        }
        for h in held {
            warn!(component = %h.component, packets = h.packets.len(),
                "component did not come back within the grace period: bouncing held packets");
            let text = format!("component '{}' is unavailable", h.component);
            self.bounce_all(
                h.packets
                    .into_iter()
                    .map(|packet| Bounce {
                        packet,
                        condition: StanzaErrorCondition::ServiceUnavailable,
                        text: text.clone(),
                    })
                    .collect(),
            );
        }
    }

    /// Answers a stanza addressed to no one (no `to`) on the sender's link.
    pub fn reply_to_sender(&self, conn: ConnId, reply: Bytes) {
        let st = self.state.lock().expect("router lock");
        if let Some(link) = st.links.get(&conn) {
            let _ = link.outbox.pusher().push(&reply, true);
        }
    }
}

/// The packet type of a parsed top-level element, if it is a packet.
pub fn packet_type<B: AsRef<[u8]>>(stanza: &Stanza<B>) -> Option<PacketType> {
    match jrs_component::TopLevel::classify(stanza.name()) {
        jrs_component::TopLevel::Packet(t) => Some(t),
        _ => None,
    }
}

fn bind_locked(
    st: &mut State,
    conn: ConnId,
    route: PacketType,
    host: &str,
    shared: bool,
    fanout: bool,
) -> Result<(), BindRefusal> {
    let link = st.links.get_mut(&conn).expect("bind on a registered link");
    // Fan-out packets carry `normal` stanzas only.
    let fanout = fanout && route == PacketType::Normal;
    let instance = Instance::new(conn, link.name.clone(), link.outbox.clone(), fanout);
    let held = st.tree.bind(route, host, instance, shared)?;
    link.bound.insert((route, host.to_owned()));
    let notice = route_notice("bound", &link.name, route, host);
    if !held.is_empty() {
        info!(%route, %host, packets = held.len(), "delivering packets held during the grace period");
    }
    {
        let mut pusher = link.outbox.pusher();
        for packet in held {
            if pusher.push(&packet, false).is_err() {
                warn!(%route, %host, "held packet could not be queued; dropped with the link");
            }
        }
    }
    notify(st, &notice);
    // Packets waiting since the router started may have a route now.
    let settled = st.tree.take_settled(None);
    if !settled.is_empty() {
        let mut bounces = std::mem::take(&mut st.deferred);
        reroute_settled(st, settled, true, &mut bounces);
        st.deferred = bounces;
    }
    Ok(())
}

/// Routes again packets that waited while the router settled; those still without a
/// route wait again (`settle`) or are bounced.
fn reroute_settled(
    st: &mut State,
    packets: Vec<(PacketType, Bytes, Option<ConnId>)>,
    settle: bool,
    bounces: &mut Vec<Bounce>,
) {
    let State { tree, links, .. } = st;
    for (route, packet, sender) in packets {
        let Ok(stanza) = Stanza::parse(packet) else {
            continue;
        };
        let mut plan = Plan {
            settle,
            sender,
            ..Plan::default()
        };
        plan.decide(tree, route, &stanza, bounces);
        plan.execute(links, bounces);
    }
}

/// Sends a link notice to every link that asked for them.
fn notify(st: &State, notice: &str) {
    for l in st.links.values().filter(|l| l.notices) {
        let _ = l.outbox.push(notice.as_bytes());
    }
}

/// Routes one packet with the state locked (bounces, re-routed and held packets).
fn route_locked<B: AsRef<[u8]>>(
    st: &mut State,
    route: PacketType,
    stanza: &Stanza<B>,
    bounces: &mut Vec<Bounce>,
) {
    let State { tree, links, .. } = st;
    let mut plan = Plan::default();
    plan.decide(tree, route, stanza, bounces);
    plan.execute(links, bounces);
}

/// The tree's key of the `xdb` route of namespace `ns` at `host` (a space stands in
/// neither a domain nor a namespace).
fn ns_route(host: &str, ns: &str) -> String {
    format!("{host} {ns}")
}

/// The host of a route key (`HOST` or `HOST NS`).
fn route_host(key: &str) -> &str {
    key.split_once(' ').map_or(key, |(h, _)| h)
}

/// Holds a packet for a route in its grace period, or bounces it when the hold is full.
fn hold(held: &mut crate::tree::Held, packet: Bytes, bounces: &mut Vec<Bounce>) {
    // Bounded by packets: each was already bounded in bytes by the stanza limit.
    if held.packets.len() < held.max_packets {
        crate::metrics::M
            .held
            .by(crate::metrics::type_of(&packet))
            .inc();
        held.packets.push_back(packet);
    } else {
        bounces.push(Bounce {
            packet,
            condition: StanzaErrorCondition::ServiceUnavailable,
            text: format!(
                "component '{}' is unavailable and its queue is full",
                held.component
            ),
        });
    }
}

/// Bounces a packet nobody can take: `remote-server-not-found` for a normal packet to a
/// domain no local component knows, else `service-unavailable`.
fn no_route(tree: &Tree, route: PacketType, host: &str, packet: Bytes, bounces: &mut Vec<Bounce>) {
    let known = OWN_NAME_ROUTES.iter().any(|t| tree.serves(*t, host));
    let condition = if route == PacketType::Normal && !known {
        StanzaErrorCondition::RemoteServerNotFound
    } else {
        StanzaErrorCondition::ServiceUnavailable
    };
    bounces.push(Bounce {
        packet,
        condition,
        text: format!("no route for {route} packets to '{host}'"),
    });
}

/// What became of a request for every store.
enum Gathered {
    /// One store at most: route it as any request.
    No,
    /// Sent to every store; one answer will follow.
    Yes,
    /// The same requester and id are being gathered already.
    Busy,
}

/// Packets to push, grouped by destination link, in order.
#[derive(Default)]
struct Plan<'a> {
    groups: Vec<Group<'a>>,
    /// Packets without a route wait while the router settles (see [`Tree::settle`]).
    settle: bool,
    /// The link the packets come from.
    sender: Option<ConnId>,
}

struct Group<'a> {
    conn: ConnId,
    name: Arc<str>,
    outbox: Arc<Outbox>,
    /// Packet bytes and whether each is an error reply.
    packets: Vec<(Packet<'a>, bool)>,
}

/// A packet to push: as received (in the read buffer), or made here from a fan-out
/// packet.
enum Packet<'a> {
    Received(&'a [u8]),
    Made(Bytes),
}

impl<'a> From<&'a [u8]> for Packet<'a> {
    fn from(b: &'a [u8]) -> Self {
        Packet::Received(b)
    }
}

impl From<Bytes> for Packet<'_> {
    fn from(b: Bytes) -> Self {
        Packet::Made(b)
    }
}

impl std::ops::Deref for Packet<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Packet::Received(b) => b,
            Packet::Made(b) => b,
        }
    }
}

impl<'a> Plan<'a> {
    fn add(&mut self, instance: &Instance, packet: impl Into<Packet<'a>>, is_error: bool) {
        let packet = packet.into();
        match self.groups.iter_mut().find(|g| g.conn == instance.conn) {
            Some(g) => g.packets.push((packet, is_error)),
            None => self.groups.push(Group {
                conn: instance.conn,
                name: instance.name.clone(),
                outbox: instance.outbox.clone(),
                packets: vec![(packet, is_error)],
            }),
        }
    }

    /// While settling, a packet of a returning component that the wildcard route would
    /// take back to that very component (s2s holds `*`: a stanza from a remote server
    /// for a local domain whose sm is not back yet) has no useful route yet: it waits
    /// like one without. (The caller checks that no exact route exists: sm sends
    /// packets to its own routes all the time.)
    fn back_to_sender(&self, target: &Target<'_>) -> bool {
        self.settle && matches!(target, Target::Deliver(i) if Some(i.conn) == self.sender)
    }

    /// A packet without a route waits while the router settles, or is bounced.
    fn no_route(
        &self,
        tree: &mut Tree,
        route: PacketType,
        host: &str,
        packet: Bytes,
        bounces: &mut Vec<Bounce>,
    ) {
        let packet = match self.settle {
            true => match tree.settle(route, packet, self.sender) {
                Ok(()) => return,
                Err(packet) => packet,
            },
            false => packet,
        };
        no_route(tree, route, host, packet, bounces);
    }

    /// The routing decision for one packet: a destination, the grace queue, or a bounce.
    fn decide<B: AsRef<[u8]>>(
        &mut self,
        tree: &mut Tree,
        route: PacketType,
        stanza: &'a Stanza<B>,
        bounces: &mut Vec<Bounce>,
    ) {
        let packet = stanza.as_slice();
        if stanza.name() == fanout::ELEMENT {
            // Re-routed from a closed link or held: it passed the checks when it came in.
            match fanout::parse(stanza.inner()) {
                Ok(f) => self.decide_fanout(tree, route, stanza, &f, bounces),
                Err(e) => warn!(error = %e, "malformed fan-out packet dropped"),
            }
            return;
        }
        if route == PacketType::Log {
            let host = lower(jid_domain(stanza.from().unwrap_or("")));
            let targets = tree.log_targets(&host);
            if targets.is_empty() {
                debug!(from = %host, "log record with no log component bound");
            }
            for t in &targets {
                self.add(t, packet, false);
            }
            return;
        }
        let to = stanza.to().unwrap_or("");
        let mut host = lower(jid_domain(to));
        let key = lower(jid_bare(to));
        let is_error = stanza.kind() == Some("error");
        if route == PacketType::Xdb && tree.has_xdb_namespaces() {
            if let Some(ns) = stanza.attr("ns") {
                let routed = tree.xdb_route(&host, &ns).into_owned();
                host = routed.into();
            }
        }
        let wildcard = !tree.serves(route, &host);
        let target = tree.target(route, &host, &key);
        if wildcard && self.back_to_sender(&target) {
            debug!(%route, to, "no route but back to its sender: waits while settling");
            self.no_route(tree, route, &host, Bytes::copy_from_slice(packet), bounces);
            return;
        }
        match target {
            Target::Deliver(instance) => self.add(instance, packet, is_error),
            Target::Hold(held) => hold(held, Bytes::copy_from_slice(packet), bounces),
            Target::NoRoute => {
                debug!(%route, to, "no route");
                self.no_route(tree, route, &host, Bytes::copy_from_slice(packet), bounces);
            }
        }
    }

    /// A storage request for every store of its host (`gather`): sent to each store that
    /// holds a route for the host (its default, its namespaces, the wildcard ones), and
    /// remembered so that the requester gets one answer. `No` when one store at most
    /// is concerned: then it is routed as any request.
    fn decide_every_store<B: AsRef<[u8]>>(
        &mut self,
        tree: &mut Tree,
        gathers: &mut Gathers,
        stanza: &'a Stanza<B>,
        bounces: &mut Vec<Bounce>,
    ) -> Gathered {
        let to = stanza.to().unwrap_or("");
        let host = lower(jid_domain(to)).into_owned();
        let key = lower(jid_bare(to)).into_owned();
        // Where each route key leads: an instance (each once) or a grace queue.
        let mut instances: Vec<Instance> = vec![];
        let mut held: Vec<String> = vec![];
        for route_key in std::iter::once(host.clone()).chain(tree.xdb_namespace_routes(&host)) {
            match tree.target(PacketType::Xdb, &route_key, &key) {
                Target::Deliver(i) if !instances.iter().any(|o| o.conn == i.conn) => {
                    instances.push(i.clone())
                }
                Target::Hold(_) => held.push(route_key),
                _ => {}
            }
        }
        if instances.len() + held.len() <= 1 {
            return Gathered::No;
        }
        if !gathers.start(
            stanza,
            instances.iter().map(|i| i.conn).collect(),
            held.len(),
        ) {
            return Gathered::Busy;
        }
        for i in &instances {
            self.add(i, stanza.as_slice(), false);
        }
        for route_key in held {
            if let Target::Hold(h) = tree.target(PacketType::Xdb, &route_key, &key) {
                hold(h, Bytes::copy_from_slice(stanza.as_slice()), bounces);
            }
        }
        Gathered::Yes
    }

    /// The routing decision for each recipient of a fan-out packet: instances that take
    /// fan-out packets get one with their recipients; the others, the grace queue and
    /// bounces get one addressed copy per recipient.
    fn decide_fanout<B: AsRef<[u8]>>(
        &mut self,
        tree: &mut Tree,
        route: PacketType,
        packet: &Stanza<B>,
        f: &fanout::Fanout<'_>,
        bounces: &mut Vec<Bounce>,
    ) {
        let host = lower(jid_domain(packet.to().unwrap_or("")));
        let is_error = f.stanza.kind() == Some("error");
        // Per instance taking fan-out packets: its recipients, in order.
        let mut batches: Vec<(Instance, Vec<fanout::Recipient<'_>>)> = vec![];
        for r in &f.recipients {
            let copy = || fanout::addressed(&f.stanza, r.to);
            if lower(jid_domain(r.to)) != host {
                bounces.push(Bounce {
                    packet: copy(),
                    condition: StanzaErrorCondition::BadRequest,
                    text: "a fan-out recipient must be in the packet's domain".into(),
                });
                continue;
            }
            match tree.target(route, &host, &lower(jid_bare(r.to))) {
                Target::Deliver(instance) if instance.fanout => {
                    // Only sm names sessions; a sender's `sid` is not passed on.
                    let r = fanout::Recipient {
                        to: r.to,
                        sid: None,
                    };
                    match batches.iter_mut().find(|(i, _)| i.conn == instance.conn) {
                        Some((_, rs)) => rs.push(r),
                        None => batches.push((instance.clone(), vec![r])),
                    }
                }
                Target::Deliver(instance) => self.add(instance, copy(), is_error),
                Target::Hold(held) => hold(held, copy(), bounces),
                Target::NoRoute => self.no_route(tree, route, &host, copy(), bounces),
            }
        }
        let (from, to) = (packet.from().unwrap_or(""), packet.to().unwrap_or(""));
        for (instance, recipients) in batches {
            let bytes = match recipients[..] {
                [one] => fanout::addressed(&f.stanza, one.to),
                _ => fanout::packet(from, to, recipients, f.stanza.as_slice()),
            };
            self.add(&instance, bytes, is_error);
        }
    }

    /// Pushes every group with one lock of its outbox. A link whose queue overflows is
    /// killed (its own task then unregisters it): its queue and the packets that did not
    /// fit are bounced.
    fn execute(self, links: &foldhash::HashMap<ConnId, LinkInfo>, bounces: &mut Vec<Bounce>) {
        for group in self.groups {
            let mut pusher = group.outbox.pusher();
            let mut rest = group.packets.into_iter();
            let mut overflow = None;
            for (packet, is_error) in rest.by_ref() {
                match pusher.push(&packet, is_error) {
                    Ok(()) => {
                        crate::metrics::M
                            .packets_out
                            .by(crate::metrics::type_of(&packet))
                            .inc();
                    }
                    Err(PushError::Closed(packet)) => bounces.push(Bounce {
                        packet,
                        condition: StanzaErrorCondition::ServiceUnavailable,
                        text: format!("component '{}' is closing", group.name),
                    }),
                    Err(PushError::Overflow(packet)) => {
                        overflow = Some(packet);
                        break;
                    }
                }
            }
            drop(pusher);
            let Some(first) = overflow else { continue };
            crate::metrics::M.overflows.inc();
            warn!(component = %group.name, conn = group.conn, "outbound queue full: the component is not reading; disconnecting it");
            let queued = match links.get(&group.conn) {
                Some(link) => link.outbox.kill(),
                None => group.outbox.kill(),
            };
            let text = format!(
                "component '{}' stopped reading and was disconnected",
                group.name
            );
            for packet in queued
                .into_iter()
                .chain(std::iter::once(first))
                .chain(rest.map(|(p, _)| Bytes::copy_from_slice(&p)))
            {
                bounces.push(Bounce {
                    packet,
                    condition: StanzaErrorCondition::ServiceUnavailable,
                    text: text.clone(),
                });
            }
        }
    }
}

impl crate::metrics::Observed for Router {
    /// Links per component account, for the metrics (at scrape time).
    fn metrics_links(&self) -> Vec<(String, i64)> {
        let users = self.users();
        let st = self.state.lock().expect("router lock");
        let mut counts: std::collections::BTreeMap<String, i64> = Default::default();
        for link in st.links.values() {
            let account = users.find(&link.name).map_or("other", |u| u.name.as_str());
            *counts.entry(account.to_owned()).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    /// Packets held per packet type, for the metrics.
    fn metrics_held(&self) -> [usize; 4] {
        self.state.lock().expect("router lock").tree.held_counts()
    }

    /// Bytes queued for every link, for the metrics.
    fn metrics_queued(&self) -> usize {
        let st = self.state.lock().expect("router lock");
        st.links.values().map(|l| l.outbox.queued_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::lower;

    #[test]
    fn route_keys_are_normalised_like_jids() {
        assert_eq!(lower("Alice@LocalHost"), "alice@localhost");
        assert_eq!(lower("alice@localhost"), "alice@localhost");
        // nodeprep: case folding and NFKC; nameprep for the domain.
        assert_eq!(lower("ÄLICE@LOCALHOST"), "älice@localhost");
        assert_eq!(lower("A\u{0308}lice@localhost"), "älice@localhost");
        assert_eq!(lower("ﬀ@Example.ORG"), "ff@example.org");
        assert_eq!(lower("bücher.example"), "bücher.example");
        assert_eq!(lower("BÜCHER.example"), "bücher.example");
    }
}
