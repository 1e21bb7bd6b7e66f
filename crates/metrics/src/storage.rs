//! Storage metrics shared by both sides of the xdb protocol: what the storage processes
//! (xdb-file, xdb-pg) served, and how long the processes that ask (sm, c2s, muc) waited.

use std::sync::LazyLock;
use std::time::Instant;

use crate::{Counter, Histogram, Labeled, LATENCY_BUCKETS};

/// The operations of the storage protocol (docs/protocol.md), `batch` for a request
/// of several owners, and `other` for anything else.
pub const OPS: &[&str] = &[
    "get",
    "set",
    "delete",
    "append",
    "take",
    "list",
    "archive-append",
    "archive-query",
    "archive-trim",
    "archive-retract",
    "batch",
    "other",
];

/// Requests served by a storage process.
pub struct Served {
    /// `jabberd_storage_requests_total{op, outcome="ok|error"}`.
    pub requests: Labeled<Counter>,
    /// `jabberd_storage_request_duration_seconds{op}`: from the request's arrival to
    /// its answer being queued (durable by then).
    pub duration: Labeled<Histogram>,
}

pub static SERVED: LazyLock<Served> = LazyLock::new(|| Served {
    requests: crate::counters(
        "jabberd_storage_requests",
        "Storage requests answered, by operation and outcome.",
        &[("op", OPS), ("outcome", &["ok", "error"])],
    ),
    duration: crate::histograms(
        "jabberd_storage_request_duration_seconds",
        "Time from a storage request's arrival to its answer (durable), by operation.",
        &[("op", OPS)],
        LATENCY_BUCKETS,
    ),
});

impl Served {
    /// A request of `op` answered (`ok`: with a result), having arrived at `start`.
    pub fn answered(&self, op: &str, ok: bool, start: Instant) {
        self.requests
            .get(&[op, if ok { "ok" } else { "error" }])
            .inc();
        self.duration.by(op).observe_since(start);
    }
}

/// `jabberd_storage_wait_seconds{op}`: how long this process waited for the answers
/// to its storage requests (the round trip through the router, retries included).
pub static WAITED: LazyLock<Labeled<Histogram>> = LazyLock::new(|| {
    crate::histograms(
        "jabberd_storage_wait_seconds",
        "Time this process waited for the answers to its storage requests, by operation.",
        &[("op", OPS)],
        LATENCY_BUCKETS,
    )
});

/// Observes the time from now to its drop into [`WAITED`].
#[must_use]
pub struct WaitTimer {
    op: &'static str,
    start: Instant,
}

/// Times a storage request of `op` until the returned value is dropped.
pub fn wait(op: &'static str) -> WaitTimer {
    WaitTimer {
        op,
        start: Instant::now(),
    }
}

impl Drop for WaitTimer {
    fn drop(&mut self) {
        WAITED.by(self.op).observe_since(self.start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_times() {
        SERVED.answered("get", true, Instant::now());
        SERVED.answered("nonsense", false, Instant::now());
        assert_eq!(SERVED.requests.get(&["get", "ok"]).get(), 1);
        assert_eq!(SERVED.requests.get(&["other", "error"]).get(), 1);
        assert_eq!(SERVED.duration.by("get").count(), 1);
        drop(wait("set"));
        assert_eq!(WAITED.by("set").count(), 1);
    }
}
