//! The core of the module host, the types everything else is written against:
//! - [`Module`]: what a feature module is (its declaration and its handlers);
//! - [`Modules`]: the loaded modules as chains per hook, an IQ table and disco lists;
//! - [`Ctx`]: what every user of the process shares (configuration, storage, modules);
//! - [`User`]: one user's state (sessions, typed module state) and output collector.
//!
//! They live in one file because they refer to one another (handlers take a `User`,
//! a `User` reaches the chains through its `Ctx`); everything else in `host/` builds on
//! them and nothing here imports it back.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use jid::{BareJid, FullJid, Jid};
use tracing::warn;

use jrs_component::Outbox;
use jrs_stream::Stanza;

use crate::config::SmConfig;
use crate::host::accounts::Accounts;
use crate::host::components::Components;
use crate::host::iq::{Iq, IqKind, Reply, Scope};
use crate::host::out::{Out, Output};
use crate::host::overload::Overload;
use crate::host::packet::Packet;
use crate::host::registry::{Registry, Wake};
use crate::host::requests::Requests;
use crate::host::session::{Link, Queued, Session, SessionKey, SessionRef};
use crate::host::shared::Shared;
use crate::host::state::State;
use crate::host::store::Store;
pub use jrs_component::session::SessionState;

/// What a handler did with a stanza: `Handled` ends the chain, `Pass` hands it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Pass,
    Handled,
}

/// The points where modules hook in. Chains run from the highest priority down; on a
/// tie, in the order of `<modules>` in sm.xml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// A stanza from one of the user's sessions (outbound processing).
    Outbound,
    /// A stanza from the network to the user (inbound processing); the account exists.
    Inbound,
    /// A message was delivered to some of the user's sessions.
    Delivered,
    /// A message for the user that no session can take now.
    Undeliverable,
    /// A session started (resource bound).
    SessionStarted,
    /// A session ended (already removed from the user's sessions).
    SessionEnded,
    /// A session sent its initial presence.
    InitialPresence,
    /// The account is about to be removed (its data still in storage).
    AccountRemoving,
    /// The account's data is gone and its sessions ended.
    AccountRemoved,
    /// Every stanza sm sends the router on the user's behalf (a filter: `Handled` drops).
    Routing,
    /// Every stanza sm hands to one of the user's sessions (a filter: `Handled` drops).
    Delivering,
    /// A stanza the client of an ended session never got (`Handled`: taken care of).
    Undelivered,
    /// A session's client confirmed offline messages given to it.
    OfflineConfirmed,
    /// The user's data in storage changed ([`Change`]): PEP items, private XML, the vCard.
    Stored,
    /// c2s restored a session sm had lost (it restarted): modules rebuild what they kept
    /// about it from what c2s tells ([`SessionState`]).
    SessionRestored,
}

impl Hook {
    const ALL: [Hook; 15] = [
        Hook::Outbound,
        Hook::Inbound,
        Hook::Delivered,
        Hook::Undeliverable,
        Hook::SessionStarted,
        Hook::SessionEnded,
        Hook::InitialPresence,
        Hook::AccountRemoving,
        Hook::AccountRemoved,
        Hook::Routing,
        Hook::Delivering,
        Hook::Undelivered,
        Hook::OfflineConfirmed,
        Hook::Stored,
        Hook::SessionRestored,
    ];

    fn index(self) -> usize {
        Hook::ALL
            .iter()
            .position(|h| *h == self)
            .expect("every hook is listed")
    }
}

/// The kinds of stanza (RFC 6120 8): the outbound and inbound chains have one chain per
/// kind, so a module hooked for messages is not called for presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stanzas {
    Message,
    Presence,
    Iq,
    /// Every kind.
    All,
}

impl Stanzas {
    const KINDS: [Stanzas; 3] = [Stanzas::Message, Stanzas::Presence, Stanzas::Iq];

    /// The kind of a stanza by its element name.
    pub fn of(name: &str) -> Stanzas {
        match name {
            "message" => Stanzas::Message,
            "presence" => Stanzas::Presence,
            _ => Stanzas::Iq,
        }
    }

