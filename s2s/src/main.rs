//! s2s, federation. For now it binds the default route `*` and bounces every stanza for a
//! remote domain with `remote-server-not-found`; dialback, TLS and SRV come next (issue 4).

use clap::Parser;

use jrs_component::service::{run_thin, Bind, CommonArgs};
use jrs_component::PacketType;
use jrs_stream::StanzaErrorCondition;

/// The jabberd-rs server-to-server component.
#[derive(Parser, Debug)]
#[command(name = "s2s", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    run_thin(
        "s2s",
        args.common,
        false,
        |_| {
            vec![Bind {
                route: PacketType::Normal,
                host: "*".into(),
                shared: false,
            }]
        },
        StanzaErrorCondition::RemoteServerNotFound,
        "federation with remote servers is not enabled yet",
    )
}
