//! Logging set-up shared by every executable: `tracing` to stderr (the supervisor writes
//! each process's stderr to its own log file), filter from the config, RUST_LOG wins;
//! and records at or above `route-level` also to the router as `log` packets
//! ([`crate::log_route`]), once a component's service loop attaches its link.

use jrs_config::LogConfig;
use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    // Per-layer filters: RUST_LOG or `level` must not hide records from the router
    // layer, whose own level is `route-level`.
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(filter);
    let route = crate::log_route::layer(&config.route_level).map(|l| {
        let level = l.level();
        // Spans down to info too: their `host`/`domain`/`jid` fields name a record's host.
        let spans = LevelFilter::INFO.max(level);
        let filter = filter_fn(move |m| {
            if m.is_span() {
                spans >= *m.level()
            } else {
                level >= *m.level()
            }
        })
        .with_max_level_hint(spans);
        l.with_filter(filter)
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(route)
        .try_init();
}
