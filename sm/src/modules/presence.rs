//! Presence (RFC 6121 section 4): initial presence (broadcast, probes, the presence of
//! the user's other resources, then the [`Hook::InitialPresence`] chain), updates,
//! unavailable presence (also when a session ends), directed presence, priority, and
//! answers to probes. Subscription stanzas are the `subscription` module's.

use std::collections::HashSet;
use std::sync::Arc;

use jid::Jid;
use tracing::{debug, info, warn};

use crate::config::SmConfig;
use crate::host::{
    hooks, Declaration, Flow, Hook, Module, Packet, Session, SessionKey, SessionState, Stanzas,
    User,
};
use crate::modules::roster;
use crate::stanzas;
use crate::xml::{Element, NS_CLIENT};

pub struct Presence {
    directed_max: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    Ok(Arc::new(Presence {
        directed_max: config.directed_max,
    }))
}

/// Entities that received directed available presence from a session and have not had
/// unavailable presence since (RFC 6121 4.6): they get unavailable presence when the
/// session goes unavailable or ends, whether or not it ever sent initial presence.
#[derive(Debug, Default)]
pub struct Directed(pub Vec<Jid>);

/// Status text of the session's last unavailable presence (for last activity).
#[derive(Debug, Default)]
pub struct LastStatus(pub Option<String>);

#[async_trait::async_trait]
impl Module for Presence {
    fn name(&self) -> &'static str {
        "presence"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .requires("roster")
            .stanzas(Hook::Outbound, Stanzas::Presence, 100)
            .stanzas(Hook::Inbound, Stanzas::Presence, 100)
            .hook(Hook::SessionEnded, 100)
            .hook(Hook::SessionRestored, 100)
    }

    /// Directed presence as c2s remembers it; for an available session, probes of the
    /// contacts the user is subscribed to (their answers reach the client again: what
    /// depends on their presence is right again) and the presence of the user's other
    /// available resources. Nothing is broadcast: contacts never saw it leave.
    fn session_state(&self, s: &Session, state: &mut SessionState) {
        if let Some(d) = s.state.get::<Directed>() {
            state.directed = d.0.iter().map(|j| j.to_string()).collect();
        }
    }

    async fn session_restored(&self, u: &mut User, key: SessionKey, state: &SessionState) {
        let max = self.directed_max;
        let Some(s) = u.session_mut(key) else { return };
        let directed: Vec<Jid> = state
            .directed
            .iter()
            .filter_map(|d| Jid::new(d).ok())
            .take(max)
            .collect();
        if !directed.is_empty() {
            s.state.insert(Directed(directed));
        }
        if !s.available {
            return;
        }
        let full = s.full.clone();
        let bare = u.bare.clone();
        match roster::load(u).await {
            Ok(r) => {
                let probes: Vec<(String, String)> = r
                    .subscriptions()
                    .map(|c| {
                        let probe = stanzas::presence(Some("probe"), &bare, &c.jid).to_stanza();
                        (c.jid.clone(), probe)
                    })
                    .collect();
                for (to, p) in probes {
                    if let Ok(to) = Jid::new(&to) {
                        u.route(&to, p);
                    }
                }
            }
            Err(e) => warn!("contacts not probed for a restored session: {e}"),
        }
        other_resources_to(u, key, &full);
    }

    async fn outbound(&self, u: &mut User, from: SessionKey, p: &mut Packet) -> Flow {
        let kind = p.kind().map(str::to_owned);
        match (p.to.clone(), kind.as_deref()) {
            (None, None) => available(u, from, p).await,
            (None, Some("unavailable")) => unavailable(u, from, p).await,
            (None, Some(other)) => debug!("presence of type '{other}' without 'to' ignored"),
            (Some(to), None) => {
                u.route(&to, p.bytes().clone());
                // 4.6: remember who got directed presence, to tell them when we leave. A
                // subscriber of an available session hears that from the broadcast.
                let subscriber =
                    roster::cached(u).is_some_and(|r| r.sub(&to.to_bare().to_string()).from);
                let max = self.directed_max;
                let Some(s) = u.session_mut(from) else {
                    return Flow::Handled;
                };
                let covered = s.available && subscriber;
                let d = &mut s.state.entry::<Directed>().0;
                if !covered && !d.contains(&to) && d.len() < max {
                    d.push(to);
                }
            }
            (Some(to), Some("unavailable")) => {
                u.route(&to, p.bytes().clone());
                if let Some(s) = u.session_mut(from) {
                    s.state.entry::<Directed>().0.retain(|d| d != &to);
                }
            }
            // probe (clients SHOULD NOT, RFC 6121 4.3) and error: sent on as they are.
            (Some(to), Some(_)) => u.route(&to, p.bytes().clone()),
        }
        Flow::Handled
    }

    async fn inbound(&self, u: &mut User, p: &mut Packet) -> Flow {
        match p.kind() {
            Some("probe") => probe(u, p).await,
            None | Some("unavailable") | Some("error") => {
                let bytes = p.for_client();
                match p.to.as_ref().map(|t| t.try_as_full()) {
                    // 8.5.3: to a full JID: that resource, if it has a session.
                    Some(Ok(full)) => {
                        if let Some(key) = u.find_resource(full) {
                            u.deliver(key, bytes);
                        }
                    }
                    // 8.5.2.1.2: to the bare JID: every available resource.
                    _ => {
                        for key in u.available() {
                            u.deliver(key, bytes.clone());
                        }
                    }
                }
            }
            Some(other) => debug!("presence of type '{other}' ignored"),
        }
        Flow::Handled
    }

    async fn session_ended(&self, u: &mut User, s: &Session) {
        let directed = s
            .state
            .get::<Directed>()
            .map(|d| d.0.as_slice())
            .unwrap_or(&[]);
        if !s.available && directed.is_empty() {
            return;
        }
        // RFC 6121 4.5.2: the server generates unavailable presence for the client.
        let mut unavailable = stanzas::presence(Some("unavailable"), &s.full, "");
        unavailable.remove_attr("to");
        if let Some(text) = s.state.get::<LastStatus>().and_then(|l| l.0.as_deref()) {
            unavailable.push(status(text));
        }
        broadcast_unavailable(u, s.available, directed, &unavailable).await;
    }
}

