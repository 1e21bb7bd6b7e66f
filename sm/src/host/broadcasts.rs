//! The table of live sessions that room broadcasts may reach without their user's task
//! (`host::shortcut` fills and reads it), and what modules say about it
//! ([`crate::host::Module::room_broadcasts`]). Apart from `shortcut` so that the module
//! host's kernel, which holds the table, does not depend on the code that uses it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use jid::Jid;

use crate::host::registry::Pending;

/// What a module's inbound hooks would do to a room broadcast for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Pass it unchanged.
    All,
    /// Stop it when it comes from these (full JIDs, bare JIDs or domains, as text:
    /// see [`blocked_by`]).
    AllBut(BTreeSet<String>),
    /// The module cannot tell yet (its state is not loaded): every broadcast goes
    /// through the user's task.
    None,
}

/// One session that may take the shortcut.
pub struct Entry {
    pub c2s: Arc<str>,
    pub sid: Arc<str>,
    pub pending: Pending,
    pub blocked: Arc<BTreeSet<String>>,
}

/// The table: full JID (as text) -> where its session is.
#[derive(Default)]
pub struct Shortcuts {
    sessions: Mutex<HashMap<String, Entry>>,
}

impl Shortcuts {
    /// The table, even after a panic elsewhere held its lock (the entries stay
    /// consistent: each is replaced whole).
    pub fn table(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether a blocklist (full JIDs, bare JIDs, domains as text) blocks `who`: its full
/// JID, its bare JID or its domain is listed (XEP-0191; the blocking module's rule).
pub fn blocked_by(list: &BTreeSet<String>, who: &Jid) -> bool {
    !list.is_empty()
        && (list.contains(who.as_str())
            || list.contains(who.domain().as_str())
            || (who.resource().is_some() && list.contains(who.to_bare().as_str())))
}
