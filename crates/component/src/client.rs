//! The component side of the protocol: what xdb-file, sm, c2s, s2s, the bench and the tests
//! use to talk to the router.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use jrs_config::RouterLink;
use jrs_stream::header::{open_stream, StreamHeader};
use jrs_stream::{Frame, Limits, Stanza, NS_COMPONENT_ACCEPT};

use crate::ack::LinkAcks;
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
    /// Bytes written so far (stream positions for acknowledgements).
    sent: u64,
    /// Set on an acknowledged link (docs/protocol.md, "Acknowledged links").
    acks: Option<Arc<LinkAcks>>,
}

impl Component {
    /// Connects, opens the stream and authenticates with the handshake.
    pub async fn connect(link: &RouterLink, limits: Limits) -> anyhow::Result<Component> {
        Component::connect_with_acks(link, limits, None).await
    }

    /// [`Component::connect`], asking for an acknowledged link when `acks` is given
    /// (the state shared by this process's successive links).
    pub async fn connect_with_acks(
        link: &RouterLink,
        limits: Limits,
        acks: Option<Arc<LinkAcks>>,
    ) -> anyhow::Result<Component> {
        let io = transport::connect(link).await?;
        let mut c =
            Component::handshake_with_acks(io, &link.name, &link.secret, limits, acks).await?;
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
        Component::handshake_with_acks(io, name, secret, limits, None).await
    }

