//! What sm keeps of its hibernating sessions' queues in storage (`hibernation.rs` does the
//! writing and the giving back): the names, what one user's task has written, and the
//! per-domain lists of users with a record. No dependency on the rest of the host, so
//! the kernel's types can hold these.

use std::collections::HashSet;

use jid::BareJid;
use jrs_stream::Stanza;
use jrs_xdb::XdbError;

use crate::host::session::Queued;
use crate::host::store::Store;
use crate::xml::escape;

pub const NS_HIBERNATED: &str = "urn:jabberd-rs:hibernated:0";

/// The namespace of this instance's records (and, owner the domain, of its list).
pub fn record_ns(me: &str) -> String {
    format!("{NS_HIBERNATED}:{me}")
}

/// What a user's task has written of its hibernating sessions.
#[derive(Debug, Default)]
pub struct Written {
    /// The user has a record in storage (written in this run, or found from the last).
    pub(crate) stored: bool,
    /// Items queued since the last write, to append.
    pub(crate) appends: Vec<u8>,
    /// A session left the queue: the record is rewritten from what is held now.
    pub(crate) rewrite: bool,
}

impl Written {
    /// A stanza queued for parked session `token` (`full`): appended after the event.
    pub fn queued(&mut self, token: &str, full: &str, item: &Queued) {
        if !self.rewrite && worth_keeping(item) {
            push_item(&mut self.appends, token, full, &item.bytes);
        }
    }

    /// A session parked, resumed or ended: the record is written again.
    pub fn changed(&mut self) {
        self.rewrite = true;
        self.appends.clear();
    }
}

/// Whether the end of a session would do anything with `item`: messages (not errors)
/// and IQ requests; offline messages are in storage already.
pub fn worth_keeping(item: &Queued) -> bool {
    if item.offline {
        return false;
    }
    let Ok(s) = Stanza::parse(item.bytes.clone()) else {
        return false;
    };
    match s.name() {
        "message" => s.kind() != Some("error"),
        "iq" => matches!(s.kind(), Some("get" | "set")),
        _ => false,
    }
}

pub fn push_item(out: &mut Vec<u8>, token: &str, full: &str, stanza: &[u8]) {
    out.extend_from_slice(
        format!("<queued token='{}' jid='{}'>", escape(token), escape(full)).as_bytes(),
    );
    out.extend_from_slice(stanza);
    out.extend_from_slice(b"</queued>");
}

/// The users with a record, per domain (this instance's lists), and those whose record of
/// an earlier run was given back in this one.
#[derive(Default)]
pub struct Index {
    /// [`recover`] was started (by the first router link).
    pub recovering: std::sync::atomic::AtomicBool,
    /// Users listed in storage by this run (or kept from the last one). A lock held
    /// across storage writes: the list rewritten at start-up must not overtake an append.
    listed: tokio::sync::Mutex<HashSet<BareJid>>,
    /// Users whose earlier run's record was given back (or found empty) in this run.
    recovered: tokio::sync::Mutex<HashSet<BareJid>>,
}

impl Index {
    /// Makes sure the domain's list (of sm instance `me`) names `user`.
    pub async fn list(&self, store: &Store, me: &str, user: &BareJid) -> Result<(), XdbError> {
        let mut listed = self.listed.lock().await;
        if listed.contains(user) {
            return Ok(());
        }
        let item = format!("<user jid='{}'/>", escape(user.as_str()));
        store
            .append(user.domain().as_str(), &record_ns(me), item, None)
            .await?;
        listed.insert(user.clone());
        Ok(())
    }

    /// Writes `host`'s list again: `kept` (found at start-up) and those listed since.
    pub async fn relist(
        &self,
        store: &Store,
        me: &str,
        host: &str,
        kept: Vec<BareJid>,
    ) -> Result<(), XdbError> {
        let mut listed = self.listed.lock().await;
        listed.extend(kept);
        let index: String = listed
            .iter()
            .filter(|u| u.domain().as_str() == host)
            .map(|u| format!("<user jid='{}'/>", escape(u.as_str())))
            .collect();
        if index.is_empty() {
            store.delete(host, &record_ns(me)).await
        } else {
            store.set(host, &record_ns(me), index).await
        }
    }

    pub async fn is_recovered(&self, user: &BareJid) -> bool {
        self.recovered.lock().await.contains(user)
    }

    /// Marks `user` recovered; false if it was already.
    pub async fn recover_once(&self, user: &BareJid) -> bool {
        self.recovered.lock().await.insert(user.clone())
    }
}
