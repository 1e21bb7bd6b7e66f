//! Ending sessions: the modules' hooks, and what the client never got (offline
//! storage, another session, or an error to the sender).

use std::sync::atomic::Ordering;

use jid::{FullJid, Jid};
use jrs_stream::{Stanza, StanzaErrorCondition, StreamErrorCondition};
use tracing::debug;

use crate::host::hooks;
use crate::host::kernel::{Flow, User};
use crate::host::packet::Packet;
use crate::host::session::{self, Link, Queued, SessionKey, SessionRef};

/// `end` with `<reset/>` for a session we do not know (we restarted, or it ended).
pub fn reset(u: &mut User, r: &SessionRef) {
    debug!(jid = %r.jid, sid = %r.sid, c2s = %r.c2s, "unknown session: reset");
    let packet = session::end_reset(&u.ctx.me, r);
    u.send(packet);
}

/// `end` with `<reset/>` for a client stanza of a session we do not know, the stanza
/// returned as `<queued/>`: a c2s restoring that session sends it again after the
/// `restore` (it was on its way when we restarted); any other c2s resets the client.
pub fn reset_returning(u: &mut User, r: &SessionRef, stanza: &Stanza) {
    debug!(jid = %r.jid, sid = %r.sid, c2s = %r.c2s, "stanza for an unknown session: reset");
    let item = Queued::new(stanza.bytes().clone());
    let mut inner = format!("<reset xmlns='{}'/>", jrs_stream::NS_STREAM_ERRORS).into_bytes();
    inner.extend(jrs_component::session::encode(&[item]));
    let packet = session::packet(&u.ctx.me, "end", r, &inner);
    u.send(packet);
}

/// Ends session `key`; with `tell`, sends its c2s an `end` saying why. The modules'
/// [`hooks::session_ended`] then do the rest (unavailable presence, last activity);
/// what a held session's client did not get is handled as [`undelivered`].
pub async fn end_session(u: &mut User, key: SessionKey, tell: Option<StreamErrorCondition>) {
    let Some(mut s) = u.remove_session(key) else {
        return;
    };
    let mut items = vec![];
    match std::mem::take(&mut s.link) {
        Link::Live => {
            if let Some(c) = tell {
                let packet = session::end(&u.ctx.me, &s.reference(), c);
                u.send(packet);
            }
        }
        Link::Held(held) => {
            if held.parked.as_ref().is_some_and(|p| p.counted) {
                u.ctx.parked.fetch_sub(1, Ordering::Relaxed);
            }
            if held.parked.is_some() {
                u.hibernation.changed();
            }
            if let Some(r) = held.resumer {
                let refusal = session::refuse_resume(&u.ctx.me, &r.c2s, &r.sid, &u.bare);
                u.send(refusal);
            }
            items = held.items;
        }
    }
    hooks::session_ended(u, &s).await;
    undelivered(u, &s.jid, Some(s.priority), items).await;
}

/// A note on an undelivered stanza: the ended session it was for.
pub struct EndedSession {
    pub priority: i32,
}

/// Stanzas the client of session `full` (ended) never got. Offline messages are still
/// in storage; the rest go to the modules (messages: to another session or offline
/// storage, RFC 6121 8.5.3.2.1), else IQ requests and messages are answered with an
/// error. Nothing is dropped silently but what RFC 6121 drops (presence, IQ answers,
/// headline, group chat and error messages).
pub async fn undelivered(u: &mut User, full: &FullJid, priority: Option<i32>, items: Vec<Queued>) {
    for item in items {
        if item.offline {
            continue;
        }
        let Ok(stanza) = Stanza::parse(item.bytes) else {
            continue;
        };
        let from = stanza.attr("from").and_then(|f| Jid::new(&f).ok());
        let mut p = Packet::new(stanza, Some(Jid::from(full.clone())), from);
        p.notes.insert(EndedSession {
            priority: priority.unwrap_or(0),
        });
        if hooks::undelivered(u, &p).await == Flow::Handled {
            continue;
        }
        let text = "the recipient's session ended before it got this";
        match (p.name(), p.kind()) {
            ("iq", Some("get" | "set")) => {
                u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, text)
            }
            ("message", Some("error" | "groupchat" | "headline")) => {}
            ("message", _) => u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, text),
            (name, kind) => debug!(name, ?kind, "undelivered stanza dropped (RFC 6121)"),
        }
    }
}
