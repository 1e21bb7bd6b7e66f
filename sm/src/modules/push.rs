//! Push Notifications (XEP-0357, `urn:xmpp:push:0`): a client registers an app server
//! (`<enable jid= node=>`, with an optional publish-options form) so that sm tells it
//! when a message comes while the user cannot be reached: every session hibernating
//! (XEP-0198, held here) or no session at all. The app server wakes the device through
//! its platform's push service, and the client resumes or logs in.
//!
//! - **Which messages**: chat and normal ones a client shows: a body, or an encrypted
//!   payload, a direct MUC invitation, a call proposal; a room's message to a
//!   hibernating occupant. Never errors, headlines, or receipts, chat states and markers
//!   alone.
//! - **The notification** (XEP-0357 section 5): a pubsub publish to the registration's
//!   node, from the user's bare JID, holding the `urn:xmpp:push:summary` form (messages
//!   since the user was last online, the last sender, and the last body only for
//!   registrations that asked for it), with the enable's form as publish-options.
//! - **Asking for the body**: the enable form's field [`INCLUDE_BODY`] (a boolean, taken
//!   out of what goes to the app server); without it, `<push include-body>` of sm.xml
//!   (default false: the app server, and the platform's push service behind it, never
//!   see what people write).
//! - **Counting**: the count starts again when the user is back: a session starts (seen
//!   by the next notification as a logout since the last one: `logout-seen`, the `last`
//!   module's record, so a login reads nothing here; without `last`, read and reset at
//!   session start), a message comes while a session is live, a hibernating session the
//!   last notification was about was resumed since (it is parked again, or was handed a
//!   stanza while live), or a session that was live since then ends.
//! - **Failures**: an app server that answers `<push failures>` notifications in a row
//!   with an error loses its registration; a result resets the count. Answers come back
//!   to the user's bare JID, recognised by the ids sm gave the notifications.
//!
//! Stored under `urn:xmpp:push:0` as `<push xmlns='urn:xmpp:push:0' count='N'
//! logout-seen='MICROSECONDS|none'>` with
//! one `<registration jid= node= include-body= failures=>` (holding the publish-options
//! form) per app server node; `count` is kept there because the user's task, and its
//! memory, ends with the user's last session.

use std::fmt::Write as _;
use std::sync::Arc;

use jid::{BareJid, Jid};
use tracing::{debug, info, warn};
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field};
use xmpp_parsers::ns::PUSH as NS_PUSH;
use xmpp_parsers::pubsub::pubsub::{Item, PubSub, Publish, PublishOptions};
use xmpp_parsers::pubsub::NodeName;
use xmpp_parsers::push::{Disable, Enable, Notification};

use jrs_stream::xml::escape;
use jrs_stream::StanzaErrorCondition;
use jrs_xdb::XdbError;

use crate::config::{positive, SmConfig};
use crate::host::session::Link;
use crate::host::{
    storage_error, Declaration, Disco, Flow, Hook, Iq, IqKind, Module, Packet, Reply, Scope,
    Session, SessionKey, Stanzas, User,
};
use crate::xml::{Element, NS_CLIENT};

/// The enable form field by which a client asks for message bodies in its
/// notifications (`true`/`1` or `false`/`0`). sm's own, so it is not sent on.
pub const INCLUDE_BODY: &str = "urn:jabberd-rs:push:0#include-body";
const SUMMARY: &str = "urn:xmpp:push:summary";
const PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";
/// The ids of notifications: `push-TAG-N`, TAG naming the registration.
const ID_PREFIX: &str = "push-";
/// Bounds on what one registration stores.
const NODE_MAX: usize = 1023;
const FORM_MAX: usize = 4096;
/// Characters of a body a notification carries at most.
const BODY_MAX: usize = 512;
/// Payloads a client shows although the message has no body: OMEMO and OpenPGP
/// encrypted messages, direct MUC invitations (XEP-0249), call proposals (XEP-0353).
const SHOWN: [(&str, &str); 6] = [
    ("encrypted", "eu.siacs.conversations.axolotl"),
    ("encrypted", "urn:xmpp:omemo:2"),
    ("openpgp", "urn:xmpp:openpgp:0"),
    ("x", "jabber:x:encrypted"),
    ("x", "jabber:x:conference"),
    ("propose", "urn:xmpp:jingle-message:0"),
];

pub struct Push {
    max_registrations: usize,
    /// Error answers in a row that disable a registration.
    max_failures: usize,
    /// Whether notifications carry the body when the enable form does not say.
    include_body: bool,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut push = Push {
        max_registrations: 5,
        max_failures: 3,
        include_body: false,
    };
    if let Some(n) = config.module_settings("push")? {
        n.allow(&["max-registrations", "failures", "include-body"], &[])?;
        push.max_registrations = positive(n, "max-registrations", push.max_registrations)?;
        push.max_failures = positive(n, "failures", push.max_failures)?;
        push.include_body = n.bool_attr("include-body", push.include_body)?;
    }
    Ok(Arc::new(push))
}

/// One app server node the user's notifications go to.
#[derive(Debug, Clone, PartialEq)]
struct Registration {
    jid: BareJid,
    node: String,
    /// Sent as publish-options with every notification ([`INCLUDE_BODY`] taken out).
    form: Option<DataForm>,
    body: bool,
    /// Error answers in a row.
    failures: usize,
}

impl Registration {
    fn is(&self, jid: &BareJid, node: &str) -> bool {
        &self.jid == jid && self.node == node
    }

