//! Message archives: the `archive-append`, `archive-query`, `archive-trim` and
//! `archive-retract` requests
//! (docs/protocol.md, "Archives"), stored as an append-only log with indexes
//! (docs/storage.md, "Message archives"):
//!
//! ```text
//! SPOOL/localhost/alice/urn%3Axmpp%3Amam%3A2.archive/
//!     meta                       segment size and low-water mark (replaced atomically)
//!     0000000000000000.log       records of items 0..65535 (length, CRC-32, fields)
//!     0000000000000000.idx       64-byte entry per item: time, offset, length, id prefix
//!     0000000000010000.log ...   the next segment
//!     with/bob%40example.net     16-byte entry per item with bob: sequence number, hash
//! ```
//! - [`format`]: the bytes of records, entries and names;
//! - [`store`]: an open archive, recovery of a torn tail, reads and binary searches;
//! - [`write`]: append and retention; [`with`]: the with-index;
//! - [`query`]: pages with the semantics of `jrs_xdb::archive::select`;
//! - [`retract`]: an item's stanza replaced (tombstones);
//! - [`files`]: the bounded cache of open files.
//!
//! Each owner's requests run on one worker thread, in order, so an [`Archives`] (one
//! per thread) needs no locks.

mod files;
mod format;
mod query;
mod retract;
mod store;
mod with;
mod write;

#[cfg(test)]
mod tests;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use lru::LruCache;
use tracing::error;

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::archive::{parse_items, parse_retraction, Item, Query, Retention};
use jrs_xdb::Refusal;

use crate::spool::Spool;
use files::Files;
use store::Archive;

/// Items per segment of a new archive: 65536 items of ~300 bytes make a 20 MiB log and
/// a 4 MiB index, so retention removes data in steps of that size.
pub const SEGMENT_ITEMS: u64 = 65536;

fn internal(text: String) -> Refusal {
    error!("{text}");
    Refusal::new(StanzaErrorCondition::InternalServerError, text)
}

fn bad(text: String) -> Refusal {
    Refusal::new(StanzaErrorCondition::BadRequest, text)
}

/// The archives of one worker thread: archives recently used, with their open files.
pub struct Archives {
    states: LruCache<PathBuf, Archive>,
    files: Files,
    segment_items: u64,
}

impl Archives {
    /// Keeps up to `max_archives` archives' state and `max_open_files` files open.
    pub fn new(max_archives: usize, max_open_files: usize, segment_items: u64) -> Archives {
        Archives {
            states: LruCache::new(NonZeroUsize::new(max_archives.max(1)).expect("max(1)")),
            files: Files::new(max_open_files),
            segment_items: segment_items.max(1),
        }
    }

    /// `archive-append`: adds the items of `content`, then applies `retention`.
    pub fn append(
        &mut self,
        spool: &mut Spool,
        dir: &Path,
        content: &[u8],
        retention: Retention,
        now: u64,
    ) -> Result<(), Refusal> {
        let items = parse_items(&Bytes::copy_from_slice(content))?;
        self.append_items(spool, dir, &items, retention, now)
    }

    /// Adds `items` (already read from a request), then applies `retention`.
    pub fn append_items(
        &mut self,
        spool: &mut Spool,
        dir: &Path,
        items: &[Item],
        retention: Retention,
        now: u64,
    ) -> Result<(), Refusal> {
        for item in items {
            check(item)?;
        }
        let result = (|| {
            let (archive, files) = self.state(spool, dir)?;
            archive.append(files, spool, items)?;
            archive.retain(files, spool, retention, now)
        })();
        self.after(dir, result)
    }

    /// `archive-query`: the page, as `<archive/>`.
    pub fn query(
        &mut self,
        spool: &mut Spool,
        dir: &Path,
        content: &[u8],
    ) -> Result<Bytes, Refusal> {
        let q = Query::parse(content)?;
        let result = (|| {
            let (archive, files) = self.state(spool, dir)?;
            query::query(archive, files, &q)
        })();
        self.after(dir, result).map(|page| page.to_bytes())
    }

    /// `archive-trim`: applies `retention`.
    pub fn trim(
        &mut self,
        spool: &mut Spool,
        dir: &Path,
        retention: Retention,
        now: u64,
    ) -> Result<(), Refusal> {
        let result = (|| {
            let (archive, files) = self.state(spool, dir)?;
            archive.retain(files, spool, retention, now)
        })();
        self.after(dir, result)
    }

    /// `archive-retract`: replaces the stanza of the item the content names.
    pub fn retract(
        &mut self,
        spool: &mut Spool,
        dir: &Path,
        content: &[u8],
    ) -> Result<(), Refusal> {
        let (id, payload) = parse_retraction(&Bytes::copy_from_slice(content))?;
        let result = (|| {
            let (archive, files) = self.state(spool, dir)?;
            archive.retract(files, spool, &id, payload)
        })();
        self.after(dir, result)
    }

    /// `delete` of the archive's namespace: removes the whole archive.
    pub fn delete(&mut self, spool: &mut Spool, dir: &Path) -> Result<(), Refusal> {
        self.forget_under(dir);
        spool.discard_pending_under(dir);
        spool.remove_tree(dir)
    }

    /// Drops what is known of the archives under `dir` (an owner removed).
    pub fn forget_under(&mut self, dir: &Path) {
        let gone: Vec<PathBuf> = self
            .states
            .iter()
            .filter(|(p, _)| p.starts_with(dir))
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            self.states.pop(&p);
        }
        self.files.forget_under(dir);
    }

    /// Drops everything known (a commit failed: what is on disk is the truth).
    pub fn clear(&mut self) {
        self.states.clear();
        self.files.clear();
    }

    fn state(
        &mut self,
        spool: &mut Spool,
        dir: &Path,
    ) -> Result<(&mut Archive, &mut Files), Refusal> {
        if !self.states.contains(dir) {
            let archive = Archive::open(dir, self.segment_items, &mut self.files, spool)?;
            self.states.put(dir.to_owned(), archive);
        }
        let archive = self.states.get_mut(dir).expect("just put");
        Ok((archive, &mut self.files))
    }

    /// After an internal error the state may not match the disk: read it again next time
    /// (which also cuts back anything written halfway).
    fn after<T>(&mut self, dir: &Path, result: Result<T, Refusal>) -> Result<T, Refusal> {
        if let Err(refusal) = &result {
            if refusal.condition == StanzaErrorCondition::InternalServerError {
                self.states.pop(dir);
                self.files.forget_under(dir);
            }
        }
        result
    }
}

/// Refuses items storage cannot keep or that are not what an archive holds.
fn check(item: &Item) -> Result<(), Refusal> {
    if item.id.is_empty() {
        return Err(bad("an item without an id".into()));
    }
    if item.id.len() > u16::MAX as usize || item.with.len() > u16::MAX as usize {
        return Err(bad(format!(
            "item '{}': id or with longer than 65535 bytes",
            item.id.chars().take(64).collect::<String>()
        )));
    }
    // The payload is served back inside answers. It is well-formed: it was cut out of a
    // request that is (this project's components send what the edges validated, and the
    // router checks every stanza of the others), between an item's balanced tags. A full
    // check of every payload again cost 40% of an append; this one costs nothing.
    let payload = item.payload.trim_ascii();
    if !(payload.starts_with(b"<") && payload.ends_with(b">")) {
        return Err(bad(format!(
            "item '{}': the payload is not an element",
            item.id.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}
