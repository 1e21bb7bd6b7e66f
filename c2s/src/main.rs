//! c2s, the client connection manager. For now it connects to the router under its own
//! name and answers every packet with `service-unavailable`; client listeners, SASL and
//! resource binding come next (issue 3).

use clap::Parser;

use jrs_component::service::{run_thin, CommonArgs};
use jrs_stream::StanzaErrorCondition;

/// The jabberd-rs client connection manager.
#[derive(Parser, Debug)]
#[command(name = "c2s", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    run_thin(
        "c2s",
        args.common,
        true,
        |_| vec![],
        StanzaErrorCondition::ServiceUnavailable,
        "client connections are not served yet",
    )
}
