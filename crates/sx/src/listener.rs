//! Listeners: every configured address is bound at start (a port in use stops the
//! process with a clear error, unless it is shared with other instances of the same
//! program: `Ports`), then each accepted connection gets its own task, in a
//! tracing span that names the peer.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, Instrument};

use jrs_component::transport::{bind_shared, spawn_accept_loop};
use jrs_config::{Listener, TlsMode};

/// How a listener's port may be shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// The process's alone: a port in use is an error.
    Own,
    /// Shared with other instances of the same program (`SO_REUSEPORT`, see
    /// `bind_shared`): c2s, whose clients resume on another instance when one stops.
    SharedWithInstances,
}

/// Binds every listener in `listen`, logging each as listening for `whom`, and serves
/// each accepted connection with `serve(tcp, peer, mode)` inside `span(peer)`.
pub async fn start_all<S, F, Fut>(
    listen: &[Listener],
    whom: &'static str,
    ports: Ports,
    span: S,
    serve: F,
) -> anyhow::Result<()>
where
    S: Fn(SocketAddr) -> tracing::Span + Clone + Send + Sync + 'static,
    F: Fn(TcpStream, SocketAddr, TlsMode) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    for l in listen {
        let listener = match ports {
            Ports::SharedWithInstances => bind_shared(&l.address, l.port).await,
            Ports::Own => TcpListener::bind((l.address.as_str(), l.port)).await,
        }
        .with_context(|| format!("listening on [{}]:{}", l.address, l.port))?;
        info!(addr = %listener.local_addr()?, mode = ?l.mode, "listening for {whom}");
        let (span, serve, mode) = (span.clone(), serve.clone(), l.mode);
        spawn_accept_loop(listener, move |tcp, peer| {
            serve(tcp, peer, mode).instrument(span(peer))
        });
    }
    Ok(())
}
