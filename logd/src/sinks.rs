//! Where logd writes records: files (with size rotation), admins' chat (rate-limited),
//! standard output.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jrs_component::log_record::{Filter, LogRecord};
use jrs_component::log_route::LOCAL_TARGET;
use jrs_stream::xml::escape;
use tracing::warn;

use crate::config::{file_for, AdminOutput, FileOutput, LogdConfig};

/// Open files per file output at most (one per host with `{host}`).
const MAX_OPEN: usize = 64;

/// A log file that rotates by size: PATH -> PATH.1 -> .. -> PATH.KEEP (dropped).
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<(File, u64)>,
    /// The last write failed: said once until one succeeds.
    failing: bool,
}

impl RotatingFile {
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> RotatingFile {
        RotatingFile {
            path,
            max_bytes,
            keep,
            file: None,
            failing: false,
        }
    }

    fn open(&mut self) -> std::io::Result<&mut (File, u64)> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let size = f.metadata()?.len();
            self.file = Some((f, size));
        }
        Ok(self.file.as_mut().expect("opened"))
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            return std::fs::remove_file(&self.path).or_else(ignore_missing);
        }
        std::fs::remove_file(self.rotated(self.keep)).or_else(ignore_missing)?;
        for n in (1..self.keep).rev() {
            std::fs::rename(self.rotated(n), self.rotated(n + 1)).or_else(ignore_missing)?;
        }
        std::fs::rename(&self.path, self.rotated(1)).or_else(ignore_missing)
    }

    /// Appends one line (a newline is added), rotating first when it would pass the size.
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        let size = self.open()?.1;
        if size > 0 && size + len > self.max_bytes {
            self.rotate()?;
        }
        let (f, size) = self.open()?;
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        f.write_all(&buf)?;
        *size += len;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

struct FileSink {
    config: FileOutput,
    files: HashMap<PathBuf, RotatingFile>,
}

impl FileSink {
    fn write(&mut self, r: &LogRecord) {
        if !self.config.filter.accepts(r) {
            return;
        }
        let path = file_for(&self.config.path, &r.host);
        if !self.files.contains_key(&path) && self.files.len() >= MAX_OPEN {
            self.files.clear();
        }
        let file = self
            .files
            .entry(path.clone())
            .or_insert_with(|| RotatingFile::new(path, self.config.max_bytes, self.config.keep));
        match file.write_line(&r.line()) {
            Ok(()) => file.failing = false,
            Err(e) => {
                if !file.failing {
                    // Not routed: a failing sink must not feed itself.
                    warn!(target: LOCAL_TARGET, path = %file.path().display(), "log file not written: {e}");
                }
                file.failing = true;
                file.file = None;
            }
        }
    }
}

/// Messages to one admin within a window, and those left out.
pub struct RateLimit {
    per_window: u32,
    window: Duration,
    start: Instant,
    sent: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(per_window: u32, window: Duration, now: Instant) -> RateLimit {
        RateLimit {
            per_window,
            window,
            start: now,
            sent: 0,
            suppressed: 0,
        }
    }

    /// Whether one more message may go now.
    pub fn allow(&mut self, now: Instant) -> bool {
        if now.duration_since(self.start) >= self.window && self.suppressed == 0 {
            self.start = now;
            self.sent = 0;
        }
        if self.sent < self.per_window {
            self.sent += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// At the end of a window with messages left out: how many (the window restarts).
    pub fn report(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.start) < self.window {
            return None;
        }
        self.start = now;
        self.sent = 0;
        let n = std::mem::take(&mut self.suppressed);
        (n > 0).then_some(n)
    }
}

struct AdminSink {
    config: AdminOutput,
    limit: RateLimit,
}

/// Every output of one logd.
pub struct Sinks {
    files: Vec<FileSink>,
    admins: Vec<AdminSink>,
    stdout: Vec<Filter>,
    next_id: u64,
}

impl Sinks {
    pub fn new(config: &LogdConfig) -> Sinks {
        let now = Instant::now();
        Sinks {
            files: config
                .files
                .iter()
                .map(|f| FileSink {
                    config: f.clone(),
                    files: HashMap::new(),
                })
                .collect(),
            admins: config
                .admins
                .iter()
                .map(|a| AdminSink {
                    config: a.clone(),
                    limit: RateLimit::new(a.per_minute, a.window, now),
                })
                .collect(),
            stdout: config.stdout.clone(),
            next_id: 0,
        }
    }

