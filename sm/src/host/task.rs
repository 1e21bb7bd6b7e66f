//! The task of one user: takes the user's events in order, runs each through the
//! session protocol and the modules' chains, and sends what they produced after each
//! batch of events. What nobody handles gets the fallback answer here.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use jid::{BareJid, Jid};
use jrs_stream::{Stanza, StanzaErrorCondition, StreamErrorCondition};
use tracing::{debug, debug_span, error, info, info_span, warn, Instrument};

use crate::host::ending::{end_session, reset, reset_returning, undelivered};
use crate::host::handover;
use crate::host::hibernation;
use crate::host::hooks;
use crate::host::iq_routing;
use crate::host::kernel::{Ctx, Flow, User};
use crate::host::packet::Packet;
use crate::host::registry::{Event, Pending, Receiver};
use crate::host::session::{self, Queued, SessionRef};
use crate::host::shortcut;
use crate::stanzas;

/// Most events handled before the output is sent: under load one write to the router
/// link carries many stanzas; alone, an event's output leaves at once.
const BATCH: usize = 32;

/// Hands `event` to the task of `user`, starting one if needed.
pub fn dispatch(ctx: &Arc<Ctx>, user: &BareJid, event: Event) {
    let c = ctx.clone();
    let jid = user.clone();
    let result = ctx
        .users
        .dispatch(user, event, ctx.config.user_queue, move |rx, pending| {
            // A root: the caller may be another user's task (`host::local`).
            let span = info_span!(parent: None, "user", jid = %jid);
            tokio::spawn(run(User::new(c, jid), rx, pending).instrument(span));
        });
    if let Err(e) = result {
        overloaded(ctx, user, *e);
    }
}

/// The user's task. An `async` block, not an `async fn`: an `async fn` keeps its
/// arguments and the locals they are moved into side by side (the `User` twice) for the
/// task's whole life, and every user with a session has a task.
#[allow(clippy::manual_async_fn)] // deliberately not an `async fn`: see above
fn run(mut u: User, mut rx: Receiver, pending: Pending) -> impl std::future::Future<Output = ()> {
    async move {
        loop {
            let Ok(event) = rx.recv().await else { break };
            // Boxed: a task waits at `recv` most of its life, and its size is that of its
            // largest await point, which would be this handler's.
            Box::pin(handle(&mut u, *event)).await;
            let mut handled = 1;
            for _ in 1..BATCH {
                let Ok(event) = rx.try_recv() else { break };
                Box::pin(handle(&mut u, *event)).await;
                handled += 1;
            }
            u.flush();
            // What the events queued for (or took from) hibernating sessions, into storage:
            // after the output, so that a record shrinks only once what it held is sent.
            // Boxed, and only when there is something to write: see `handle` above.
            if hibernation::dirty(&u) {
                Box::pin(hibernation::sync(&mut u)).await;
            }
            // Sent: room broadcasts may overtake nothing now (host::shortcut).
            shortcut::publish(&mut u, &pending);
            pending.fetch_sub(handled, Ordering::AcqRel);
            if u.sessions.is_empty() && u.ctx.users.retire(&u.jid, &pending) {
                break;
            }
        }
    }
}

