//! The task of one user: takes the user's events in order, runs each through the
//! session protocol and the modules' chains, and sends what they produced after each
//! batch of events. What nobody handles gets the fallback answer here.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use jid::{BareJid, Jid};
use jrs_stream::{Stanza, StanzaErrorCondition, StreamErrorCondition};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::host::ending::{end_session, reset, undelivered};
use crate::host::handover;
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
            let span = info_span!("user", jid = %jid);
            tokio::spawn(run(User::new(c, jid), rx, pending).instrument(span));
        });
    if let Err(e) = result {
        overloaded(ctx, user, *e);
    }
}

async fn run(mut u: User, mut rx: Receiver, pending: Pending) {
    loop {
        let Some(event) = rx.recv().await else { break };
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
        // Sent: room broadcasts may overtake nothing now (host::shortcut).
        shortcut::publish(&mut u, &pending);
        pending.fetch_sub(handled, Ordering::AcqRel);
        if u.sessions.is_empty() && u.ctx.users.retire(&u.jid, &rx) {
            break;
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
        Event::Delivered(r, count) => match u.find(&r) {
            Some(key) => hooks::offline_confirmed(u, key, count).await,
            None => debug!(count, "confirmation for an ended session"),
        },
        Event::Stanza(r, stanza) => {
            let span = session_span(&r);
            client_stanza(u, r, stanza).instrument(span).await
        }
        Event::Inbound(p) => {
            let span = info_span!(
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
        Event::LinkLost => {
            // c2s reset every client of ours when it heard we disconnected.
            while let Some(key) = u.sessions.first().map(|s| s.key) {
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

/// A stanza the client sent (outbound processing).
async fn client_stanza(u: &mut User, r: SessionRef, stanza: Stanza) {
    let Some(key) = u.find(&r) else {
        reset(u, &r);
        return;
    };
    let full = r.jid.clone();
    // c2s stamps the full JID; make sure of it.
    let stanza = if stanza.attr("from").as_deref() != Some(full.as_str()) {
        stanzas::reparse(stanza.with_addresses(None, Some(full.as_str())))
    } else {
        stanza
    };
    let to = match stanza.attr("to").map(|t| Jid::new(&t)) {
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
