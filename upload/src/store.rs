//! The spool: one directory per slot, `SPOOL/SLOT/`, holding
//! - `data.part` while the upload runs (never served),
//! - `meta` (the content type) and `data` once it completed: `data` appears last, by
//!   rename after fsync, so a file is served whole or not at all.
//!
//! A periodic sweep removes files past their lifetime and parts abandoned by clients, and
//! measures what is on disk for the disk budget.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

use crate::sign::is_slot_id;

pub struct Store {
    pub root: PathBuf,
    /// Bytes on disk at the last sweep plus bytes granted since.
    used: AtomicU64,
    pub file_lifetime: Duration,
    /// A part untouched this long was abandoned.
    pub part_lifetime: Duration,
}

pub const DATA: &str = "data";
pub const PART: &str = "data.part";
pub const META: &str = "meta";

impl Store {
    pub fn new(root: PathBuf, file_lifetime: Duration, part_lifetime: Duration) -> Store {
        Store {
            root,
            used: AtomicU64::new(0),
            file_lifetime,
            part_lifetime,
        }
    }

    pub fn dir(&self, slot: &str) -> PathBuf {
        debug_assert!(is_slot_id(slot));
        self.root.join(slot)
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `size` bytes of the budget `budget` (0: none) for a granted slot.
    pub fn reserve(&self, size: u64, budget: u64) -> bool {
        if budget == 0 {
            self.used.fetch_add(size, Ordering::Relaxed);
            return true;
        }
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(size).filter(|t| *t <= budget)
            })
            .is_ok()
    }

    /// Whether a completed file is past its lifetime (by the time it completed).
    pub fn expired(&self, modified: SystemTime, now: SystemTime) -> bool {
        now.duration_since(modified).unwrap_or_default() > self.file_lifetime
    }

    /// One sweep: removes expired files and abandoned parts, then counts what is left.
    pub fn sweep(&self) -> std::io::Result<()> {
        let now = SystemTime::now();
        let mut total = 0u64;
        let mut removed = 0usize;
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(slot) = name.to_str().filter(|n| is_slot_id(n)) else {
                continue;
            };
            let dir = entry.path();
            let age = |p: &Path| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .map(|m| (m, now.duration_since(m).unwrap_or_default()))
            };
            let remove = match (age(&dir.join(DATA)), age(&dir.join(PART))) {
                (Ok((modified, _)), _) => {
                    if self.expired(modified, now) {
                        true
                    } else {
                        total += std::fs::metadata(dir.join(DATA))
                            .map(|m| m.len())
                            .unwrap_or(0);
                        false
                    }
                }
                (Err(_), Ok((_, idle))) => {
                    if idle > self.part_lifetime {
                        true
                    } else {
                        total += std::fs::metadata(dir.join(PART))
                            .map(|m| m.len())
                            .unwrap_or(0);
                        false
                    }
                }
                // Neither: a slot whose upload failed (or is about to start).
                (Err(_), Err(_)) => age(&dir).is_ok_and(|(_, a)| a > self.part_lifetime),
            };
            if remove {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {
                        removed += 1;
                        debug!(slot, "removed");
                    }
                    Err(e) => warn!(slot, error = %e, "cannot remove"),
                }
            }
        }
        self.used.store(total, Ordering::Relaxed);
        if removed > 0 {
            info!(removed, bytes = total, "sweep done");
        }
        Ok(())
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
        assert_eq!(store.used(), 7);
        assert!(store.reserve(3, 10));
        assert!(!store.reserve(1, 10));
        std::thread::sleep(Duration::from_millis(300));
        store.sweep().unwrap();
        assert_eq!(store.used(), 0);
        assert!(!store.dir(&a).exists() && !store.dir(&b).exists());
        assert!(tmp.path().join("not-a-slot").exists());
    }
}
