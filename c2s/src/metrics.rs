//! c2s's metrics (docs/metrics.md): client connections by transport and state, stanzas
//! and bytes both ways, logins by SASL mechanism, sessions. Atomic adds only.

use std::sync::LazyLock;

use jrs_metrics::{Counter, Gauge, GaugeGuard, Labeled, Traffic, STANZA_KINDS};

/// How a client connects: the STARTTLS port, direct TLS, WebSocket, BOSH.
pub const TRANSPORTS: &[&str] = &["tcp", "tls", "websocket", "bosh"];
/// Where a connection is: before its session (TLS, SASL, binding), or in it.
const STATES: &[&str] = &["negotiating", "session"];
/// The mechanisms c2s may offer (SASL, SASL2 and FAST), then `other`.
const MECHANISMS: &[&str] = &[
    "PLAIN",
    "SCRAM-SHA-1",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-512",
    "SCRAM-SHA-512-PLUS",
    "HT-SHA-256-NONE",
    "HT-SHA-256-UNIQ",
    "HT-SHA-256-EXPR",
    "HT-SHA-256-ENDP",
    "other",
];

pub struct Metrics {
    connections: Labeled<Gauge>,
    accepted: Labeled<Counter>,
    pub stanzas_in: Labeled<Counter>,
    pub stanzas_out: Labeled<Counter>,
    pub traffic: Traffic,
    auth: Labeled<Counter>,
    /// Sessions started (bound), resumed (XEP-0198, on this connection manager), and
    /// handed to sm to hibernate.
    pub sessions: Labeled<Counter>,
}

pub static M: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    connections: jrs_metrics::gauges(
        "jabberd_c2s_connections",
        "Client connections open, by transport and state.",
        &[("transport", TRANSPORTS), ("state", STATES)],
    ),
    accepted: jrs_metrics::counters(
        "jabberd_c2s_connections_accepted",
        "Client connections (streams) accepted, by transport.",
        &[("transport", TRANSPORTS)],
    ),
    stanzas_in: jrs_metrics::counters(
        "jabberd_c2s_stanzas_in",
        "Stanzas received from clients in sessions, by type.",
        &[("type", STANZA_KINDS)],
    ),
    stanzas_out: jrs_metrics::counters(
        "jabberd_c2s_stanzas_out",
        "Stanzas written to clients in sessions, by type.",
        &[("type", STANZA_KINDS)],
    ),
    traffic: Traffic::new("jabberd_c2s", "client streams"),
    auth: jrs_metrics::counters(
        "jabberd_c2s_auth",
        "Authentication attempts that ended, by SASL mechanism and result.",
        &[
            ("mechanism", MECHANISMS),
            ("result", &["success", "failure"]),
        ],
    ),
    sessions: jrs_metrics::counters(
        "jabberd_c2s_sessions",
        "Sessions started (bound), resumed here, handed to sm to hibernate, and restored at sm.",
        &[("event", &["started", "resumed", "restored", "hibernated"])],
    ),
});

/// A mechanism's name as a label (`other` for any not in the list).
pub fn mechanism(name: &str) -> &'static str {
    MECHANISMS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("other")
}

/// Counts an authentication that ended.
pub fn auth(mechanism: &str, success: bool) {
    M.auth
        .get(&[mechanism, if success { "success" } else { "failure" }])
        .inc();
}

tokio::task_local! {
    /// The connection the current task serves (see [`counted`]).
    static COUNTED: std::cell::RefCell<Connection>;
}

/// Runs `serve` (one client stream) counted as a connection over `transport`.
///
/// A plain function returning the scoped future, not an `async fn`: an `async fn` keeps
/// its argument `serve` and the future it awaits side by side for its whole life, which
/// doubled the size of every connection's task (memory per idle connection,
/// docs/benchmarks.md).
pub fn counted<F: std::future::Future>(
    transport: &'static str,
    serve: F,
) -> tokio::task::futures::TaskLocalFuture<std::cell::RefCell<Connection>, F> {
    COUNTED.scope(std::cell::RefCell::new(Connection::open(transport)), serve)
}

/// The connection of the current task is in its session now (bound or resumed).
pub fn in_session() {
    let _ = COUNTED.try_with(|c| c.borrow_mut().in_session());
}

/// One client connection, counted while it lives: negotiating, then in its session.
pub struct Connection {
    transport: &'static str,
    gauge: GaugeGuard,
}

impl Connection {
    pub fn open(transport: &'static str) -> Connection {
        M.accepted.by(transport).inc();
        Connection {
            transport,
            gauge: GaugeGuard::new(M.connections.get(&[transport, "negotiating"])),
        }
    }

    pub fn in_session(&mut self) {
        self.gauge
            .move_to(M.connections.get(&[self.transport, "session"]));
    }
}
