//! Incoming streams: a remote server connects to us, negotiates TLS, authenticates its
//! domain (SASL EXTERNAL with a certificate that verifies, or dialback with the
//! `db:verify` round trip to its authoritative server) and sends stanzas, which go into
//! the router once checked. The stream's rules are `negotiation/incoming.rs`; this is
//! its I/O.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use jrs_stream::{Frame, StanzaErrorCondition, StreamErrorCondition, StreamHeader};
use jrs_sx::connection::parse;
use jrs_sx::features::NS_SM;
use jrs_sx::{stream_error, tls, Close, Connection, Transport};

use crate::config::TlsMode;
use crate::shared::Shared;
use crate::xml::{self, NS_SERVER};

use crate::negotiation::incoming::{Action, Incoming, Input};

/// Serves one accepted connection.
pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, mode: TlsMode) {
    // Counted until its close handshake is over (a shutdown waits for it).
    let _counted = shared.stream_opened();
    let transport = match mode {
        TlsMode::StartTls => Transport::Plain(tcp),
        TlsMode::Direct => match tls::accept(tcp, shared.tls().server_direct.clone()).await {
            Ok(t) => t,
            Err(e) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
        },
    };
    let _open = jrs_metrics::GaugeGuard::new(crate::metrics::M.connections.by("in"));
    let mut stream = Incoming::new(transport.is_tls(), transport.peer_certificates());
    let mut conn = Connection::new(
        transport,
        shared.connection_settings(shared.config.idle_timeout),
    );
    let close = run(&shared, &mut conn, &mut stream).await;
    match &close {
        Close::Error(e) => warn!(error = %e, "closing the incoming stream with a stream error"),
        Close::Closed => info!("the remote closed its stream"),
        Close::Gone(why) => info!(reason = %why, "incoming connection gone"),
    }
    let local = if stream.local.is_empty() {
        shared.config.hosts[0].name.clone()
    } else {
        stream.local.clone()
    };
    conn.finish(&close, || xml::header(&local, "", Some(&stream.stream_id)))
        .await;
}

/// The answer of the authoritative server about one `db:result` we received.
struct Verified {
    remote: String,
    local: String,
    valid: bool,
}

