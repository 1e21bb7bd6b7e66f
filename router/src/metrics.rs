//! The router's metrics (docs/metrics.md): packets and bytes through it, counted on the
//! way with atomic adds; links, held packets and queued bytes read from its state at
//! each scrape.

use std::sync::{Arc, LazyLock, Weak};

use jrs_component::{PacketType, TopLevel};
use jrs_metrics::{Counter, Labeled};

/// Packet types, in the order of the tree's held counts (`Tree::held_counts`).
const TYPES: &[&str] = &["normal", "session", "xdb", "log"];

pub struct Metrics {
    /// Packets read from links, by packet type.
    pub packets_in: Labeled<Counter>,
    /// Packets queued for a link, by packet type (one per recipient of a fan-out
    /// packet split here; a copy per instance of a log route).
    pub packets_out: Labeled<Counter>,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// Packets held for a component in its grace period, by packet type.
    pub held: Labeled<Counter>,
    /// Packets answered with an error because they could not be delivered.
    pub bounced: Counter,
    /// Links killed because they stopped reading (their queue overflowed).
    pub overflows: Counter,
}

pub static M: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    packets_in: jrs_metrics::counters(
        "jabberd_router_packets_in",
        "Packets read from component links, by packet type.",
        &[("type", TYPES)],
    ),
    packets_out: jrs_metrics::counters(
        "jabberd_router_packets_out",
        "Packets queued for component links, by packet type.",
        &[("type", TYPES)],
    ),
    bytes_in: jrs_metrics::counter(
        "jabberd_router_bytes_in",
        "Bytes of packets read from component links.",
    ),
    bytes_out: jrs_metrics::counter(
        "jabberd_router_bytes_out",
        "Bytes written to component links.",
    ),
    held: jrs_metrics::counters(
        "jabberd_router_packets_held",
        "Packets held for a component during its grace period, by packet type.",
        &[("type", TYPES)],
    ),
    bounced: jrs_metrics::counter(
        "jabberd_router_bounces",
        "Packets that could not be delivered (answered with an error where they may be).",
    ),
    overflows: jrs_metrics::counter(
        "jabberd_router_queue_overflows",
        "Links disconnected because their outbound queue overflowed.",
    ),
});

/// The packet type of a serialized packet, by its element name (`normal` for anything
/// else: stanzas and fan-out packets).
pub fn type_of(packet: &[u8]) -> &'static str {
    let name = packet.strip_prefix(b"<").unwrap_or(packet);
    let end = name
        .iter()
        .position(|b| matches!(b, b' ' | b'>' | b'/' | b'\t' | b'\r' | b'\n'))
        .unwrap_or(name.len());
    match std::str::from_utf8(&name[..end]).map(TopLevel::classify) {
        Ok(TopLevel::Packet(t)) => t.name(),
        _ => PacketType::Normal.name(),
    }
}

/// What the gauges read at each scrape (the router's state; a trait so that this file
/// does not depend on the router's).
pub trait Observed: Send + Sync + 'static {
    /// Links per component account.
    fn metrics_links(&self) -> Vec<(String, i64)>;
    /// Packets held per packet type, in the order of [`TYPES`].
    fn metrics_held(&self) -> [usize; 4];
    /// Bytes queued for every link.
    fn metrics_queued(&self) -> usize;
}

/// Registers the counters and the gauges read from `router` at each scrape.
pub fn register<R: Observed>(router: &Arc<R>) {
    LazyLock::force(&M);
    let weak: Weak<R> = Arc::downgrade(router);
    let w = weak.clone();
    jrs_metrics::gauges_fn(
        "jabberd_router_links",
        "Authenticated component links, by component account (router-users.xml).",
        "component",
        move || w.upgrade().map(|r| r.metrics_links()).unwrap_or_default(),
    );
    let w = weak.clone();
    jrs_metrics::gauges_fn(
        "jabberd_router_held_packets",
        "Packets held now for components in their grace period, by packet type.",
        "type",
        move || {
            let held = w.upgrade().map(|r| r.metrics_held()).unwrap_or_default();
            TYPES
                .iter()
                .zip(held)
                .map(|(t, n)| (t.to_string(), n as i64))
                .collect()
        },
    );
    let w = weak;
    jrs_metrics::gauge_fn(
        "jabberd_router_queued_bytes",
        "Bytes queued for component links and not yet written.",
        move || w.upgrade().map_or(0, |r| r.metrics_queued() as i64),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn packet_types_by_name() {
        assert_eq!(super::type_of(b"<xdb type='get'/>"), "xdb");
        assert_eq!(super::type_of(b"<session sid='1'>"), "session");
        assert_eq!(super::type_of(b"<message/>"), "normal");
        assert_eq!(super::type_of(b"<fanout from='a'>"), "normal");
        assert_eq!(super::type_of(b"<log>x</log>"), "log");
    }
}
