//! The spool: one directory per slot, `SPOOL/SLOT/`, holding
//! - `data.part` while the upload runs (never served),
//! - `meta` (the content type) and `data` once it completed: `data` appears last, by
//!   rename after fsync, so a file is served whole or not at all.
//!
//! A periodic sweep removes files past their lifetime and parts abandoned by clients, and
//! measures what is on disk for the disk budget. The budget is what is on disk plus the
//! live reservations: slots granted and not yet uploaded, until they expire.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use crate::sign::is_slot_id;

pub struct Store {
    pub root: PathBuf,
    budget: Mutex<Budget>,
    /// Slots with an upload running in this process (or being swept): the sweep leaves
    /// them alone and a second PUT to one is refused.
    active: Mutex<HashSet<String>>,
    pub file_lifetime: Duration,
    /// A part untouched this long was abandoned.
    pub part_lifetime: Duration,
}

#[derive(Default)]
struct Budget {
    /// Bytes of completed files: measured by the sweep, plus uploads completed since.
    on_disk: u64,
    /// While a sweep runs: the bytes of uploads completed meanwhile (added to its count).
    completed_during_sweep: Option<u64>,
    /// Granted slots not yet uploaded: slot id -> (until, size).
    reservations: HashMap<String, (Instant, u64)>,
    reserved: u64,
}

impl Budget {
    /// Drops the reservations past their time, except those of running uploads.
    fn prune(&mut self, now: Instant, active: &HashSet<String>) {
        let mut freed = 0;
        self.reservations.retain(|id, (until, size)| {
            let keep = *until > now || active.contains(id);
            if !keep {
                freed += *size;
            }
            keep
        });
        self.reserved -= freed;
    }
}

pub const DATA: &str = "data";
pub const PART: &str = "data.part";
pub const META: &str = "meta";

/// Marks a slot's upload as running until dropped.
pub struct ActiveUpload<'a> {
    store: &'a Store,
    slot: String,
}

impl Drop for ActiveUpload<'_> {
    fn drop(&mut self) {
        self.store
            .active
            .lock()
            .expect("active lock")
            .remove(&self.slot);
    }
}

/// The metadata of `p`, `None` only when it does not exist.
fn stat(p: &Path) -> std::io::Result<Option<std::fs::Metadata>> {
    match std::fs::metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Store {
    pub fn new(root: PathBuf, file_lifetime: Duration, part_lifetime: Duration) -> Store {
        Store {
            root,
            budget: Mutex::new(Budget::default()),
            active: Mutex::new(HashSet::new()),
            file_lifetime,
            part_lifetime,
        }
    }

    pub fn dir(&self, slot: &str) -> PathBuf {
        debug_assert!(is_slot_id(slot));
        self.root.join(slot)
    }

    /// Bytes on disk plus bytes reserved.
    pub fn used(&self) -> u64 {
        let b = self.budget.lock().expect("budget lock");
        b.on_disk + b.reserved
    }

    /// Reserves `size` bytes of the budget `budget` for the slot `slot` until `until`
    /// (when its PUT URL expires); with no budget (0) nothing is reserved.
    pub fn reserve(&self, slot: &str, size: u64, budget: u64, until: Instant) -> bool {
        if budget == 0 {
            return true;
        }
        let active = self.active.lock().expect("active lock");
        let mut b = self.budget.lock().expect("budget lock");
        b.prune(Instant::now(), &active);
        if (b.on_disk + b.reserved)
            .checked_add(size)
            .is_none_or(|t| t > budget)
        {
            return false;
        }
        b.reservations.insert(slot.to_owned(), (until, size));
        b.reserved += size;
        true
    }

    /// An upload of `size` bytes to `slot` completed: its reservation becomes disk use.
    pub fn completed(&self, slot: &str, size: u64) {
        let mut b = self.budget.lock().expect("budget lock");
        if let Some((_, r)) = b.reservations.remove(slot) {
            b.reserved -= r;
        }
        b.on_disk += size;
        if let Some(c) = b.completed_during_sweep.as_mut() {
            *c += size;
        }
    }

    /// Marks an upload to `slot` as running; `None` when one runs already (or the sweep
    /// is looking at the slot).
    pub fn begin_upload(&self, slot: &str) -> Option<ActiveUpload<'_>> {
        self.active
            .lock()
            .expect("active lock")
            .insert(slot.to_owned())
            .then(|| ActiveUpload {
                store: self,
                slot: slot.to_owned(),
            })
    }

    /// Whether a completed file is past its lifetime (by the time it completed).
    pub fn expired(&self, modified: SystemTime, now: SystemTime) -> bool {
        now.duration_since(modified).unwrap_or_default() > self.file_lifetime
    }

    /// Whether the slot directory `dir` is to be removed; adds its file's size to `total`
    /// when it is kept. An error (other than a missing file) keeps it.
    fn stale(&self, dir: &Path, now: SystemTime, total: &mut u64) -> std::io::Result<bool> {
        let idle = |m: &std::fs::Metadata| {
            m.modified()
                .map(|t| (t, now.duration_since(t).unwrap_or_default()))
        };
        if let Some(data) = stat(&dir.join(DATA))? {
            let (modified, _) = idle(&data)?;
            if self.expired(modified, now) {
                return Ok(true);
            }
            *total += data.len();
            return Ok(false);
        }
        // A part is counted in its slot's reservation, not here.
        if let Some(part) = stat(&dir.join(PART))? {
            return Ok(idle(&part)?.1 > self.part_lifetime);
        }
        // Neither: a slot whose upload failed (or is about to start).
        match stat(dir)? {
            Some(m) => Ok(idle(&m)?.1 > self.part_lifetime),
            None => Ok(false),
        }
    }

    /// One sweep: removes expired files and abandoned parts, then counts what is left.
    /// Slots with a running upload are left alone.
    pub fn sweep(&self) -> std::io::Result<()> {
        let now = SystemTime::now();
        let mut total = 0u64;
        let mut removed = 0usize;
        self.budget
            .lock()
            .expect("budget lock")
            .completed_during_sweep = Some(0);
        let result = (|| {
            for entry in std::fs::read_dir(&self.root)? {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(error = %e, "cannot read the spool");
                        continue;
                    }
                };
                let name = entry.file_name();
                let Some(slot) = name.to_str().filter(|n| is_slot_id(n)) else {
                    continue;
                };
                // Claimed while it is looked at: an upload to it cannot start meanwhile.
                let Some(_claim) = self.begin_upload(slot) else {
                    debug!(slot, "upload running; not swept");
                    continue;
                };
                let dir = entry.path();
                match self.stale(&dir, now, &mut total) {
                    Ok(false) => {}
                    Ok(true) => match std::fs::remove_dir_all(&dir) {
                        Ok(()) => {
                            removed += 1;
                            debug!(slot, "removed");
                        }
                        Err(e) => warn!(slot, error = %e, "cannot remove"),
                    },
                    Err(e) => warn!(slot, error = %e, "cannot check; left alone"),
                }
            }
            Ok(())
        })();
        let active = self.active.lock().expect("active lock");
        let mut b = self.budget.lock().expect("budget lock");
        let meanwhile = b.completed_during_sweep.take().unwrap_or(0);
        if result.is_ok() {
            b.on_disk = total + meanwhile;
        }
        b.prune(Instant::now(), &active);
        if removed > 0 {
            info!(
                removed,
                bytes = b.on_disk,
                reserved = b.reserved,
                "sweep done"
            );
        }
        result
    }
}