/// Handles one event (the user task's loop body; tests call it directly).
pub async fn handle(u: &mut User, event: Event) {
    match event {
        Event::Start(r) => {
            let span = session_span(&r);
            start(u, r).instrument(span).await
        }
        Event::End(r, items) => {
            let span = session_span(&r);
            end_from_c2s(u, r, items).instrument(span).await
        }
        Event::Resumable(r, token) => handover::resumable(u, &r, token),
        Event::Hibernate(r) => {
            let _span = session_span(&r).entered();
            handover::hibernate(u, &r)
        }
        Event::Park(r, park) => {
            let span = session_span(&r);
            let wait = handover::park(u, r, park).instrument(span).await;
            if let Some((key, generation, timeout)) = wait {
                let (ctx, user) = (u.ctx.clone(), u.jid.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    dispatch(&ctx, &user, Event::HibernationEnds { key, generation });
                });
            }
        }
        Event::Resume { c2s, sid, token } => {
            let _span = info_span!("resume", %c2s, %sid).entered();
            handover::resume(u, c2s, sid, token)
        }
        Event::HibernationEnds { key, generation } => handover::wait_over(u, key, generation).await,
        Event::HibernatedBefore(record) => hibernation::given_back(u, record).await,
        Event::Delivered(r, count) => match u.find(&r) {
            Some(key) => hooks::offline_confirmed(u, key, count).await,
            None => debug!(count, "confirmation for an ended session"),
        },
        Event::Stanza(r, stanza) => {
            // Made here, inside the user's span, so that it is the parent.
            let span = match u.find(&r).and_then(|k| u.session_mut(k)) {
                Some(s) => s.span.get_or_insert_with(|| session_span(&r)).clone(),
                None => session_span(&r),
            };
            client_stanza(u, r, stanza).instrument(span).await
        }
        Event::Inbound(p) => {
            // At debug only: a span per delivered stanza, its sender formatted for the
            // log's line prefix, was 6% of sm's instructions per message at the
            // shipped `info` (docs/benchmarks.md, "A span per stanza"). Lines written
            // meanwhile keep the user's span; those about one stanza name its sender.
            let span = debug_span!(
                "inbound",
                from = p.from.as_ref().map(|j| j.as_str()).unwrap_or("")
            );
            inbound(u, p).instrument(span).await
        }
        Event::C2sGone(c2s) => {
            // Parked sessions live here, not on their old c2s.
            while let Some(s) = u.sessions.iter().find(|s| s.c2s == c2s && !s.is_parked()) {
                info!(resource = s.jid.resource().as_str(), %c2s, "session ended: its c2s disconnected");
                let key = s.key;
                end_session(u, key, None).await;
            }
        }
        Event::Wake { module, data } => {
            let ctx = u.ctx.clone();
            if let Some(m) = ctx.modules.get(module) {
                m.woken(u, data).await;
            }
        }
        Event::Admin(query) => crate::host::admin_answer::answer(u, query).await,
        Event::Restore(r, state) => {
            let span = session_span(&r);
            restore(u, r, state).instrument(span).await
        }
        Event::LinkLost => link_lost(u).await,
        Event::StaleOver => {
            while let Some(key) = u.sessions.iter().find(|s| s.stale).map(|s| s.key) {
                info!("session ended: its c2s did not restore it");
                end_session(u, key, None).await;
            }
        }
    }
    // Held sessions whose queue went past its limit end now.
    while let Some(key) = u.overflowed.pop() {
        warn!("a hibernating session's queue is full: the session ends");
        end_session(u, key, None).await;
    }
}

fn session_span(r: &SessionRef) -> tracing::Span {
    info_span!("session", resource = r.jid.resource().as_str(), sid = %r.sid)
}

async fn start(u: &mut User, r: SessionRef) {
    let me = u.ctx.me.clone();
    if u.find(&r).is_some() {
        // A repeated start for the same session: answer it again.
        debug!("repeated start");
        u.send(session::packet(&me, "started", &r, b""));
        return;
    }
    if let Some(old) = u.find_resource(&r.jid) {
        // RFC 6120 7.7.2.2: the new session replaces the old one.
        let s = u.session(old).expect("found");
        info!(resource = r.jid.resource().as_str(), old_c2s = %s.c2s, old_sid = %s.sid,
              "session replaced (conflict)");
        end_session(u, old, Some(StreamErrorCondition::Conflict)).await;
    }
    let max = u.ctx.config.sessions_max;
    if u.sessions.len() >= max {
        warn!(max, "session refused: too many sessions");
        let text = format!("at most {max} sessions per account");
        u.send(session::refuse_start(
            &me,
            &r,
            StanzaErrorCondition::ResourceConstraint,
            &text,
        ));
        return;
    }
    u.removed = false;
    u.ctx.accounts.remember(&u.bare, true);
    let key = u.add_session(&r);
    info!(resource = r.jid.resource().as_str(), sid = %r.sid, c2s = %r.c2s, "session started");
    // c2s answers the client's bind when this arrives: do not hold it for the hooks.
    u.send(session::packet(&me, "started", &r, b""));
    u.flush();
    hooks::session_started(u, key).await;
}

