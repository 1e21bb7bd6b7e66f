//! The router: owns the delivery tree; every other process connects to it over the
//! XEP-0114 component protocol. See `docs/protocol.md` and `docs/router.md`.

mod config;
mod dial;
mod gather;
mod link;
mod listener;
mod metrics;
mod outbox;
mod router;
mod tree;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

use crate::config::{RouterConfig, Users};
use crate::router::Router;

jrs_component::server_allocator!();

/// The jabberd-rs router: delivers packets between components.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file.
    #[arg(short = 'c', long = "config", default_value = "etc/router.xml")]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match RouterConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("router: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // `<metrics/>`, as in every process's file (docs/metrics.md).
    let metrics = match jrs_metrics::MetricsConfig::from_file(&args.config) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("router: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let users = match Users::load(&config.users_file) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("router: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        return std::process::ExitCode::SUCCESS;
    }
    jrs_component::logging::init(&config.log);
    jrs_component::transport::install_crypto_provider();
    // One thread by default: without cross-thread wake-ups a lone message costs about
    // 40% less CPU, and 200 clients on two cores are no slower (docs/benchmarks.md, "Low
    // load"). JABBERD_RUNTIME(_PROGRAM)=multi:N changes it (crates/component/src/runtime.rs).
    let runtime =
        match jrs_component::runtime::build("router", jrs_component::runtime::Shape::Current) {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("router: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        };
    match runtime.block_on(run(args, config, users, metrics)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("router: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(
    args: Args,
    config: RouterConfig,
    users: Users,
    metrics: Option<jrs_metrics::MetricsConfig>,
) -> anyhow::Result<()> {
    let router = Arc::new(Router::new(config, users));
    metrics::register(&router);
    if let Some(m) = &metrics {
        jrs_metrics::http::serve(m).await?;
    }
    listener::start_all(&router).await?;
    dial::start_all(&router);
    info!(id = %router.config.id, "router ready");

    // Ends grace periods: held packets past their deadline are bounced.
    tokio::spawn({
        let router = router.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                router.expire_held();
            }
        }
    });

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // Secrets and ACLs are re-read; listeners and links stay as they are.
                match RouterConfig::load(&args.config).and_then(|c| Users::load(&c.users_file)) {
                    Ok(users) => {
                        router.replace_users(users);
                        info!("SIGHUP: component users reloaded");
                    }
                    Err(e) => error!("SIGHUP: keeping the old component users: {e}"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping");
    Ok(())
}
