//! One archive as a worker thread knows it: its segments, where it ends, and reads of
//! index entries and records (with the binary searches over them). Opening an archive
//! cuts a torn tail back (see [`Archive::open`]).

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::{error, warn};

use jrs_xdb::archive::Item;
use jrs_xdb::Refusal;

use super::files::Files;
use super::format::{
    decode_record, idx_name, log_name, segment_of, IdxEntry, Meta, IDX_ENTRY, META_FILE,
    RECORD_HEADER,
};
use super::internal;
use crate::spool::Spool;

pub struct Archive {
    pub dir: PathBuf,
    /// The directory exists (an archive nobody appended to is empty and has none).
    pub exists: bool,
    /// The `meta` file is missing (a crash before the first append was committed): the
    /// next append writes it.
    pub needs_meta: bool,
    /// Items per segment.
    pub seg: u64,
    /// First live sequence number: the durable low-water mark, or the first segment's
    /// start if that is higher.
    pub low: u64,
    /// First sequence number still on disk (the first segment's start).
    pub first: u64,
    /// Sequence number of the next item appended.
    pub next: u64,
    /// `next` when the archive was opened: with-index entries from there on that were
    /// on disk before are a torn tail (see `Archive::with_file`).
    pub opened_next: u64,
    /// Start of the segment appended to, and its log's length.
    pub head: u64,
    pub head_log_len: u64,
    /// Id and time of item `next - 1` (`None` when there is none, or it is unreadable).
    pub last: Option<(String, u64)>,
    /// Id and time of item `low` once read.
    pub oldest: Option<Option<(String, u64)>>,
    /// Starts of the segments on disk.
    pub segments: BTreeSet<u64>,
    /// With-index files whose tails were checked since the archive was opened, with
    /// their lengths in entries, kept up to date by every write (`with.rs`): an append
    /// need not ask the file system for the length (a `statx` per correspondent and
    /// batch under load).
    pub with_lens: HashMap<String, u64>,
    /// Corrupt things already logged (so each is logged once per opening).
    reported: HashSet<(u64, bool)>,
}