/// Runs the sweep every `interval`, for ever.
pub async fn sweeper(store: std::sync::Arc<Store>, interval: Duration) {
    loop {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.sweep()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, dir = %store.root.display(), "sweep failed"),
            Err(e) => warn!(error = %e, "sweep task failed"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn sweep_removes_expired_and_abandoned() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(
            tmp.path().to_path_buf(),
            Duration::from_millis(200),
            Duration::from_millis(200),
        );
        let a = crate::sign::new_slot_id();
        let b = crate::sign::new_slot_id();
        std::fs::create_dir(store.dir(&a)).unwrap();
        std::fs::write(store.dir(&a).join(DATA), b"12345").unwrap();
        std::fs::create_dir(store.dir(&b)).unwrap();
        std::fs::write(store.dir(&b).join(PART), b"12").unwrap();
        std::fs::create_dir(tmp.path().join("not-a-slot")).unwrap();
        store.sweep().unwrap();
        // Parts are not counted (their slots' reservations are).
        assert_eq!(store.used(), 5);
        assert!(store.reserve(&b, 5, 10, later()));
        assert!(!store.reserve(&crate::sign::new_slot_id(), 1, 10, later()));
        std::thread::sleep(Duration::from_millis(300));
        store.sweep().unwrap();
        // The files are gone; the reservation is not (the sweep never overwrites it).
        assert_eq!(store.used(), 5);
        assert!(!store.dir(&a).exists() && !store.dir(&b).exists());
        assert!(tmp.path().join("not-a-slot").exists());
    }

    #[test]
    fn running_uploads_are_not_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(
            tmp.path().to_path_buf(),
            Duration::from_millis(50),
            Duration::from_millis(50),
        );
        let a = crate::sign::new_slot_id();
        std::fs::create_dir(store.dir(&a)).unwrap();
        std::fs::write(store.dir(&a).join(PART), b"12").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let running = store.begin_upload(&a).unwrap();
        assert!(store.begin_upload(&a).is_none());
        store.sweep().unwrap();
        assert!(store.dir(&a).join(PART).exists());
        drop(running);
        store.sweep().unwrap();
        assert!(!store.dir(&a).exists());
    }

    #[test]
    fn unreadable_slots_are_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().to_path_buf(), Duration::ZERO, Duration::ZERO);
        let a = crate::sign::new_slot_id();
        std::fs::create_dir(store.dir(&a)).unwrap();
        // A `data` whose metadata cannot be read (a symlink loop: ELOOP, not NotFound).
        std::os::unix::fs::symlink(DATA, store.dir(&a).join(DATA)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        store.sweep().unwrap();
        assert!(store.dir(&a).exists());
        std::fs::remove_file(store.dir(&a).join(DATA)).unwrap();
        store.sweep().unwrap();
        assert!(!store.dir(&a).exists());
    }

    #[test]
    fn budget_counts_disk_and_live_reservations() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(
            tmp.path().to_path_buf(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let soon = Instant::now() + Duration::from_millis(100);
        assert!(store.reserve("a", 600, 1000, soon));
        assert!(!store.reserve("b", 600, 1000, later()));
        // Completed: the reservation becomes disk use (the sweep has not seen it yet).
        store.completed("a", 600);
        assert_eq!(store.used(), 600);
        assert!(store.reserve("c", 400, 1000, soon));
        assert!(!store.reserve("d", 1, 1000, later()));
        std::thread::sleep(Duration::from_millis(150));
        // c expired unused: its bytes are free again; a is still on disk.
        assert!(store.reserve("d", 400, 1000, later()));
        assert_eq!(store.used(), 1000);
        // No budget: nothing to reserve.
        assert!(store.reserve("e", u64::MAX, 0, later()));
        assert_eq!(store.used(), 1000);
    }
}
