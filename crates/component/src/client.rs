//! The component side of the protocol: what xdb-file, sm, c2s, s2s, the bench and the tests
//! use to talk to the router.

use std::collections::VecDeque;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use jrs_config::RouterLink;
use jrs_stream::header::{open_stream, StreamHeader};
use jrs_stream::{Frame, Limits, Stanza, NS_COMPONENT_ACCEPT};

use crate::io::{FramedReader, ReadError};
use crate::protocol::{bind_request, handshake_digest, PacketType};
use crate::transport::{self, BoxIo};

/// Told when the router bounces one of our log packets (set by `log_route`, which
/// stops sending them; kept as a hook so that this module does not depend on it).
static LOG_REFUSED: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Sets what happens when the router refuses this component's log packets.
pub fn on_log_refused(hook: fn(&str)) {
    let _ = LOG_REFUSED.set(hook);
}

/// The router refused a bind.
#[derive(Debug, thiserror::Error)]
#[error("bind of {route} for '{host}' refused: {condition}")]
pub struct BindError {
    pub route: PacketType,
    pub host: String,
    pub condition: String,
}

/// The router refused the handshake (unknown name, wrong secret, name in use): retrying
/// will not help until the configuration changes.
#[derive(Debug, thiserror::Error)]
#[error("the router refused the handshake: {0}")]
pub struct HandshakeRefused(pub String);

/// An authenticated link to the router, before it is split for reading and writing.
pub struct Component {
    pub name: String,
    reader: FramedReader<ReadHalf<BoxIo>>,
    writer: WriteHalf<BoxIo>,
    /// Stanzas that arrived while waiting for a bind answer.
    early: VecDeque<Stanza>,
    next_id: u32,
    /// Silence after which the writer sends a whitespace keepalive.
    keepalive: std::time::Duration,
}

impl Component {
    /// Connects, opens the stream and authenticates with the handshake.
    pub async fn connect(link: &RouterLink, limits: Limits) -> anyhow::Result<Component> {
        let io = transport::connect(link).await?;
        let mut c = Component::handshake(io, &link.name, &link.secret, limits).await?;
        c.keepalive = link.keepalive;
        Ok(c)
    }

    /// Runs the XEP-0114 opening and handshake over an already connected stream.
    pub async fn handshake(
        io: BoxIo,
        name: &str,
        secret: &str,
        limits: Limits,
    ) -> anyhow::Result<Component> {
        let (r, mut writer) = tokio::io::split(io);
        let mut reader = FramedReader::new(r, limits);
        writer
            .write_all(open_stream(NS_COMPONENT_ACCEPT, &[("to", name)]).as_bytes())
            .await?;
        writer.flush().await?;
        let header = match next_frame(&mut reader).await? {
            Frame::StreamOpen(b) => StreamHeader::parse(&b, Some(NS_COMPONENT_ACCEPT))?,
            other => bail!("expected a stream header from the router, got {other:?}"),
        };
        let id = header
            .id
            .ok_or_else(|| anyhow!("the router sent no stream id"))?;
        let digest = handshake_digest(&id, secret);
        writer
            .write_all(format!("<handshake>{digest}</handshake>").as_bytes())
            .await?;
        writer.flush().await?;
        match next_element(&mut reader).await? {
            s if s.name() == "handshake" => {}
            s => return Err(HandshakeRefused(describe_error(&s)).into()),
        }
        Ok(Component {
            name: name.to_owned(),
            reader,
            writer,
            early: VecDeque::new(),
            next_id: 0,
            keepalive: jrs_config::LINK_KEEPALIVE,
        })
    }

    /// Asks the router for one more route and waits for its answer.
    pub async fn bind(
        &mut self,
        route: PacketType,
        host: &str,
        shared: bool,
    ) -> anyhow::Result<()> {
        self.request("bind", route, host, shared, false).await
    }

