//! s2s, federation: holds the router's default route `*`, so every stanza for a domain no
//! local component serves comes here and leaves on a server-to-server stream; remote
//! servers connect to its listeners and their stanzas go into the router. See
//! `docs/federation.md`.
//!
//! Modules, one concern each: [`config`], [`resolve`] (static map, SRV, A/AAAA), [`tls`],
//! [`link`] (one connection's framing, limits and closing), [`outgoing`] (queues and the
//! connection state machine), [`incoming`], [`dialback`] (keys), [`router`] (the router
//! link), [`xml`] (headers, dialback elements, namespace mapping).

mod config;
mod dialback;
mod incoming;
mod metrics;
mod negotiation;
mod outgoing;
mod resolve;
mod router;
mod shared;
mod stream_management;
mod tls;
mod xml;

use std::sync::Arc;

use clap::Parser;
use tracing::{error, info, warn};

use jrs_component::service::{
    exit_code, load_and_init, on_sighup, run_component_until_stopped, Bind, CommonArgs,
};
use jrs_component::PacketType;
use jrs_stream::Limits;

use crate::config::S2sConfig;
use crate::shared::Shared;

jrs_component::server_allocator!();

/// The jabberd-rs server-to-server component.
/// How long streams get to close on SIGTERM (each close is itself bounded: a write,
/// then a short wait for the remote's close), well inside the supervisor's stop timeout.
const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(4);

#[derive(Parser, Debug)]
#[command(name = "s2s", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "s2s")
}

fn run(args: Args) -> anyhow::Result<()> {
    // hickory logs every DNS message at debug level: keep it to warnings unless RUST_LOG
    // asks for more.
    let quiet_dns = |c: &S2sConfig| {
        let mut log = c.log.clone();
        log.level = format!(
            "{},hickory_net=warn,hickory_resolver=warn,hickory_proto=warn",
            log.level
        );
        log
    };
    let Some(config) = load_and_init(&args.common, S2sConfig::load, quiet_dns)? else {
        return Ok(());
    };
    let tls = tls::Tls::load(&config)?;
    let secret = match &config.dialback_secret {
        Some(s) => s.clone(),
        None => {
            warn!("no <dialback secret>: using a random one (remote servers re-authenticate after a restart)");
            dialback::random_secret()
        }
    };
    let link = config.router.clone().for_instance(args.common.instance);
    std::sync::LazyLock::force(&metrics::M);
    let runtime =
        jrs_component::runtime::build("s2s", jrs_component::runtime::Shape::Multi(Some(2)))?;
    runtime.block_on(async move {
        let resolver = resolve::Resolver::new(&config.nameservers, config.routes.clone())?;
        let shared = Arc::new(Shared::new(config, tls, resolver, secret));
        let serving = shared.clone();
        jrs_sx::listener::start_all(
            &shared.config.listen,
            "remote servers",
            jrs_sx::listener::Ports::Own,
            |peer| {
                tracing::info_span!(
                    "in",
                    %peer,
                    remote = tracing::field::Empty,
                    id = tracing::field::Empty
                )
            },
            move |tcp, peer, mode| incoming::serve(serving.clone(), tcp, peer, mode),
        )
        .await?;
        info!(name = %link.name, hosts = shared.config.hosts.len(), "s2s ready");
        // Stanzas from local users may be as large as what a remote accepts.
        let limits = Limits {
            max_stanza_bytes: 4 << 20,
            max_depth: 64,
        };
        let binds = vec![Bind {
            route: PacketType::Normal,
            host: "*".into(),
            shared: false,
            fanout: false,
            ns: None,
        }];
        let reloading = shared.clone();
        on_sighup(move || match reloading.reload_tls() {
            Ok(()) => info!("SIGHUP: certificates reloaded; new streams get them"),
            Err(e) => error!("SIGHUP: certificates not reloaded, the old ones stay: {e:#}"),
        })?;
        let serving = shared.clone();
        run_component_until_stopped(
            link,
            limits,
            binds,
            |reader, outbox| router::serve(serving.clone(), reader, outbox),
            // SIGTERM: <system-shutdown/> on every stream, each closed cleanly.
            || async { shared.shut_down(SHUTDOWN_LIMIT).await },
        )
        .await
    })
}