async fn end_from_c2s(u: &mut User, r: SessionRef, items: Vec<Queued>) {
    let priority = u.find(&r).and_then(|k| u.session(k)).map(|s| s.priority);
    match u.find(&r) {
        Some(key) => {
            info!(resource = r.jid.resource().as_str(), sid = %r.sid, undelivered = items.len(), "session ended by c2s");
            end_session(u, key, None).await;
        }
        // Ended here already (replaced, say): what its client did not get still counts.
        None if !items.is_empty() => {}
        None => reset(u, &r),
    }
    undelivered(u, &r.jid, priority, items).await;
}

/// Our router link was lost and is back. Sessions sm holds for a c2s stay (so contacts
/// see no change) but wait for that c2s to restore them: a c2s whose link dropped with
/// ours (the router restarted) restores every session it has; a session nobody restores
/// within `restore-wait` ends. Sessions being handed over (XEP-0198) end: their c2s
/// will not answer `collect` on a new router; parked ones live here and stay.
async fn link_lost(u: &mut User) {
    while let Some(key) = u
        .sessions
        .iter()
        .find(|s| !s.is_live() && !s.is_parked())
        .map(|s| s.key)
    {
        end_session(u, key, None).await;
    }
    let mut stale = false;
    for s in u.sessions.iter_mut().filter(|s| s.is_live()) {
        s.stale = true;
        stale = true;
    }
    if stale {
        debug!("router link back: sessions wait for their c2s to restore them");
        let (ctx, user) = (u.ctx.clone(), u.jid.clone());
        tokio::spawn(async move {
            tokio::time::sleep(ctx.config.restore_wait).await;
            dispatch(&ctx, &user, Event::StaleOver);
        });
    }
}

/// `restore`: c2s tells a session sm lost (it restarted) or kept over its own link's
/// loss. A kept session is live again as it was; a lost one is rebuilt from `state`
/// without a presence broadcast (contacts never saw it leave), then the modules rebuild
/// what they kept ([`Hook::SessionRestored`]: carbons, roster pushes, directed presence,
/// probes of the contacts, offline messages stored meanwhile). Answered `restored`, or
/// `end` with a condition when it cannot be (c2s then resets the client).
async fn restore(u: &mut User, r: SessionRef, state: jrs_component::session::SessionState) {
    let me = u.ctx.me.clone();
    if let Some(key) = u.find(&r) {
        let s = u.session_mut(key).expect("found");
        s.stale = false;
        if state.token.is_some() {
            s.resume_token = state.token.clone();
        }
        debug!("kept session restored");
        u.send(session::packet(&me, "restored", &r, b""));
        return;
    }
    match u.exists().await {
        Ok(true) => {}
        Ok(false) => {
            info!("restore refused: no such account");
            u.send(session::end(&me, &r, StreamErrorCondition::NotAuthorized));
            return;
        }
        Err(e) => {
            warn!("restore refused: storage is not available: {e}");
            u.send(session::end(
                &me,
                &r,
                StreamErrorCondition::InternalServerError,
            ));
            return;
        }
    }
    if let Some(old) = u.find_resource(&r.jid) {
        end_session(u, old, Some(StreamErrorCondition::Conflict)).await;
    }
    if u.sessions.len() >= u.ctx.config.sessions_max {
        warn!("restore refused: too many sessions");
        u.send(session::end(
            &me,
            &r,
            StreamErrorCondition::ResourceConstraint,
        ));
        return;
    }
    u.removed = false;
    u.ctx.accounts.remember(&u.bare, true);
    let key = u.add_session(&r);
    let presence = state
        .presence
        .clone()
        .and_then(|b| Stanza::parse(b).ok())
        .filter(|p| p.name() == "presence" && p.kind().is_none())
        .and_then(|p| stanzas::parse(&p).ok());
    let s = u.session_mut(key).expect("added");
    s.resume_token = state.token.clone();
    if let Some(mut el) = presence {
        el.remove_attr("to");
        el.set_attr("from", s.full.clone());
        s.priority = el
            .child_text("priority")
            .and_then(|p| p.trim().parse::<i32>().ok())
            .unwrap_or(0)
            .clamp(-128, 127);
        s.available = true;
        s.presence = Some(el);
    }
    info!(available = s.available, c2s = %r.c2s, "session restored");
    u.send(session::packet(&me, "restored", &r, b""));
    u.flush();
    hooks::session_restored(u, key, &state).await;
}