/// A client's presence without `to` as sm sends it on: from the session's full JID.
fn broadcast_form(p: &Packet, full: &str) -> Option<Element> {
    match stanzas::parse(p.stanza()) {
        Ok(mut el) => {
            el.remove_attr("to");
            el.set_attr("from", full);
            Some(el)
        }
        Err(e) => {
            debug!("unreadable presence from the client: {e}");
            None
        }
    }
}

/// Available presence without `to`: initial presence or an update.
async fn available(u: &mut User, key: SessionKey, p: &Packet) {
    let Some(s) = u.session_mut(key) else { return };
    let full = s.full.clone();
    let Some(el) = broadcast_form(p, &full) else {
        return;
    };
    let priority = el
        .child_text("priority")
        .and_then(|p| p.trim().parse::<i32>().ok())
        .unwrap_or(0)
        .clamp(-128, 127);
    let initial = !s.available;
    s.available = true;
    s.priority = priority;
    s.presence = Some(el.clone());
    s.state.insert(LastStatus(None));
    if initial {
        info!(priority, "initial presence");
    } else {
        debug!(priority, "presence update");
    }
    // Contacts subscribed to the user (4.2.2, 4.4.2), and probes for those the user is
    // subscribed to (4.3.1), which answer to the bare JID.
    let bare = u.bare.clone();
    match roster::load(u).await {
        Ok(r) => {
            let mut out = vec![];
            for c in r.subscribers() {
                let mut p = el.clone();
                p.set_attr("to", c.jid.clone());
                out.push((c.jid.clone(), p.to_stanza()));
            }
            if initial {
                for c in r.subscriptions() {
                    let probe = stanzas::presence(Some("probe"), &bare, &c.jid).to_stanza();
                    out.push((c.jid.clone(), probe));
                }
            }
            for (to, p) in out {
                if let Ok(to) = Jid::new(&to) {
                    u.route(&to, p);
                }
            }
        }
        Err(e) => warn!("presence not broadcast to contacts, the roster is unavailable: {e}"),
    }
    // The user's own available resources, this one included (4.2.2).
    to_own_resources(u, &el);
    if initial {
        // The presence of the user's other available resources, to the new one.
        other_resources_to(u, key, &full);
        hooks::initial_presence(u, key).await;
    }
}