    /// Names the registration in its notifications' ids, so an answer finds it even
    /// in a later task of the user (FNV-1a: the same in every process).
    fn tag(&self) -> u64 {
        let bytes = self
            .jid
            .as_str()
            .bytes()
            .chain([0])
            .chain(self.node.bytes());
        bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// The user's registrations and message count, as stored (cached on the user while
/// the task runs).
#[derive(Debug, Default, Clone, PartialEq)]
struct Record {
    registrations: Vec<Registration>,
    /// Messages notified since the user was last online.
    count: u64,
    /// The user's last logout (`last::logout_time`) when the count was last raised:
    /// `Some(None)` when none was recorded; `None` in records from before it was kept.
    /// Another logout since means the user was back: the count starts again.
    seen_logout: Option<Option<u64>>,
}

impl Record {
    fn parse(stored: &[u8]) -> Record {
        if stored.iter().all(u8::is_ascii_whitespace) {
            return Record::default();
        }
        let root = match std::str::from_utf8(stored)
            .map_err(|e| e.to_string())
            .and_then(|s| s.parse::<minidom::Element>().map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                warn!("stored push registrations unreadable, taken as none: {e}");
                return Record::default();
            }
        };
        let registrations = root
            .children()
            .filter(|r| r.is("registration", NS_PUSH))
            .filter_map(|r| {
                Some(Registration {
                    jid: BareJid::new(r.attr("jid")?).ok()?,
                    node: r.attr("node")?.to_owned(),
                    form: r
                        .children()
                        .find(|f| f.is("x", xmpp_parsers::ns::DATA_FORMS))
                        .and_then(|f| DataForm::try_from(f.clone()).ok()),
                    body: r.attr("include-body") == Some("true"),
                    failures: r.attr("failures").and_then(|f| f.parse().ok()).unwrap_or(0),
                })
            })
            .collect();
        Record {
            registrations,
            count: root.attr("count").and_then(|c| c.parse().ok()).unwrap_or(0),
            seen_logout: root.attr("logout-seen").map(|t| t.parse().ok()),
        }
    }

    fn to_storage(&self) -> String {
        let mut s = format!("<push xmlns='{NS_PUSH}' count='{}'", self.count);
        match self.seen_logout {
            Some(Some(t)) => {
                let _ = write!(s, " logout-seen='{t}'");
            }
            Some(None) => s.push_str(" logout-seen='none'"),
            None => {}
        }
        s.push('>');
        for r in &self.registrations {
            let _ = write!(
                s,
                "<registration jid='{}' node='{}' include-body='{}' failures='{}'",
                escape(r.jid.as_str()),
                escape(&r.node),
                r.body,
                r.failures
            );
            match &r.form {
                Some(f) => {
                    s.push('>');
                    s.push_str(&form_xml(f));
                    s.push_str("</registration>");
                }
                None => s.push_str("/>"),
            }
        }
        s.push_str("</push>");
        s
    }
}

fn form_xml(form: &DataForm) -> String {
    String::from(&minidom::Element::from(form.clone()))
}

/// Set on every session a notification was sent for: the parking it was sent during
/// (`None`: the session was still being handed over). A session without it, or parked
/// again since, was online after the notification: the count starts again.
#[derive(Debug)]
struct Notified(Option<u64>);

/// The number of the session's current parking, if it is parked.
fn parking(s: &Session) -> Option<u64> {
    match &s.link {
        Link::Held(h) => h.parked.as_ref().map(|p| p.generation),
        Link::Live => None,
    }
}

/// Whether session `s` stayed away since the last notification.
fn away_since_notified(s: &Session) -> bool {
    match s.state.get::<Notified>() {
        Some(Notified(None)) => !s.is_live(),
        Some(Notified(at)) => *at == parking(s),
        None => false,
    }
}

/// The registrations, loaded from storage on first use.
async fn load(u: &mut User) -> Result<&mut Record, XdbError> {
    if u.state.get::<Record>().is_none() {
        let stored = u.ctx.store.get(&u.bare, NS_PUSH).await?;
        u.state.insert(Record::parse(&stored));
    }
    Ok(u.state.get_mut::<Record>().expect("loaded above"))
}

/// Writes the cached record. If that fails the cache is dropped (the next use reads
/// storage again), so memory never runs ahead of what is stored.
async fn save(u: &mut User) -> Result<(), XdbError> {
    if u.removed {
        return Ok(());
    }
    let Some(record) = u.state.get_mut::<Record>() else {
        return Ok(());
    };
    if record.registrations.is_empty() {
        record.count = 0;
    }
    let record = &*record;
    let result = if record.registrations.is_empty() {
        u.ctx.store.delete(&u.bare, NS_PUSH).await
    } else {
        let data = record.to_storage();
        let max = u.ctx.config.fragment_max();
        if data.len() > max {
            Err(crate::stanzas::too_large("the push registrations", max))
        } else {
            u.ctx.store.set(&u.bare, NS_PUSH, data).await
        }
    };
    if result.is_err() {
        u.state.remove::<Record>();
    }
    result
}

/// The user is online: the message count starts again.
async fn reset(u: &mut User) {
    match u.state.get_mut::<Record>() {
        Some(r) if r.count > 0 => r.count = 0,
        _ => return,
    }
    if let Err(e) = save(u).await {
        warn!("push message count not reset in storage: {e}");
    }
}

/// Whether the count restarts by the logout time the `last` module keeps, rather than
/// by a read of the registrations at every session start (a storage read per login,
/// for the few users with registrations; docs/benchmarks.md, "Push registrations read
/// when needed").
fn counts_by_logout(u: &User) -> bool {
    u.ctx.modules.get("last").is_some()
}

/// Which logout was the user's last (`Some(None)`: none recorded), when the count
/// restarts by it; `None` without the `last` module or when storage cannot say (the
/// count then goes on).
async fn last_logout(u: &User) -> Option<Option<u64>> {
    if !counts_by_logout(u) {
        return None;
    }
    match crate::modules::last::logout_time(u).await {
        Ok(logout) => Some(logout),
        Err(e) => {
            warn!("last logout time unavailable, the push count goes on: {e}");
            None
        }
    }
}

/// Whether a message is one a chat client shows (XEP-0357 leaves the choice to the
/// server): chat or normal, with a body or another payload shown to the user.
fn notable(p: &Packet) -> bool {
    if p.name() != "message" {
        return false;
    }
    match p.kind().unwrap_or("normal") {
        "chat" | "normal" => p.has_body() || SHOWN.iter().any(|(name, ns)| p.has(name, ns)),
        // A room's message to a hibernating session of an occupant (mobile clients
        // stay in their rooms while asleep); not a subject change.
        "groupchat" => p.has_body() && p.to.as_ref().is_some_and(|t| t.resource().is_some()),
        _ => false,
    }
}

/// The message's (first) body, cut to [`BODY_MAX`] characters.
fn body_text(p: &Packet) -> Option<String> {
    let child = p.child("body", NS_CLIENT)?;
    let body = Element::parse(p.child_bytes(child), NS_CLIENT).ok()?.text();
    Some(body.chars().take(BODY_MAX).collect())
}

/// The registration tag in a notification's id.
fn id_tag(id: &str) -> Option<u64> {
    let (tag, _) = id.strip_prefix(ID_PREFIX)?.split_once('-')?;
    u64::from_str_radix(tag, 16).ok()
}

/// The `<iq type='set'>` publishing a notification to registration `r` (XEP-0357
/// section 5).
fn notification(
    from: &str,
    r: &Registration,
    id: &str,
    count: u64,
    sender: Option<&str>,
    body: Option<&str>,
) -> String {
    let mut fields = vec![Field::text_single("message-count", &count.to_string())];
    if let Some(sender) = sender {
        fields.push(Field::text_single("last-message-sender", sender));
    }
    if let Some(body) = body {
        fields.push(Field::text_single("last-message-body", body));
    }
    let summary = Notification {
        form: Some(DataForm::new(DataFormType::Form, SUMMARY, fields)),
        payloads: vec![],
    };
    let pubsub = PubSub::Publish {
        publish: Publish {
            node: NodeName(r.node.clone()),
            items: vec![Item {
                id: None,
                publisher: None,
                payload: Some(summary.into()),
            }],
        },
        publish_options: r.form.clone().map(|f| PublishOptions { form: Some(f) }),
    };
    format!(
        "<iq type='set' from='{}' to='{}' id='{}'>{}</iq>",
        escape(from),
        escape(r.jid.as_str()),
        escape(id),
        String::from(&minidom::Element::from(pubsub))
    )
}

/// The defined condition of an error answer, for the log.
fn condition(p: &Packet) -> String {
    p.child("error", NS_CLIENT)
        .and_then(|e| Element::parse(p.child_bytes(e), NS_CLIENT).ok())
        .and_then(|e| {
            e.elements()
                .find(|c| c.local_name() != "text")
                .map(|c| c.local_name().to_owned())
        })
        .unwrap_or_default()
}

impl Push {
    /// The enable form: what goes to the app server as publish-options (without
    /// [`INCLUDE_BODY`], and nothing when only FORM_TYPE is left), and whether
    /// notifications carry the body.
    fn options(&self, form: Option<DataForm>) -> Result<(Option<DataForm>, bool), Reply> {
        let Some(mut form) = form else {
            return Ok((None, self.include_body));
        };
        if form.type_ != DataFormType::Submit || form.form_type() != Some(PUBLISH_OPTIONS) {
            return Err(Reply::error(
                StanzaErrorCondition::BadRequest,
                format!(
                    "the <enable/> form must be a submitted {PUBLISH_OPTIONS} form (XEP-0357 5)"
                ),
            ));
        }
        let mut body = self.include_body;
        if let Some(at) = form
            .fields
            .iter()
            .position(|f| f.var.as_deref() == Some(INCLUDE_BODY))
        {
            body = match form.fields.remove(at).values.first().map(String::as_str) {
                Some("1" | "true") => true,
                Some("0" | "false") => false,
                _ => {
                    return Err(Reply::error(
                        StanzaErrorCondition::BadRequest,
                        format!("field '{INCLUDE_BODY}' takes true or false"),
                    ))
                }
            };
        }
        if !form
            .fields
            .iter()
            .any(|f| f.var.as_deref() != Some("FORM_TYPE"))
        {
            return Ok((None, body));
        }
        if form_xml(&form).len() > FORM_MAX {
            return Err(Reply::error(
                StanzaErrorCondition::NotAcceptable,
                format!("the publish options are limited to {FORM_MAX} bytes"),
            ));
        }
        Ok((Some(form), body))
    }