/// A stanza the client sent (outbound processing).
async fn client_stanza(u: &mut User, r: SessionRef, stanza: Stanza) {
    let Some(key) = u.find(&r) else {
        // The stanza goes back with the reset: sent before its c2s heard that we went
        // away (held by the router and replayed to us), it is sent again after the
        // session's restore (docs/protocol.md, "Sessions").
        reset_returning(u, &r, &stanza);
        return;
    };
    let full = r.jid.clone();
    // c2s stamps the full JID; make sure of it.
    let stanza = if stanza.attr("from").as_deref() != Some(full.as_str()) {
        stanzas::reparse(stanza.with_addresses(None, Some(full.as_str())))
    } else {
        stanza
    };
    let to = match stanza.attr("to").map(|t| jrs_stream::jids::parse(&t)) {
        None => None,
        Some(Ok(j)) => Some(j),
        Some(Err(e)) => {
            if let Some(reply) =
                stanza.error_reply(StanzaErrorCondition::JidMalformed, &format!("'to': {e}"))
            {
                u.deliver(key, reply);
            }
            return;
        }
    };
    let mut p = Packet::new(stanza, to, Some(Jid::from(full)));
    if hooks::outbound(u, key, &mut p).await == Flow::Handled {
        return;
    }
    match p.name() {
        "iq" => iq_routing::from_client(u, key, p).await,
        "message" if p.kind() != Some("error") => {
            // Nobody routes messages: the messages module is not loaded.
            if let Some(reply) = p
                .stanza()
                .error_reply(StanzaErrorCondition::ServiceUnavailable, "")
            {
                u.deliver(key, reply);
            }
        }
        other => debug!("<{other}> from the client left unhandled"),
    }
}

/// A stanza addressed to this user (inbound processing): from the network, or from one
/// of the user's own sessions to the user's own account.
pub async fn inbound(u: &mut User, mut p: Packet) {
    let kind = p.kind().unwrap_or("").to_owned();
    match u.exists().await {
        Ok(true) => {}
        Ok(false) => return no_such_user(u, &p, &kind),
        Err(e) => {
            warn!("{} for this user not processed: {e}", p.name());
            if p.name() != "presence" {
                u.refuse(
                    p.stanza(),
                    StanzaErrorCondition::InternalServerError,
                    "storage is not available right now",
                );
            }
            return;
        }
    }
    if hooks::inbound(u, &mut p).await == Flow::Handled {
        return;
    }
    match p.name() {
        "iq" => iq_routing::inbound(u, p).await,
        "message" => u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, ""),
        other => debug!(kind, "<{other}> for the user left unhandled"),
    }
}

/// RFC 6121: to an account that does not exist, messages and IQ requests are answered
/// `service-unavailable` (8.5.1), subscription requests and probes `unsubscribed`
/// (3.1.3, 4.3.2); other presence is dropped.
fn no_such_user(u: &mut User, p: &Packet, kind: &str) {
    match (p.name(), kind) {
        ("presence", "subscribe" | "probe") => {
            if let Some(from) = &p.from {
                let reply =
                    stanzas::presence(Some("unsubscribed"), &u.bare, &from.to_bare().to_string());
                u.send(reply.to_stanza());
            }
        }
        ("presence", _) => {}
        _ => u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, ""),
    }
}