async fn unavailable(u: &mut User, key: SessionKey, p: &Packet) {
    let Some(s) = u.session_mut(key) else { return };
    let Some(el) = broadcast_form(p, &s.full) else {
        return;
    };
    s.state.insert(LastStatus(el.child_text("status")));
    let was_available = s.available;
    let directed = s.state.remove::<Directed>().unwrap_or_default();
    s.available = false;
    s.presence = None;
    s.priority = 0;
    info!("unavailable presence");
    broadcast_unavailable(u, was_available, &directed.0, &el).await;
}

/// Sends the current presence of each available session again, as an update: to the
/// contacts subscribed to the user and to the user's available resources. For a module
/// that changed what the presence carries (the avatar hash, `avatars`).
pub async fn resend(u: &mut User) {
    let presences: Vec<Element> = u
        .sessions
        .iter()
        .filter(|s| s.available)
        .filter_map(|s| s.presence.clone())
        .collect();
    if presences.is_empty() {
        return;
    }
    let subscribers: Vec<String> = match roster::load(u).await {
        Ok(r) => r.subscribers().map(|c| c.jid.clone()).collect(),
        Err(e) => {
            warn!("presence not sent again to contacts, the roster is unavailable: {e}");
            vec![]
        }
    };
    for el in presences {
        for c in &subscribers {
            let Ok(to) = Jid::new(c) else { continue };
            let mut p = el.clone();
            p.set_attr("to", c.clone());
            u.route(&to, p.to_stanza());
        }
        to_own_resources(u, &el);
    }
}

/// Delivers `presence` to each of the user's available resources, addressed to it.
fn to_own_resources(u: &mut User, presence: &Element) {
    let copies: Vec<(SessionKey, String)> = u
        .sessions
        .iter()
        .filter(|s| s.available)
        .map(|s| {
            let mut p = presence.clone();
            p.set_attr("to", s.full.clone());
            (s.key, p.to_stanza())
        })
        .collect();
    for (key, p) in copies {
        u.deliver(key, p);
    }
}

/// Sends unavailable presence `el` (from the full JID of a resource going away) to the
/// contacts subscribed to the user and the user's other resources (when that resource
/// was available) and to the targets of its directed presence.
async fn broadcast_unavailable(u: &mut User, was_available: bool, directed: &[Jid], el: &Element) {
    let mut sent: HashSet<String> = HashSet::new();
    let mut out = vec![];
    if was_available {
        match roster::load(u).await {
            Ok(r) => {
                for c in r.subscribers() {
                    let mut p = el.clone();
                    p.set_attr("to", c.jid.clone());
                    out.push((c.jid.clone(), p.to_stanza()));
                    sent.insert(c.jid.clone());
                }
            }
            Err(e) => warn!("unavailable presence not broadcast to contacts: {e}"),
        }
        to_own_resources(u, el);
    }
    for d in directed {
        if sent.insert(d.to_string()) {
            let mut p = el.clone();
            p.set_attr("to", d.to_string());
            out.push((d.to_string(), p.to_stanza()));
        }
    }
    for (to, p) in out {
        if let Ok(to) = Jid::new(&to) {
            u.route(&to, p);
        }
    }
}