    fn covers(self, kind: Stanzas) -> bool {
        self == Stanzas::All || self == kind
    }

    fn index(self) -> usize {
        Stanzas::KINDS.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// A change to the user's data in storage, for [`Hook::Stored`], made by the module
/// that keeps that data (pep, private, vcard) once storage has it.
///
/// Modules that keep the same data in another form follow it here (bookmarks: XEP-0402
/// and XEP-0048; avatars: XEP-0084 and the vCard photo, XEP-0398). A hook rather than
/// calls from the storing modules into the converting ones: pep, private and vcard stay
/// unaware of who converts (the converters import them, never the other way round, so
/// there is no import cycle), and a converter is one more module in sm.xml.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The module that wrote it (a conversion); `None`: one of the user's clients. A
    /// module ignores the changes it made itself, so conversions do not echo.
    pub by: Option<&'static str>,
    pub what: Stored<'a>,
}

/// What changed ([`Change`]). XML is self-contained (its namespace declared).
#[derive(Debug, Clone, Copy)]
pub enum Stored<'a> {
    /// PEP: item `id` of node `node` published (new or replaced).
    PepPublished {
        node: &'a str,
        id: &'a str,
        payload: &'a str,
    },
    /// PEP: items retracted from node `node`.
    PepRetracted { node: &'a str, ids: &'a [String] },
    /// PEP: every item of node `node` removed: purged, or the node deleted.
    PepCleared { node: &'a str },
    /// XEP-0049 private XML storage: the element `<name xmlns=ns>` is now `xml`.
    Private {
        name: &'a str,
        ns: &'a str,
        xml: &'a str,
    },
    /// vcard-temp: the user's vCard is now `xml` (an empty `<vCard/>`: removed).
    VCard { xml: &'a str },
}

/// Where service discovery lists a feature or identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disco {
    /// The server (a domain sm serves).
    Server,
    /// Every account's bare JID.
    Account,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub category: &'static str,
    pub kind: &'static str,
    pub name: Option<&'static str>,
}

/// An IQ a module answers: type, to whom it is addressed, payload element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IqRoute {
    pub kind: IqKind,
    pub scopes: &'static [Scope],
    pub ns: &'static str,
    pub name: &'static str,
}

/// What a module takes part in, read once when sm starts.
#[derive(Debug, Default, Clone)]
pub struct Declaration {
    pub hooks: Vec<(Hook, Stanzas, i32)>,
    pub iqs: Vec<IqRoute>,
    pub features: Vec<(Disco, &'static str)>,
    pub identities: Vec<(Disco, Identity)>,
    /// Modules this one uses (their functions and state): sm refuses to start without.
    pub requires: Vec<&'static str>,
}

impl Declaration {
    /// Takes part in `hook` at `priority` (for the outbound and inbound chains: for
    /// every kind of stanza).
    pub fn hook(mut self, hook: Hook, priority: i32) -> Self {
        self.hooks.push((hook, Stanzas::All, priority));
        self
    }

    /// Takes part in the outbound or inbound chain for stanzas of kind `kind` only.
    pub fn stanzas(mut self, hook: Hook, kind: Stanzas, priority: i32) -> Self {
        self.hooks.push((hook, kind, priority));
        self
    }

    pub fn iq(
        mut self,
        kind: IqKind,
        scopes: &'static [Scope],
        ns: &'static str,
        name: &'static str,
    ) -> Self {
        self.iqs.push(IqRoute {
            kind,
            scopes,
            ns,
            name,
        });
        self
    }

    pub fn feature(mut self, at: Disco, var: &'static str) -> Self {
        self.features.push((at, var));
        self
    }

    pub fn identity(mut self, at: Disco, identity: Identity) -> Self {
        self.identities.push((at, identity));
        self
    }

    pub fn requires(mut self, module: &'static str) -> Self {
        self.requires.push(module);
        self
    }
}

/// A feature module. Every handler has a default that does nothing (or passes), so a
/// module writes only the ones its declaration names.
#[async_trait::async_trait]
pub trait Module: Send + Sync {
    /// The name that `<modules>` in sm.xml uses.
    fn name(&self) -> &'static str;

