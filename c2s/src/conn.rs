//! One client connection: its transport, the negotiation (`login.rs`), then the session
//! (`session/`), and the close handshake however it ends.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use jrs_stream::StreamErrorCondition;
use jrs_sx::{stream_error, tls, Close, Connection, Transport};

use crate::config::TlsMode;
use crate::login;
use crate::negotiation::{sm_failed, Negotiation, Outcome};
use crate::session::{self, BindReply, Resumed};
use crate::shared::Shared;

/// Serves one accepted TCP connection.
pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, mode: TlsMode) {
    let transport = match mode {
        TlsMode::StartTls => Transport::Plain(tcp),
        TlsMode::Direct => match Box::pin(tls::accept(tcp, shared.tls().direct)).await {
            Ok(t) => t,
            Err(e) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
        },
    };
    let secure = transport.is_tls();
    let kind = if mode == TlsMode::Direct {
        "tls"
    } else {
        "tcp"
    };
    serve_counted(kind, shared, transport, peer, secure).await
}

/// Serves a client stream over `transport`; `secure`: it is encrypted (TLS here, or the
/// web transport's HTTPS), so no STARTTLS is offered. Counted as a BOSH connection in
/// the metrics (WebSocket calls [`serve_counted`]).
pub fn serve_transport(
    shared: Arc<Shared>,
    transport: Transport,
    peer: SocketAddr,
    secure: bool,
) -> impl Future<Output = ()> {
    serve_counted("bosh", shared, transport, peer, secure)
}

/// [`serve_transport`], counted in the metrics as a connection over `kind` (one of
/// `metrics::TRANSPORTS`). Not an `async fn`, like [`crate::metrics::counted`]: a layer
/// of `async fn` around the stream's future would keep a second copy of it.
pub fn serve_counted(
    kind: &'static str,
    shared: Arc<Shared>,
    transport: Transport,
    peer: SocketAddr,
    secure: bool,
) -> impl Future<Output = ()> {
    crate::metrics::counted(kind, serve_stream(shared, transport, peer, secure))
}

async fn serve_stream(shared: Arc<Shared>, transport: Transport, peer: SocketAddr, secure: bool) {
    let cb = crate::channel_binding::of(&transport, &shared.tls().endpoints, &shared.config.hosts);
    let mut negotiation = Negotiation::new(peer.ip(), secure, cb);
    let mut conn = Connection::new(transport, shared.connection_settings());
    // The handshake, the closing and the session's rare paths are boxed: the task's size
    // is that of its largest await point, and most clients spend their life idle.
    let close = run(&shared, &mut conn, &mut negotiation, peer).await;
    if let Close::Error(e) = &close {
        debug!(%peer, error = %e, "closing with a stream error");
    }
    Box::pin(conn.finish(&close, || negotiation.error_header(&shared.negotiation))).await;
}

async fn run(
    shared: &Arc<Shared>,
    conn: &mut Connection,
    negotiation: &mut Negotiation,
    peer: SocketAddr,
) -> Close {
    if shared.shutting_down() {
        return stream_error(
            StreamErrorCondition::SystemShutdown,
            "the server is stopping",
        );
    }
    loop {
        // Boxed: negotiation's state is large and short-lived; the task then spends its
        // life in the session, and its size is that of its largest await point.
        match Box::pin(login::run(shared, conn, negotiation)).await {
            Ok(Outcome::Bind { bare, full, id }) => {
                let reply = BindReply::Iq(id);
                let mut live =
                    match Box::pin(session::bind(shared, conn, peer, bare, full, reply)).await {
                        Ok(live) => live,
                        Err(close) => return close,
                    };
                return live.run().await;
            }
            Ok(Outcome::Resume { bare, previd, h }) => {
                match Box::pin(session::resume(shared, conn, peer, bare, previd, h, None)).await {
                    Resumed::Ended(close) => return close,
                    // `<failed/>` was sent: the client may bind on this stream.
                    Resumed::Failed => continue,
                }
            }
            // SASL2: resumption first, then Bind 2 (XEP-0386 3.2), both answered in
            // `<success/>`.
            Ok(Outcome::Sasl2(done)) => {
                let mut failed = String::new();
                if let Some((previd, h)) = done.resume.clone() {
                    let bare = done.bare.clone();
                    let resumed = session::resume(shared, conn, peer, bare, previd, h, Some(&done));
                    match Box::pin(resumed).await {
                        Resumed::Ended(close) => return close,
                        Resumed::Failed => failed = sm_failed("item-not-found"),
                    }
                }
                let Some(full) = done.bind.as_ref().map(|b| b.full.clone()) else {
                    // Authenticated only: the client binds (or resumes) next.
                    let success = done.success(&done.bare, &failed, false);
                    if let Err(close) = conn.write(success.as_bytes()).await {
                        return close;
                    }
                    continue;
                };
                let bare = done.bare.clone();
                let reply = BindReply::Sasl2 { done, failed };
                let mut live =
                    match Box::pin(session::bind(shared, conn, peer, bare, full, reply)).await {
                        Ok(live) => live,
                        Err(close) => return close,
                    };
                return live.run().await;
            }
            Err(close) => return close,
        }
    }
}
