//! Outgoing connections: one task per remote domain, holding one queue per local domain.
//!
//! The task resolves the remote (static map, SRV, A/AAAA), connects, negotiates TLS and
//! authenticates each local domain that has traffic (SASL EXTERNAL for the stream's own
//! domain when both certificates allow it, dialback otherwise, several local domains over
//! the same stream). Stanzas wait in their queue meanwhile; on failure, or once they have
//! waited `queue timeout`, they are bounced to their senders. The same stream carries
//! `db:verify` requests for incoming streams from that remote. An idle connection closes.
//! With XEP-0198 (`stream_management.rs`) a stream lost with stanzas the remote did not
//! acknowledge is followed by a new connection that sends them again.
//! Opening the stream is `negotiation/outgoing.rs`; this module drives it, then the
//! stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn, Instrument};

use jrs_stream::{Frame, Stanza, StanzaErrorCondition, StreamErrorCondition, StreamHeader};
use jrs_sx::connection::{element, parse};
use jrs_sx::{stream_error, tls, Close, Connection, Transport};

use crate::config::{Target, TlsMode};
use crate::dialback;
use crate::resolve::Resolution;
use crate::shared::{Cmd, Shared};
use crate::stream_management::Acks;
use crate::xml::{self, Dialback, NS_SERVER};

use crate::negotiation::outgoing::{Action, Established, Input, Outgoing};

/// Sends an error reply we made to a remote sender through the outgoing stream to its
/// server (never on the incoming stream it came by: server streams go one way).
pub fn send_reply(shared: &Arc<Shared>, reply: bytes::Bytes) {
    let Ok(stanza) = jrs_stream::Stanza::parse(reply) else {
        return;
    };
    let remote = stanza.to().and_then(crate::xml::domain_of);
    let local = stanza.from().and_then(crate::xml::domain_of);
    if let (Some(remote), Some(local)) = (remote, local) {
        hand(
            shared,
            &remote,
            Cmd::Send {
                local,
                stanza,
                since: std::time::Instant::now(),
            },
        );
    }
}

/// Hands `cmd` to the outgoing connection for `remote`, starting one if there is none
/// (or the one there is has just ended).
pub fn hand(shared: &Arc<Shared>, remote: &str, cmd: Cmd) {
    let mut cmd = cmd;
    for _ in 0..2 {
        let tx = {
            let mut map = shared.outgoing.lock().expect("outgoing lock");
            match map.get(remote) {
                Some((_, tx)) if !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let generation = shared.unique();
                    map.insert(remote.to_owned(), (generation, tx.clone()));
                    let span = info_span!("out", remote = %remote);
                    tokio::spawn(
                        run(shared.clone(), remote.to_owned(), generation, rx).instrument(span),
                    );
                    tx
                }
            }
        };
        match tx.send(cmd) {
            Ok(()) => return,
            Err(mpsc::error::SendError(back)) => cmd = back,
        }
    }
    cmd.fail(
        shared,
        StanzaErrorCondition::InternalServerError,
        "no outgoing connection",
    );
}

/// Asks the authoritative server of `remote` whether `key` is valid for the stream
/// `id` that `remote` opened to our `local` domain (the `db:verify` round trip).
pub fn verify(
    shared: &Arc<Shared>,
    local: &str,
    remote: &str,
    id: &str,
    key: &str,
) -> oneshot::Receiver<bool> {
    let (tx, rx) = oneshot::channel();
    hand(
        shared,
        remote,
        Cmd::Verify {
            local: local.to_owned(),
            id: id.to_owned(),
            key: key.to_owned(),
            reply: tx,
        },
    );
    rx
}

/// Why a connection attempt failed.
struct Failure {
    condition: StanzaErrorCondition,
    text: String,
    /// Every address refused the connection: the remote server may be restarting, so
    /// connecting is tried again for a while (see [`RETRY_REFUSED_FOR`]).
    refused: bool,
}