    fn declare(&self) -> Declaration;

    /// [`Hook::Outbound`]: a stanza from session `from`.
    async fn outbound(&self, _u: &mut User, _from: SessionKey, _p: &mut Packet) -> Flow {
        Flow::Pass
    }

    /// [`Hook::Inbound`]: a stanza to the user from the network (or from the user's own
    /// session to the user's own account).
    async fn inbound(&self, _u: &mut User, _p: &mut Packet) -> Flow {
        Flow::Pass
    }

    /// [`Hook::Delivered`]: message `p` went to sessions `to`.
    async fn delivered(&self, _u: &mut User, _p: &Packet, _to: &[SessionKey]) {}

    /// [`Hook::Undeliverable`]: no session takes message `p` now.
    async fn undeliverable(&self, _u: &mut User, _p: &Packet) -> Flow {
        Flow::Pass
    }

    async fn session_started(&self, _u: &mut User, _s: SessionKey) {}

    async fn session_ended(&self, _u: &mut User, _s: &Session) {}

    /// [`Hook::SessionRestored`]: session `s` was rebuilt from what its c2s kept (sm
    /// restarted); its presence, priority and availability are set already. No presence
    /// is broadcast for it: its contacts never saw it leave.
    async fn session_restored(&self, _u: &mut User, _s: SessionKey, _state: &SessionState) {}

    /// Adds to `state` what the module keeps about session `s` that its c2s would tell
    /// again in a `restore` (sent to c2s with `resumed`); the inverse of
    /// [`Module::session_restored`].
    fn session_state(&self, _s: &Session, _state: &mut SessionState) {}

    async fn initial_presence(&self, _u: &mut User, _s: SessionKey) {}

    async fn account_removing(&self, _u: &mut User) {}

    async fn account_removed(&self, _u: &mut User) {}

    /// [`Hook::Routing`]: `Handled` drops a stanza sm was about to send to `to`.
    fn routing(&self, _u: &User, _to: &Jid, _stanza: &[u8]) -> Flow {
        Flow::Pass
    }

    /// [`Hook::Delivering`]: `Handled` drops a stanza for session `s`.
    fn delivering(&self, _s: &mut Session, _stanza: &[u8]) -> Flow {
        Flow::Pass
    }

    /// [`Hook::Undelivered`]: the client of an ended session never got `p` (its `to` is
    /// that session's full JID, which is gone).
    async fn undelivered(&self, _u: &mut User, _p: &Packet) -> Flow {
        Flow::Pass
    }

    /// [`Hook::OfflineConfirmed`]: session `s`'s client has `count` more of the offline
    /// messages given to it.
    async fn offline_confirmed(&self, _u: &mut User, _s: SessionKey, _count: usize) {}

