//! logd: a log sink. Binds `log` packets (docs/protocol.md, "Log packets") for `*` or
//! chosen hosts and writes the records to files, admins' chat and standard output, each
//! with its own filter. See docs/logd.md.

mod config;
mod sinks;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tracing::{debug, info};

use jrs_component::log_record::LogRecord;
use jrs_component::service::{exit_code, load_and_init, run_component, Bind, CommonArgs};
use jrs_component::{ComponentReader, Outbox, PacketType};
use jrs_stream::StanzaErrorCondition;

use crate::config::LogdConfig;
use crate::sinks::Sinks;

jrs_component::server_allocator!();

/// The jabberd-rs log sink.
#[derive(Parser, Debug)]
#[command(name = "logd", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "logd")
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = load_and_init(&args.common, LogdConfig::load, |c| c.log.clone())? else {
        return Ok(());
    };
    let link = config.router.clone().for_instance(args.common.instance);
    let binds = config
        .binds
        .iter()
        .map(|h| Bind {
            route: PacketType::Log,
            host: h.clone(),
            shared: true,
            fanout: false,
            ns: None,
        })
        .collect();
    info!(
        name = %link.name,
        hosts = %config.binds.join(" "),
        files = config.files.len(),
        admins = config.admins.len(),
        stdout = config.stdout.len(),
        "logd starting"
    );
    std::sync::LazyLock::force(&RECORDS);
    let sinks = Arc::new(Mutex::new(Sinks::new(&config)));
    let me: Arc<str> = link.name.clone().into();
    jrs_component::runtime::build("logd", jrs_component::runtime::Shape::Multi(Some(1)))?.block_on(
        run_component(link, config.limits, binds, |reader, outbox| {
            serve(sinks.clone(), me.clone(), reader, outbox)
        }),
    )
}

/// `jabberd_logd_records_total{level}`: log records received (docs/metrics.md).
static RECORDS: std::sync::LazyLock<jrs_metrics::Labeled<jrs_metrics::Counter>> =
    std::sync::LazyLock::new(|| {
        jrs_metrics::counters(
            "jabberd_logd_records",
            "Log records received, by level.",
            &[("level", &["error", "warn", "info", "debug", "trace"])],
        )
    });

async fn serve(
    sinks: Arc<Mutex<Sinks>>,
    me: Arc<str>,
    mut reader: ComponentReader,
    outbox: Outbox,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            stanza = reader.next() => {
                let stanza = stanza?;
                match stanza.name() {
                    "log" => match LogRecord::parse(&stanza) {
                        Some(r) => {
                            RECORDS.by(r.level.name()).inc();
                            let messages = sinks.lock().expect("sinks").record(&r, &me, Instant::now());
                            for m in messages {
                                outbox.send(m);
                            }
                        }
                        None => debug!("unreadable log packet ignored"),
                    },
                    "iq" if matches!(stanza.kind(), Some("get" | "set")) => {
                        if let Some(reply) = stanza.error_reply(
                            StanzaErrorCondition::ServiceUnavailable,
                            "this is a log sink",
                        ) {
                            outbox.send(reply);
                        }
                    }
                    other => debug!("ignoring <{other}> from the router"),
                }
            }
            _ = tick.tick() => {
                let reports = sinks.lock().expect("sinks").tick(&me, Instant::now());
                for m in reports {
                    outbox.send(m);
                }
            }
        }
    }
}