/// New streams in a row for stanzas a remote never acknowledges before they are bounced.
const MAX_FRUITLESS: u32 = 3;

/// How long connecting is tried again while every address of the remote refuses it (a
/// server restarting is back within a second or two); queued stanzas wait meanwhile.
const RETRY_REFUSED_FOR: Duration = Duration::from_secs(5);

fn not_found(text: impl Into<String>) -> Failure {
    Failure {
        condition: StanzaErrorCondition::RemoteServerNotFound,
        refused: false,
        text: text.into(),
    }
}

struct Queued {
    stanza: Stanza,
    since: Instant,
}

struct PendingVerify {
    local: String,
    id: String,
    key: String,
    reply: oneshot::Sender<bool>,
    since: Instant,
    sent: bool,
}

struct Out {
    shared: Arc<Shared>,
    remote: String,
    generation: u64,
    queues: HashMap<String, VecDeque<Queued>>,
    verifies: Vec<PendingVerify>,
    /// Local domains authenticated to the remote on the current stream.
    authorized: HashSet<String>,
    /// Local domains whose `db:result` was sent and not answered yet.
    requested: HashSet<String>,
    /// What [`Out::count_queued`] last added to the queued-stanzas gauge.
    counted: i64,
    /// XEP-0198 on the current stream.
    acks: Acks<Queued>,
    /// Stanzas the last stream lost unacknowledged (back in the queues).
    requeued: usize,
    /// New streams in a row after losses in which the remote acknowledged nothing: a
    /// remote that takes the stanzas and never acknowledges them (or breaks the stream
    /// on one of them) gets them bounced instead of sent forever.
    fruitless: u32,
}

impl Drop for Out {
    fn drop(&mut self) {
        crate::metrics::M.queued.dec_by(self.counted);
    }
}

pub async fn run(
    shared: Arc<Shared>,
    remote: String,
    generation: u64,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
) {
    let Some(first) = rx.recv().await else {
        return;
    };
    let first_local = first.local().to_owned();
    let mut out = Out {
        shared: shared.clone(),
        remote: remote.clone(),
        generation,
        queues: HashMap::new(),
        verifies: vec![],
        authorized: HashSet::new(),
        requested: HashSet::new(),
        counted: 0,
        acks: Acks::new(false),
        requeued: 0,
        fruitless: 0,
    };
    out.accept(first);
    let timeout = shared.config.queue_timeout;
    // Before a new stream after a loss: a moment, longer each time nothing came of it.
    let mut pause = Duration::ZERO;
    loop {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut connecting = Box::pin(connect_after(
            pause,
            shared.clone(),
            remote.clone(),
            first_local.clone(),
        ));
        let retry_until = tokio::time::Instant::now() + RETRY_REFUSED_FOR.min(timeout);
        let mut backoff = Duration::from_millis(100);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let result = loop {
            out.count_queued();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => out.accept(cmd),
                    None => return,
                },
                r = &mut connecting => match r {
                    Err(f) if f.refused && tokio::time::Instant::now() + backoff < retry_until => {
                        debug!(reason = %f.text, "connection refused; trying again in {backoff:?}");
                        connecting = Box::pin(connect_after(
                            backoff,
                            shared.clone(),
                            remote.clone(),
                            first_local.clone(),
                        ));
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    r => break r,
                },
                _ = tick.tick() => out.expire(),
                _ = tokio::time::sleep_until(deadline) => break Err(Failure {
                    refused: false,
                    condition: StanzaErrorCondition::RemoteServerTimeout,
                    text: format!("{remote} did not answer within {} s", timeout.as_secs_f64()),
                }),
            }
        };
        let failure = match result {
            Ok((link, established)) => {
                // Each stream (a lost one is followed by another) in a span of its own.
                let span = info_span!("stream", id = %established.stream_id);
                span.in_scope(|| {
                    info!(
                        sasl = established.sasl_local.is_some(),
                        tls = link.transport().is_tls(),
                        "connected"
                    )
                });
                match out.serve(link, established, &mut rx).instrument(span).await {
                    Some(failure)
                        if out.requeued > 0
                            && out.fruitless < MAX_FRUITLESS
                            && !shared.shutting_down() =>
                    {
                        // What the remote did not acknowledge goes on a new stream (it may be
                        // restarting: refused connections are tried again for a while).
                        info!(reason = %failure.text, stanzas = out.requeued, "outgoing stream lost: connecting again");
                        pause = Duration::from_millis(100) * out.fruitless;
                        out.new_stream();
                        continue;
                    }
                    Some(failure) => failure,
                    None => {
                        // Closed for idleness: anything that arrived meanwhile goes to a new
                        // connection.
                        rx.close();
                        while let Ok(cmd) = rx.try_recv() {
                            let remote = out.remote.clone();
                            hand(&shared, &remote, cmd);
                        }
                        return;
                    }
                }
            }
            Err(f) => f,
        };
        warn!(condition = failure.condition.name(), reason = %failure.text, "outgoing connection failed or ended");
        out.give_up(&mut rx, failure);
        return;
    }
}