    /// [`Hook::Stored`]: the user's data in storage changed. What goes wrong here is
    /// the module's to log: the change itself is done and acknowledged.
    async fn stored(&self, _u: &mut User, _change: &Change<'_>) {}

    /// An IQ of one of the module's [`IqRoute`]s.
    async fn iq(&self, _u: &mut User, _iq: &Iq) -> Reply {
        Reply::not_handled()
    }

    /// Work the module left for later on this user comes due (`Event::Wake`).
    async fn woken(&self, _u: &mut User, _data: Wake) {}

    /// Puts what the module shares across users (a cache) into `shared`, once when sm
    /// starts.
    fn install(&self, _shared: &mut Shared) {}

    /// sm is stopping (SIGTERM): sends what the module held back to send later (the
    /// archive writer's batch) and waits, briefly, for it to be answered.
    async fn stopping(&self, _ctx: &Arc<Ctx>) {}

    /// What this module's hooks would do to a room's broadcast to the user (a
    /// `groupchat` message or an occupant's presence to a live session): if it would
    /// only pass it on, such broadcasts may reach the user's sessions without the user's
    /// task (`host::shortcut`). Asked on the user's task after each batch of events.
    fn room_broadcasts(&self, _u: &User) -> crate::host::broadcasts::Admit {
        crate::host::broadcasts::Admit::All
    }
}

/// The IQ routes of one payload namespace: (type, scope, element name, module).
type IqRoutes = Vec<(IqKind, Scope, &'static str, Arc<dyn Module>)>;

/// A chain being built: (priority, place in sm.xml, module).
type Ranked = Vec<(i32, usize, Arc<dyn Module>)>;

/// The loaded modules, arranged for dispatch.
pub struct Modules {
    all: Vec<Arc<dyn Module>>,
    /// By hook, then (outbound and inbound) by kind of stanza: see [`chain_index`].
    chains: Vec<Vec<Arc<dyn Module>>>,
    /// IQ routes by payload namespace.
    iqs: HashMap<&'static str, IqRoutes>,
    features: Vec<(Disco, &'static str)>,
    identities: Vec<(Disco, Identity)>,
}

impl Modules {
    /// Arranges `list` (in sm.xml order): chains sorted by priority, every IQ route
    /// owned by one module, every required module present.
    pub fn new(list: Vec<Arc<dyn Module>>) -> anyhow::Result<Modules> {
        let mut chains: Vec<Ranked> = vec![vec![]; Hook::ALL.len() * Stanzas::KINDS.len()];
        let mut iqs: HashMap<&'static str, IqRoutes> = HashMap::new();
        let mut features = vec![];
        let mut identities = vec![];
        let names: Vec<&str> = list.iter().map(|m| m.name()).collect();
        for (order, m) in list.iter().enumerate() {
            let d = m.declare();
            for r in &d.requires {
                if !names.contains(r) {
                    anyhow::bail!(
                        "module '{}' needs module '{r}': add it to <modules>",
                        m.name()
                    );
                }
            }
            for (hook, kinds, priority) in d.hooks {
                let per_kind = matches!(hook, Hook::Outbound | Hook::Inbound);
                for kind in Stanzas::KINDS.into_iter().filter(|k| kinds.covers(*k)) {
                    chains[chain_index(hook, kind)].push((priority, order, m.clone()));
                    if !per_kind {
                        break;
                    }
                }
            }
            for route in d.iqs {
                for scope in route.scopes {
                    let routes = iqs.entry(route.ns).or_default();
                    if let Some((.., other)) = routes
                        .iter()
                        .find(|(k, s, n, _)| (*k, s, *n) == (route.kind, scope, route.name))
                    {
                        anyhow::bail!(
                            "modules '{}' and '{}' both answer {:?} {{{}}}{} ({scope:?})",
                            other.name(),
                            m.name(),
                            route.kind,
                            route.ns,
                            route.name
                        );
                    }
                    routes.push((route.kind, *scope, route.name, m.clone()));
                }
            }
            for f in d.features {
                if !features.contains(&f) {
                    features.push(f);
                }
            }
            identities.extend(d.identities);
        }
        let chains = chains
            .into_iter()
            .map(|mut c| {
                c.sort_by_key(|(priority, order, _)| (-priority, *order));
                c.into_iter().map(|(_, _, m)| m).collect()
            })
            .collect();
        Ok(Modules {
            all: list,
            chains,
            iqs,
            features,
            identities,
        })
    }

    /// The modules of `hook` (other than the outbound and inbound chains), in order.
    pub fn chain(&self, hook: Hook) -> &[Arc<dyn Module>] {
        &self.chains[chain_index(hook, Stanzas::Message)]
    }

    /// The outbound or inbound chain for stanzas of kind `kind`, in order.
    pub fn stanza_chain(&self, hook: Hook, kind: Stanzas) -> &[Arc<dyn Module>] {
        &self.chains[chain_index(hook, kind)]
    }

    pub fn iq_handler(
        &self,
        kind: IqKind,
        scope: Scope,
        ns: &str,
        name: &str,
    ) -> Option<&Arc<dyn Module>> {
        self.iqs
            .get(ns)?
            .iter()
            .find(|(k, s, n, _)| *k == kind && *s == scope && *n == name)
            .map(|(.., m)| m)
    }

    /// Every loaded module, in load order.
    pub fn all(&self) -> &[Arc<dyn Module>] {
        &self.all
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.all.iter().map(|m| m.name()).collect()
    }

    /// The loaded module called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Module>> {
        self.all.iter().find(|m| m.name() == name)
    }

    /// Features listed at `at`, in load order.
    pub fn features(&self, at: Disco) -> impl Iterator<Item = &'static str> + '_ {
        self.features
            .iter()
            .filter(move |(a, _)| *a == at)
            .map(|(_, f)| *f)
    }

    pub fn identities(&self, at: Disco) -> impl Iterator<Item = &Identity> + '_ {
        self.identities
            .iter()
            .filter(move |(a, _)| *a == at)
            .map(|(_, i)| i)
    }
}

/// Where the chain of `hook` for stanzas of `kind` is. Hooks that are not about one
/// stanza keep their one chain in the first kind's place.
fn chain_index(hook: Hook, kind: Stanzas) -> usize {
    let kind = match hook {
        Hook::Outbound | Hook::Inbound => kind,
        _ => Stanzas::Message,
    };
    hook.index() * Stanzas::KINDS.len() + kind.index()
}

/// What every part of sm shares.
pub struct Ctx {
    pub config: SmConfig,
    /// Our component name (`sm`, `sm-2`): the `from` of session packets.
    pub me: String,
    pub store: Store,
    pub accounts: Accounts,
    pub users: Registry,
    pub modules: Modules,
    /// Components connected to the router (for disco#items).
    pub components: Components,
    /// When this process started (server uptime for XEP-0012).
    pub started: Instant,
    /// Refusals for full user queues, logged once per burst.
    pub overload: Overload,
    /// Sessions parked (hibernating) in this process.
    pub parked: AtomicUsize,
    /// The users whose hibernating sessions have their queues in storage.
    pub hibernated: crate::host::hibernated::Index,
    /// IQs sm sent from a served domain, waiting for their answers.
    pub requests: Requests,
    /// What modules share across users.
    pub shared: Shared,
    /// Live sessions that room broadcasts may reach without their user's task.
    pub shortcuts: Arc<crate::host::broadcasts::Shortcuts>,
    link: Mutex<Option<Outbox>>,
}

impl Ctx {
    pub fn new(config: SmConfig, me: String, store: Store, modules: Modules) -> Ctx {
        let mut shared = Shared::default();
        for m in &modules.all {
            m.install(&mut shared);
        }
        Ctx {
            requests: Requests::default(),
            shared,
            accounts: Accounts::new(config.accounts_cache, config.accounts_ttl),
            users: Registry::default(),
            shortcuts: Default::default(),
            components: Components::default(),
            started: Instant::now(),
            overload: Overload::default(),
            parked: AtomicUsize::new(0),
            hibernated: Default::default(),
            link: Mutex::new(None),
            modules,
            store,
            me,
            config,
        }
    }

