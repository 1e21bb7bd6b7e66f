//! The router link of a component process (jrs-component's client): packets read and
//! queued, by element.

use std::sync::LazyLock;

use crate::{Counter, Labeled};

const ELEMENTS: &[&str] = &[
    "message", "presence", "iq", "session", "xdb", "log", "fanout", "notice", "other",
];

pub struct Link {
    pub packets_in: Labeled<Counter>,
    pub packets_out: Labeled<Counter>,
    pub bytes_out: Counter,
}

pub static LINK: LazyLock<Link> = LazyLock::new(|| Link {
    packets_in: crate::counters(
        "jabberd_link_packets_in",
        "Packets read from the router link, by element.",
        &[("type", ELEMENTS)],
    ),
    packets_out: crate::counters(
        "jabberd_link_packets_out",
        "Packets queued for the router link, by element.",
        &[("type", ELEMENTS)],
    ),
    bytes_out: crate::counter(
        "jabberd_link_bytes_out",
        "Bytes queued for the router link.",
    ),
});

impl Link {
    /// A packet read, by its element name.
    pub fn received(&self, name: &str) {
        self.packets_in.by(name).inc();
    }

    /// A serialized packet queued.
    pub fn sent(&self, packet: &[u8]) {
        self.packets_out.by(crate::element_name(packet)).inc();
        self.bytes_out.inc_by(packet.len() as u64);
    }
}