impl Out {
    /// Forgets what belonged to the stream that was lost: authentications, and answers
    /// to requests it carried (asked again on the next).
    fn new_stream(&mut self) {
        self.authorized.clear();
        self.requested.clear();
        self.requeued = 0;
        for v in &mut self.verifies {
            v.sent = false;
        }
    }

    /// Takes a command while there is no usable stream: queue it (bounded).
    fn accept(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Send {
                local,
                stanza,
                since,
            } => {
                let queue = self.queues.entry(local).or_default();
                if queue.len() >= self.shared.config.queue_max {
                    self.shared.bounce(
                        &stanza,
                        StanzaErrorCondition::ResourceConstraint,
                        "too many stanzas waiting for this remote server",
                    );
                    return;
                }
                queue.push_back(Queued { stanza, since });
            }
            Cmd::Verify {
                local,
                id,
                key,
                reply,
            } => self.verifies.push(PendingVerify {
                local,
                id,
                key,
                reply,
                since: Instant::now(),
                sent: false,
            }),
        }
    }

    /// Bounces stanzas that waited longer than the queue timeout; fails old verifications.
    fn expire(&mut self) {
        let timeout = self.shared.config.queue_timeout;
        for queue in self.queues.values_mut() {
            while queue.front().is_some_and(|q| q.since.elapsed() >= timeout) {
                let q = queue.pop_front().expect("front exists");
                self.shared.bounce(
                    &q.stanza,
                    StanzaErrorCondition::RemoteServerTimeout,
                    &format!("{} did not answer in time", self.remote),
                );
            }
        }
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.verifies)
            .into_iter()
            .partition(|v| v.since.elapsed() >= timeout);
        self.verifies = keep;
        for v in old {
            let _ = v.reply.send(false);
        }
    }

    /// Brings the queued-stanzas gauge up to date with this connection's queues.
    fn count_queued(&mut self) {
        let now = self.queued() as i64;
        crate::metrics::M.queued.inc_by(now - self.counted);
        self.counted = now;
    }

    fn queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Ends this connection: forget it, then bounce everything queued and everything
    /// still arriving on the channel.
    fn give_up(mut self, rx: &mut mpsc::UnboundedReceiver<Cmd>, failure: Failure) {
        self.shared.forget_outgoing(&self.remote, self.generation);
        rx.close();
        let text = failure.text.as_str();
        for (_, queue) in self.queues.drain() {
            for q in queue {
                self.shared.bounce(&q.stanza, failure.condition, text);
            }
        }
        for v in self.verifies.drain(..) {
            let _ = v.reply.send(false);
        }
        while let Ok(cmd) = rx.try_recv() {
            cmd.fail(&self.shared, failure.condition, text);
        }
    }

    /// Runs an established stream until it ends; returns why it ended.
    async fn serve(
        &mut self,
        mut link: Connection,
        established: Established,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
    ) -> Option<Failure> {
        let Established {
            stream_id,
            sasl_local,
            dialback,
            stream_management,
        } = established;
        self.acks = Acks::new(stream_management);
        if let Some(local) = sasl_local {
            self.authorized.insert(local);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut idle_close = false;
        let _counted = self.shared.stream_opened();
        let _open = jrs_metrics::GaugeGuard::new(crate::metrics::M.connections.by("out"));
        let mut shutdown = self.shared.shutdown_signal();
        let close = loop {
            if *shutdown.borrow() {
                break stream_error(
                    StreamErrorCondition::SystemShutdown,
                    "the server is stopping",
                );
            }
            if let Err(close) = self.progress(&mut link, &stream_id, dialback).await {
                break close;
            }
            self.count_queued();
            tokio::select! {
                _ = shutdown.changed() => continue,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.accept(cmd),
                    None => break Close::Closed,
                },
                frame = link.next_frame_within(Duration::from_secs(3600)) => {
                    if let Err(close) = self.remote_frame(frame).await {
                        break close;
                    }
                }
                _ = tick.tick() => {
                    self.expire();
                    if self.acks.stalled() {
                        break Close::Gone("the remote does not acknowledge what it gets".into());
                    }
                    let idle = link.last_activity().elapsed() >= self.shared.config.idle_timeout;
                    if idle && self.queued() == 0 && self.verifies.is_empty() && self.acks.settled() {
                        info!("closing the idle connection");
                        // Stop taking commands first, so none is lost.
                        self.shared.forget_outgoing(&self.remote, self.generation);
                        idle_close = true;
                        break Close::Closed;
                    }
                }
            }
        };
        let reason = close.to_string();
        // What the remote did not acknowledge goes first on the next stream.
        let acks = std::mem::replace(&mut self.acks, Acks::new(false));
        self.fruitless = if acks.progressed() {
            0
        } else {
            self.fruitless + 1
        };
        let lost = acks.lost();
        self.requeued = lost.len();
        for u in lost.into_iter().rev() {
            self.queues.entry(u.local).or_default().push_front(u.item);
        }
        let (local, remote) = (self.first_local(), self.remote.clone());
        link.finish(&close, || xml::header(&local, &remote, None))
            .await;
        (!idle_close).then(|| not_found(format!("connection to {} lost: {reason}", self.remote)))
    }

    fn first_local(&self) -> String {
        self.shared.config.hosts[0].name.clone()
    }

    /// Sends what can be sent: queued stanzas of authorized domains, dialback requests for
    /// the others, pending verifications.
    async fn progress(
        &mut self,
        link: &mut Connection,
        stream_id: &str,
        dialback: bool,
    ) -> Result<(), Close> {
        let locals: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(l, _)| l.clone())
            .collect();
        for local in locals {
            if self.authorized.contains(&local) {
                if let Some(enable) = self.acks.before_stanzas() {
                    link.write(enable.as_bytes()).await?;
                }
                let mut queue = self.queues.remove(&local).unwrap_or_default();
                while let Some(q) = queue.pop_front() {
                    if let Err(close) = link.write(q.stanza.as_slice()).await {
                        // Not written: kept for the next stream (or bounced).
                        queue.push_front(q);
                        self.queues.insert(local, queue);
                        return Err(close);
                    }
                    self.acks.written(&local, q);
                }
            } else if !self.requested.contains(&local) {
                if !dialback {
                    let queue = self.queues.remove(&local).unwrap_or_default();
                    for q in queue {
                        self.shared.bounce(
                            &q.stanza,
                            StanzaErrorCondition::RemoteServerNotFound,
                            "cannot authenticate to the remote server (certificate not trusted, dialback not allowed)",
                        );
                    }
                    continue;
                }
                let key = dialback::key(&self.shared.secret, &self.remote, &local, stream_id);
                debug!(local = %local, "sending db:result");
                link.write(xml::db_result_request(&local, &self.remote, &key).as_bytes())
                    .await?;
                self.requested.insert(local);
            }
        }
        for v in self.verifies.iter_mut().filter(|v| !v.sent) {
            debug!(local = %v.local, id = %v.id, "sending db:verify");
            link.write(xml::db_verify_request(&v.local, &self.remote, &v.id, &v.key).as_bytes())
                .await?;
            v.sent = true;
        }
        if let Some(sm) = self.acks.take_output() {
            link.write(sm.as_bytes()).await?;
        }
        Ok(())
    }

    /// Handles what the remote sends on our outgoing stream: dialback answers.
    async fn remote_frame(&mut self, frame: Result<Frame, Close>) -> Result<(), Close> {
        let element = parse(element(frame?)?)?;
        if element.name() == "stream:error" {
            return Err(Close::Gone(format!(
                "the remote sent a stream error: {}",
                jrs_component::client::error_condition(&element)
            )));
        }
        if self.acks.element(&element)? {
            return Ok(());
        }
        let Some(db) = Dialback::parse(&element) else {
            debug!(
                name = element.name(),
                "ignoring an element on an outgoing stream"
            );
            return Ok(());
        };
        let db = db.map_err(|e| stream_error(StreamErrorCondition::InvalidXml, e))?;
        let valid = db.kind.as_deref() == Some("valid");
        if db.verify {
            let id = db.id.clone().unwrap_or_default();
            if let Some(i) = self
                .verifies
                .iter()
                .position(|v| v.sent && v.id == id && v.local == db.to)
            {
                let v = self.verifies.remove(i);
                info!(local = %v.local, id = %id, valid, "db:verify answered");
                let _ = v.reply.send(valid);
            }
            return Ok(());
        }
        let local = db.to.clone();
        if !self.requested.remove(&local) {
            return Ok(());
        }
        crate::metrics::dialback("out", valid);
        if valid {
            info!(local = %local, "authenticated with dialback");
            self.authorized.insert(local);
        } else {
            warn!(local = %local, answer = ?db.kind, "the remote refused our dialback");
            let queue = self.queues.remove(&local).unwrap_or_default();
            for q in queue {
                self.shared.bounce(
                    &q.stanza,
                    StanzaErrorCondition::RemoteServerNotFound,
                    &format!("{} refused dialback from {local}", self.remote),
                );
            }
        }
        Ok(())
    }
}

