//! Client listeners: bound at start (a port in use stops the process with a clear
//! error), IPv6 `::` also taking IPv4 where the system allows.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, info_span, Instrument};

use jrs_component::transport::spawn_accept_loop;

use crate::conn;
use crate::shared::Shared;

pub async fn start_all(shared: &Arc<Shared>) -> anyhow::Result<()> {
    for listen in shared.config.listen.clone() {
        let listener = TcpListener::bind((listen.address.as_str(), listen.port))
            .await
            .with_context(|| format!("listening on [{}]:{}", listen.address, listen.port))?;
        info!(addr = %listener.local_addr()?, mode = ?listen.mode, "listening for clients");
        let shared = shared.clone();
        spawn_accept_loop(listener, move |tcp, peer| {
            let span = info_span!("client", %peer);
            conn::serve(shared.clone(), tcp, peer, listen.mode).instrument(span)
        });
    }
    Ok(())
}
