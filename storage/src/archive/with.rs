//! The with-index: per bare JID of `with`, one file of fixed-size entries (sequence
//! number, hash of the full `with`) in append order, so the items exchanged with one
//! contact are found, counted and paged without reading the archive.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;

use tracing::warn;

use super::files::Files;
use super::format::{decode_with, encode_with, with_file_name, WITH_DIR, WITH_ENTRY};
use super::store::{read_up_to, Archive};

/// An open with-index file and how many entries it holds.
pub struct WithFile {
    pub file: Rc<File>,
    pub len: u64,
}

impl WithFile {
    /// Entries `a..b` as (seq, hash).
    pub fn read(&self, a: u64, b: u64) -> io::Result<Vec<(u64, u64)>> {
        let bytes = read_up_to(
            &self.file,
            a * WITH_ENTRY,
            (b.saturating_sub(a) * WITH_ENTRY) as usize,
        )?;
        Ok(bytes
            .chunks_exact(WITH_ENTRY as usize)
            .map(decode_with)
            .collect())
    }

    pub fn seq(&self, k: u64) -> io::Result<u64> {
        let mut b = [0u8; WITH_ENTRY as usize];
        self.file.read_exact_at(&mut b, k * WITH_ENTRY)?;
        Ok(decode_with(&b).0)
    }

    /// The first entry in `lo..hi` whose sequence number is at least `seq`.
    pub fn partition(&self, mut lo: u64, mut hi: u64, seq: u64) -> io::Result<u64> {
        // Bounds outside the entries (a query without bounds) cost one read each.
        if lo < hi && self.seq(lo)? >= seq {
            return Ok(lo);
        }
        if lo < hi && self.seq(hi - 1)? < seq {
            return Ok(hi);
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.seq(mid)? < seq {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

impl Archive {
    fn with_path(&self, name: &str) -> PathBuf {
        self.dir.join(WITH_DIR).join(name)
    }

    /// The with-index file of `bare` (`None` if it does not exist and `create` is
    /// false). The first time a file is used after the archive is opened, its torn tail
    /// is cut: a partial entry, zeroed entries, entries not increasing or past the last
    /// item when the archive was opened (never acknowledged: the items they point at
    /// were cut or never written). Every write to the file goes through here, so
    /// entries from before the opening are checked before any new one follows them.
    pub fn with_file(
        &mut self,
        files: &mut Files,
        bare: &str,
        create: bool,
    ) -> io::Result<Option<WithFile>> {
        let name = with_file_name(bare);
        let path = self.with_path(&name);
        let file = match files.open(&path, create) {
            // The first with-index of the archive.
            Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(self.dir.join(WITH_DIR))?;
                files.open(&path, create)?
            }
            other => other?,
        };
        let Some(file) = file else {
            return Ok(None);
        };
        if let Some(&len) = self.with_lens.get(&name) {
            return Ok(Some(WithFile { file, len }));
        }
        let size = file.metadata()?.len();
        let mut w = WithFile {
            file,
            len: size / WITH_ENTRY,
        };
        while w.len > 0 {
            let tail = w.read(w.len.saturating_sub(2), w.len)?;
            let (seq, hash) = *tail.last().expect("read 1 or 2");
            let increasing = tail.len() < 2 || tail[0].0 < seq;
            if hash != 0 && seq < self.opened_next && increasing {
                break;
            }
            w.len -= 1;
        }
        if size != w.len * WITH_ENTRY {
            warn!(
                file = %path.display(),
                "torn tail cut: {} bytes of with-index (never acknowledged)",
                size - w.len * WITH_ENTRY
            );
            w.file.set_len(w.len * WITH_ENTRY)?;
        }
        self.with_lens.insert(name, w.len);
        Ok(Some(w))
    }

    /// Adds entries (already encoded, in increasing order, after every entry there) to
    /// the with-index of `bare`.
    pub fn with_append(&mut self, files: &mut Files, bare: &str, entries: &[u8]) -> io::Result<()> {
        let w = self.with_file(files, bare, true)?.expect("created");
        w.file.write_all_at(entries, w.len * WITH_ENTRY)?;
        let len = w.len + entries.len() as u64 / WITH_ENTRY;
        self.with_lens.insert(with_file_name(bare), len);
        Ok(())
    }

    /// Makes sure the with-index of `bare` has item `seq` (an item whose entry was lost
    /// in a crash, found again when its append is retried).
    pub fn with_restore(
        &mut self,
        files: &mut Files,
        bare: &str,
        seq: u64,
        hash: u64,
    ) -> io::Result<()> {
        let w = self.with_file(files, bare, true)?.expect("created");
        let k = w.partition(0, w.len, seq)?;
        if k < w.len && w.seq(k)? == seq {
            return Ok(());
        }
        if k == w.len {
            w.file
                .write_all_at(&encode_with(seq, hash), k * WITH_ENTRY)?;
            self.with_lens.insert(with_file_name(bare), k + 1);
            return Ok(());
        }
        // In the middle (entries of later items survived): rewrite the file.
        let mut all = read_up_to(&w.file, 0, (w.len * WITH_ENTRY) as usize)?;
        let at = (k * WITH_ENTRY) as usize;
        all.splice(at..at, encode_with(seq, hash));
        self.with_replace(files, bare, &all)
    }

    /// Replaces the with-index of `bare` with `data` so that a crash leaves the old or
    /// the new file: written beside it, made durable, renamed over it. (The rename is
    /// made durable by the batch's commit.)
    fn with_replace(&mut self, files: &mut Files, bare: &str, data: &[u8]) -> io::Result<()> {
        let name = with_file_name(bare);
        let path = self.with_path(&name);
        let tmp = self.with_path(&format!(".{name}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        fs::rename(&tmp, &path)?;
        files.forget(&path);
        self.with_lens.insert(name, data.len() as u64 / WITH_ENTRY);
        Ok(())
    }

    /// After retention removed segments: drops with-index entries of items below the
    /// low-water mark, removing files that hold nothing else and rewriting those where
    /// they are at least half (so the cost stays proportional to what is removed).
    pub fn with_compact(&mut self, files: &mut Files) -> io::Result<()> {
        let dir = self.dir.join(WITH_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let Some(file) = files.open(&path, false)? else {
                continue;
            };
            let w = WithFile {
                len: file.metadata()?.len() / WITH_ENTRY,
                file,
            };
            let dead = w.partition(0, w.len, self.low)?;
            if dead == 0 {
                continue;
            }
            if dead == w.len {
                files.forget(&path);
                fs::remove_file(&path)?;
                self.with_lens.remove(&name);
            } else if dead * 2 >= w.len {
                let live = read_up_to(
                    &w.file,
                    dead * WITH_ENTRY,
                    ((w.len - dead) * WITH_ENTRY) as usize,
                )?;
                let tmp = dir.join(format!(".{name}.tmp"));
                let mut f = File::create(&tmp)?;
                f.write_all(&live)?;
                f.sync_data()?;
                fs::rename(&tmp, &path)?;
                files.forget(&path);
                self.with_lens.insert(name, w.len - dead);
            }
        }
        Ok(())
    }
}
