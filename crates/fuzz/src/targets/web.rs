//! The web edge of c2s (RFC 7395 WebSocket, XEP-0206 BOSH).
//!
//! `websocket`: with a first byte `w`, the rest is raw WebSocket bytes from a client,
//! read by tungstenite with the limits c2s sets (c2s/src/web/websocket.rs, `config`);
//! otherwise the rest is text messages, one per line. Each text message goes through
//! the RFC 7395 translation (crates/sx/src/framing.rs: `from_client`, and
//! `from_server` as a client reads the server's), and the stream bytes made of them
//! through the framer and checks c2s applies to any client stream. The same bytes are
//! also cut into messages by the `Splitter` (either role), as c2s and the bench's
//! client cut their own output, and each message translated back.
//!
//! `bosh`: a request body read as c2s/src/web/bosh.rs reads it (`request`,
//! `Request::read`, `Creation::read`: private to that file, so their few reads of the
//! shared parser are repeated here), the payload then going through the framer and
//! checks of a client stream.

use std::io::{Cursor, Read, Write};

use jrs_stream::{Limits, Stanza};
use jrs_sx::framing::{from_client, from_server, to_stream, Outgoing, Role, Splitter};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::support::{choice, frames, HEADER};
use crate::targets::stream::check_frames;

/// c2s's WebSocket limits for its default stanza limit (c2s/src/web/websocket.rs).
fn config(max_stanza_bytes: usize) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(max_stanza_bytes + 1024);
    c.max_frame_size = Some(max_stanza_bytes + 1024);
    c.read_buffer_size = 8 * 1024;
    c
}

/// A connection that reads the input and drops what is written.
struct Wire(Cursor<Vec<u8>>);

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn websocket(data: &[u8]) {
    let (c, rest) = choice(data);
    let limits = Limits::default();
    let mut stream = HEADER.to_vec();
    if c == b'w' {
        let wire = Wire(Cursor::new(rest.to_vec()));
        let mut ws = WebSocket::from_raw_socket(
            wire,
            tungstenite::protocol::Role::Server,
            Some(config(limits.max_stanza_bytes)),
        );
        // Each read consumes input or fails; the bound only guards against a loop.
        for _ in 0..10_000 {
            match ws.read() {
                Ok(Message::Text(text)) => match from_client(text.as_str()) {
                    Ok(bytes) => stream.extend_from_slice(&bytes),
                    Err(_) => break,
                },
                Ok(Message::Binary(_)) | Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        check_frames(limits, frames(limits, &stream, stream.len()).0);
        return;
    }
    let mut at_client = vec![];
    for line in rest.split(|&b| b == b'\n') {
        let Ok(text) = std::str::from_utf8(line) else {
            continue;
        };
        if let Ok(bytes) = from_client(text) {
            stream.extend_from_slice(&bytes);
        }
        if let Ok(bytes) = from_server(text) {
            at_client.extend_from_slice(&bytes);
        }
    }
    check_frames(limits, frames(limits, &stream, 7).0);
    check_frames(limits, frames(limits, &at_client, at_client.len()).0);
    for (role, peer) in [(Role::Server, Role::Client), (Role::Client, Role::Server)] {
        let mut splitter = Splitter::new(role);
        for piece in rest.chunks(13) {
            splitter.push(piece);
            while let Some(out) = splitter.next() {
                if let Outgoing::Message(m) = out {
                    let _ = to_stream(peer, &m);
                }
            }
        }
    }
}

const NS_HTTPBIND: &str = "http://jabber.org/protocol/httpbind";
const MAX_RID: u64 = (1 << 53) - 1;

pub fn bosh(data: &[u8]) {
    // bosh.rs `request`: what the body asks for.
    let Ok(b) = Stanza::parse_slice(data) else {
        return;
    };
    if b.name() != "body" || b.attr("xmlns").as_deref() != Some(NS_HTTPBIND) {
        return;
    }
    let Some(_rid) = b
        .attr("rid")
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|r| *r <= MAX_RID)
    else {
        return;
    };
    let limits = Limits::default();
    if b.attr("sid").is_none() {
        // `Creation::read`: a new session.
        let _ = (b.attr("to"), b.attr("xml:lang"));
        let _ = b.attr("wait").and_then(|w| w.parse::<u64>().ok());
        let _ = b.attr("hold").and_then(|h| h.parse::<u64>().ok());
        return;
    }
    // `Request::read`: the payload for c2s.
    let terminate = b.attr("type").as_deref() == Some("terminate");
    let restart = b.attr("xmpp:restart").as_deref() == Some("true");
    let inner = b.inner();
    let payload = jrs_sx::framing::bosh_to_stream(
        terminate,
        restart,
        &b.attr("to").unwrap_or_default(),
        inner,
    );
    let mut stream = HEADER.to_vec();
    stream.extend_from_slice(&payload);
    check_frames(limits, frames(limits, &stream, stream.len()).0);
}