/// RFC 6121 4.3.2: a probe is answered with the last presence of each available
/// resource when the prober is subscribed, with unavailable presence when none is
/// available, and with `unsubscribed` when it is not subscribed.
async fn probe(u: &mut User, p: &Packet) {
    let Some(from) = p.from.clone() else { return };
    let contact = from.to_bare().to_string();
    let authorized = contact == u.bare
        || match roster::load(u).await {
            Ok(r) => r.sub(&contact).from,
            Err(e) => {
                warn!("probe from {contact} not answered: {e}");
                return;
            }
        };
    if !authorized {
        debug!(contact = %contact, "probe from a non-subscriber");
        let reply = stanzas::presence(Some("unsubscribed"), &u.bare, &contact);
        u.send(reply.to_stanza());
        return;
    }
    let reply_to = from.to_string();
    let presences: Vec<String> = u
        .sessions
        .iter()
        .filter(|s| s.available)
        .filter_map(|s| s.presence.clone())
        .map(|mut p| {
            p.set_attr("to", reply_to.clone());
            p.to_stanza()
        })
        .collect();
    if presences.is_empty() {
        let reply = stanzas::presence(Some("unavailable"), &u.bare, &reply_to);
        u.route(&from, reply.to_stanza());
        return;
    }
    for p in presences {
        u.route(&from, p);
    }
}

/// A `<status/>` child.
pub fn status(text: &str) -> Element {
    Element::new("status", NS_CLIENT).with_text(text)
}

/// The presence of the user's other available resources, to session `key` (full JID
/// `full`): a new session's, or a restored one's.
fn other_resources_to(u: &mut User, key: SessionKey, full: &str) {
    let others: Vec<String> = u
        .sessions
        .iter()
        .filter(|o| o.available && o.key != key)
        .filter_map(|o| o.presence.clone())
        .map(|mut p| {
            p.set_attr("to", full.to_owned());
            p.to_stanza()
        })
        .collect();
    for p in others {
        u.deliver(key, p);
    }
}

#[cfg(test)]
mod tests {
    use crate::modules::testing::*;

    #[tokio::test]
    async fn directed_presence_without_initial_presence_is_ended_too() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        // Joins a room (or a gateway's channel) before, or without, initial presence.
        send(
            &mut u,
            "phone",
            "<presence to='room@conference.example.org/alice'/>",
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["to='room@conference.example.org/alice'"]).len(),
            1,
            "{out:?}"
        );
        let r = reference(&u, "phone");
        crate::host::task::handle(&mut u, crate::host::registry::Event::End(r, vec![])).await;
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "",
                &[
                    "type='unavailable'",
                    "to='room@conference.example.org/alice'",
                    "from='alice@localhost/phone'"
                ]
            )
            .len(),
            1,
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn unavailable_presence_reaches_directed_targets_once() {
        let ctx = ctx(None, "");
        ctx.store
            .set("alice@localhost", "jabber:iq:roster", "<query xmlns='jabber:iq:roster' ver='1'><item jid='bob@example.com' subscription='from'/></query>")
            .await
            .unwrap();
        let mut u = user(&ctx, "alice@localhost");
        start(&mut u, "phone").await;
        send(&mut u, "phone", "<presence to='bob@example.com'/>").await;
        send(&mut u, "phone", "<presence/>").await;
        send(&mut u, "phone", "<presence to='gw.example.org'/>").await;
        take(&mut u);
        send(
            &mut u,
            "phone",
            "<presence type='unavailable'><status>bye</status></presence>",
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["type='unavailable'", "to='bob@example.com'"]).len(),
            1,
            "{out:?}"
        );
        assert_eq!(
            to(
                &out,
                "",
                &["type='unavailable'", "to='gw.example.org'", "bye"]
            )
            .len(),
            1,
            "{out:?}"
        );
    }
}