async fn run(shared: &Arc<Shared>, conn: &mut Connection, stream: &mut Incoming) -> Close {
    let mut shutdown = shared.shutdown_signal();
    let (verified_tx, mut verified) = mpsc::unbounded_channel::<Verified>();
    // XEP-0198: counts whose stanzas the router has, and the last we told the remote;
    // one waiter at a time, and the count a `<r/>` asked about meanwhile (waited for
    // next: never starved by a remote asking often).
    let (safe_tx, mut safe) = mpsc::unbounded_channel::<u64>();
    let mut acked = 0u64;
    let mut waiter = Waiter::default();
    loop {
        if *shutdown.borrow() {
            return stream_error(
                StreamErrorCondition::SystemShutdown,
                "the server is stopping",
            );
        }
        let input = tokio::select! {
            _ = shutdown.changed() => continue,
            frame = conn.next_frame() => match frame.and_then(|f| input(stream, f)) {
                Ok(input) => input,
                Err(close) => return close,
            },
            Some(v) = verified.recv() => Input::Verified {
                remote: v.remote,
                local: v.local,
                valid: v.valid,
            },
            Some(h) = safe.recv() => {
                waiter.done(shared, &safe_tx);
                if h > acked {
                    acked = h;
                    // Counted modulo 2^32 (XEP-0198 5).
                    let h = h & 0xffff_ffff;
                    if let Err(close) = conn.write(format!("<a xmlns='{NS_SM}' h='{h}'/>").as_bytes()).await {
                        return close;
                    }
                }
                continue;
            }
        };
        for action in stream.step(&shared.incoming, input) {
            let done = match action {
                Action::Header(h) => conn.write_header(&h).await,
                Action::Send(s) => conn.write(s.as_bytes()).await,
                Action::StartTls => {
                    if conn.has_buffered() {
                        return stream_error(
                            StreamErrorCondition::PolicyViolation,
                            "data after <starttls/> before <proceed/>",
                        );
                    }
                    match conn.accept_tls(shared.tls().server_starttls.clone()).await {
                        Ok(()) => {
                            debug!("TLS established");
                            let certs = conn.transport().peer_certificates();
                            // Nothing to do in answer: the remote sends a new header.
                            let none = stream.step(&shared.incoming, Input::TlsStarted(certs));
                            debug_assert!(none.is_empty());
                            Ok(())
                        }
                        Err(close) => Err(close),
                    }
                }
                Action::Restart => {
                    conn.restart();
                    Ok(())
                }
                Action::Verify { local, remote, key } => {
                    let answer =
                        crate::outgoing::verify(shared, &local, &remote, &stream.stream_id, &key);
                    let tx = verified_tx.clone();
                    tokio::spawn(async move {
                        let valid = answer.await.unwrap_or(false);
                        let _ = tx.send(Verified {
                            remote,
                            local,
                            valid,
                        });
                    });
                    Ok(())
                }
                Action::Route { bytes, original } => {
                    crate::metrics::M.stanzas_in.by(original.name()).inc();
                    if !shared.to_router(bytes) {
                        // Held for the router link up to its bound; past it, answered
                        // through our outgoing stream to the sender's server (the
                        // stream it came on goes one way).
                        warn!("router link down and its hold full: stanza bounced");
                        if let Some(reply) = original.error_reply(
                            StanzaErrorCondition::ServiceUnavailable,
                            "the server is restarting",
                        ) {
                            crate::outgoing::send_reply(shared, reply);
                        }
                    }
                    Ok(())
                }
                Action::AckWhenSafe(h) => {
                    waiter.ask(shared, &safe_tx, h);
                    Ok(())
                }
                Action::Close(close) => Err(close),
            };
            if let Err(close) = done {
                return close;
            }
        }
    }
}

/// Waits until the router has what came before an XEP-0198 `<r/>`, one wait at a time
/// (stopped with the stream), then sends the count to the stream's loop.
#[derive(Default)]
struct Waiter {
    task: Option<tokio::task::JoinHandle<()>>,
    /// Asked for while a wait was under way.
    next: Option<u64>,
}

impl Waiter {
    fn ask(&mut self, shared: &Arc<Shared>, tx: &mpsc::UnboundedSender<u64>, h: u64) {
        if self.task.as_ref().is_some_and(|t| !t.is_finished()) {
            self.next = Some(h);
            return;
        }
        let (shared, tx) = (shared.clone(), tx.clone());
        self.task = Some(tokio::spawn(async move {
            shared.router_acknowledged().await;
            let _ = tx.send(h);
        }));
    }

    /// A wait ended: the next one, if a `<r/>` came meanwhile.
    fn done(&mut self, shared: &Arc<Shared>, tx: &mpsc::UnboundedSender<u64>) {
        self.task = None;
        if let Some(h) = self.next.take() {
            self.ask(shared, tx, h);
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What a frame is to the stream: a header where one is due, else an element.
fn input(stream: &Incoming, frame: Frame) -> Result<Input, Close> {
    match (frame, stream.expects_header()) {
        (Frame::StreamOpen(bytes), true) => {
            Ok(Input::Header(StreamHeader::parse(&bytes, Some(NS_SERVER))?))
        }
        (Frame::StreamOpen(_), false) => Err(stream_error(
            StreamErrorCondition::NotWellFormed,
            "a second stream header",
        )),
        (Frame::Element(_), true) => Err(stream_error(
            StreamErrorCondition::NotWellFormed,
            "expected a stream header",
        )),
        (Frame::Element(bytes), false) => Ok(Input::Element(parse(bytes)?)),
        (Frame::StreamClose, _) => Err(Close::Closed),
    }
}