    /// Writes a record to every output that takes it; returns the chat messages to send.
    pub fn record(&mut self, r: &LogRecord, me: &str, now: Instant) -> Vec<String> {
        for f in &mut self.files {
            f.write(r);
        }
        if self.stdout.iter().any(|f| f.accepts(r)) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", r.line());
        }
        let mut messages = vec![];
        for i in 0..self.admins.len() {
            let a = &mut self.admins[i];
            if a.config.filter.accepts(r) && a.limit.allow(now) {
                let jid = a.config.jid.clone();
                messages.push(self.chat(me, &jid, &r.line()));
            }
        }
        messages
    }

    /// Reports of rate-limited admins whose window ended.
    pub fn tick(&mut self, me: &str, now: Instant) -> Vec<String> {
        let mut reports = vec![];
        for a in &mut self.admins {
            if let Some(n) = a.limit.report(now) {
                reports.push((
                    a.config.jid.clone(),
                    format!(
                        "{n} more log records not sent to you (at most {} a minute): see the log files",
                        a.config.per_minute
                    ),
                ));
            }
        }
        reports
            .into_iter()
            .map(|(jid, text)| self.chat(me, &jid, &text))
            .collect()
    }

    fn chat(&mut self, me: &str, to: &str, text: &str) -> String {
        self.next_id += 1;
        format!(
            "<message from='{}' to='{}' type='chat' id='log{}'><body>{}</body></message>",
            escape(me),
            escape(to),
            self.next_id,
            escape(&jrs_component::log_record::clean(text, 8192))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("logd-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let d = tmp("rotate");
        let path = d.join("server.log");
        let mut f = RotatingFile::new(path.clone(), 100, 2);
        let line = "x".repeat(39); // 40 bytes with the newline
        for i in 0..7 {
            f.write_line(&format!("{i}{}", &line[1..])).unwrap();
        }
        // 2 lines per file: 0 1 | 2 3 | 4 5 | 6 -> current 6, .1 4 5, .2 2 3, 0 1 dropped.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let first = |s: String| s.lines().map(|l| l[..1].to_owned()).collect::<Vec<_>>();
        assert_eq!(first(read(&path)), vec!["6"]);
        assert_eq!(first(read(&d.join("server.log.1"))), vec!["4", "5"]);
        assert_eq!(first(read(&d.join("server.log.2"))), vec!["2", "3"]);
        assert!(!d.join("server.log.3").exists());
        for e in std::fs::read_dir(&d).unwrap() {
            let len = e.unwrap().metadata().unwrap().len();
            assert!(len <= 100, "{len}");
        }
        // Reopened (a restart), the size already written counts.
        let mut g = RotatingFile::new(path.clone(), 100, 2);
        g.write_line(&line).unwrap();
        g.write_line(&line).unwrap();
        assert_eq!(first(read(&d.join("server.log.1"))), vec!["6", "x"]);
    }

    #[test]
    fn keep_zero_truncates() {
        let d = tmp("keep0");
        let path = d.join("a.log");
        let mut f = RotatingFile::new(path.clone(), 50, 0);
        for _ in 0..3 {
            f.write_line(&"y".repeat(29)).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert!(!d.join("a.log.1").exists());
    }

    #[test]
    fn admin_rate_limit_counts_and_reports() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(3, Duration::from_secs(60), t0);
        let sent = (0..10).filter(|_| l.allow(t0)).count();
        assert_eq!(sent, 3);
        assert_eq!(l.report(t0 + Duration::from_secs(30)), None);
        assert_eq!(l.report(t0 + Duration::from_secs(60)), Some(7));
        // A new window: allowed again.
        assert!(l.allow(t0 + Duration::from_secs(61)));
        assert_eq!(l.report(t0 + Duration::from_secs(200)), None);
    }
}
