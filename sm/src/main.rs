//! sm, the session manager: client sessions (carried by c2s over `session` packets), and
//! the IM features of the server and of accounts as modules. Everything durable is kept
//! through xdb. See docs/sm.md.
//!
//! - `host`: the module host (sessions, the chains, the IQ table, one task per user);
//! - `modules`: the features, one per file (roster, presence, messages, carbons, ...);
//! - `link`: the router link's reader; `config`: sm.xml;
//! - `xml`, `stanzas`, `clock`: helpers every layer uses.

mod clock;
mod config;
mod host;
mod link;
mod metrics;
mod modules;
mod stanzas;
mod xml;

use std::path::Path;
use std::sync::Arc;

use clap::Parser;

use jrs_component::service::{
    exit_code, load_and_init, run_component_until_stopped, Bind, CommonArgs,
};
use jrs_component::PacketType;
use jrs_xdb::XdbClient;

use crate::config::SmConfig;
use crate::host::store::Store;
use crate::host::{Ctx, Modules};

jrs_component::server_allocator!();

/// The jabberd-rs session manager.
#[derive(Parser, Debug)]
#[command(name = "sm", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "sm")
}

/// sm.xml and the modules it loads: both checked by `--check`.
fn load(path: &Path) -> jrs_config::Result<(SmConfig, Modules)> {
    let config = SmConfig::load(path, &modules::names(), modules::DEFAULT)?;
    let loaded = modules::load(&config).map_err(|e| config.root.error(format!("{e:#}")))?;
    Ok((config, loaded))
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some((config, loaded)) = load_and_init(&args.common, load, |c| c.0.log.clone())? else {
        return Ok(());
    };
    let link = config.router.clone().for_instance(args.common.instance);
    // session and normal for every host, shared: several instances split the users by
    // the router's rendezvous hashing of the bare JID. Notices tell us when a c2s goes
    // and which components are connected.
    let mut binds: Vec<Bind> = config
        .hosts
        .iter()
        .flat_map(|h| {
            [PacketType::Session, PacketType::Normal].map(|route| Bind {
                route,
                host: h.clone(),
                shared: true,
                // Room broadcasts for this sm's users arrive as one packet per room
                // message (sm/src/host/shortcut.rs).
                fanout: route == PacketType::Normal,
                ns: None,
            })
        })
        .collect();
    binds.push(Bind::notices());
    let limits = config.limits;
    let store = Store::Xdb(XdbClient::new(link.name.clone(), config.xdb_timeout));
    let ctx = Arc::new(Ctx::new(config, link.name.clone(), store, loaded));
    link::describe(&ctx);
    metrics::register(&ctx);

    // One thread by default: without cross-thread wake-ups a lone message costs about
    // 40% less CPU, and 200 clients on two cores are no slower (docs/benchmarks.md, "Low
    // load"). JABBERD_RUNTIME(_PROGRAM)=multi:N changes it (crates/component/src/runtime.rs).
    let runtime = jrs_component::runtime::build("sm", jrs_component::runtime::Shape::Current)?;
    let stopping = ctx.clone();
    runtime.block_on(run_component_until_stopped(
        link,
        limits,
        binds,
        |reader, outbox| link::serve(ctx.clone(), reader, outbox),
        // SIGTERM: what modules hold back (archive batches) goes out first.
        || async move {
            for m in stopping.modules.all() {
                m.stopping(&stopping).await;
            }
        },
    ))
}