impl Archive {
    /// Opens the archive in `dir` (an empty one when `dir` does not exist). A torn tail
    /// of the head segment is cut back: a partial index entry, index entries pointing
    /// past the end of the log or at a record that fails its checksum, log bytes no
    /// index entry covers (but replacement records of retracted items the index points
    /// at). Only the head segment can be torn: before the first item goes into a new
    /// segment, the previous one is made durable.
    pub fn open(
        dir: &Path,
        segment_items: u64,
        files: &mut Files,
        spool: &mut Spool,
    ) -> Result<Archive, Refusal> {
        let io =
            |what: &str, e: io::Error| internal(format!("archive {}: {what}: {e}", dir.display()));
        // A directory left by a removal that crashed midway.
        if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
            let trash = parent.join(format!(".{}.deleted", name.to_string_lossy()));
            if trash.exists() {
                fs::remove_dir_all(&trash).map_err(|e| io("removing a deleted archive", e))?;
            }
        }
        let mut archive = Archive {
            dir: dir.to_owned(),
            exists: dir.is_dir(),
            needs_meta: false,
            seg: segment_items,
            low: 0,
            first: 0,
            next: 0,
            opened_next: 0,
            head: 0,
            head_log_len: 0,
            last: None,
            oldest: None,
            segments: BTreeSet::new(),
            with_lens: HashMap::new(),
            reported: HashSet::new(),
        };
        if !archive.exists {
            return Ok(archive);
        }
        let meta_path = dir.join(META_FILE);
        let mut mark = 0;
        match spool
            .read_small(&meta_path)
            .map_err(|e| io("reading meta", e))?
        {
            Some(data) => {
                let meta = Meta::parse(&data).ok_or_else(|| {
                    internal(format!(
                        "{} is corrupt; left in place for the operator",
                        meta_path.display()
                    ))
                })?;
                archive.seg = meta.segment_items;
                mark = meta.low_water;
            }
            // Created, and the process died before the batch was committed.
            None => {
                warn!(archive = %dir.display(), "no meta file; assuming {segment_items} items per segment");
                archive.needs_meta = true;
            }
        }
        for entry in fs::read_dir(dir).map_err(|e| io("listing", e))? {
            let entry = entry.map_err(|e| io("listing", e))?;
            let name = entry.file_name();
            if let Some(start) = name.to_str().and_then(segment_of) {
                if start.checked_add(archive.seg).is_none() {
                    // No room for its items' sequence numbers (the name is not one this
                    // program writes).
                    error!(archive = %dir.display(), "ignoring {}: past the last sequence number", name.to_string_lossy());
                } else if start % archive.seg == 0 {
                    archive.segments.insert(start);
                } else {
                    error!(archive = %dir.display(), "ignoring {}: not a segment boundary", name.to_string_lossy());
                }
            }
        }
        let (Some(&first), Some(&head)) = (archive.segments.first(), archive.segments.last())
        else {
            if mark > 0 {
                return Err(internal(format!(
                    "archive {}: low-water mark {mark} but no segment files; left for the operator",
                    dir.display()
                )));
            }
            return Ok(archive);
        };
        let missing = (head - first) / archive.seg + 1 - archive.segments.len() as u64;
        if missing > 0 {
            error!(archive = %dir.display(), "{missing} segment(s) missing between {first} and {head}: their items are skipped");
        }
        let (n, log_len, cut) = archive
            .recover_head(files, head)
            .map_err(|e| io("recovering the last segment", e))?;
        if cut {
            spool.mark_dirty();
        }
        archive.first = first;
        archive.head = head;
        archive.head_log_len = log_len;
        archive.next = head + n;
        archive.opened_next = archive.next;
        if mark > archive.next {
            error!(archive = %dir.display(), "low-water mark {mark} is past the last item {}", archive.next);
        }
        archive.low = mark.max(first).min(archive.next);
        if archive.next > first {
            let last = archive.next - 1;
            archive.last = archive
                .entries(files, last, last + 1)
                .pop()
                .flatten()
                .and_then(|e| Some((archive.full_id(files, last, &e)?, e.time)));
            if archive.last.is_none() {
                error!(archive = %dir.display(), "the last item ({last}) is unreadable: appends are refused");
            }
        }
        Ok(archive)
    }

    /// Cuts the torn tail of the head segment; returns its item count, its log length
    /// and whether anything was cut.
    fn recover_head(&mut self, files: &mut Files, head: u64) -> io::Result<(u64, u64, bool)> {
        let idx = files.create(&self.dir.join(idx_name(head)))?;
        let log = files.create(&self.dir.join(log_name(head)))?;
        let idx_len = idx.metadata()?.len();
        let log_len = log.metadata()?.len();
        let mut n = (idx_len / IDX_ENTRY).min(self.seg);
        let mut end = 0;
        while n > 0 {
            let mut b = [0u8; IDX_ENTRY as usize];
            idx.read_exact_at(&mut b, (n - 1) * IDX_ENTRY)?;
            if let Some(e) = IdxEntry::decode(&b) {
                if e.end() <= log_len {
                    let mut rec = vec![0u8; e.len as usize];
                    log.read_exact_at(&mut rec, e.offset)?;
                    if decode_record(&rec, head + n - 1).is_ok() {
                        end = e.end();
                        break;
                    }
                }
            }
            n -= 1;
        }
        // Records `archive-retract` wrote after the last item's record are kept while the
        // index points at them (else the retraction was never acknowledged: cut).
        while end + RECORD_HEADER as u64 <= log_len {
            let mut header = [0u8; RECORD_HEADER];
            log.read_exact_at(&mut header, end)?;
            let len = RECORD_HEADER as u64
                + u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
            if len < RECORD_HEADER as u64 + 8 || end + len > log_len {
                break;
            }
            let mut rec = vec![0u8; len as usize];
            log.read_exact_at(&mut rec, end)?;
            let seq = u64::from_le_bytes(
                rec[RECORD_HEADER..RECORD_HEADER + 8]
                    .try_into()
                    .expect("8 bytes"),
            );
            if seq < head || seq >= head + n {
                break;
            }
            let mut b = [0u8; IDX_ENTRY as usize];
            idx.read_exact_at(&mut b, (seq - head) * IDX_ENTRY)?;
            let pointed =
                IdxEntry::decode(&b).is_some_and(|e| e.offset == end && e.len as u64 == len);
            if !pointed || decode_record(&rec, seq).is_err() {
                break;
            }
            end += len;
        }
        if idx_len != n * IDX_ENTRY {
            warn!(
                file = %self.dir.join(idx_name(head)).display(),
                "torn tail cut: {} bytes of index after item {} (never acknowledged)",
                idx_len - n * IDX_ENTRY,
                head + n
            );
            idx.set_len(n * IDX_ENTRY)?;
        }
        if log_len != end {
            warn!(
                file = %self.dir.join(log_name(head)).display(),
                "torn tail cut: {} bytes of log past the last indexed record (never acknowledged)",
                log_len - end
            );
            log.set_len(end)?;
        }
        Ok((n, end, idx_len != n * IDX_ENTRY || log_len != end))
    }

    pub fn segment_of(&self, seq: u64) -> u64 {
        seq - seq % self.seg
    }

    /// Logs a corrupt item or segment once.
    fn report(&mut self, key: u64, segment: bool, text: String) {
        if self.reported.insert((key, segment)) {
            error!(archive = %self.dir.display(), "{text}; skipped in answers, left in place for the operator");
        }
    }

    /// Index entries of items `from..to` (all below `next`); `None` for an entry that
    /// is unreadable (reported).
    pub fn entries(&mut self, files: &mut Files, from: u64, to: u64) -> Vec<Option<IdxEntry>> {
        let mut out = Vec::with_capacity(to.saturating_sub(from) as usize);
        let mut s = from.max(self.first);
        out.extend((from..s.min(to)).map(|_| None));
        while s < to {
            let seg = self.segment_of(s);
            let end = to.min(seg + self.seg);
            let count = (end - s) as usize;
            match self.read_idx(files, seg, s - seg, count) {
                Ok(bytes) => {
                    for k in 0..count {
                        let entry = bytes
                            .get(k * IDX_ENTRY as usize..(k + 1) * IDX_ENTRY as usize)
                            .and_then(IdxEntry::decode);
                        if entry.is_none() {
                            let path = self.dir.join(idx_name(seg));
                            self.report(
                                s + k as u64,
                                false,
                                format!(
                                    "{}: index entry of item {} is corrupt",
                                    path.display(),
                                    s + k as u64
                                ),
                            );
                        }
                        out.push(entry);
                    }
                }
                Err(e) => {
                    let path = self.dir.join(idx_name(seg));
                    self.report(
                        seg,
                        true,
                        format!("{}: unreadable segment index: {e}", path.display()),
                    );
                    out.extend((0..count).map(|_| None));
                }
            }
            s = end;
        }
        out
    }

    /// Up to `count` entries of segment `seg` from entry `k` (fewer if the file is short).
    fn read_idx(
        &mut self,
        files: &mut Files,
        seg: u64,
        k: u64,
        count: usize,
    ) -> io::Result<Vec<u8>> {
        if !self.segments.contains(&seg) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "segment missing"));
        }
        let file = files
            .open(&self.dir.join(idx_name(seg)), false)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "index file missing"))?;
        read_up_to(&file, k * IDX_ENTRY, count * IDX_ENTRY as usize)
    }

    /// Entries of the (ascending) `seqs`, reading nearby ones (a page of one contact's
    /// items) in one read: from a cold page cache one read beats many.
    pub fn entries_for(&mut self, files: &mut Files, seqs: &[u64]) -> Vec<Option<IdxEntry>> {
        const SPAN: u64 = 4096; // entries: 256 KiB
        let mut out = Vec::with_capacity(seqs.len());
        let mut i = 0;
        while i < seqs.len() {
            let mut j = i + 1;
            while j < seqs.len()
                && seqs[j] - seqs[i] < SPAN
                && self.segment_of(seqs[j]) == self.segment_of(seqs[i])
            {
                j += 1;
            }
            if seqs[i] >= self.first && seqs[j - 1] < self.next {
                let run = self.entries(files, seqs[i], seqs[j - 1] + 1);
                out.extend(seqs[i..j].iter().map(|s| run[(s - seqs[i]) as usize]));
            } else {
                out.extend((i..j).map(|_| None));
            }
            i = j;
        }
        out
    }

    /// The items of `seqs` with their `entries`, reading records close to each other in
    /// one read (less than 64 KiB apart, up to 1 MiB); `None` for an unreadable or
    /// corrupt record (reported).
    pub fn items(
        &mut self,
        files: &mut Files,
        seqs: &[u64],
        entries: &[Option<IdxEntry>],
    ) -> Vec<Option<Item>> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut i = 0;
        while i < seqs.len() {
            let Some(e0) = entries[i] else {
                out.push(None);
                i += 1;
                continue;
            };
            let seg = self.segment_of(seqs[i]);
            let path = self.dir.join(log_name(seg));
            let log = files.open(&path, false).and_then(|f| {
                let f =
                    f.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "log file missing"))?;
                let len = f.metadata()?.len();
                Ok((f, len))
            });
            // An entry can say anything its checksum covers: a record past the end of the
            // log is not read (nor its length allocated).
            let log_len = log.as_ref().map_or(0, |(_, len)| *len);
            if log.is_ok() && e0.end() > log_len {
                self.report(
                    seqs[i],
                    false,
                    format!(
                        "{}: record of item {} at offset {} ends past the end of the log",
                        path.display(),
                        seqs[i],
                        e0.offset
                    ),
                );
                out.push(None);
                i += 1;
                continue;
            }
            let mut end = e0.end();
            let mut j = i + 1;
            const GAP: u64 = 64 << 10;
            const RUN: u64 = 1 << 20;
            while j < seqs.len()
                && self.segment_of(seqs[j]) == seg
                && entries[j].is_some_and(|e| {
                    e.offset >= end
                        && e.offset - end <= GAP
                        && e.end() - e0.offset <= RUN
                        && e.end() <= log_len
                })
            {
                let e = entries[j].expect("checked");
                end = e.end();
                j += 1;
            }
            let data = log.and_then(|(f, _)| {
                let mut buf = vec![0u8; (end - e0.offset) as usize];
                f.read_exact_at(&mut buf, e0.offset)?;
                Ok(buf)
            });
            for k in i..j {
                let e = entries[k].expect("checked");
                let item = match &data {
                    Ok(buf) => {
                        let at = (e.offset - e0.offset) as usize;
                        decode_record(&buf[at..at + e.len as usize], seqs[k])
                            .map_err(|why| why.to_owned())
                    }
                    Err(err) => Err(err.to_string()),
                };
                match item {
                    Ok(item) => out.push(Some(item)),
                    Err(why) => {
                        self.report(
                            seqs[k],
                            false,
                            format!(
                                "{}: record of item {} at offset {}: {why}",
                                path.display(),
                                seqs[k],
                                e.offset
                            ),
                        );
                        out.push(None);
                    }
                }
            }
            i = j;
        }
        out
    }

    /// The whole id of item `seq`: from its entry, or its record when it is long.
    pub fn full_id(&mut self, files: &mut Files, seq: u64, e: &IdxEntry) -> Option<String> {
        if let Some(id) = e.full_id() {
            return String::from_utf8(id.to_vec()).ok();
        }
        self.items(files, &[seq], &[Some(*e)])
            .pop()
            .flatten()
            .map(|i| i.id)
    }

    /// The first readable entry at or after `seq`, before `end`.
    pub fn valid_from(
        &mut self,
        files: &mut Files,
        mut seq: u64,
        end: u64,
    ) -> Option<(u64, IdxEntry)> {
        const CHUNK: u64 = 64;
        seq = seq.max(self.first);
        let mut first_try = true;
        while seq < end {
            let seg = self.segment_of(seq);
            let seg_end = end.min(seg + self.seg);
            if !self.segments.contains(&seg) {
                // Over the whole gap at once: a segment file whose name lost a bit makes
                // one of up to 2^64 / segment size missing segments (found by fuzzing).
                seq = self
                    .segments
                    .range(seg..)
                    .next()
                    .map_or(end, |&next| next.min(end))
                    .max(seg_end);
                continue;
            }
            // Usually the entry itself is good: read it alone, and more only after it.
            let to = seg_end.min(seq + if first_try { 1 } else { CHUNK });
            first_try = false;
            let found = self
                .entries(files, seq, to)
                .into_iter()
                .enumerate()
                .find_map(|(k, e)| e.map(|e| (seq + k as u64, e)));
            if found.is_some() {
                return found;
            }
            seq = to;
        }
        None
    }

    /// The first sequence number in `lo..hi` for which `pred` is false, `pred` being true
    /// then false over the items in order. An unreadable entry counts as the next
    /// readable one after it.
    pub fn partition(
        &mut self,
        files: &mut Files,
        mut lo: u64,
        mut hi: u64,
        pred: &mut dyn FnMut(&mut Archive, &mut Files, u64, &IdxEntry) -> bool,
    ) -> u64 {
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.valid_from(files, mid, hi) {
                None => hi = mid,
                Some((s, e)) => {
                    if pred(self, files, s, &e) {
                        lo = s + 1;
                    } else {
                        hi = mid;
                    }
                }
            }
        }
        lo
    }

    /// How item `seq`'s id compares with `id` (reading the record for long ids).
    fn cmp_id(&mut self, files: &mut Files, seq: u64, e: &IdxEntry, id: &str) -> Option<Ordering> {
        match e.cmp_id(id.as_bytes()) {
            Some(o) => Some(o),
            None => Some(self.full_id(files, seq, e)?.as_bytes().cmp(id.as_bytes())),
        }
    }

    /// The sequence number of the item with this id in `lo..hi` (ids increase).
    pub fn find_id(&mut self, files: &mut Files, id: &str, lo: u64, hi: u64) -> Option<u64> {
        let p = self.partition(files, lo, hi, &mut |a, f, s, e| {
            a.cmp_id(f, s, e, id) == Some(Ordering::Less)
        });
        let (s, e) = self.valid_from(files, p, hi)?;
        (self.cmp_id(files, s, &e, id) == Some(Ordering::Equal)).then_some(s)
    }

    /// The first item in `lo..hi` archived at or after `time`.
    pub fn time_from(&mut self, files: &mut Files, lo: u64, hi: u64, time: u64) -> u64 {
        self.partition(files, lo, hi, &mut |_, _, _, e| e.time < time)
    }

    /// The first item in `lo..hi` archived after `time`.
    pub fn time_after(&mut self, files: &mut Files, lo: u64, hi: u64, time: u64) -> u64 {
        self.partition(files, lo, hi, &mut |_, _, _, e| e.time <= time)
    }

    /// Id and time of the first readable item at or after `seq`.
    pub fn id_time_from(&mut self, files: &mut Files, seq: u64) -> Option<(String, u64)> {
        let (s, e) = self.valid_from(files, seq, self.next)?;
        Some((self.full_id(files, s, &e)?, e.time))
    }
}

/// Reads up to `len` bytes at `offset` (fewer at the end of the file).
pub fn read_up_to(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}