    /// [`Component::bind`] for a route on which this component also takes `<fanout>`
    /// packets (docs/protocol.md, "Fan-out"); without it the router splits them.
    pub async fn bind_with_fanout(
        &mut self,
        route: PacketType,
        host: &str,
        shared: bool,
    ) -> anyhow::Result<()> {
        self.request("bind", route, host, shared, true).await
    }

    /// [`Component::bind`] of an `xdb` route for one namespace of `host` only.
    pub async fn bind_namespace(
        &mut self,
        route: PacketType,
        host: &str,
        ns: &str,
    ) -> anyhow::Result<()> {
        self.next_id += 1;
        let id = format!("b{}", self.next_id);
        let request = bind_request("bind", &id, route, host, false, false).replacen(
            "/>",
            &format!(" ns='{}'/>", jrs_stream::xml::escape(ns)),
            1,
        );
        self.exchange("bind", &id, &request, route, host).await
    }

    pub async fn unbind(&mut self, route: PacketType, host: &str) -> anyhow::Result<()> {
        self.request("unbind", route, host, false, false).await
    }

    /// Asks the router for link notices: `<notice event='disconnected' name='..'/>` when
    /// any other component disconnects.
    pub async fn subscribe_notices(&mut self) -> anyhow::Result<()> {
        self.next_id += 1;
        let id = format!("b{}", self.next_id);
        let request = format!(
            "<notices xmlns='{}' id='{id}'/>",
            crate::protocol::NS_ROUTER
        );
        self.exchange("notices", &id, &request, PacketType::Normal, "")
            .await
    }

    async fn request(
        &mut self,
        element: &str,
        route: PacketType,
        host: &str,
        shared: bool,
        fanout: bool,
    ) -> anyhow::Result<()> {
        self.next_id += 1;
        let id = format!("b{}", self.next_id);
        let request = bind_request(element, &id, route, host, shared, fanout);
        self.exchange(element, &id, &request, route, host).await
    }

    /// Sends a request to the router and waits for the answer with the same id; stanzas
    /// arriving meanwhile are kept for the reader.
    async fn exchange(
        &mut self,
        element: &str,
        id: &str,
        request: &str,
        route: PacketType,
        host: &str,
    ) -> anyhow::Result<()> {
        self.writer.write_all(request.as_bytes()).await?;
        self.writer.flush().await?;
        loop {
            let s = next_element(&mut self.reader).await?;
            if s.name() == element && s.id() == Some(id) {
                if s.kind() == Some("result") {
                    return Ok(());
                }
                return Err(BindError {
                    route,
                    host: host.to_owned(),
                    condition: error_condition(&s),
                }
                .into());
            }
            if s.name() == "stream:error" {
                bail!("the router closed the stream: {}", describe_error(&s));
            }
            self.early.push_back(s);
        }
    }

    /// Sends raw bytes before splitting (for tests and simple tools).
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    pub fn split(self) -> (ComponentReader, ComponentWriter) {
        (
            ComponentReader {
                reader: self.reader,
                early: self.early,
            },
            ComponentWriter {
                writer: self.writer,
                keepalive: self.keepalive,
            },
        )
    }
}

/// Reads stanzas from the router.
pub struct ComponentReader {
    reader: FramedReader<ReadHalf<BoxIo>>,
    early: VecDeque<Stanza>,
}

impl ComponentReader {
    /// The next stanza. A stream error or close from the router ends the link with an error.
    pub async fn next(&mut self) -> anyhow::Result<Stanza> {
        if let Some(s) = self.early.pop_front() {
            return Ok(s);
        }
        loop {
            let s = next_element(&mut self.reader).await?;
            if s.name() == "stream:error" {
                bail!("the router closed the stream: {}", describe_error(&s));
            }
            // Our own log packet bounced (the ACL): not the component's business.
            if s.name() == "log" && s.kind() == Some("error") {
                if let Some(refused) = LOG_REFUSED.get() {
                    refused(&error_condition(&s));
                }
                continue;
            }
            jrs_metrics::link::LINK.received(s.name());
            return Ok(s);
        }
    }
}

