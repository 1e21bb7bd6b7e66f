//! Group commit across worker threads. Every worker makes its batch durable with
//! `syncfs`, which flushes the whole file system: when several workers commit at the
//! same moment (a batch of archive appends touches all of them), one `syncfs` that
//! starts after all of their writes serves them all. A caller waits for the first
//! `syncfs` that starts after it called, running it itself when none is running.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::{Condvar, Mutex};

#[derive(Default)]
pub struct Syncer {
    state: Mutex<State>,
    finished: Condvar,
}

#[derive(Default)]
struct State {
    /// How many syncs have started; the n-th is sync number n.
    started: u64,
    running: bool,
    /// Results of the latest syncs by number (an error as text: `io::Error` is not
    /// `Clone`).
    results: VecDeque<(u64, Result<(), String>)>,
}

/// Results kept for waiters that have not looked yet (they wake within microseconds).
const KEPT: usize = 64;

impl Syncer {
    /// Returns once everything written before the call is on disk under `dir`'s file
    /// system.
    pub fn sync(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.state.lock().expect("syncer lock");
        // A sync already running may have started before our writes: the next one
        // covers them.
        let needed = st.started + 1;
        loop {
            if let Some((_, result)) = st.results.iter().find(|(n, _)| *n == needed) {
                return result.clone().map_err(io::Error::other);
            }
            if !st.running && st.started < needed {
                st.running = true;
                st.started += 1;
                let n = st.started;
                drop(st);
                let result = syncfs(dir).map_err(|e| e.to_string());
                st = self.state.lock().expect("syncer lock");
                st.running = false;
                st.results.push_back((n, result.clone()));
                while st.results.len() > KEPT {
                    st.results.pop_front();
                }
                self.finished.notify_all();
                return result.map_err(io::Error::other);
            }
            st = self.finished.wait(st).expect("syncer lock");
        }
    }
}

/// Flushes every dirty page and all metadata of the file system holding `dir` to disk,
/// and waits for it.
fn syncfs(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let f = File::open(dir)?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_share_syncs() {
        let dir = std::env::temp_dir();
        let s = Arc::new(Syncer::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                let dir = dir.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        s.sync(&dir).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let started = s.state.lock().unwrap().started;
        assert!((20..=160).contains(&started), "{started} syncs");
    }
}
