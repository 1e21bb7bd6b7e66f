//! The component protocol between the router and every other process (XEP-0114 plus the
//! project's bind extension, specified in `docs/protocol.md`), and a client for it.
//!
//! - [`ack`]: acknowledged links (counted acks, packets kept until acknowledged).
//! - [`protocol`]: packet types, element names, the bind extension, the handshake digest.
//! - [`io`]: a framed reader over any async byte stream, used by the router and clients.
//! - [`transport`]: TCP, Unix socket or TLS links to the router; [`unix_link`]: the Unix
//!   socket registered for what it reads only.
//! - [`client`]: connect, handshake, bind; then read stanzas and send bytes.
//! - [`session`]: the queued stanzas of the session protocol (c2s and sm).
//! - [`fanout`]: one stanza for many recipients (room broadcasts).
//! - [`logging`], [`log_route`], [`log_record`]: stderr logging, and log records sent
//!   through the router as `log` packets.

pub mod ack;
pub mod client;
pub mod fanout;
pub mod io;
pub mod log_record;
pub mod log_route;
pub mod logging;
pub mod protocol;
pub mod runtime;
pub mod service;
pub mod session;
pub mod transport;
pub mod unix_link;

pub use client::{
    BindError, Component, ComponentReader, ComponentWriter, HandshakeRefused, Outbox, WriterStop,
};
pub use io::{FramedReader, ReadError};
/// The metrics crate, for the crates built on this one (docs/metrics.md).
pub use jrs_metrics as metrics;
pub use protocol::{PacketType, TopLevel};

/// Re-exported for [`server_allocator!`].
pub use tikv_jemallocator;

/// Makes jemalloc the program's allocator (`jrs_component::server_allocator!();` at
/// the top level of each server program's `main.rs`). glibc's malloc took its slow paths
/// (`_int_malloc`, consolidation) on sm's heap of many users: a third of sm's samples in
/// a presence round of 18 000 users; with jemalloc sm's CPU per presence change fell by
/// 30-40% and per lone message by about a tenth, with no more memory per idle
/// connection (docs/benchmarks.md, "Allocator"). A macro, not a `#[global_allocator]`
/// here: a program (the fuzz tests) may need its own.
#[macro_export]
macro_rules! server_allocator {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::tikv_jemallocator::Jemalloc = $crate::tikv_jemallocator::Jemalloc;
    };
}