/// [`connect`] after `delay`.
async fn connect_after(
    delay: Duration,
    shared: Arc<Shared>,
    remote: String,
    local: String,
) -> Result<(Connection, Established), Failure> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    connect(&shared, &remote, &local).await
}

/// Resolves the remote and tries its targets in order until one negotiates a stream.
async fn connect(
    shared: &Shared,
    remote: &str,
    local: &str,
) -> Result<(Connection, Established), Failure> {
    let targets = match shared.resolver.targets(remote).await {
        Ok(Resolution::Targets(t)) => t,
        Ok(Resolution::NoService(why)) => return Err(not_found(why)),
        Err(e) => return Err(not_found(format!("{e:#}"))),
    };
    let mut last = format!("{remote}: no address found");
    // Whether some address accepted or ignored us without answering in time.
    let mut timed_out = false;
    // Whether some address refused the connection and every other failed only as
    // unreachable (an IPv6 address without a route beside a refusing IPv4 one): the
    // remote may be restarting.
    let (mut refused, mut other_failure) = (false, false);
    for target in targets {
        let addrs = match shared.resolver.addresses(&target.host).await {
            Ok(a) => a,
            Err(e) => {
                last = format!("{e:#}");
                continue;
            }
        };
        if addrs.is_empty() {
            last = format!("{}: no address found", target.host);
        }
        for ip in addrs {
            let addr = std::net::SocketAddr::new(ip, target.port);
            debug!(%addr, mode = ?target.mode, "connecting");
            let tcp =
                match tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(tcp)) => tcp,
                    Ok(Err(e)) => {
                        match e.kind() {
                            std::io::ErrorKind::ConnectionRefused => refused = true,
                            std::io::ErrorKind::NetworkUnreachable
                            | std::io::ErrorKind::HostUnreachable => {}
                            _ => other_failure = true,
                        }
                        last = format!("{addr}: {e}");
                        continue;
                    }
                    Err(_) => {
                        last = format!("{addr}: connect timed out");
                        timed_out = true;
                        continue;
                    }
                };
            other_failure = true;
            let _ = tcp.set_nodelay(true);
            match negotiate(shared, tcp, &target, remote, local).await {
                Ok(e) => return Ok(e),
                Err(close) => {
                    if let Close::Error(e) = &close {
                        timed_out |= e.condition == StreamErrorCondition::ConnectionTimeout;
                    }
                    last = match close {
                        Close::Error(e) => format!("{addr}: {e}"),
                        Close::Gone(why) => format!("{addr}: {why}"),
                        Close::Closed => format!("{addr}: the remote closed the stream"),
                    };
                    warn!(reason = %last, "negotiation failed");
                }
            }
        }
    }
    if timed_out {
        return Err(Failure {
            condition: StanzaErrorCondition::RemoteServerTimeout,
            text: last,
            refused: false,
        });
    }
    Err(Failure {
        refused: refused && !other_failure,
        ..not_found(last)
    })
}

