//! What the benchmarks read about processes from /proc: CPU time and which processes
//! belong to a test installation.

use std::path::PathBuf;

/// The server's processes: every process whose working directory is the installation.
pub fn server_pids(dir: &PathBuf) -> Vec<u32> {
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).ok().as_ref() == Some(dir) {
            pids.push(pid);
        }
    }
    pids
}

/// `name=value` for each server process, e.g. `c2s=12.3 sm=4.5`.
pub fn per_process(pids: &[u32], value: impl Fn(u32) -> f64, unit: &str) -> String {
    let mut parts: Vec<(String, f64)> = pids
        .iter()
        .map(|&pid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            (name, value(pid))
        })
        .collect();
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    parts
        .iter()
        .map(|(n, v)| format!("{n} {v:.1}{unit}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn cpu_micros(pids: &[u32]) -> u64 {
    let hz = 100; // USER_HZ on Linux
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<String> = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
        })
        .sum::<u64>()
        * 1_000_000
        / hz
}

/// CPU time (ns) of every thread of the processes, from /proc/PID/task/*/schedstat:
/// precise where [`cpu_micros`] counts 10 ms ticks. Threads that ended are not counted
/// (the servers' worker threads live as long as the process).
pub fn cpu_nanos(pids: &[u32]) -> u64 {
    sum_over_threads(pids, "schedstat", |s| {
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    })
}

/// Context switches (voluntary + involuntary) of every thread of the processes, from
/// /proc/PID/task/*/status: each voluntary one is a thread going to sleep (waiting for
/// a read, a futex, epoll), so per message they count the wake-ups on its path.
pub fn context_switches(pids: &[u32]) -> u64 {
    sum_over_threads(pids, "status", |s| {
        s.lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    })
}

/// `read` of /proc/PID/task/*/FILE, summed over every thread of the processes.
fn sum_over_threads(pids: &[u32], file: &str, read: impl Fn(&str) -> u64) -> u64 {
    pids.iter()
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|task| std::fs::read_to_string(task.path().join(file)).ok())
        .map(|s| read(&s))
        .sum()
}

/// Threads of a process (from /proc/PID/status).
pub fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
