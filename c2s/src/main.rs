//! c2s, the client connection manager: client listeners (STARTTLS and direct TLS),
//! SASL, resource binding, then relaying each session's stanzas to and from its sm
//! instance through the router. See `docs/c2s.md` and `docs/protocol.md`.

mod auth_failures;
mod channel_binding;
mod config;
mod conn;
mod fast;
mod iq;
mod login;
mod metrics;
mod negotiation;
mod protocol;
mod sasl;
mod sasl2;
mod scram;
mod server_caps;
mod session;
mod shared;
mod tls;
mod web;

use std::sync::Arc;

use clap::Parser;
use tracing::{error, info};

use jrs_component::service::{
    exit_code, load_and_init, on_sighup, run_component_until_stopped, Bind, CommonArgs,
};
use jrs_stream::Limits;

use crate::config::C2sConfig;
use crate::shared::Shared;

jrs_component::server_allocator!();

/// The jabberd-rs client connection manager.
#[derive(Parser, Debug)]
#[command(name = "c2s", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "c2s")
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = load_and_init(&args.common, C2sConfig::load, |c| c.log.clone())? else {
        return Ok(());
    };
    jrs_component::service::raise_open_files_limit();
    std::sync::LazyLock::force(&metrics::M);
    std::sync::LazyLock::force(&jrs_metrics::storage::WAITED);
    let tls = tls::load(&config.hosts, config.compact_tls_records)?;
    let link = config.router.clone().for_instance(args.common.instance);
    let shared = Arc::new(Shared::new(config, tls, link.name.clone()));
    // One thread by default: without cross-thread wake-ups a lone message costs about
    // 40% less CPU, and 200 clients on two cores are no slower (docs/benchmarks.md, "Low
    // load"). JABBERD_RUNTIME(_PROGRAM)=multi:N changes it (crates/component/src/runtime.rs).
    let runtime = jrs_component::runtime::build("c2s", jrs_component::runtime::Shape::Current)?;
    runtime.block_on(async move {
        let serving = shared.clone();
        jrs_sx::listener::start_all(
            &shared.config.listen,
            "clients",
            jrs_sx::listener::Ports::SharedWithInstances,
            |peer| tracing::info_span!("client", %peer),
            move |tcp, peer, mode| conn::serve(serving.clone(), tcp, peer, mode),
        )
        .await?;
        web::start(&shared).await?;
        tokio::spawn(shared.clone().watch_restores());
        info!(name = %link.name, "c2s ready");
        // Packets from sm can be as large as what sm stores (rosters, vCards).
        let limits = Limits {
            max_stanza_bytes: 4 << 20,
            max_depth: 64,
        };
        let reloading = shared.clone();
        on_sighup(move || match reloading.reload_tls() {
            Ok(()) => info!("SIGHUP: certificates reloaded; new connections get them"),
            Err(e) => error!("SIGHUP: certificates not reloaded, the old ones stay: {e:#}"),
        })?;
        let serving = shared.clone();
        run_component_until_stopped(
            link,
            limits,
            vec![Bind::notices()],
            |reader, outbox| {
                let shared = serving.clone();
                async move { shared.serve_router(reader, outbox).await }
            },
            // SIGTERM: every client gets <system-shutdown/>; resumable sessions are
            // handed to sm (a client may resume on another instance), the others end.
            || async { shared.shut_down(shared.config.shutdown_timeout).await },
        )
        .await
    })
}
