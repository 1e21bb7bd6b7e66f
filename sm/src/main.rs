//! sm, the session manager. For now it connects, binds the session and normal routes of
//! its domains (shared, so several instances split the users) and answers every packet
//! with `service-unavailable`; sessions, presence and rosters come next (issue 3).

use clap::Parser;

use jrs_component::service::{run_thin, Bind, CommonArgs};
use jrs_component::PacketType;
use jrs_stream::StanzaErrorCondition;

/// The jabberd-rs session manager.
#[derive(Parser, Debug)]
#[command(name = "sm", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    run_thin(
        "sm",
        args.common,
        true,
        |hosts| {
            hosts
                .iter()
                .flat_map(|h| {
                    [PacketType::Session, PacketType::Normal].map(|route| Bind {
                        route,
                        host: h.clone(),
                        shared: true,
                    })
                })
                .collect()
        },
        StanzaErrorCondition::ServiceUnavailable,
        "the session manager does not serve users yet",
    )
}