    async fn enable(&self, u: &mut User, iq: &Iq) -> Reply {
        let enable = match iq.parse::<Enable>() {
            Ok(e) => e,
            Err(r) => return r,
        };
        let Some(node) = enable.node.filter(|n| !n.is_empty()) else {
            return Reply::error(
                StanzaErrorCondition::BadRequest,
                "<enable/> needs the 'node' the app server provisioned (XEP-0357 5)",
            );
        };
        if node.len() > NODE_MAX {
            return Reply::error(
                StanzaErrorCondition::NotAcceptable,
                format!("the node is limited to {NODE_MAX} bytes"),
            );
        }
        let (form, body) = match self.options(enable.form) {
            Ok(o) => o,
            Err(r) => return r,
        };
        let record = match load(u).await {
            Ok(r) => r,
            Err(e) => return storage_error(&e),
        };
        // Enabling again replaces the registration (new options); past the limit the
        // oldest gives way (a reinstalled app registers anew and leaves its old one).
        record.registrations.retain(|r| !r.is(&enable.jid, &node));
        record.registrations.push(Registration {
            jid: enable.jid.clone(),
            node,
            form,
            body,
            failures: 0,
        });
        let excess = record
            .registrations
            .len()
            .saturating_sub(self.max_registrations);
        let gone: Vec<Registration> = record.registrations.drain(..excess).collect();
        let total = record.registrations.len();
        if let Err(e) = save(u).await {
            warn!("push registration not stored: {e}");
            return storage_error(&e);
        }
        for g in gone {
            info!(app_server = %g.jid, "push registration removed: too many for this account (the oldest gives way)");
        }
        info!(app_server = %enable.jid, body, registrations = total, "push notifications enabled");
        Reply::empty()
    }