    async fn handshake_with_acks(
        io: BoxIo,
        name: &str,
        secret: &str,
        limits: Limits,
        acks: Option<Arc<LinkAcks>>,
    ) -> anyhow::Result<Component> {
        let (r, writer) = tokio::io::split(io);
        let mut c = Component {
            name: name.to_owned(),
            reader: FramedReader::new(r, limits),
            writer,
            early: VecDeque::new(),
            next_id: 0,
            keepalive: jrs_config::LINK_KEEPALIVE,
            sent: 0,
            acks: None,
        };
        c.send(open_stream(NS_COMPONENT_ACCEPT, &[("to", name)]).as_bytes())
            .await?;
        let header = match next_frame(&mut c.reader).await? {
            Frame::StreamOpen(b) => StreamHeader::parse(&b, Some(NS_COMPONENT_ACCEPT))?,
            other => bail!("expected a stream header from the router, got {other:?}"),
        };
        let id = header
            .id
            .ok_or_else(|| anyhow!("the router sent no stream id"))?;
        let digest = handshake_digest(&id, secret);
        let attributes = acks
            .as_ref()
            .map(|a| a.handshake_attributes())
            .unwrap_or_default();
        c.send(format!("<handshake{attributes}>{digest}</handshake>").as_bytes())
            .await?;
        let accepted = match next_element(&mut c.reader).await? {
            s if s.name() == "handshake" => s,
            s => return Err(HandshakeRefused(describe_error(&s)).into()),
        };
        if let Some(acks) = acks {
            let agreed = accepted.attr("acks").as_deref() == Some("1");
            let handled = crate::ack::parse_h(accepted.attr("h").as_deref());
            acks.link_started(&id, agreed, handled);
            if !agreed {
                // What the last link kept is still sent first; nothing is kept from now.
                tracing::warn!("the router does not acknowledge packets on this link");
            }
            c.acks = Some(acks);
        }
        Ok(c)
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
        self.send(request.as_bytes()).await?;
        loop {
            let s = next_element(&mut self.reader).await?;
            if take_ack(&self.acks, &s)? {
                continue;
            }
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
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// Whether the router agreed to acknowledge this link.
    pub fn acknowledged(&self) -> bool {
        self.acks.as_ref().is_some_and(|a| a.is_active())
    }

    pub fn split(self) -> (ComponentReader, ComponentWriter) {
        // Answers to our binds were read and handled before the split: acknowledged like
        // packets.
        let handled_before = self.next_id > 0;
        (
            ComponentReader {
                reader: self.reader,
                early: self.early,
                acks: self.acks.clone(),
                ack_timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
                returned: handled_before,
            },
            ComponentWriter {
                writer: self.writer,
                keepalive: self.keepalive,
                sent: self.sent,
                acks: self.acks,
            },
        )
    }
}

/// Reads stanzas from the router.
pub struct ComponentReader {
    reader: FramedReader<ReadHalf<BoxIo>>,
    early: VecDeque<Stanza>,
    acks: Option<Arc<LinkAcks>>,
    /// When our owed ack must go alone (reset, not re-made, for each wait).
    ack_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// A packet was returned since the last call (asking again means it is handled).
    returned: bool,
}

impl ComponentReader {
    /// The next stanza. A stream error or close from the router ends the link with an error.
    ///
    /// On an acknowledged link, asking for the next stanza acknowledges those returned
    /// before: the caller has handled them (done, or handed them to its own tasks). An
    /// ack that must go alone is asked for while this waits: a caller keeps calling it
    /// (every component's reader loop does).
    pub async fn next(&mut self) -> anyhow::Result<Stanza> {
        if let Some(s) = self.early.pop_front() {
            self.returned = true;
            return Ok(s);
        }
        loop {
            let returned = std::mem::take(&mut self.returned);
            let deadline = self
                .acks
                .as_ref()
                .and_then(|acks| acks.handled(self.reader.position(), returned));
            let s = match deadline {
                Some(due) => {
                    if self.ack_timer.deadline() != due {
                        self.ack_timer.as_mut().reset(due);
                    }
                    tokio::select! {
                        s = next_packet(&mut self.reader, &self.acks) => s?,
                        _ = self.ack_timer.as_mut() => {
                            // Nothing to ride along with came: the ack goes alone.
                            if let Some(acks) = &self.acks {
                                acks.ack_now();
                            }
                            continue;
                        }
                    }
                }
                None => next_packet(&mut self.reader, &self.acks).await?,
            };
            // An ack, read by [`crate::ack::quick_ack`].
            let Some(s) = s else { continue };
            if take_ack(&self.acks, &s)? {
                continue;
            }
            if s.name() == "stream:error" {
                bail!("the router closed the stream: {}", describe_error(&s));
            }
            // Our own log packet bounced (the ACL): not the component's business.
            if s.name() == "log" && s.kind() == Some("error") {
                if let Some(refused) = LOG_REFUSED.get() {
                    refused(&error_condition(&s));
                }
                // Handled here: it is acknowledged like any packet.
                self.returned = true;
                continue;
            }
            jrs_metrics::link::LINK.received(s.name());
            self.returned = true;
            return Ok(s);
        }
    }
}

/// Writes to the router.
pub struct ComponentWriter {
    writer: WriteHalf<BoxIo>,
    keepalive: std::time::Duration,
    /// Bytes written so far on this link.
    sent: u64,
    acks: Option<Arc<LinkAcks>>,
}

impl ComponentWriter {
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// Moves the writer into a task fed by a channel, so many tasks can send. Stanzas
    /// queued together are written with one system call. On an acknowledged link it
    /// first sends again what the last link did not get acknowledged, keeps what it
    /// writes until acknowledged, and carries our acks.
    pub fn spawn(self) -> Outbox {
        self.spawn_stoppable().0
    }

    /// [`ComponentWriter::spawn`], with a handle that stops the writer task: a process
    /// that reconnects stops the old writer first, so that what it still held is kept
    /// for the next link (before anything the next writer sends).
    pub fn spawn_stoppable(mut self) -> (Outbox, WriterStop) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let acks = self.acks.clone();
            let mut batch = Vec::with_capacity(64 * 1024);
            // The packets of `batch` (on an acknowledged link), with where each ends in it.
            let mut packets: Vec<(usize, Bytes)> = vec![];
            let mut flushes = vec![];
            // Packets taken from the outbox for this batch, and who waits for their ack.
            let mut fresh = 0u64;
            let mut waiters: Vec<(u64, crate::ack::AckWaiter)> = vec![];
            // The keepalive's timer, kept for the link's life and pushed back before each
            // wait (moving a pending deadline later costs a store; a `timeout` per wait
            // registered and removed a timer for every lone packet).
            let mut silence = Box::pin(tokio::time::sleep(self.keepalive));
            if let Some(acks) = &acks {
                for p in acks.take_resend() {
                    batch.extend_from_slice(&p);
                    packets.push((batch.len(), p));
                }
            }
            loop {
                if batch.is_empty() {
                    // A space after a silence, so that a dead router is noticed (the
                    // link's TCP_USER_TIMEOUT fires on unacknowledged data, not on an idle
                    // link).
                    silence
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.keepalive);
                    let first = tokio::select! {
                        r = rx.recv() => match r {
                            Some(first) => Some(first),
                            None => break,
                        },
                        _ = silence.as_mut() => {
                            batch.push(b' ');
                            None
                        }
                        _ = ack_due(&acks) => None,
                        _ = stopped.notified() => break,
                    };
                    let mut next = first;
                    while let Some(queued) = next.take() {
                        match queued {
                            Queued::Bytes(bytes) => {
                                batch.extend_from_slice(&bytes);
                                fresh += 1;
                                if acks.is_some() {
                                    packets.push((batch.len(), bytes));
                                }
                            }
                            Queued::Flush(done) => flushes.push(done),
                            Queued::Acked(done) => match &acks {
                                Some(_) => waiters.push((fresh, done)),
                                // No acks on this link: written is all there is.
                                None => flushes.push(done),
                            },
                        }
                        if batch.len() >= 64 * 1024 {
                            break;
                        }
                        next = rx.try_recv().ok();
                    }
                }
                if let Some(acks) = &acks {
                    // Kept from now on, so a write that fails half way is sent again.
                    acks.written(
                        self.sent,
                        &mut packets,
                        std::mem::take(&mut fresh),
                        &mut waiters,
                    );
                    let riding = !batch.is_empty();
                    acks.take_ack(riding, &mut batch);
                }
                if !batch.is_empty() {
                    // The write first: the stop is looked at only while a write waits
                    // (no random draw and no waiter registered for a write that goes at once).
                    let written = tokio::select! {
                        biased;
                        r = self.send(&batch) => r.is_ok(),
                        _ = stopped.notified() => false,
                    };
                    if !written {
                        break;
                    }
                }
                batch.clear();
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
            // What is still queued goes on the next link (first, after what this one did
            // not get acknowledged). Waiters for a flush are released: the link is gone.
            rx.close();
            while let Ok(queued) = rx.try_recv() {
                match queued {
                    Queued::Bytes(bytes) => {
                        if let Some(acks) = &acks {
                            fresh += 1;
                            acks.unsent(bytes);
                        }
                    }
                    Queued::Flush(done) => flushes.push(done),
                    // Asked again on the next link (what it waited for goes there first).
                    Queued::Acked(_) => {}
                }
            }
            if let Some(acks) = &acks {
                acks.taken(fresh, &mut waiters);
            }
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.writer.shutdown())
                .await;
        });
        (Outbox(tx), WriterStop { stop, task })
    }

    /// Closes our stream politely.
    pub async fn close(mut self) {
        let _ = self.writer.write_all(b"</stream:stream>").await;
        let _ = self.writer.shutdown().await;
    }
}