    /// Uses a new router link (after every connect).
    pub fn set_link(&self, outbox: Outbox) {
        if let Some(x) = self.store.xdb() {
            x.set_outbox(outbox.clone());
        }
        *self.link.lock().expect("link lock") = Some(outbox);
    }

    /// Queues a packet for the router. Lost (and logged) while the link is down.
    pub fn send(&self, bytes: impl Into<Bytes>) {
        let sent = match &*self.link.lock().expect("link lock") {
            Some(outbox) => outbox.send(bytes),
            None => false,
        };
        if !sent {
            warn!("router link down: a packet was dropped");
        }
    }

    /// Sends `<iq type=kind from=from to=to>payload</iq>` and waits up to `wait` for the
    /// answer (a result or an error stanza); `None` if none came in time.
    pub async fn ask(
        &self,
        kind: &str,
        from: &str,
        to: &str,
        payload: &str,
        wait: std::time::Duration,
    ) -> Option<Stanza> {
        use jrs_stream::xml::escape;
        let (id, answer) = self.requests.register(to);
        self.send(format!(
            "<iq type='{kind}' id='{id}' from='{}' to='{}'>{payload}</iq>",
            escape(from),
            escape(to)
        ));
        let answer = tokio::time::timeout(wait, answer).await;
        self.requests.forget(&id);
        answer.ok()?.ok()
    }