    async fn disable(&self, u: &mut User, iq: &Iq) -> Reply {
        let disable = match iq.parse::<Disable>() {
            Ok(d) => d,
            Err(r) => return r,
        };
        let record = match load(u).await {
            Ok(r) => r,
            Err(e) => return storage_error(&e),
        };
        let before = record.registrations.len();
        // Without a node: every node of that app server (XEP-0357 6).
        record.registrations.retain(|r| {
            r.jid != disable.jid || disable.node.as_deref().is_some_and(|n| n != r.node)
        });
        let removed = before - record.registrations.len();
        if removed > 0 {
            if let Err(e) = save(u).await {
                warn!("push registrations not removed from storage: {e}");
                return storage_error(&e);
            }
        }
        info!(app_server = %disable.jid, removed, "push notifications disabled");
        Reply::empty()
    }

    /// A message for the user: notifies the app servers if no session is online.
    async fn message(&self, u: &mut User, p: &Packet) {
        if u.sessions.iter().any(Session::is_live) {
            reset(u).await;
            return;
        }
        let back_since = !u.sessions.iter().all(away_since_notified);
        let record = match load(u).await {
            Ok(r) => r,
            Err(e) => {
                warn!("push registrations unavailable, no notification sent: {e}");
                return;
            }
        };
        if record.registrations.is_empty() {
            return;
        }
        let logout = last_logout(u).await;
        let record = u.state.get_mut::<Record>().expect("loaded above");
        // The user logged out again since the last notification: back in between.
        let logged_out_since =
            matches!((record.seen_logout, logout), (Some(seen), Some(now)) if seen != now);
        if back_since || logged_out_since {
            record.count = 0;
        }
        record.count += 1;
        if logout.is_some() {
            record.seen_logout = logout;
        }
        let count = record.count;
        let registrations = record.registrations.clone();
        for s in &mut u.sessions {
            let at = parking(s);
            s.state.insert(Notified(at));
        }
        let sender = p.from.as_ref().map(|f| f.to_string());
        let body = if registrations.iter().any(|r| r.body) {
            body_text(p)
        } else {
            None
        };
        for r in &registrations {
            let id = format!("{ID_PREFIX}{:016x}-{}", r.tag(), u.next_id());
            let body = body.as_deref().filter(|_| r.body);
            let stanza = notification(&u.bare, r, &id, count, sender.as_deref(), body);
            u.route(&Jid::from(r.jid.clone()), stanza);
        }
        debug!(
            count,
            app_servers = registrations.len(),
            "push notifications sent"
        );
        if let Err(e) = save(u).await {
            warn!("push message count not stored: {e}");
        }
    }

    /// An IQ answer to the user's bare JID: if it answers a notification, counts the
    /// app server's failures.
    async fn answer(&self, u: &mut User, p: &Packet) -> Flow {
        let failed = match p.kind() {
            Some("result") => false,
            Some("error") => true,
            _ => return Flow::Pass,
        };
        let Some(tag) = p.stanza().attr("id").and_then(|id| id_tag(&id)) else {
            return Flow::Pass;
        };
        let (Some(to), Some(from)) = (&p.to, &p.from) else {
            return Flow::Pass;
        };
        if !u.is_self(to) {
            return Flow::Pass;
        }
        let from = from.to_bare();
        let max = self.max_failures;
        let record = match load(u).await {
            Ok(r) => r,
            Err(e) => {
                warn!(app_server = %from, "push registrations unavailable, answer not counted: {e}");
                return Flow::Handled;
            }
        };
        let Some(at) = record
            .registrations
            .iter()
            .position(|r| r.jid == from && r.tag() == tag)
        else {
            debug!(app_server = %from, "answer for a push registration that is gone");
            return Flow::Handled;
        };
        let r = &mut record.registrations[at];
        if !failed {
            if r.failures == 0 {
                return Flow::Handled;
            }
            r.failures = 0;
        } else {
            r.failures += 1;
            let (failures, condition) = (r.failures, condition(p));
            if failures >= max {
                record.registrations.remove(at);
                warn!(app_server = %from, failures, condition, "push registration disabled: the app server keeps answering with errors");
            } else {
                debug!(app_server = %from, failures, condition, "push notification refused by the app server");
            }
        }
        if let Err(e) = save(u).await {
            warn!("push registrations not stored: {e}");
        }
        Flow::Handled
    }
}

#[async_trait::async_trait]
impl Module for Push {
    fn name(&self) -> &'static str {
        "push"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(IqKind::Set, &[Scope::Own, Scope::Server], NS_PUSH, "enable")
            .iq(
                IqKind::Set,
                &[Scope::Own, Scope::Server],
                NS_PUSH,
                "disable",
            )
            // XEP-0357 4: the user's server advertises support on the account.
            .feature(Disco::Account, NS_PUSH)
            // Just before delivery (messages, 0), after blocking and carbons' marker
            // removal; IQ answers to the bare JID before they are dropped.
            .stanzas(Hook::Inbound, Stanzas::Message, 50)
            .stanzas(Hook::Inbound, Stanzas::Iq, 50)
            .hook(Hook::SessionStarted, 0)
            .hook(Hook::SessionEnded, 0)
            .hook(Hook::Delivering, 0)
            .hook(Hook::AccountRemoving, 0)
            .hook(Hook::AccountRemoved, 0)
    }

