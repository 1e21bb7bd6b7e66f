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

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use jid::Jid;
use jrs_component::fanout::{self, Fanout, Recipient};
use jrs_stream::children::children;
use tracing::debug;

use crate::host::broadcasts::{blocked_by, Admit, Entry, Shortcuts};
use crate::host::kernel::{Ctx, User};
use crate::host::registry::Pending;

const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
const NS_CARBONS: &str = "urn:xmpp:carbons:2";

/// What a user published last (kept in its state to see whether it changed). When
/// the user's task ends, even by a panic, its entries go with it.
#[derive(Default)]
struct Published {
    /// (full JID, c2s, sid) of each live session.
    sessions: Vec<(String, String, String)>,
    blocked: BTreeSet<String>,
    table: Option<Arc<Shortcuts>>,
}

impl Drop for Published {
    fn drop(&mut self) {
        if let (Some(table), false) = (&self.table, self.sessions.is_empty()) {
            let mut table = table.table();
            for (full, ..) in &self.sessions {
                table.remove(full);
            }
        }
    }
}

/// Updates the table for the user after its task handled events (and before it counts
/// them done). Cheap when nothing changed.
pub fn publish(u: &mut User, pending: &Pending) {
    let mut blocked = BTreeSet::new();
    let mut admitted = true;
    if !u.sessions.is_empty() {
        for m in u.ctx.modules.all() {
            match m.room_broadcasts(u) {
                Admit::All => {}
                Admit::AllBut(list) => blocked.extend(list),
                Admit::None => admitted = false,
            }
        }
    }
    // Compared in place: this runs after every batch of events, and the sessions
    // rarely change between two.
    let live = || u.sessions.iter().filter(|s| admitted && s.is_live());
    let published = u.state.entry::<Published>();
    let unchanged = published.blocked == blocked
        && published.sessions.len() == live().count()
        && published
            .sessions
            .iter()
            .zip(live())
            .all(|((full, c2s, sid), s)| *full == s.full && *c2s == s.c2s && *sid == s.sid);
    if unchanged {
        return;
    }
    // Exactly as long as needed: one is kept per user with a session.
    let mut sessions = Vec::with_capacity(live().count());
    sessions.extend(live().map(|s| (s.full.clone(), s.c2s.clone(), s.sid.clone())));
    let shortcuts = u.ctx.shortcuts.clone();
    let mut table = shortcuts.table();
    for (full, ..) in &published.sessions {
        table.remove(full);
    }
    let shared_blocked = Arc::new(blocked.clone());
    for (full, c2s, sid) in sessions.iter().cloned() {
        table.insert(
            full,
            Entry {
                c2s: c2s.into(),
                sid: sid.into(),
                pending: pending.clone(),
                blocked: shared_blocked.clone(),
            },
        );
    }
    drop(table);
    published.sessions = sessions;
    published.blocked = blocked;
    published.table = Some(shortcuts);
}

/// Whether the stanza is a room broadcast that the inbound hooks pass unchanged: a
/// groupchat message (without a carbons marker, which the carbons hook removes), or a
/// presence with a `muc#user` `<x/>` child (what PEP's hook looks for to leave it be).
fn is_room_broadcast(f: &Fanout<'_>) -> bool {
    let s = &f.stanza;
    match (s.name(), s.kind()) {
        ("message", Some("groupchat")) => {
            memchr::memmem::find(s.inner(), NS_CARBONS.as_bytes()).is_none()
        }
        ("presence", None | Some("unavailable")) => {
            // A cheap look first; then the children, as PEP reads them.
            memchr::memmem::find(s.inner(), NS_MUC_USER.as_bytes()).is_some()
                && children(&s.to_owned())
                    .iter()
                    .any(|c| c.name == "x" && c.ns == NS_MUC_USER)
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
        let table = ctx.shortcuts.table();
        for r in &f.recipients {
            let to = jrs_stream::xml::unescape(r.to);
            let entry = to.as_deref().and_then(|to| table.get(to));
            let Some(e) = entry.filter(|e| e.pending.load(Ordering::Acquire) == 0) else {
                slow.push(*r);
                continue;
            };
            if !e.blocked.is_empty() && blocked_by(&e.blocked, &from) {
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
        let recipients = recipients.iter().map(|(r, sid)| Recipient {
            to: r.to,
            sid: Some(sid),
        });
        ctx.send(fanout::session_packet(&ctx.me, &c2s, recipients, stanza));
    }
    slow
}
