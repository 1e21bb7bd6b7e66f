//! s2s's metrics (docs/metrics.md): streams by direction, stanzas and bytes, stanzas
//! waiting for outgoing streams, dialback outcomes. Atomic adds only.

use std::sync::LazyLock;

use jrs_metrics::{Counter, Gauge, Labeled, Traffic, STANZA_KINDS};

const DIRECTIONS: &[&str] = &["in", "out"];

pub struct Metrics {
    /// Established streams: incoming (accepted) and outgoing (negotiated).
    pub connections: Labeled<Gauge>,
    /// Stanzas from remote servers passed to the router, by type.
    pub stanzas_in: Labeled<Counter>,
    /// Stanzas from local users handed to outgoing streams, by type.
    pub stanzas_out: Labeled<Counter>,
    pub traffic: Traffic,
    /// Stanzas queued for remote servers without a usable stream yet.
    pub queued: Gauge,
    /// Dialback: remotes we verified (`in`), and our own requests (`out`).
    pub dialback: Labeled<Counter>,
}

pub static M: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    connections: jrs_metrics::gauges(
        "jabberd_s2s_connections",
        "Server-to-server streams open, by direction.",
        &[("direction", DIRECTIONS)],
    ),
    stanzas_in: jrs_metrics::counters(
        "jabberd_s2s_stanzas_in",
        "Stanzas received from remote servers and routed, by type.",
        &[("type", STANZA_KINDS)],
    ),
    stanzas_out: jrs_metrics::counters(
        "jabberd_s2s_stanzas_out",
        "Stanzas for remote servers taken from the router, by type.",
        &[("type", STANZA_KINDS)],
    ),
    traffic: Traffic::new("jabberd_s2s", "server-to-server streams"),
    queued: jrs_metrics::gauge(
        "jabberd_s2s_queued_stanzas",
        "Stanzas waiting in outgoing queues (for a stream to be negotiated).",
    ),
    dialback: jrs_metrics::counters(
        "jabberd_s2s_dialback",
        "Dialback outcomes: remotes verified here (in) and our requests (out).",
        &[("direction", DIRECTIONS), ("result", &["valid", "invalid"])],
    ),
});

pub fn dialback(direction: &str, valid: bool) {
    M.dialback
        .get(&[direction, if valid { "valid" } else { "invalid" }])
        .inc();
}
