//! Appending to an archive and retention.
//!
//! An append writes the records at the end of the head segment's log, their index
//! entries at the end of its index, and an entry per item at the end of the with-index
//! of the item's bare JID: a few `pwrite`s, whatever the archive's size. Nothing is
//! synced here: the batch's group commit (`Spool::commit`) makes it durable before any
//! answer goes out. The one exception is a segment change: the full segment is synced
//! before the first item goes into the next one, so a crash can only tear the head
//! segment (see `Archive::open`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;

use tracing::info;

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::archive::{bare, Item, Retention};
use jrs_xdb::Refusal;

use super::files::Files;
use super::format::{
    encode_record, encode_with, idx_name, log_name, record_len, with_hash, IdxEntry, Meta,
    IDX_ENTRY, META_FILE,
};
use super::internal;
use super::store::Archive;
use crate::spool::Spool;

impl Archive {
    fn io(&self, what: &str, e: io::Error) -> Refusal {
        internal(format!("archive {}: {what}: {e}", self.dir.display()))
    }

    /// Appends `items` in order. An item whose id is already in the archive is skipped
    /// (a retried append), after making sure its with-index entry is there; an item
    /// whose id is not after the last one and not in the archive is refused with
    /// `conflict`, and so is the whole request (nothing is written). Times must not
    /// decrease.
    pub fn append(
        &mut self,
        files: &mut Files,
        spool: &mut Spool,
        items: &[Item],
    ) -> Result<(), Refusal> {
        if self.last.is_none() && self.next > self.first {
            return Err(internal(format!(
                "archive {}: the last item is unreadable, so the order of new ids cannot be checked",
                self.dir.display()
            )));
        }
        let mut new: Vec<&Item> = vec![];
        let mut skipped = vec![];
        let mut last = self.last.clone();
        for item in items {
            if let Some((last_id, last_time)) = &last {
                if item.id.as_bytes() <= last_id.as_bytes() {
                    if new.iter().any(|n| n.id == item.id) {
                        continue;
                    }
                    // Trimmed items still on disk count: retrying is harmless for them too.
                    match self.find_id(files, &item.id, self.first, self.next) {
                        Some(seq) => {
                            skipped.push(seq);
                            continue;
                        }
                        None => {
                            return Err(Refusal::new(
                                StanzaErrorCondition::Conflict,
                                format!(
                                    "item '{}' is not after the archive's last item '{last_id}' and is not in the archive",
                                    item.id
                                ),
                            ))
                        }
                    }
                }
                if item.time < *last_time {
                    return Err(Refusal::new(
                        StanzaErrorCondition::BadRequest,
                        format!(
                            "item '{}': time {} is before the previous item's {last_time}",
                            item.id, item.time
                        ),
                    ));
                }
            }
            last = Some((item.id.clone(), item.time));
            new.push(item);
        }
        if !self.exists || self.needs_meta {
            fs::create_dir_all(&self.dir).map_err(|e| self.io("creating", e))?;
            self.write_meta(spool)?;
            self.exists = true;
            self.needs_meta = false;
        }
        for seq in skipped {
            self.restore_with(files, seq)
                .map_err(|e| self.io("restoring a with-index entry", e))?;
        }
        if !new.is_empty() {
            self.write_items(files, &new)
                .map_err(|e| self.io("appending", e))?;
            self.last = last;
            if self.low == self.next - new.len() as u64 {
                self.oldest = None;
            }
        }
        spool.mark_dirty();
        Ok(())
    }

    fn write_meta(&self, spool: &mut Spool) -> Result<(), Refusal> {
        let meta = Meta {
            segment_items: self.seg,
            low_water: self.low,
        };
        spool.write_small(&self.dir.join(META_FILE), meta.encode().as_bytes())
    }

    fn restore_with(&mut self, files: &mut Files, seq: u64) -> io::Result<()> {
        let entries = self.entries(files, seq, seq + 1);
        let Some(item) = self.items(files, &[seq], &entries).pop().flatten() else {
            return Ok(()); // reported; nothing to index
        };
        self.with_restore(files, bare(&item.with), seq, with_hash(&item.with))
    }