    /// A session notified while away clears its mark on its next delivery
    /// ([`Hook::Delivering`]): until then room broadcasts go through the user's task.
    fn room_broadcasts(&self, u: &User) -> crate::host::broadcasts::Admit {
        if u.sessions
            .iter()
            .any(|s| s.state.get::<Notified>().is_some())
        {
            crate::host::broadcasts::Admit::None
        } else {
            crate::host::broadcasts::Admit::All
        }
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        if iq.session.is_none() {
            return Reply::error(
                StanzaErrorCondition::NotAllowed,
                "push notifications are enabled by the user's own clients",
            );
        }
        if iq.payload.name() == "enable" {
            self.enable(u, iq).await
        } else {
            self.disable(u, iq).await
        }
    }

    async fn inbound(&self, u: &mut User, p: &mut Packet) -> Flow {
        if p.name() == "iq" {
            return self.answer(u, p).await;
        }
        if notable(p) {
            self.message(u, p).await;
        }
        Flow::Pass
    }

    /// A new session is the user online: the count starts again. With the `last`
    /// module that needs no read here: the next notification sees that the user
    /// logged out again since the last one ([`last_logout`]); without it, the record is
    /// read and its count reset now.
    async fn session_started(&self, u: &mut User, _s: SessionKey) {
        if counts_by_logout(u) {
            return;
        }
        match load(u).await {
            Ok(_) => reset(u).await,
            Err(e) => warn!("push registrations unavailable: {e}"),
        }
    }

    /// A session that ends after it was online since the last notification (it lost
    /// its mark): the user was online.
    async fn session_ended(&self, u: &mut User, s: &Session) {
        if s.state.get::<Notified>().is_none() {
            reset(u).await;
        }
    }

    /// A stanza handed to a live session: its client is back (a resumed session loses
    /// its mark).
    fn delivering(&self, s: &mut Session, _stanza: &[u8]) -> Flow {
        if s.is_live() && s.state.get::<Notified>().is_some() {
            s.state.remove::<Notified>();
        }
        Flow::Pass
    }

    /// Nothing is written back while the account goes.
    async fn account_removing(&self, u: &mut User) {
        u.state.remove::<Record>();
    }