/// Stops a writer task (see [`ComponentWriter::spawn_stoppable`]).
pub struct WriterStop {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl WriterStop {
    /// Stops the writer (a write in progress is abandoned: on an acknowledged link what
    /// it carried is kept) and waits until it has put away what it held.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// What the writer task takes: bytes, or a request to say when all before it is
/// written, or acknowledged by the router.
enum Queued {
    Bytes(Bytes),
    Flush(oneshot::Sender<()>),
    Acked(oneshot::Sender<()>),
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

    /// True once everything queued before it was acknowledged by the router (on a link
    /// without acks: written); false if this link dropped first (what was queued goes on
    /// the next link: ask that one's outbox again). What a process that must not
    /// acknowledge anything before the router has it waits for (s2s's XEP-0198 `<a/>`).
    pub async fn acknowledged(&self) -> bool {
        let (done, acked) = oneshot::channel();
        self.0.send(Queued::Acked(done)).is_ok() && acked.await.is_ok()
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

/// Waits until our ack is due alone on an acknowledged link (never otherwise).
async fn ack_due(acks: &Option<Arc<LinkAcks>>) {
    match acks {
        Some(acks) => acks.ack_due().await,
        None => std::future::pending().await,
    }
}

/// Handles the router's `<a h='N'/>` on an acknowledged link: true if `s` was one.
fn take_ack(acks: &Option<Arc<LinkAcks>>, s: &Stanza) -> anyhow::Result<bool> {
    let Some(acks) = acks else {
        return Ok(false);
    };
    if s.name() != "a" {
        return Ok(false);
    }
    let h = crate::ack::parse_h(s.attr("h").as_deref())
        .ok_or_else(|| anyhow!("the router sent an <a/> without a number h"))?;
    acks.acknowledged(h);
    Ok(true)
}

async fn next_frame(reader: &mut FramedReader<ReadHalf<BoxIo>>) -> anyhow::Result<Frame> {
    reader.next_frame().await.context("reading from the router")
}

/// The next element from the router, `None` for an ack taken on the quick path (spelled
/// as we write them: [`crate::ack::quick_ack`]).
async fn next_packet(
    reader: &mut FramedReader<ReadHalf<BoxIo>>,
    acks: &Option<Arc<LinkAcks>>,
) -> anyhow::Result<Option<Stanza>> {
    let frame = reader.next_frame().await;
    if let (Some(acks), Ok(Frame::Element(b))) = (acks, &frame) {
        if let Some(h) = crate::ack::quick_ack(b) {
            acks.acknowledged(h);
            return Ok(None);
        }
    }
    element_of(frame).map(Some)
}

async fn next_element(reader: &mut FramedReader<ReadHalf<BoxIo>>) -> anyhow::Result<Stanza> {
    element_of(reader.next_frame().await)
}

fn element_of(frame: Result<Frame, ReadError>) -> anyhow::Result<Stanza> {
    match frame {
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
