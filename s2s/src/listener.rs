//! Listeners for remote servers: bound at start (a port in use stops the process with a
//! clear error).

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, info_span, Instrument};

use jrs_component::transport::spawn_accept_loop;

use crate::incoming;
use crate::shared::Shared;

pub async fn start_all(shared: &Arc<Shared>) -> anyhow::Result<()> {
    for listen in shared.config.listen.clone() {
        let listener = TcpListener::bind((listen.address.as_str(), listen.port))
            .await
            .with_context(|| format!("listening on [{}]:{}", listen.address, listen.port))?;
        info!(addr = %listener.local_addr()?, mode = ?listen.mode, "listening for remote servers");
        let shared = shared.clone();
        spawn_accept_loop(listener, move |tcp, peer| {
            let span = info_span!(
                "in",
                %peer,
                remote = tracing::field::Empty,
                id = tracing::field::Empty
            );
            incoming::serve(shared.clone(), tcp, peer, listen.mode).instrument(span)
        });
    }
    Ok(())
}
