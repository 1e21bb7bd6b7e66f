//! sm's metrics (docs/metrics.md): packets from the router by kind, session events,
//! users with a task and hibernating sessions (read at scrape time). The time sm waits
//! for storage is `jabberd_storage_wait_seconds` (jrs-xdb's client).

use std::sync::{Arc, LazyLock, Weak};

use jrs_metrics::{Counter, Labeled};

use crate::host::Ctx;

pub struct Metrics {
    /// Packets read from the router, by element.
    pub packets: Labeled<Counter>,
    /// Session packets from c2s, by kind.
    pub sessions: Labeled<Counter>,
    /// Stanzas delivered to users of this instance without the router (`host::local`).
    pub local: Counter,
}

pub static M: LazyLock<Metrics> = LazyLock::new(|| {
    Metrics {
    packets: jrs_metrics::counters(
        "jabberd_sm_packets",
        "Packets from the router handled, by kind (stanzas by type, session control, storage answers).",
        &[(
            "type",
            &["message", "presence", "iq", "session", "fanout", "xdb", "notice", "other"],
        )],
    ),
    sessions: jrs_metrics::counters(
        "jabberd_sm_session_events",
        "Session packets from c2s, by kind.",
        &[(
            "event",
            &["start", "end", "resume", "resumable", "hibernate", "park", "restore", "other"],
        )],
    ),
    local: jrs_metrics::counter(
        "jabberd_sm_local_stanzas",
        "Stanzas handed from one user's task to another's without the router: the recipient's domain is served by this instance alone.",
    ),
}
});

/// Registers the counters, the storage wait histogram and the gauges read from `ctx`.
pub fn register(ctx: &Arc<Ctx>) {
    LazyLock::force(&M);
    LazyLock::force(&jrs_metrics::storage::WAITED);
    let w: Weak<Ctx> = Arc::downgrade(ctx);
    jrs_metrics::gauge_fn(
        "jabberd_sm_hibernated_sessions",
        "Sessions hibernating here (XEP-0198), waiting for their client to resume.",
        move || {
            w.upgrade().map_or(0, |c| {
                c.parked.load(std::sync::atomic::Ordering::Relaxed) as i64
            })
        },
    );
    let w: Weak<Ctx> = Arc::downgrade(ctx);
    jrs_metrics::gauge_fn(
        "jabberd_sm_users",
        "Users with a task in this sm (online, or with work under way).",
        move || w.upgrade().map_or(0, |c| c.users.user_count() as i64),
    );
}