/// Writes to the router.
pub struct ComponentWriter {
    writer: WriteHalf<BoxIo>,
    keepalive: std::time::Duration,
}

impl ComponentWriter {
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    /// Moves the writer into a task fed by a channel, so many tasks can send. Stanzas
    /// queued together are written with one system call.
    pub fn spawn(mut self) -> Outbox {
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(64 * 1024);
            let mut flushes = vec![];
            loop {
                // A space after a silence, so that a dead router is noticed (the link's
                // TCP_USER_TIMEOUT fires on unacknowledged data, not on an idle link).
                let first = match tokio::time::timeout(self.keepalive, rx.recv()).await {
                    Ok(Some(first)) => first,
                    Ok(None) => break,
                    Err(_) => Queued::Bytes(Bytes::from_static(b" ")),
                };
                batch.clear();
                let mut next = Some(first);
                while let Some(queued) = next.take() {
                    match queued {
                        Queued::Bytes(bytes) => batch.extend_from_slice(&bytes),
                        Queued::Flush(done) => flushes.push(done),
                    }
                    if batch.len() >= 64 * 1024 {
                        break;
                    }
                    next = rx.try_recv().ok();
                }
                if !batch.is_empty() && self.send(&batch).await.is_err() {
                    break;
                }
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
            let _ = self.writer.shutdown().await;
        });
        Outbox(tx)
    }

    /// Closes our stream politely.
    pub async fn close(mut self) {
        let _ = self.writer.write_all(b"</stream:stream>").await;
        let _ = self.writer.shutdown().await;
    }
}

/// What the writer task takes: bytes, or a request to say when all before it is written.
enum Queued {
    Bytes(Bytes),
    Flush(oneshot::Sender<()>),
}

/// A cloneable handle that queues bytes for the router link.
#[derive(Clone)]
pub struct Outbox(mpsc::UnboundedSender<Queued>);

impl Outbox {
    /// Queues bytes; false when the link is gone.
    pub fn send(&self, bytes: impl Into<Bytes>) -> bool {
        let bytes = bytes.into();
        jrs_metrics::link::LINK.sent(&bytes);
        self.0.send(Queued::Bytes(bytes)).is_ok()
    }

    /// Resolves once everything queued before it was written to the router (or the link
    /// is gone): a stopping process waits for this before it exits.
    pub async fn flushed(&self) {
        let (done, written) = oneshot::channel();
        if self.0.send(Queued::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }
}

async fn next_frame(reader: &mut FramedReader<ReadHalf<BoxIo>>) -> anyhow::Result<Frame> {
    reader.next_frame().await.context("reading from the router")
}

async fn next_element(reader: &mut FramedReader<ReadHalf<BoxIo>>) -> anyhow::Result<Stanza> {
    match reader.next_frame().await {
        Ok(Frame::Element(b)) => Ok(Stanza::parse(b)?),
        Ok(Frame::StreamClose) => bail!("the router closed the stream"),
        Ok(Frame::StreamOpen(_)) => bail!("unexpected second stream header"),
        Err(ReadError::Closed) => bail!("the router closed the connection"),
        Err(e) => Err(e.into()),
    }
}

/// The condition of an error stanza (the first element inside its `<error/>` child) or of
/// a stream error (its first child), e.g. `not-allowed`.
pub fn error_condition(s: &Stanza) -> String {
    let inner = String::from_utf8_lossy(s.inner()).into_owned();
    let body = match inner.find("<error") {
        Some(at) if s.name() != "stream:error" => {
            inner[at..].split_once('>').map_or("", |(_, after)| after)
        }
        _ => inner.as_str(),
    };
    body.trim_start()
        .trim_start_matches('<')
        .split(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .next()
        .unwrap_or("")
        .to_owned()
}

fn describe_error(s: &Stanza) -> String {
    format!(
        "{} ({})",
        error_condition(s),
        String::from_utf8_lossy(s.bytes())
    )
}
