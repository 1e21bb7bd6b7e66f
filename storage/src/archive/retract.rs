//! `archive-retract`: the stanza of one item replaced (a tombstone of a moderated
//! message), its id, time and `with` kept.
//!
//! Records are never rewritten in place (a torn write would lose the item): the new
//! record goes at the end of the item's segment log and is synced, then the item's
//! index entry points at it and is synced, then the old record's bytes are zeroed so
//! the retracted stanza does not stay readable on disk. A crash before the entry is
//! durable leaves the old item (the request was never answered); in the head segment
//! such an unreferenced record is cut when the archive is opened, and a referenced one
//! is kept (`Archive::recover_head`).

use std::io;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use jrs_xdb::archive::{unknown_id, Item};
use jrs_xdb::Refusal;

use super::files::Files;
use super::format::{encode_record, idx_name, log_name, IdxEntry, IDX_ENTRY};
use super::internal;
use super::store::Archive;
use crate::spool::Spool;

impl Archive {
    /// Replaces the stanza of the live item `id` with `payload`; nothing to do when it
    /// is already that (a retried request).
    pub fn retract(
        &mut self,
        files: &mut Files,
        spool: &mut Spool,
        id: &str,
        payload: Bytes,
    ) -> Result<(), Refusal> {
        let seq = self
            .find_id(files, id, self.low, self.next)
            .ok_or_else(|| unknown_id(id))?;
        let dir = self.dir.clone();
        let corrupt = |what: &str| {
            internal(format!(
                "archive {}: the {what} of item {seq} ('{id}') is unreadable; not retracted",
                dir.display()
            ))
        };
        let entry = self
            .entries(files, seq, seq + 1)
            .pop()
            .flatten()
            .ok_or_else(|| corrupt("index entry"))?;
        let old = self
            .items(files, &[seq], &[Some(entry)])
            .pop()
            .flatten()
            .ok_or_else(|| corrupt("record"))?;
        if old.payload == payload {
            return Ok(());
        }
        let new = Item { payload, ..old };
        self.replace(files, seq, &entry, &new).map_err(|e| {
            internal(format!(
                "archive {}: retracting item {seq}: {e}",
                self.dir.display()
            ))
        })?;
        spool.mark_dirty();
        Ok(())
    }

    fn replace(
        &mut self,
        files: &mut Files,
        seq: u64,
        old: &IdxEntry,
        item: &Item,
    ) -> io::Result<()> {
        let seg = self.segment_of(seq);
        let missing = || io::Error::new(io::ErrorKind::NotFound, "segment file missing");
        let log = files
            .open(&self.dir.join(log_name(seg)), false)?
            .ok_or_else(missing)?;
        let idx = files
            .open(&self.dir.join(idx_name(seg)), false)?
            .ok_or_else(missing)?;
        let end = if seg == self.head {
            self.head_log_len
        } else {
            log.metadata()?.len()
        };
        let mut record = vec![];
        let len = encode_record(seq, item, &mut record);
        log.write_all_at(&record, end)?;
        // The record is durable before an entry points at it...
        log.sync_data()?;
        let entry = IdxEntry::new(item.time, end, len, &item.id);
        idx.write_all_at(&entry.encode(), (seq - seg) * IDX_ENTRY)?;
        // ...and the entry before the old record goes.
        idx.sync_data()?;
        if seg == self.head {
            self.head_log_len = end + len as u64;
        }
        log.write_all_at(&vec![0u8; old.len as usize], old.offset)?;
        Ok(())
    }
}
