//! Room broadcasts straight to live sessions. A group chat room sends one `<fanout>`
//! packet per message for all its occupants here (docs/protocol.md, "Fan-out"); going
//! through each recipient's task would cost a task wake-up, a parse and a packet per
//! recipient, which is most of what a big room costs. Instead the link reader looks each
//! recipient up in a table the user tasks publish, and sends one `<session
//! type='fanout'>` per c2s instance with the sessions it holds.
//!
//! A recipient takes the shortcut only when nothing can tell the difference:
//! - the stanza is a room broadcast: a `groupchat` message, or an occupant's presence
//!   (available or unavailable, with `muc#user` data), which the modules' inbound hooks
//!   pass unchanged to a session that is there (no archive, carbons, push or PEP work);
//! - the full JID has a live session (not hibernating or handed over);
//! - the user's task has nothing pending, so nothing it still sends can come after;
//! - every module agrees ([`Module::room_broadcasts`]): the blocklist, loaded, does not
//!   block the sender.
//!
//! Everyone else gets their copy as a `normal` packet through their task, as before.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use jid::Jid;
use jrs_component::fanout::{self, Fanout, Recipient};
use tracing::debug;

use crate::host::kernel::{Ctx, User};
use crate::host::registry::Pending;

const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";

/// What a module's inbound hooks would do to a room broadcast for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Pass it unchanged.
    All,
    /// Stop it when it comes from these (full JIDs, bare JIDs or domains, as text).
    AllBut(Vec<String>),
    /// The module cannot tell yet (its state is not loaded): every broadcast goes
    /// through the user's task.
    None,
}

/// One session that may take the shortcut.
struct Entry {
    c2s: Arc<str>,
    sid: Arc<str>,
    pending: Pending,
    blocked: Arc<Vec<String>>,
}

/// The table: full JID (as text) -> where its session is.
#[derive(Default)]
pub struct Shortcuts {
    sessions: Mutex<HashMap<String, Entry>>,
}

/// What a user published last (kept in its state to see whether it changed).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Published {
    /// (full JID, c2s, sid) of each live session.
    sessions: Vec<(String, String, String)>,
    blocked: Vec<String>,
}

/// Updates the table for the user after its task handled events (and before it counts
/// them done). Cheap when nothing changed.
pub fn publish(u: &mut User, pending: &Pending) {
    let mut now = Published::default();
    let mut admitted = true;
    if !u.sessions.is_empty() {
        for m in u.ctx.modules.all() {
            match m.room_broadcasts(u) {
                Admit::All => {}
                Admit::AllBut(list) => now.blocked.extend(list),
                Admit::None => admitted = false,
            }
        }
    }
    if admitted {
        now.sessions = u
            .sessions
            .iter()
            .filter(|s| s.is_live())
            .map(|s| (s.full.clone(), s.c2s.clone(), s.sid.clone()))
            .collect();
    }
    let before = u.state.entry::<Published>();
    if *before == now {
        return;
    }
    let before = std::mem::replace(before, now.clone());
    let mut table = u.ctx.shortcuts.sessions.lock().expect("shortcuts lock");
    for (full, ..) in &before.sessions {
        table.remove(full);
    }
    let blocked = Arc::new(now.blocked);
    for (full, c2s, sid) in now.sessions {
        table.insert(
            full,
            Entry {
                c2s: c2s.into(),
                sid: sid.into(),
                pending: pending.clone(),
                blocked: blocked.clone(),
            },
        );
    }
}

/// Whether the stanza is a room broadcast that the inbound hooks pass unchanged.
fn is_room_broadcast(f: &Fanout<'_>) -> bool {
    let s = &f.stanza;
    match (s.name(), s.kind()) {
        ("message", Some("groupchat")) => true,
        ("presence", None | Some("unavailable")) => {
            // Its `<x xmlns='..muc#user'>`: a cheap look, the namespace as written.
            memchr::memmem::find(s.inner(), NS_MUC_USER.as_bytes()).is_some()
        }
        _ => false,
    }
}

/// Splits a fan-out packet: one `<session type='fanout'>` per c2s for the recipients
/// that may take the shortcut; returns the others, for their tasks.
pub fn deliver<'a>(ctx: &Ctx, f: &Fanout<'a>) -> Vec<Recipient<'a>> {
    if !is_room_broadcast(f) {
        return f.recipients.clone();
    }
    let from = f
        .stanza
        .from()
        .and_then(jrs_stream::xml::unescape)
        .and_then(|from| Jid::new(&from).ok());
    let Some(from) = from else {
        return f.recipients.clone();
    };
    let mut slow = vec![];
    // Per c2s: its recipients (and their session ids), in order.
    type Batch<'a> = (Arc<str>, Vec<(Recipient<'a>, Arc<str>)>);
    let mut batches: Vec<Batch<'a>> = vec![];
    {
        let table = ctx.shortcuts.sessions.lock().expect("shortcuts lock");
        for r in &f.recipients {
            let to = jrs_stream::xml::unescape(r.to);
            let entry = to.as_deref().and_then(|to| table.get(to));
            let Some(e) = entry.filter(|e| e.pending.load(Ordering::Acquire) == 0) else {
                slow.push(*r);
                continue;
            };
            if !e.blocked.is_empty() && blocks(&e.blocked, &from) {
                slow.push(*r);
                continue;
            }
            match batches.iter_mut().find(|(c2s, _)| *c2s == e.c2s) {
                Some((_, rs)) => rs.push((*r, e.sid.clone())),
                None => batches.push((e.c2s.clone(), vec![(*r, e.sid.clone())])),
            }
        }
    }
    debug!(
        recipients = f.recipients.len(),
        shortcut = f.recipients.len() - slow.len(),
        "room broadcast"
    );
    let stanza = f.stanza.as_slice();
    for (c2s, recipients) in batches {
        let mut out = BytesMut::with_capacity(stanza.len() + 64 + recipients.len() * 48);
        out.put_slice(b"<session type='fanout' from='");
        out.put_slice(jrs_stream::xml::escape(&ctx.me).as_bytes());
        out.put_slice(b"' to='");
        out.put_slice(jrs_stream::xml::escape(&c2s).as_bytes());
        out.put_slice(b"'>");
        for (r, sid) in &recipients {
            fanout::recipient(
                Recipient {
                    to: r.to,
                    sid: Some(sid),
                },
                &mut out,
            );
        }
        out.put_slice(stanza);
        out.put_slice(b"</session>");
        ctx.send(out.freeze());
    }
    slow
}

/// Whether a blocklist (full JIDs, bare JIDs, domains as text) blocks `who`, as the
/// blocking module decides.
fn blocks(list: &[String], who: &Jid) -> bool {
    let listed = |s: &str| list.iter().any(|b| b == s);
    listed(who.as_str())
        || listed(who.domain().as_str())
        || (who.resource().is_some() && listed(who.to_bare().as_str()))
}
