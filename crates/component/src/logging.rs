//! Logging set-up shared by every executable: `tracing` to stderr (the supervisor writes
//! each process's stderr to its own log file), filter from the config, RUST_LOG wins.

use jrs_config::LogConfig;
use tracing_subscriber::EnvFilter;

pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
