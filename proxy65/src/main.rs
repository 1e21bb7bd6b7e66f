//! proxy65: a XEP-0065 SOCKS5 bytestream proxy as a component. The XMPP side (on the
//! router link, as `proxy.DOMAIN`) tells clients where the streamhost is and takes
//! activations; the SOCKS5 side pairs the two connections of a stream and relays them.
//! See docs/proxy65.md.
//!
//! - `config`: proxy65.xml; `xmpp`: disco, streamhost query, activation;
//! - `socks`: the SOCKS5 handshake; `relay`: waiting connections, pairing, relaying.

mod config;
mod relay;
mod socks;
mod xmpp;

/// Relayed streams (docs/metrics.md).
pub struct Streams {
    pub active: jrs_metrics::Gauge,
    pub done: jrs_metrics::Counter,
    pub bytes: jrs_metrics::Counter,
}

impl Streams {
    pub fn relayed(&self, bytes: u64) {
        self.done.inc();
        self.bytes.inc_by(bytes);
    }
}

pub static STREAMS: std::sync::LazyLock<Streams> = std::sync::LazyLock::new(|| Streams {
    active: jrs_metrics::gauge("jabberd_proxy65_streams", "Streams being relayed."),
    done: jrs_metrics::counter(
        "jabberd_proxy65_streams_relayed",
        "Streams relayed and closed.",
    ),
    bytes: jrs_metrics::counter(
        "jabberd_proxy65_relayed_bytes",
        "Bytes relayed (both directions) by closed streams.",
    ),
});

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing::info;

use jrs_component::service::{exit_code, load_and_init, run_component, CommonArgs};

use crate::config::ProxyConfig;

jrs_component::server_allocator!();

/// The jabberd-rs SOCKS5 bytestream proxy (XEP-0065).
#[derive(Parser, Debug)]
#[command(name = "proxy65", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "proxy65")
}

fn load(path: &Path) -> jrs_config::Result<ProxyConfig> {
    ProxyConfig::load(path)
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = load_and_init(&args.common, load, |c| c.log.clone())? else {
        return Ok(());
    };
    let link = config.router.clone().for_instance(args.common.instance);
    std::sync::LazyLock::force(&STREAMS);
    let runtime =
        jrs_component::runtime::build("proxy65", jrs_component::runtime::Shape::Multi(Some(2)))?;
    runtime.block_on(async move {
        let address = format!("{}:{}", config.listen_address, config.listen_port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("listening for SOCKS5 on {address}"))?;
        let relay = relay::Relay::new(relay::RelayLimits {
            bandwidth: config.bandwidth,
            streams_per_user: config.streams_per_user,
            max_waiting: config.max_waiting,
            per_address: config.per_address,
            max_streams: config.max_streams,
            handshake: config.handshake,
            idle: config.idle,
            pending: config.pending,
        });
        info!(
            name = %link.name,
            listen = %listener.local_addr()?,
            streamhost = %format!("{}:{}", config.streamhost_host, config.streamhost_port),
            "proxy65 starting"
        );
        tokio::spawn(relay.clone().serve(listener));
        let service = Arc::new(xmpp::Service {
            config: config.clone(),
            relay,
        });
        run_component(link, config.limits, vec![], |reader, outbox| {
            xmpp::serve(service.clone(), reader, outbox)
        })
        .await
    })
}
