//! Listeners: every configured address is bound at start (a port in use by another
//! program stops the process with a clear error; instances of one program share their
//! ports, see `bind_shared`), then each accepted connection gets its own task, in a
//! tracing span that names the peer.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpStream;
use tracing::{info, Instrument};

use jrs_component::transport::{bind_shared, spawn_accept_loop};
use jrs_config::{Listener, TlsMode};

/// Binds every listener in `listen`, logging each as listening for `whom`, and serves
/// each accepted connection with `serve(tcp, peer, mode)` inside `span(peer)`.
pub async fn start_all<S, F, Fut>(
    listen: &[Listener],
    whom: &'static str,
    span: S,
    serve: F,
) -> anyhow::Result<()>
where
    S: Fn(SocketAddr) -> tracing::Span + Clone + Send + Sync + 'static,
    F: Fn(TcpStream, SocketAddr, TlsMode) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    for l in listen {
        let listener = bind_shared(&l.address, l.port)
            .await
            .with_context(|| format!("listening on [{}]:{}", l.address, l.port))?;
        info!(addr = %listener.local_addr()?, mode = ?l.mode, "listening for {whom}");
        let (span, serve, mode) = (span.clone(), serve.clone(), l.mode);
        spawn_accept_loop(listener, move |tcp, peer| {
            serve(tcp, peer, mode).instrument(span(peer))
        });
    }
    Ok(())
}