/// Answers the sender of an event `user`'s full queue refused (and counts it: logged
/// once per burst).
fn overloaded(ctx: &Ctx, user: &BareJid, event: Event) {
    use jrs_stream::StanzaErrorCondition::ResourceConstraint;
    let text = "too many stanzas queued for this user; try again later";
    match event {
        Event::Inbound(p) => {
            ctx.overload.refused(user, "a stanza for the user");
            if let Some(reply) = p.stanza().error_reply(ResourceConstraint, text) {
                ctx.send(reply);
            }
        }
        Event::Stanza(s, stanza) => {
            ctx.overload.refused(user, "a stanza from a client");
            if let Some(reply) = stanza.error_reply(ResourceConstraint, text) {
                ctx.send(session::packet(&ctx.me, "stanza", &s, &reply));
            }
        }
        Event::Start(s) => {
            ctx.overload.refused(user, "a session start");
            ctx.send(session::refuse_start(&ctx.me, &s, ResourceConstraint, text));
        }
        other => error!("user queue full: {other:?} dropped"),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::host::registry::Event;
    use crate::modules::carbons::Enabled;
    use crate::modules::presence::Directed;
    use crate::modules::testing::*;
    use jrs_component::session::SessionState;

    fn state(presence: Option<&'static str>) -> SessionState {
        SessionState {
            presence: presence.map(|p| Bytes::from_static(p.as_bytes())),
            carbons: true,
            roster: true,
            directed: vec!["room@conference.example.org/alice".into()],
            ..SessionState::default()
        }
    }

    #[tokio::test]
    async fn a_lost_session_is_restored_without_a_broadcast() {
        let ctx = ctx(None, "");
        ctx.store
            .set("alice@localhost", "jabber:iq:roster", "<query xmlns='jabber:iq:roster' ver='1'><item jid='bob@example.com' subscription='both'/></query>")
            .await
            .unwrap();
        let mut u = user(&ctx, "alice@localhost");
        // Stored while sm had no session for alice (it restarted).
        inbound(
            &mut u,
            "<message from='bob@example.com/x' to='alice@localhost' type='chat' id='m1'><body>hi</body></message>",
        )
        .await;
        take(&mut u);
        let r = reference(&u, "phone");
        let presence = "<presence from='alice@localhost/phone'><show>away</show><priority>5</priority></presence>";
        super::handle(&mut u, Event::Restore(r.clone(), state(Some(presence)))).await;
        let out = take(&mut u);
        // `restored` went out first (flushed before the hooks ran).
        // Contacts never saw alice leave: no presence broadcast, but they are probed.
        assert!(
            to(&out, "", &["<presence", "to='bob@example.com'"])
                .iter()
                .all(|p| p.contains("type='probe'")),
            "{out:?}"
        );
        assert_eq!(
            to(&out, "", &["type='probe'", "to='bob@example.com'"]).len(),
            1,
            "{out:?}"
        );
        // What was stored meanwhile reaches the restored session.
        assert_eq!(to(&out, "phone", &["id='m1'"]).len(), 1, "{out:?}");
        let s = u.session(u.find(&r).unwrap()).unwrap();
        assert!(s.available && s.priority == 5 && !s.stale);
        assert!(s.state.get::<Enabled>().is_some());
        assert_eq!(s.state.get::<Directed>().unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn sessions_kept_over_a_link_loss_wait_for_their_restore() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        online(&mut u, "laptop", 0).await;
        take(&mut u);
        super::handle(&mut u, Event::LinkLost).await;
        assert!(u.sessions.iter().all(|s| s.stale && s.available));
        assert!(take(&mut u).is_empty(), "nothing is broadcast");
        // The phone's c2s restores it: the same session, live again.
        let r = reference(&u, "phone");
        let key = u.find(&r).unwrap();
        super::handle(&mut u, Event::Restore(r.clone(), SessionState::default())).await;
        assert_eq!(u.find(&r), Some(key));
        assert!(!u.session(key).unwrap().stale);
        let out = take(&mut u);
        assert_eq!(to(&out, "", &["type='restored'"]).len(), 1, "{out:?}");
        // The laptop's never does: it ends when the wait is over.
        super::handle(&mut u, Event::StaleOver).await;
        assert_eq!(u.sessions.len(), 1);
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "phone",
                &["type='unavailable'", "from='alice@localhost/laptop'"]
            )
            .len(),
            1,
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn a_stanza_for_an_unknown_session_comes_back_with_the_reset() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        send(
            &mut u,
            "phone",
            "<message to='bob@example.com' id='x'><body>1</body></message>",
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "",
                &["type='end'", "<reset ", "<queued><message", "id='x'"]
            )
            .len(),
            1,
            "{out:?}"
        );
    }
}