    /// Queues several packets for the router under one lock.
    pub fn send_all(&self, packets: impl IntoIterator<Item = Bytes>) {
        let guard = self.link.lock().expect("link lock");
        let mut lost = 0;
        for p in packets {
            if !guard.as_ref().is_some_and(|o| o.send(p)) {
                lost += 1;
            }
        }
        if lost > 0 {
            warn!(lost, "router link down: packets were dropped");
        }
    }
}

/// One user, as the user's task holds it while it handles the user's events.
pub struct User {
    pub ctx: Arc<Ctx>,
    pub jid: BareJid,
    /// The bare JID as text.
    pub bare: String,
    pub sessions: Vec<Session>,
    /// What modules keep about the user (roster, blocklist, archive state, ...).
    pub state: State,
    /// The account was removed while this task ran: store nothing more for it.
    pub removed: bool,
    /// What the handlers produced, sent after each batch of events.
    pub out: Out,
    /// Held sessions whose queue overflowed: ended after the current event.
    pub overflowed: Vec<SessionKey>,
    /// What is written to storage of the hibernating sessions' queues.
    pub hibernation: crate::host::hibernated::Written,
    next_key: SessionKey,
    next_id: u64,
}

impl User {
    pub fn new(ctx: Arc<Ctx>, jid: BareJid) -> User {
        User {
            bare: jid.to_string(),
            ctx,
            jid,
            sessions: vec![],
            state: State::default(),
            removed: false,
            out: Out::default(),
            overflowed: vec![],
            hibernation: Default::default(),
            next_key: 0,
            next_id: 0,
        }
    }

    /// A fresh id for stanzas sm originates (roster and blocklist pushes).
    pub fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("sm{}", self.next_id)
    }

    pub fn session(&self, key: SessionKey) -> Option<&Session> {
        self.sessions.iter().find(|s| s.key == key)
    }

    pub fn session_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        self.sessions.iter_mut().find(|s| s.key == key)
    }

    /// The session `r` names, if it is one of ours.
    pub fn find(&self, r: &SessionRef) -> Option<SessionKey> {
        self.sessions.iter().find(|s| s.is(r)).map(|s| s.key)
    }

    pub fn find_resource(&self, full: &FullJid) -> Option<SessionKey> {
        self.sessions.iter().find(|s| &s.jid == full).map(|s| s.key)
    }

    /// Sessions that sent initial presence.
    pub fn available(&self) -> Vec<SessionKey> {
        self.sessions
            .iter()
            .filter(|s| s.available)
            .map(|s| s.key)
            .collect()
    }

    pub fn add_session(&mut self, r: &SessionRef) -> SessionKey {
        self.next_key += 1;
        // Most users have one or two sessions: grow one at a time, not to four (memory
        // per connection).
        self.sessions.reserve_exact(1);
        self.sessions.push(Session::new(self.next_key, r));
        self.next_key
    }

    pub fn remove_session(&mut self, key: SessionKey) -> Option<Session> {
        let at = self.sessions.iter().position(|s| s.key == key)?;
        Some(self.sessions.remove(at))
    }

    /// Whether `jid` is this user's bare JID or one of its full JIDs.
    pub fn is_same_user(&self, jid: &Jid) -> bool {
        jid.node() == self.jid.node() && jid.domain() == self.jid.domain()
    }

    /// Whether `jid` is exactly this user's bare JID.
    pub fn is_self(&self, jid: &Jid) -> bool {
        jid.resource().is_none() && self.is_same_user(jid)
    }

    /// Whether the account exists: yes while it has sessions, else storage (cached).
    pub async fn exists(&self) -> Result<bool, jrs_xdb::XdbError> {
        if !self.sessions.is_empty() {
            return Ok(true);
        }
        if self.removed {
            return Ok(false);
        }
        self.ctx.accounts.exists(&self.ctx.store, &self.bare).await
    }

    /// Hands `stanza` to session `key` (unless a [`Hook::Delivering`] filter drops it).
    pub fn deliver(&mut self, key: SessionKey, stanza: impl Into<Bytes>) {
        self.deliver_queued(key, Queued::new(stanza.into()));
    }

