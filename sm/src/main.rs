//! sm, the session manager: client sessions (carried by c2s over `session` packets),
//! presence, rosters and subscriptions, message delivery and offline storage, and the
//! IQ services of the server and of accounts. Everything durable is kept through xdb.
//! See docs/sm.md.
//!
//! One module per concern: `sessions`, `presence`, `subscription`, `roster`, `messages`,
//! `iq` (routing) and the IQ services `disco`, `ping`, `version`, `time`, `last`, `vcard`,
//! `private`, `register`; `server` answers for the domain itself. `dispatch` reads the
//! router link; `users` runs one task per active user (`user`).

mod accounts;
mod config;
mod context;
mod disco;
mod dispatch;
mod iq;
mod last;
mod messages;
mod ping;
mod presence;
mod private;
mod register;
mod roster;
mod server;
mod sessions;
mod stanzas;
mod subscription;
mod time;
mod user;
mod users;
mod vcard;
mod version;
mod xml;

use std::sync::Arc;

use clap::Parser;

use jrs_component::service::{exit_code, load_and_init, run_component, Bind, CommonArgs};
use jrs_component::PacketType;

use crate::config::SmConfig;
use crate::context::Ctx;

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

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = load_and_init(&args.common, SmConfig::load, |c| c.log.clone())? else {
        return Ok(());
    };
    let link = config.router.clone().for_instance(args.common.instance);
    // session and normal for every host, shared: several instances split the users by
    // the router's rendezvous hashing of the bare JID. Notices tell us when a c2s goes.
    let mut binds: Vec<Bind> = config
        .hosts
        .iter()
        .flat_map(|h| {
            [PacketType::Session, PacketType::Normal].map(|route| Bind {
                route,
                host: h.clone(),
                shared: true,
            })
        })
        .collect();
    binds.push(Bind::notices());
    let limits = config.limits;
    let ctx = Arc::new(Ctx::new(config, link.name.clone()));
    dispatch::describe(&ctx);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run_component(link, limits, binds, |reader, outbox| {
        dispatch::serve(ctx.clone(), reader, outbox)
    }))
}
