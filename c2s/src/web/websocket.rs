//! One WebSocket client (RFC 7395): the connection is bridged to an in-process pipe
//! whose other end c2s serves as a client stream (`conn::serve_transport`), the framing
//! translated both ways (`framing`).

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use jrs_sx::Transport;

use super::framing::{self, Splitter, ToClient};
use crate::conn;
use crate::shared::Shared;

/// Bytes the pipe between the WebSocket and the stream holds before a writer waits.
const PIPE_BYTES: usize = 64 * 1024;

/// The WebSocket limits: a message is one stanza, so the stanza limit bounds it (plus
/// room for the framing).
pub fn config(max_stanza_bytes: usize) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(max_stanza_bytes + 1024);
    c.max_frame_size = Some(max_stanza_bytes + 1024);
    c
}

/// Serves one upgraded WebSocket connection until either side ends it.
pub async fn serve<S>(shared: Arc<Shared>, ws: WebSocketStream<S>, peer: SocketAddr, secure: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stream_end, bridge_end) = tokio::io::duplex(PIPE_BYTES);
    let client = tokio::spawn(conn::serve_transport(
        shared,
        Transport::Web(stream_end),
        peer,
        secure,
    ));
    bridge(ws, bridge_end).await;
    let _ = client.await;
}

/// Moves messages between the WebSocket and the stream pipe until the stream closes (c2s
/// ended it) or the client goes away.
async fn bridge<S>(ws: WebSocketStream<S>, pipe: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ws_out, mut ws_in) = ws.split();
    let (mut pipe_in, mut pipe_out) = tokio::io::split(pipe);
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            // What c2s wrote: as messages to the client.
            read = pipe_in.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                splitter.push(&buf[..n]);
                let mut closed = false;
                while let Some(out) = splitter.next() {
                    match out {
                        ToClient::Message(text) => {
                            if ws_out.feed(Message::text(text)).await.is_err() {
                                return;
                            }
                        }
                        ToClient::Close => {
                            let close = format!("<close xmlns='{}'/>", framing::NS_FRAMING);
                            let _ = ws_out.feed(Message::text(close)).await;
                            closed = true;
                            break;
                        }
                    }
                }
                if ws_out.flush().await.is_err() {
                    return;
                }
                if closed {
                    break;
                }
            }
            // What the client sent: as stream bytes to c2s.
            message = ws_in.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Binary(_))) => {
                        debug!("binary WebSocket message: closing");
                        let frame = CloseFrame {
                            code: CloseCode::Unsupported,
                            reason: "RFC 7395 uses text messages only".into(),
                        };
                        let _ = ws_out.send(Message::Close(Some(frame))).await;
                        let _ = pipe_out.shutdown().await;
                        return;
                    }
                    // Pings are answered by the WebSocket layer itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => {
                        // Gone without <close/>: as a TCP client whose connection drops.
                        let _ = pipe_out.shutdown().await;
                        break;
                    }
                    Some(Err(tungstenite::Error::Capacity(e))) => {
                        // Over the stanza limit: the stream error c2s gives TCP clients.
                        debug!(error = %e, "WebSocket message over the limit");
                        let error = framing::stream_error("policy-violation", "stanza too large");
                        let _ = ws_out.feed(Message::text(error)).await;
                        let close = format!("<close xmlns='{}'/>", framing::NS_FRAMING);
                        let _ = ws_out.feed(Message::text(close)).await;
                        let _ = ws_out.send(Message::Close(None)).await;
                        let _ = pipe_out.shutdown().await;
                        return;
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "WebSocket error");
                        let _ = pipe_out.shutdown().await;
                        break;
                    }
                };
                let bytes = match framing::from_client(text.as_str()) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        // The stream error and close of RFC 7395 3.6; c2s sees the
                        // client go as if its connection dropped.
                        debug!(error = %e, "message is not RFC 7395 framing");
                        let _ = ws_out.feed(Message::text(framing::stream_error("invalid-xml", e.0))).await;
                        let close = format!("<close xmlns='{}'/>", framing::NS_FRAMING);
                        let _ = ws_out.feed(Message::text(close)).await;
                        let _ = ws_out.send(Message::Close(None)).await;
                        let _ = pipe_out.shutdown().await;
                        return;
                    }
                };
                if !bytes.is_empty() && pipe_out.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        }
    }
    // Whatever c2s still writes (the close after a stream error) is sent, then the
    // WebSocket closing handshake.
    while let Ok(n) = pipe_in.read(&mut buf).await {
        if n == 0 {
            break;
        }
        splitter.push(&buf[..n]);
        while let Some(out) = splitter.next() {
            let text = match out {
                ToClient::Message(text) => text,
                ToClient::Close => format!("<close xmlns='{}'/>", framing::NS_FRAMING),
            };
            let _ = ws_out.feed(Message::text(text)).await;
        }
        let _ = ws_out.flush().await;
    }
    let _ = ws_out.send(Message::Close(None)).await;
}
