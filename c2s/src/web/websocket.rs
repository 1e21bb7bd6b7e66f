//! One WebSocket client (RFC 7395): the connection is bridged to an in-process pipe
//! whose other end c2s serves as a client stream (`conn::serve_transport`), the framing
//! translated both ways (`framing`).

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, Instrument};

use jrs_sx::framing::{self, Outgoing as ToClient, Splitter};
use jrs_sx::Transport;

use super::PIPE_BYTES;
use crate::conn;
use crate::shared::Shared;

/// The WebSocket limits: a message is one stanza, so the stanza limit bounds it (plus
/// room for the framing).
pub fn config(max_stanza_bytes: usize) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(max_stanza_bytes + 1024);
    c.max_frame_size = Some(max_stanza_bytes + 1024);
    // tungstenite reads into a buffer of this size (128 KiB by default, zeroed on each
    // read): most of an idle connection's memory and a measurable cost per message.
    c.read_buffer_size = 8 * 1024;
    c
}

/// Serves one upgraded WebSocket connection until either side ends it.
pub async fn serve<S>(shared: Arc<Shared>, ws: WebSocketStream<S>, peer: SocketAddr, secure: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stream_end, bridge_end) = tokio::io::duplex(PIPE_BYTES);
    let client = tokio::spawn(conn::serve_counted(
        "websocket",
        shared,
        Transport::Web(stream_end),
        peer,
        secure,
    ));
    bridge(ws, bridge_end).await;
    let _ = client.await;
}

/// How long one message may take to go out to a client that does not read: then the
/// client counts as gone (as a TCP client whose connection broke).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Messages queued for the WebSocket writer; beyond, reading what c2s writes waits (and
/// c2s with it, as on a TCP socket that is full).
const QUEUE: usize = 64;

/// Moves messages between the WebSocket and the stream pipe until the stream closes (c2s
/// ended it) or the client goes away. The two directions run apart, so that neither
/// waits for the other (c2s writing to a full pipe while the client's messages wait to
/// be written to it would otherwise hold both for ever).
async fn bridge<S>(ws: WebSocketStream<S>, pipe: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ws_out, ws_in) = ws.split();
    let (pipe_in, pipe_out) = tokio::io::split(pipe);
    let (tx, rx) = mpsc::channel::<Message>(QUEUE);
    let from_client = tokio::spawn(from_client(ws_in, pipe_out, tx.clone()).in_current_span());
    let writer = tokio::spawn(write_to_client(ws_out, rx).in_current_span());
    // What c2s writes, until it closes its end (the client gone included: then
    // `from_client` shut our write side and c2s ended the stream).
    to_client(pipe_in, tx).await;
    from_client.abort();
    let _ = writer.await;
}

/// What c2s writes: as messages for the writer; `<close/>` and the end at its end.
async fn to_client(mut pipe_in: ReadHalf<DuplexStream>, tx: mpsc::Sender<Message>) {
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match pipe_in.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        splitter.push(&buf[..n]);
        while let Some(out) = splitter.next() {
            let text = match out {
                ToClient::Message(text) => text,
                ToClient::Close => framing::close(),
            };
            if tx.send(Message::text(text)).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.send(Message::Close(None)).await;
}

/// Writes the queued messages to the WebSocket, each within [`WRITE_TIMEOUT`]; ends
/// with the closing handshake.
async fn write_to_client<S>(
    mut ws_out: SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Message>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = rx.recv().await {
        let closing = matches!(message, Message::Close(_));
        let mut sent = tokio::time::timeout(WRITE_TIMEOUT, ws_out.feed(message)).await;
        // Flushed when nothing more waits: one write for a burst.
        if matches!(sent, Ok(Ok(()))) && (rx.is_empty() || closing) {
            sent = tokio::time::timeout(WRITE_TIMEOUT, ws_out.flush()).await;
        }
        match sent {
            Ok(Ok(())) if !closing => {}
            Ok(Ok(())) => return,
            Ok(Err(e)) => return debug!(error = %e, "WebSocket write failed"),
            Err(_) => return debug!("client not reading: WebSocket given up"),
        }
    }
}

/// What the client sends: as stream bytes to c2s. Ends when the client goes away or
/// breaks the framing (then with the stream error and `<close/>` of RFC 7395 3.6);
/// either way c2s sees its client go.
async fn from_client<S>(
    mut ws_in: SplitStream<WebSocketStream<S>>,
    mut pipe_out: WriteHalf<DuplexStream>,
    tx: mpsc::Sender<Message>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let refuse = |condition: &str, text: &str| {
        [
            Message::text(framing::stream_error(condition, text)),
            Message::text(framing::close()),
            Message::Close(None),
        ]
    };
    while let Some(message) = ws_in.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Binary(_)) => {
                debug!("binary WebSocket message: closing");
                let frame = CloseFrame {
                    code: CloseCode::Unsupported,
                    reason: "RFC 7395 uses text messages only".into(),
                };
                let _ = tx.send(Message::Close(Some(frame))).await;
                break;
            }
            // Pings are answered by the WebSocket layer itself.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            // Gone without <close/>: as a TCP client whose connection drops.
            Ok(Message::Close(_)) => break,
            Err(tungstenite::Error::Capacity(e)) => {
                // Over the stanza limit: the stream error c2s gives TCP clients.
                debug!(error = %e, "WebSocket message over the limit");
                for m in refuse("policy-violation", "stanza too large") {
                    let _ = tx.send(m).await;
                }
                break;
            }
            Err(e) => {
                debug!(error = %e, "WebSocket error");
                break;
            }
        };
        let bytes = match framing::from_client(text.as_str()) {
            Ok(bytes) => bytes,
            Err(e) => {
                debug!(error = %e, "message is not RFC 7395 framing");
                for m in refuse("invalid-xml", e.0) {
                    let _ = tx.send(m).await;
                }
                break;
            }
        };
        if !bytes.is_empty() && pipe_out.write_all(&bytes).await.is_err() {
            break;
        }
    }
    let _ = pipe_out.shutdown().await;
}