    /// Writes the with-index entries first, then the records, then the index entries:
    /// if the process dies midway, whatever the index holds has its record and its
    /// with-index entry, and what is past the index is cut when the archive is opened.
    fn write_items(&mut self, files: &mut Files, items: &[&Item]) -> io::Result<()> {
        // Per bare JID, in the order first seen.
        let mut withs: Vec<(&str, Vec<u8>)> = vec![];
        let mut with_at: HashMap<&str, usize> = HashMap::new();
        for (seq, item) in (self.next..).zip(items) {
            let b = bare(&item.with);
            let slot = *with_at.entry(b).or_insert_with(|| {
                withs.push((b, vec![]));
                withs.len() - 1
            });
            withs[slot]
                .1
                .extend_from_slice(&encode_with(seq, with_hash(&item.with)));
        }
        for (b, entries) in withs {
            self.with_append(files, b, &entries)?;
        }
        // Sized once: a batch's records and entries are written from these buffers.
        let mut log_buf = Vec::with_capacity(items.iter().map(|i| record_len(i)).sum());
        let mut idx_buf = Vec::with_capacity(items.len() * IDX_ENTRY as usize);
        // Items in the buffers start at `chunk`.
        let mut chunk = self.next;
        for item in items {
            let seq = self.next;
            let seg = self.segment_of(seq);
            if !self.segments.contains(&seg) {
                self.flush(files, chunk, &mut log_buf, &mut idx_buf)?;
                self.start_segment(files, seg)?;
                chunk = seq;
            }
            let offset = self.head_log_len + log_buf.len() as u64;
            let len = encode_record(seq, item, &mut log_buf);
            idx_buf.extend_from_slice(&IdxEntry::new(item.time, offset, len, &item.id).encode());
            self.next += 1;
        }
        self.flush(files, chunk, &mut log_buf, &mut idx_buf)
    }

    /// Writes buffered records and entries (of items from `chunk` on) to the head segment.
    fn flush(
        &mut self,
        files: &mut Files,
        chunk: u64,
        log_buf: &mut Vec<u8>,
        idx_buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        if log_buf.is_empty() {
            return Ok(());
        }
        let log = files.create(&self.dir.join(log_name(self.head)))?;
        let idx = files.create(&self.dir.join(idx_name(self.head)))?;
        log.write_all_at(log_buf, self.head_log_len)?;
        idx.write_all_at(idx_buf, (chunk - self.head) * IDX_ENTRY)?;
        self.head_log_len += log_buf.len() as u64;
        log_buf.clear();
        idx_buf.clear();
        Ok(())
    }

    /// Makes the full head segment durable, then starts segment `seg`.
    fn start_segment(&mut self, files: &mut Files, seg: u64) -> io::Result<()> {
        if self.segments.contains(&self.head) {
            for name in [log_name(self.head), idx_name(self.head)] {
                files.create(&self.dir.join(name))?.sync_data()?;
            }
        }
        for name in [log_name(seg), idx_name(seg)] {
            files.create(&self.dir.join(name))?;
        }
        self.segments.insert(seg);
        if self.segments.len() == 1 {
            self.first = seg;
        }
        self.head = seg;
        self.head_log_len = 0;
        Ok(())
    }

    /// Applies retention: moves the low-water mark (durable through the spool's
    /// temporary file and rename) and removes segments wholly below it, except the head
    /// segment (which keeps the last id, so ids keep increasing after everything was
    /// removed).
    pub fn retain(
        &mut self,
        files: &mut Files,
        spool: &mut Spool,
        retention: Retention,
        now: u64,
    ) -> Result<(), Refusal> {
        if retention == Retention::default() || self.low >= self.next {
            return Ok(());
        }
        let (low, next) = (self.low, self.next);
        let keep = {
            let both = RefCell::new((&mut *self, &mut *files));
            retention.first_kept((next - low) as usize, now, |i| {
                let mut b = both.borrow_mut();
                let (a, f) = &mut *b;
                // An unreadable entry counts as the next readable one.
                a.valid_from(f, low + i as u64, next)
                    .map_or(u64::MAX, |(_, e)| e.time)
            })
        };
        if keep == 0 {
            return Ok(());
        }
        self.low = low + keep as u64;
        self.oldest = None;
        self.write_meta(spool)?;
        let dead: Vec<u64> = self
            .segments
            .iter()
            .copied()
            .filter(|&s| s + self.seg <= self.low && s != self.head)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        // Removing a segment before the new mark is durable is safe: a segment's absence
        // raises the first live item by itself (see `Archive::open`).
        for &s in &dead {
            for name in [log_name(s), idx_name(s)] {
                let path = self.dir.join(name);
                files.forget(&path);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io("removing a segment", e)),
                }
            }
            self.segments.remove(&s);
        }
        self.first = *self.segments.first().expect("the head segment stays");
        info!(archive = %self.dir.display(), "retention removed {} segment(s) below item {}", dead.len(), self.low);
        self.with_compact(files)
            .map_err(|e| self.io("compacting the with-index", e))?;
        spool.mark_dirty();
        Ok(())
    }
}
