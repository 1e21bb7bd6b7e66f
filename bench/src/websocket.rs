//! The bench client's WebSocket transport (RFC 7395): a tokio-tungstenite client with the
//! `xmpp` subprotocol, bridged to an in-process pipe (as c2s bridges its WebSocket
//! clients, `c2s/src/web/websocket.rs`) so that [`crate::client::Client`] reads and
//! writes stream bytes over it as over TCP. The translation is the client side of
//! `jrs_sx::framing`: the stream header becomes `<open/>`, each element one text
//! message, `</stream:stream>` `<close/>`; the server's `<open/>` becomes a stream header
//! again.

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use jrs_component::transport::BoxIo;
use jrs_sx::framing::{self, Outgoing, Role, Splitter};

/// The path c2s serves WebSocket clients on.
pub const PATH: &str = "/xmpp-websocket";

/// Bytes the pipe between the client and the WebSocket holds before a writer waits.
const PIPE_BYTES: usize = 64 * 1024;

/// Opens a WebSocket to c2s's web listener on loopback `port` and returns the client's
/// end of the stream pipe.
pub async fn connect(port: u16) -> anyhow::Result<BoxIo> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let mut request = format!("ws://localhost:{port}{PATH}").into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("xmpp"));
    let (ws, response) = tokio_tungstenite::client_async(request, tcp)
        .await
        .context("WebSocket handshake")?;
    if response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        != Some("xmpp")
    {
        bail!("the server did not accept the xmpp subprotocol");
    }
    let (client_end, bridge_end) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(bridge(ws, bridge_end));
    Ok(Box::new(client_end))
}

/// Moves the client's stream bytes to the WebSocket as messages and the server's
/// messages to the client as stream bytes, until either side ends.
async fn bridge(ws: WebSocketStream<TcpStream>, pipe: DuplexStream) {
    let (mut ws_out, mut ws_in) = ws.split();
    let (mut pipe_in, mut pipe_out) = tokio::io::split(pipe);
    let mut splitter = Splitter::new(Role::Client);
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        tokio::select! {
            read = pipe_in.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                splitter.push(&buf[..n]);
                while let Some(out) = splitter.next() {
                    let text = match out {
                        Outgoing::Message(text) => text,
                        Outgoing::Close => framing::close(),
                    };
                    if ws_out.feed(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                if ws_out.flush().await.is_err() {
                    return;
                }
            }
            message = ws_in.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Binary(_) | Message::Close(_))) | Some(Err(_)) | None => break,
                };
                let Ok(bytes) = framing::from_server(text.as_str()) else { break };
                if !bytes.is_empty() && pipe_out.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = pipe_out.shutdown().await;
    let _ = ws_out.send(Message::Close(None)).await;
}