    /// The registrations go with the account (storage removed everything; this
    /// module does not count on it).
    async fn account_removed(&self, u: &mut User) {
        u.state.remove::<Record>();
        match u.ctx.store.delete(&u.bare, NS_PUSH).await {
            Ok(()) => debug!("push registrations removed with the account"),
            Err(e) => warn!("push registrations not removed with the account: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use xmpp_parsers::data_forms::DataForm;
    use xmpp_parsers::pubsub::pubsub::PubSub;
    use xmpp_parsers::push::Notification;

    use super::{INCLUDE_BODY, NS_PUSH};
    use crate::host::registry::Event;
    use crate::host::session::{Park, SessionRef};
    use crate::host::task::handle;
    use crate::host::User;
    use crate::modules::testing::*;

    const APP: &str = "push.example.net";
    const CHAT: &str = "<message from='bob@example.com/x' to='alice@localhost' type='chat' id='m'><body>hi &amp; bye</body></message>";

    /// `<enable>` for `node` at APP, with a publish-options form holding `fields` (no
    /// form when `fields` is None).
    fn enable(id: &str, node: &str, fields: Option<&str>) -> String {
        let form = fields.map(|f| format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>{f}</x>"
        )).unwrap_or_default();
        format!("<iq type='set' id='{id}'><enable xmlns='urn:xmpp:push:0' jid='{APP}' node='{node}'>{form}</enable></iq>")
    }

    fn field(var: &str, value: &str) -> String {
        format!("<field var='{var}'><value>{value}</value></field>")
    }

    /// Sends `iqs` from session `resource` and checks each was answered with a result.
    async fn enabled(u: &mut User, resource: &str, iqs: &[String]) {
        for iq in iqs {
            send(u, resource, iq).await;
            let out = take(u);
            assert_eq!(
                to(&out, resource, &["type='result'"]).len(),
                1,
                "{iq}: {out:?}"
            );
        }
    }

    /// alice with registrations made by `iqs`, offline.
    async fn offline_alice(settings: &str, iqs: &[String]) -> User {
        let ctx = ctx(None, settings);
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        enabled(&mut u, "phone", iqs).await;
        let r = reference(&u, "phone");
        handle(&mut u, Event::End(r, vec![])).await;
        take(&mut u);
        u
    }

    /// A notification, read back: (node, summary fields, publish-options form).
    struct Published {
        id: String,
        node: String,
        fields: Vec<(String, String)>,
        options: Option<DataForm>,
    }

    impl Published {
        fn get(&self, var: &str) -> Option<&str> {
            self.fields
                .iter()
                .find(|(v, _)| v == var)
                .map(|(_, x)| x.as_str())
        }
    }

    /// The notifications among `out` (to the router, to APP), in order.
    fn published(out: &[(String, String)]) -> Vec<Published> {
        to(out, "", &["<pubsub"])
            .into_iter()
            .map(|s| {
                let iq = minidom::Element::from_reader_with_prefixes(
                    s.as_bytes(),
                    Some("jabber:client".to_owned()),
                )
                .unwrap();
                assert_eq!(iq.attr("type"), Some("set"), "{s}");
                assert_eq!(iq.attr("from"), Some("alice@localhost"), "{s}");
                assert_eq!(iq.attr("to"), Some(APP), "{s}");
                let pubsub = PubSub::try_from(
                    iq.get_child("pubsub", xmpp_parsers::ns::PUBSUB)
                        .unwrap()
                        .clone(),
                )
                .unwrap();
                let PubSub::Publish {
                    publish,
                    publish_options,
                } = pubsub
                else {
                    panic!("not a publish: {s}")
                };
                assert_eq!(publish.items.len(), 1, "{s}");
                let payload = publish.items[0].payload.clone().unwrap();
                let form = Notification::try_from(payload).unwrap().form.unwrap();
                assert_eq!(form.form_type(), Some("urn:xmpp:push:summary"), "{s}");
                Published {
                    id: iq.attr("id").unwrap().to_owned(),
                    node: publish.node.0,
                    fields: form
                        .fields
                        .iter()
                        .filter(|f| f.var.as_deref() != Some("FORM_TYPE"))
                        .map(|f| (f.var.clone().unwrap(), f.values.concat()))
                        .collect(),
                    options: publish_options.and_then(|o| o.form),
                }
            })
            .collect()
    }

    async fn stored(u: &User) -> String {
        let data = u.ctx.store.get(&u.bare, NS_PUSH).await.unwrap();
        String::from_utf8_lossy(&data).into_owned()
    }

    fn park() -> Park {
        Park {
            received: 0,
            acked: 0,
            sent: 0,
            timeout: Duration::from_secs(300),
            max: 100,
            items: vec![],
        }
    }

    /// Session `r`'s connection drops and c2s hands it over: it hibernates.
    async fn hibernate(u: &mut User, r: &SessionRef) {
        handle(u, Event::Hibernate(r.clone())).await;
        handle(u, Event::Park(r.clone(), park())).await;
        take(u);
    }

    #[tokio::test]
    async fn enable_and_disable_are_stored_and_the_account_advertises_push() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        send(&mut u, "phone", "<iq type='get' id='d' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='d'", "var='urn:xmpp:push:0'"]).len(),
            1,
            "{out:?}"
        );
        let secret = field("secret", "s3cr&amp;t");
        let with_body = format!("{secret}{}", field(INCLUDE_BODY, "true"));
        enabled(
            &mut u,
            "phone",
            &[
                enable("e1", "n1", Some(&with_body)),
                enable("e2", "n2", None),
            ],
        )
        .await;
        let s = stored(&u).await;
        assert!(
            s.contains("node='n1' include-body='true'") && s.contains("s3cr&amp;t"),
            "{s}"
        );
        assert!(s.contains("node='n2' include-body='false'"), "{s}");
        // sm's own field is not kept for the app server.
        assert!(!s.contains(INCLUDE_BODY), "{s}");
        // Enabling again replaces.
        enabled(&mut u, "phone", &[enable("e3", "n1", None)]).await;
        let s = stored(&u).await;
        assert_eq!(s.matches("node='n1'").count(), 1, "{s}");
        assert!(!s.contains("secret"), "{s}");
        // Disabling one node, then every node of the app server.
        let disable = |id: &str, node: &str| {
            format!("<iq type='set' id='{id}'><disable xmlns='urn:xmpp:push:0' jid='{APP}'{node}/></iq>")
        };
        enabled(&mut u, "phone", &[disable("d1", " node='n1'")]).await;
        let s = stored(&u).await;
        assert!(!s.contains("'n1'") && s.contains("'n2'"), "{s}");
        enabled(
            &mut u,
            "phone",
            &[enable("e4", "n3", None), disable("d2", "")],
        )
        .await;
        assert_eq!(stored(&u).await, "");
    }

    #[tokio::test]
    async fn bad_enables_are_refused() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        for (iq, why) in [
            (
                format!("<iq type='set' id='x'><enable xmlns='urn:xmpp:push:0' jid='{APP}'/></iq>"),
                "the app server provisioned",
            ),
            (
                enable("x", "n", Some(&field(INCLUDE_BODY, "maybe"))),
                "takes true or false",
            ),
            (
                enable("x", "n", Some("")).replace("pubsub#publish-options", "pubsub#node_config"),
                "publish-options form",
            ),
            (
                enable("x", "n", None).replace(APP, "not a jid@"),
                "unreadable",
            ),
        ] {
            send(&mut u, "phone", &iq).await;
            let out = take(&mut u);
            assert_eq!(
                to(&out, "phone", &["type='error'", "bad-request", why]).len(),
                1,
                "{iq}: {out:?}"
            );
        }
        assert_eq!(stored(&u).await, "");
    }

    #[tokio::test]
    async fn past_the_limit_the_oldest_registration_gives_way() {
        let u = offline_alice(
            "<push max-registrations='2'/>",
            &[
                enable("1", "a", None),
                enable("2", "b", None),
                enable("3", "c", None),
            ],
        )
        .await;
        let s = stored(&u).await;
        assert!(
            !s.contains("'a'") && s.contains("'b'") && s.contains("'c'"),
            "{s}"
        );
    }

    #[tokio::test]
    async fn a_login_reads_no_registrations_and_a_logout_restarts_the_count() {
        let mut u = offline_alice("", &[enable("1", "plain", None)]).await;
        inbound(&mut u, CHAT).await;
        take(&mut u);
        inbound(&mut u, CHAT).await;
        let p = published(&take(&mut u));
        assert_eq!(p[0].get("message-count"), Some("2"));
        let stored = u.ctx.store.get(&u.bare, NS_PUSH).await.unwrap();
        assert!(String::from_utf8_lossy(&stored).contains("logout-seen='"));
        // A later task of the user: a login does not read the registrations...
        u.state.remove::<super::Record>();
        start(&mut u, "laptop").await;
        assert!(u.state.get::<super::Record>().is_none());
        let r = reference(&u, "laptop");
        handle(&mut u, Event::End(r, vec![])).await;
        take(&mut u);
        // ...and the logout it ended with restarts the count.
        u.state.remove::<super::Record>();
        inbound(&mut u, CHAT).await;
        let p = published(&take(&mut u));
        assert_eq!(p[0].get("message-count"), Some("1"));
        // A record from before the logouts were kept: its count goes on.
        u.ctx
            .store
            .set(&u.bare, NS_PUSH, format!("<push xmlns='{NS_PUSH}' count='5'><registration jid='push.example.net' node='plain' include-body='false' failures='0'/></push>"))
            .await
            .unwrap();
        u.state.remove::<super::Record>();
        inbound(&mut u, CHAT).await;
        let p = published(&take(&mut u));
        assert_eq!(p[0].get("message-count"), Some("6"));
    }

    #[tokio::test]
    async fn without_the_last_module_a_login_restarts_the_count() {
        let modules = [
            "roster",
            "presence",
            "subscription",
            "messages",
            "offline",
            "push",
        ];
        let ctx = ctx(Some(&modules), "");
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        enabled(&mut u, "phone", &[enable("1", "plain", None)]).await;
        let r = reference(&u, "phone");
        handle(&mut u, Event::End(r, vec![])).await;
        inbound(&mut u, CHAT).await;
        take(&mut u);
        u.state.remove::<super::Record>();
        // The login reads the record and starts the count again.
        start(&mut u, "laptop").await;
        assert!(u.state.get::<super::Record>().is_some());
        let r = reference(&u, "laptop");
        handle(&mut u, Event::End(r, vec![])).await;
        take(&mut u);
        inbound(&mut u, CHAT).await;
        let p = published(&take(&mut u));
        assert_eq!(p[0].get("message-count"), Some("1"));
    }

    #[tokio::test]
    async fn offline_users_are_notified_with_the_body_only_when_asked() {
        let mut u = offline_alice(
            "",
            &[
                enable("1", "plain", Some(&field("secret", "xyz"))),
                enable("2", "body", Some(&field(INCLUDE_BODY, "1"))),
            ],
        )
        .await;
        inbound(&mut u, CHAT).await;
        let out = take(&mut u);
        let p = published(&out);
        assert_eq!(p.len(), 2, "{out:?}");
        assert_eq!((p[0].node.as_str(), p[1].node.as_str()), ("plain", "body"));
        for n in &p {
            assert_eq!(n.get("message-count"), Some("1"));
            assert_eq!(n.get("last-message-sender"), Some("bob@example.com/x"));
            assert!(n.id.starts_with("push-"), "{}", n.id);
        }
        assert_eq!(p[0].get("last-message-body"), None);
        assert_eq!(p[1].get("last-message-body"), Some("hi & bye"));
        // The enable's form goes along as publish-options; sm's own field did not.
        let options = p[0].options.as_ref().expect("publish-options");
        assert_eq!(
            options.form_type(),
            Some("http://jabber.org/protocol/pubsub#publish-options")
        );
        assert!(options
            .fields
            .iter()
            .any(|f| f.var.as_deref() == Some("secret") && f.values == ["xyz"]));
        assert!(p[1].options.is_none());
        // The message was stored offline as well.
        let offline = u
            .ctx
            .store
            .get(&u.bare, crate::modules::offline::NS_OFFLINE)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&offline).contains("hi &amp; bye"));
        // The count goes on until the user comes back.
        inbound(&mut u, CHAT).await;
        let p = published(&take(&mut u));
        assert_eq!(p[0].get("message-count"), Some("2"));
        start(&mut u, "laptop").await;
        let r = reference(&u, "laptop");
        handle(&mut u, Event::End(r, vec![])).await;
        take(&mut u);
        inbound(&mut u, CHAT).await;
        let p = published(&take(&mut u));
        assert_eq!(p[0].get("message-count"), Some("1"));
    }

    #[tokio::test]
    async fn only_messages_a_client_shows_are_notified() {
        let mut u = offline_alice("", &[enable("1", "n", None)]).await;
        for m in [
            "<message from='bob@example.com/x' to='alice@localhost' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message from='bob@example.com/x' to='alice@localhost'><received xmlns='urn:xmpp:receipts' id='m'/></message>",
            "<message from='bob@example.com/x' to='alice@localhost' type='headline'><body>news</body></message>",
            "<message from='bob@example.com/x' to='alice@localhost' type='error'><body>x</body><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
            "<message from='room@muc.example.com/x' to='alice@localhost' type='groupchat'><body>x</body></message>",
        ] {
            inbound(&mut u, m).await;
            let out = take(&mut u);
            assert!(published(&out).is_empty(), "{m}: {out:?}");
        }
        // An encrypted message without a body is shown (and has no body to give).
        inbound(&mut u, "<message from='bob@example.com/x' to='alice@localhost' type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>").await;
        let p = published(&take(&mut u));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].get("message-count"), Some("1"));
    }

    #[tokio::test]
    async fn no_notification_while_a_session_is_live() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        // A live session without initial presence is online too.
        start(&mut u, "laptop").await;
        enabled(&mut u, "phone", &[enable("1", "n", None)]).await;
        inbound(&mut u, CHAT).await;
        let out = take(&mut u);
        assert!(published(&out).is_empty(), "{out:?}");
        assert_eq!(to(&out, "phone", &["hi &amp; bye"]).len(), 1, "{out:?}");
    }

    #[tokio::test]
    async fn a_room_message_to_a_hibernating_occupant_is_notified() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        let r = reference(&u, "phone");
        handle(&mut u, Event::Resumable(r.clone(), "t".into())).await;
        enabled(&mut u, "phone", &[enable("1", "n", None)]).await;
        hibernate(&mut u, &r).await;
        let room =
            "<message from='room@muc.example.com/bob' to='alice@localhost/phone' type='groupchat'>";
        inbound(&mut u, &format!("{room}<body>hello room</body></message>")).await;
        assert_eq!(published(&take(&mut u)).len(), 1);
        // A subject change is not a message to wake a phone for.
        inbound(&mut u, &format!("{room}<subject>topic</subject></message>")).await;
        assert!(published(&take(&mut u)).is_empty());
    }

    #[tokio::test]
    async fn hibernating_sessions_are_notified_until_the_client_is_back() {
        let ctx = ctx(None, "<push include-body='true'/>");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        let r = reference(&u, "phone");
        handle(&mut u, Event::Resumable(r.clone(), "t".into())).await;
        enabled(&mut u, "phone", &[enable("1", "n", None)]).await;
        hibernate(&mut u, &r).await;
        for count in ["1", "2"] {
            inbound(&mut u, CHAT).await;
            let out = take(&mut u);
            let p = published(&out);
            assert_eq!(p.len(), 1, "{out:?}");
            assert_eq!(p[0].get("message-count"), Some(count));
            // sm.xml's include-body applies to a registration that did not say.
            assert_eq!(p[0].get("last-message-body"), Some("hi & bye"));
            // The message waits for the session.
            assert!(to(&out, "phone", &[]).is_empty(), "{out:?}");
        }
        // The client resumes, and its connection drops again: counting starts again.
        handle(
            &mut u,
            Event::Resume {
                c2s: "c2s-2".into(),
                sid: "s9".into(),
                token: "t".into(),
            },
        )
        .await;
        let out = take(&mut u);
        assert_eq!(to(&out, "", &["type='resumed'"]).len(), 1, "{out:?}");
        let again = SessionRef {
            c2s: "c2s-2".into(),
            sid: "s9".into(),
            jid: r.jid.clone(),
        };
        hibernate(&mut u, &again).await;
        inbound(&mut u, CHAT).await;
        let p = published(&take(&mut u));
        assert_eq!(p[0].get("message-count"), Some("1"));
        // Back and live: a message reaches the client, no notification.
        handle(
            &mut u,
            Event::Resume {
                c2s: "c2s".into(),
                sid: "s10".into(),
                token: "t".into(),
            },
        )
        .await;
        take(&mut u);
        inbound(&mut u, CHAT).await;
        let out = take(&mut u);
        assert!(published(&out).is_empty(), "{out:?}");
        assert_eq!(to(&out, "phone", &["hi &amp; bye"]).len(), 1, "{out:?}");
        assert!(stored(&u).await.contains("count='0'"));
    }

    #[tokio::test]
    async fn error_answers_in_a_row_disable_a_registration() {
        let mut u = offline_alice("", &[enable("1", "bad", None), enable("2", "good", None)]).await;
        let answer = |kind: &str, id: &str, from: &str| {
            let error = if kind == "error" {
                "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
            } else {
                ""
            };
            format!("<iq type='{kind}' id='{id}' from='{from}' to='alice@localhost'>{error}</iq>")
        };
        // error, error, result (the count starts again), then three errors in a row.
        for (i, kind) in ["error", "error", "result", "error", "error", "error"]
            .into_iter()
            .enumerate()
        {
            inbound(&mut u, CHAT).await;
            let p = published(&take(&mut u));
            assert_eq!(p.len(), 2, "message {i}");
            assert_eq!(p[0].node, "bad");
            // Answers from someone else, or for no notification, do not count.
            inbound(&mut u, &answer("error", &p[0].id, "evil.example.net")).await;
            inbound(&mut u, &answer("error", "push-0000000000000000-sm1", APP)).await;
            inbound(&mut u, &answer(kind, &p[0].id, APP)).await;
            inbound(&mut u, &answer("result", &p[1].id, APP)).await;
            // Answers are consumed.
            let out = take(&mut u);
            assert!(out.is_empty(), "{out:?}");
            let gone = !stored(&u).await.contains("'bad'");
            assert_eq!(gone, i == 5, "after answer {i}");
        }
        inbound(&mut u, CHAT).await;
        let p = published(&take(&mut u));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].node, "good");
    }

    #[tokio::test]
    async fn registrations_go_with_the_account() {
        let ctx = ctx(
            None,
            "<modules defaults='true'><module name='register'/></modules>",
        );
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        enabled(&mut u, "phone", &[enable("1", "n", None)]).await;
        assert!(!stored(&u).await.is_empty());
        send(&mut u, "phone", "<iq type='set' id='r' to='localhost'><query xmlns='jabber:iq:register'><remove/></query></iq>").await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='r'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        assert_eq!(stored(&u).await, "");
        assert!(u.state.get::<super::Record>().is_none());
    }
}