    /// Delivers a message from offline storage: the client confirms it (then it is
    /// removed from storage, [`Hook::OfflineConfirmed`]).
    pub fn deliver_offline(&mut self, key: SessionKey, stanza: impl Into<Bytes>) {
        self.deliver_queued(
            key,
            Queued {
                bytes: stanza.into(),
                offline: true,
            },
        );
    }

    /// Hands a stanza to session `key`: to its c2s, or to its queue while it is held
    /// (hibernating or being handed over).
    fn deliver_queued(&mut self, key: SessionKey, item: Queued) {
        let ctx = &self.ctx;
        let Some(s) = self.sessions.iter_mut().find(|s| s.key == key) else {
            return;
        };
        for m in ctx.modules.chain(Hook::Delivering) {
            if m.delivering(s, &item.bytes) == Flow::Handled {
                return;
            }
        }
        match &mut s.link {
            Link::Live => {
                let to = s.reference();
                self.out.push(Output::Deliver {
                    to,
                    stanza: item.bytes,
                    offline: item.offline,
                });
            }
            Link::Held(held) => {
                if let (Some(_), Some(token)) = (&held.parked, &s.resume_token) {
                    self.hibernation.queued(token, &s.full, &item);
                }
                held.items.push(item);
                let full = held
                    .parked
                    .as_ref()
                    .is_some_and(|p| held.items.len() > p.max);
                if full && !self.overflowed.contains(&key) {
                    self.overflowed.push(key);
                }
            }
        }
    }

    /// Sends `stanza`, addressed to `to`, to the router on the user's behalf (unless a
    /// [`Hook::Routing`] filter drops it).
    pub fn route(&mut self, to: &Jid, stanza: impl Into<Bytes>) {
        let stanza = stanza.into();
        if self.routing_allows(to, &stanza) {
            self.out.push(Output::Route(stanza));
        }
    }

    /// [`User::route`] for a stanza already parsed: local delivery does not parse it again.
    pub fn route_stanza(&mut self, to: &Jid, stanza: Stanza) {
        if self.routing_allows(to, stanza.bytes()) {
            self.out.push(Output::RouteStanza(stanza));
        }
    }

    /// Whether no [`Hook::Routing`] filter drops `stanza` for `to`.
    fn routing_allows(&self, to: &Jid, stanza: &[u8]) -> bool {
        self.ctx
            .modules
            .chain(Hook::Routing)
            .iter()
            .all(|m| m.routing(self, to, stanza) == Flow::Pass)
    }

    /// Sends a packet to the router unfiltered: answers to requests from the network,
    /// session control packets.
    pub fn send(&mut self, bytes: impl Into<Bytes>) {
        self.out.push(Output::Route(bytes.into()));
    }

    /// Answers `request` with an error (never an error to an error).
    pub fn refuse(
        &mut self,
        request: &Stanza,
        condition: jrs_stream::StanzaErrorCondition,
        text: &str,
    ) {
        if let Some(reply) = request.error_reply(condition, text) {
            self.send(reply);
        }
    }

    /// The current presence of each available resource, to `contact` (a new
    /// subscriber, RFC 6121 3.1.5; an unblocked contact, XEP-0191).
    pub fn send_presence_to(&mut self, contact: &Jid) {
        let to = contact.to_string();
        let presences: Vec<String> = self
            .sessions
            .iter()
            .filter(|s| s.available)
            .filter_map(|s| s.presence.clone())
            .map(|mut p| {
                p.set_attr("to", to.clone());
                p.to_stanza()
            })
            .collect();
        for p in presences {
            self.route(contact, p);
        }
    }

    /// Unavailable presence from each available resource, to `contact` (a subscription
    /// cancelled, RFC 6121 3.2.2; a blocked contact, XEP-0191).
    pub fn send_unavailable_to(&mut self, contact: &Jid) {
        let to = contact.to_string();
        let presences: Vec<String> = self
            .sessions
            .iter()
            .filter(|s| s.available)
            .map(|s| crate::stanzas::presence(Some("unavailable"), &s.full, &to).to_stanza())
            .collect();
        for p in presences {
            self.route(contact, p);
        }
    }
}