/// Opens the stream on `tcp`: TLS (direct or STARTTLS), the certificate check, SASL
/// EXTERNAL where possible (the rules are `negotiation/outgoing.rs`).
async fn negotiate(
    shared: &Shared,
    tcp: TcpStream,
    target: &Target,
    remote: &str,
    local: &str,
) -> Result<(Connection, Established), Close> {
    let client_tls = |direct| {
        shared
            .tls()
            .client(local, direct)
            .ok_or_else(|| Close::Gone(format!("no certificate for {local}")))
    };
    let transport = match target.mode {
        TlsMode::Direct => tls::connect(tcp, client_tls(true)?, remote).await?,
        TlsMode::StartTls => Transport::Plain(tcp),
    };
    let settings = shared.outgoing_settings();
    let (mut stream, mut actions) = Outgoing::start(
        &settings,
        local,
        remote,
        transport.is_tls(),
        transport.peer_certificates(),
    );
    // Negotiation waits for the remote at most the queue timeout.
    let mut link = Connection::new(
        transport,
        shared.connection_settings(shared.config.queue_timeout),
    );
    loop {
        let mut next = None;
        for action in actions {
            match action {
                Action::Header(h) => link.write_header(&h).await?,
                Action::Send(s) => link.write(s.as_bytes()).await?,
                Action::StartTls => {
                    link.connect_tls(client_tls(false)?, remote).await?;
                    next = Some(Input::TlsStarted(link.transport().peer_certificates()));
                }
                Action::Restart => link.restart(),
                Action::Done(established) => return Ok((link, established)),
                Action::Close(close) => return Err(close),
            }
        }
        let input = match next {
            Some(input) => input,
            None if stream.expects_header() => match link.next_frame().await? {
                Frame::StreamOpen(bytes) => {
                    Input::Header(StreamHeader::parse(&bytes, Some(NS_SERVER))?)
                }
                _ => {
                    return Err(stream_error(
                        StreamErrorCondition::NotWellFormed,
                        "expected a stream header",
                    ))
                }
            },
            None => Input::Element(parse(link.next_element().await?)?),
        };
        actions = stream.step(&settings, input);
    }
}
