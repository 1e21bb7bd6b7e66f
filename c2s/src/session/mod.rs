//! A client session: started with sm (or resumed, XEP-0198), then relaying stanzas
//! between the client and its sm instance until either side ends it. With stream
//! management the session outlives its connection: when the connection drops, it is
//! handed to sm (`hibernate`, sm answers `collect`, c2s sends `park` with what the client
//! has not acknowledged), where any c2s instance of the domain can resume it. Without,
//! or when the session ends, what the client did not get goes back to sm with `end`
//! (offline storage, another session, or a bounce): nothing is dropped here.
//!
//! `stream_management.rs` (XEP-0198) and `csi.rs` (XEP-0352) are the rules, without I/O.

pub mod csi;
pub mod stream_management;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use jrs_stream::children::children;
use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StanzaErrorCondition, StreamError, StreamErrorCondition};
use jrs_sx::features::{NS_BIND, NS_CSI, NS_SESSION, NS_SM};
use jrs_sx::{stream_error, Close, Connection};

use crate::iq::{error_iq, result_iq};
use crate::negotiation::sm_failed;
use crate::protocol::{
    to_client_channel, Answer, Counts, Item, SessionHandle, ToClient, ToClientReceiver,
};
use crate::shared::{RelayGuard, Shared};

use csi::Csi;
use stream_management::StreamManagement;

/// How long sm may take to start or resume a session.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a session whose connection dropped waits for sm to take it.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of queued stanzas written to the client in one go.
const BURST: usize = 64 * 1024;

/// How a bound session is announced to the client.
pub enum BindReply {
    /// RFC 6120 7: the result of the client's bind request with this id.
    Iq(String),
    /// XEP-0386 Bind 2: SASL2 `<success/>` with `<bound/>` (after `failed`, the
    /// `<failed/>` of an inline resumption that did not work).
    Sasl2 {
        done: Box<crate::sasl2::Done>,
        failed: String,
    },
}

/// Starts the session for `full` (answering the client's bind request); the caller
/// then runs it ([`Live::run`]). Separate so that what starting needs is not kept in
/// the task for the session's whole life (memory per connection).
pub async fn bind<'a>(
    shared: &'a Arc<Shared>,
    conn: &'a mut Connection,
    peer: SocketAddr,
    bare: String,
    full: String,
    reply: BindReply,
) -> Result<Live<'a>, Close> {
    let bind_id = match reply {
        BindReply::Iq(id) => id,
        BindReply::Sasl2 { done, failed } => {
            return Box::pin(bind2(shared, conn, peer, bare, full, done, failed)).await
        }
    };
    if shared.shutting_down() {
        return Err(stream_error(
            StreamErrorCondition::SystemShutdown,
            "the server is stopping",
        ));
    }
    let (to_client, from_sm) = to_client_channel();
    let (handle, started) = shared.start_session(&full, &bare, to_client);
    let reply = match tokio::time::timeout(START_TIMEOUT, started).await {
        Ok(Ok(Answer::Started)) => format!(
            "<iq type='result' id='{}'><bind xmlns='{NS_BIND}'><jid>{}</jid></bind></iq>",
            escape(&bind_id),
            escape(&full)
        ),
        Ok(Ok(Answer::Refused(condition))) => {
            let cond = StanzaErrorCondition::parse(&condition)
                .unwrap_or(StanzaErrorCondition::InternalServerError);
            shared.end_session(&handle, &[]);
            error_iq(&bind_id, cond, "the session manager refused the session")
        }
        _ => {
            shared.end_session(&handle, &[]);
            error_iq(
                &bind_id,
                StanzaErrorCondition::InternalServerError,
                "the session manager did not answer",
            )
        }
    };
    let bound = reply.contains("type='result'");
    if let Err(close) = conn.write(reply.as_bytes()).await {
        shared.end_session(&handle, &[]);
        return Err(close);
    }
    if !bound {
        return Err(stream_error(
            StreamErrorCondition::InternalServerError,
            "no session could be started",
        ));
    }
    info!(%peer, jid = %full, sid = %handle.sid, "session started");
    crate::metrics::M.sessions.by("started").inc();
    Ok(Live::new(shared, conn, handle, from_sm, None))
}

/// XEP-0386: the session starts as [`bind`] starts it, with the features the client
/// asked for enabled, and is announced in SASL2 `<success/>`.
async fn bind2<'a>(
    shared: &'a Arc<Shared>,
    conn: &'a mut Connection,
    peer: SocketAddr,
    bare: String,
    full: String,
    done: Box<crate::sasl2::Done>,
    failed: String,
) -> Result<Live<'a>, Close> {
    if shared.shutting_down() {
        return Err(stream_error(
            StreamErrorCondition::SystemShutdown,
            "the server is stopping",
        ));
    }
    let (to_client, from_sm) = to_client_channel();
    let (handle, started) = shared.start_session(&full, &bare, to_client);
    match tokio::time::timeout(START_TIMEOUT, started).await {
        Ok(Ok(Answer::Started)) => {}
        _ => {
            shared.end_session(&handle, &[]);
            let failure = crate::sasl2::failure(
                "temporary-auth-failure",
                Some("the session manager did not start the session"),
            );
            conn.write(failure.as_bytes()).await?;
            return Err(stream_error(
                StreamErrorCondition::InternalServerError,
                "no session could be started",
            ));
        }
    }
    let bind = done.bind.clone().expect("a Bind 2 request");
    let mut live = Live::new(shared, conn, handle, from_sm, None);
    let enabled = match bind.sm {
        Some(sm) => live.enable_sm(sm.resume, sm.max),
        None => String::new(),
    };
    if bind.inactive {
        live.handle.kept().state.inactive = true;
        live.csi.inactive();
    }
    if bind.carbons {
        // As if the client had sent the enable IQ (XEP-0386 4); sm's answer is dropped.
        let id = format!("bind2-carbons-{}", live.handle.sid);
        let iq = format!(
            "<iq type='set' id='{}' from='{}'><enable xmlns='{}'/></iq>",
            escape(&id),
            escape(&full),
            crate::sasl2::NS_CARBONS
        );
        shared.client_stanza(&live.handle, iq.as_bytes());
        live.handle.kept().state.carbons = true;
        live.own_iq = Some(id);
    }
    let inner = format!("{failed}{}", crate::sasl2::Done::bound(&enabled));
    let success = done.success(&full, &inner, true);
    if let Err(close) = live.conn.write(success.as_bytes()).await {
        return Err(live.finish(Ending::Close(close)).await);
    }
    info!(%peer, jid = %full, sid = %live.handle.sid, "session started (Bind 2)");
    crate::metrics::M.sessions.by("started").inc();
    Ok(live)
}

/// How a resumption attempt ended.
pub enum Resumed {
    /// `<failed/>` was sent: the client may bind instead.
    Failed,
    /// The resumed session (or the stream) ended.
    Ended(Close),
}

/// XEP-0198 resumption of the session `previd` of `bare`, whose client received `h`
/// stanzas: sm hands it over (from wherever it was), the stanzas the client missed are
/// sent again, and the session goes on here.
pub async fn resume(
    shared: &Arc<Shared>,
    conn: &mut Connection,
    peer: SocketAddr,
    bare: String,
    previd: String,
    h: u32,
    sasl2: Option<&crate::sasl2::Done>,
) -> Resumed {
    if shared.shutting_down() {
        return Resumed::Ended(stream_error(
            StreamErrorCondition::SystemShutdown,
            "the server is stopping",
        ));
    }
    let (to_client, from_sm) = to_client_channel();
    let (handle, answer) = shared.resume_session(&bare, &previd, to_client);
    let resumption = match tokio::time::timeout(START_TIMEOUT, answer).await {
        Ok(Ok(Answer::Resumed(r))) => r,
        other => {
            shared.drop_session(&handle);
            let why = match other {
                Ok(Ok(Answer::Refused(c))) => c,
                _ => "no answer from the session manager".into(),
            };
            info!(%peer, user = %bare, reason = %why, "resumption failed");
            if sasl2.is_some() {
                // Its `<failed/>` goes into SASL2 `<success/>`.
                return Resumed::Failed;
            }
            return match conn.write(sm_failed("item-not-found").as_bytes()).await {
                Ok(()) => Resumed::Failed,
                Err(close) => Resumed::Ended(close),
            };
        }
    };
    let (sm, again, confirmed) = StreamManagement::resume(
        previd.clone(),
        shared.ack_policy(),
        resumption.received,
        resumption.acked,
        resumption.sent,
        resumption.items,
        h,
    );
    let handle = resumption.handle;
    handle.kept().state.token = Some(previd.clone());
    shared.delivered(&handle, confirmed);
    let mut resumed = format!(
        "<resumed xmlns='{NS_SM}' previd='{}' h='{}'/>",
        escape(&previd),
        sm.h()
    );
    if let Some(done) = sasl2 {
        resumed = done.success(&handle.jid, &resumed, true);
    }
    info!(%peer, jid = %handle.jid, sid = %handle.sid, resent = again.len(), "session resumed");
    crate::metrics::M.sessions.by("resumed").inc();
    let mut live = Live::new(shared, conn, handle, from_sm, Some(sm));
    let replayed = match live.conn.write(resumed.as_bytes()).await {
        Ok(()) => live.write_items(again).await,
        Err(close) => {
            // Not even `<resumed/>` went out: all of it is still to be sent.
            live.lost.extend(again);
            Err(close)
        }
    };
    Resumed::Ended(match replayed {
        Ok(()) => live.run().await,
        Err(close) => live.finish(Ending::Close(close)).await,
    })
}

/// How the relay stopped.
enum Ending {
    /// The stream ends with this (the client closed it, broke a rule, or vanished).
    Close(Close),
    /// sm ended the session.
    Ended(Close),
    /// sm takes the session: it was resumed on another connection.
    Collected,
    /// The process is stopping.
    Shutdown,
}

/// A session with its client connected.
pub struct Live<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a mut Connection,
    handle: Arc<SessionHandle>,
    from_sm: ToClientReceiver,
    sm: Option<StreamManagement>,
    csi: Csi,
    /// Stanzas whose write failed, without stream management to keep them.
    lost: Vec<Item>,
    /// The id of an IQ c2s sent sm on the client's behalf (Bind 2's inline carbons):
    /// its answer is not the client's.
    own_iq: Option<String>,
    shutdown: watch::Receiver<bool>,
    /// Counted until this is dropped, after the session was ended or handed over.
    _relay: RelayGuard,
}

impl<'a> Live<'a> {
    fn new(
        shared: &'a Arc<Shared>,
        conn: &'a mut Connection,
        handle: Arc<SessionHandle>,
        from_sm: ToClientReceiver,
        sm: Option<StreamManagement>,
    ) -> Live<'a> {
        crate::metrics::in_session();
        Live {
            csi: Csi::new(shared.config.csi.max_held),
            shutdown: shared.shutdown_signal(),
            _relay: shared.relay_started(),
            shared,
            conn,
            handle,
            from_sm,
            sm,
            own_iq: None,
            lost: vec![],
        }
    }

    /// Relays until the session ends, then ends it.
    ///
    /// By reference: an `async fn` that takes `self` by value keeps a second copy of it
    /// for its whole life. The ending is boxed, as is each client element in `relay`: a
    /// task's size is that of its largest await point, and an idle session should only
    /// pay for waiting (memory per connection, docs/benchmarks.md).
    pub async fn run(&mut self) -> Close {
        let ending = self.relay().await;
        Box::pin(self.finish(ending)).await
    }

    fn resumable(&self) -> bool {
        self.sm.as_ref().is_some_and(|sm| sm.token.is_some())
    }

    /// Whether the session can wait at sm for its client: resumable, and sm has it (one
    /// whose sm is away ends after its restore instead, `Shared::tell_end`).
    fn can_hibernate(&self) -> bool {
        self.resumable() && !self.handle.sm_away()
    }

    async fn relay(&mut self) -> Ending {
        let keepalive = self.shared.config.keepalive;
        // A SIGTERM while sm was starting or handing over the session came before we
        // subscribed to the signal.
        if self.shared.shutting_down() {
            return Ending::Shutdown;
        }
        // The timer and the shutdown signal live as long as the loop: made anew each turn,
        // each put a waiter in (and took it out of) the timer wheel and the signal's list
        // for every stanza either way (docs/benchmarks.md, "Addresses parsed once").
        let mut shutdown = self.shutdown.clone();
        let shutdown = shutdown.changed();
        tokio::pin!(shutdown);
        let timer = tokio::time::sleep_until(self.wake_at(keepalive).into());
        tokio::pin!(timer);
        loop {
            // One timer for the whitespace keepalive and XEP-0198's timed writes (our
            // `<r/>`, the answer to the client's): a timer per kind would cost a
            // timer-wheel entry per loop turn. Moved, not made again: moving a deadline
            // that is still ahead is a store.
            let wake_at = self.wake_at(keepalive).into();
            if timer.deadline() != wake_at {
                timer.as_mut().reset(wake_at);
            }
            tokio::select! {
                element = self.conn.next_stanza() => {
                    let result = match element {
                        Ok(element) => Box::pin(self.client_element(element)).await,
                        Err(close) => Err(close),
                    };
                    if let Err(close) = result {
                        return Ending::Close(close);
                    }
                }
                message = self.from_sm.recv() => match message.ok().map(|m| *m) {
                    Some(ToClient::Stanza(item)) => {
                        // Whatever else is queued for this client goes out in the same
                        // write: one system call for a burst, not one per stanza.
                        let mut items = vec![item];
                        let mut size = items[0].bytes.len();
                        let mut then = None;
                        while size < BURST {
                            match self.from_sm.try_recv().map(|m| *m) {
                                Ok(ToClient::Stanza(more)) => {
                                    size += more.bytes.len();
                                    items.push(more);
                                }
                                Ok(other) => {
                                    then = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        if let Err(close) = self.deliver(items).await {
                            return Ending::Close(close);
                        }
                        match then {
                            Some(ToClient::End(c, text)) => return Ending::Ended(stream_error(c, text)),
                            Some(ToClient::Collect) => return Ending::Collected,
                            _ => {}
                        }
                    }
                    Some(ToClient::End(c, text)) => return Ending::Ended(stream_error(c, text)),
                    Some(ToClient::Collect) => return Ending::Collected,
                    None => return Ending::Ended(stream_error(StreamErrorCondition::SystemShutdown, "shutting down")),
                },
                _ = timer.as_mut() => {
                    if let Err(close) = self.answer_and_ask().await {
                        return Ending::Close(close);
                    }
                    if self.conn.last_write() + keepalive <= Instant::now() {
                        if let Err(close) = self.conn.write(b" ").await {
                            return Ending::Close(close);
                        }
                    }
                }
                _ = shutdown.as_mut() => return Ending::Shutdown,
            }
        }
    }

    /// When the session's timer is due: the whitespace keepalive after a silence, or
    /// XEP-0198's next timed write, whichever comes first.
    fn wake_at(&self, keepalive: Duration) -> Instant {
        let keepalive_at = self.conn.last_write() + keepalive;
        match &self.sm {
            Some(sm) => [sm.request_due(), sm.answer_due()]
                .into_iter()
                .flatten()
                .fold(keepalive_at, Instant::min),
            None => keepalive_at,
        }
    }

    /// Stanzas for the client: through CSI (which may hold some), then written.
    async fn deliver(&mut self, mut items: Vec<Item>) -> Result<(), Close> {
        if let Some(id) = self.own_iq.clone() {
            let answer = |i: &Item| {
                Stanza::parse(i.bytes.clone()).is_ok_and(|s| {
                    s.name() == "iq"
                        && s.id() == Some(id.as_str())
                        && matches!(s.kind(), Some("result" | "error"))
                })
            };
            if let Some(pos) = items.iter().position(answer) {
                let item = items.remove(pos);
                if !item.bytes.windows(6).any(|w| w == b"result") {
                    warn!(jid = %self.handle.jid, "carbons not enabled inline: sm refused");
                }
                self.own_iq = None;
            }
        }
        if !self.csi.is_inactive() {
            return self.write_items(items).await;
        }
        let mut now = Vec::with_capacity(items.len());
        for item in items {
            now.extend(self.csi.offer(item));
        }
        self.write_items(now).await
    }

    /// Writes stanzas to the client in one go, counted and kept until acknowledged
    /// under stream management (with an `<r/>` after them when one is due).
    async fn write_items(&mut self, items: Vec<Item>) -> Result<(), Close> {
        if items.is_empty() {
            return Ok(());
        }
        let mut burst = Vec::with_capacity(items.iter().map(|i| i.bytes.len()).sum::<usize>() + 32);
        for i in &items {
            burst.extend_from_slice(&i.bytes);
            let kind = jrs_metrics::stanza_kind(&i.bytes);
            crate::metrics::M.stanzas_out.by(kind).inc();
        }
        let Some(sm) = &mut self.sm else {
            let offline = items.iter().filter(|i| i.offline).count();
            return match self.conn.write(&burst).await {
                Ok(()) => {
                    // Without acknowledgements, written is the best we know.
                    self.shared.delivered(&self.handle, offline);
                    Ok(())
                }
                Err(close) => {
                    self.lost.extend(items);
                    Err(close)
                }
            };
        };
        let now = Instant::now();
        // The answer to the client's `<r/>` rides along; it counts what came before.
        if let Some(h) = sm.take_answer() {
            burst.extend_from_slice(format!("<a xmlns='{NS_SM}' h='{h}'/>").as_bytes());
        }
        let mut ask = false;
        for i in items {
            ask |= sm.sent(i, now);
        }
        if sm.unacked() > self.shared.config.stream_management.max_queue {
            return Err(stream_error(
                StreamErrorCondition::ResourceConstraint,
                "too many stanzas not acknowledged",
            ));
        }
        if ask {
            burst.extend_from_slice(format!("<r xmlns='{NS_SM}'/>").as_bytes());
            sm.requested();
        }
        self.conn.write(&burst).await
    }

    /// XEP-0198 on a timer: the answer to the client's `<r/>` that no stanza took
    /// along, and our `<r/>` when the oldest unacknowledged stanza is old enough.
    async fn answer_and_ask(&mut self) -> Result<(), Close> {
        let Some(sm) = &mut self.sm else {
            return Ok(());
        };
        let now = Instant::now();
        let mut out = String::new();
        if sm.answer_due().is_some_and(|due| due <= now) {
            if let Some(h) = sm.take_answer() {
                out = format!("<a xmlns='{NS_SM}' h='{h}'/>");
            }
        }
        if sm.should_request(now) {
            sm.requested();
            out.push_str(&format!("<r xmlns='{NS_SM}'/>"));
        }
        if out.is_empty() {
            return Ok(());
        }
        self.conn.write(out.as_bytes()).await
    }

    /// An element from the client: a stream management or CSI element, or a stanza.
    async fn client_element(&mut self, element: Stanza) -> Result<(), Close> {
        let config = &self.shared.config;
        match (element.name(), element.xmlns()) {
            (_, Some(NS_SM)) if config.stream_management.enabled => {
                return self.stream_management(&element).await
            }
            ("active", Some(NS_CSI)) if config.csi.enabled => {
                self.handle.kept().state.inactive = false;
                let held = self.csi.active();
                return self.write_items(held).await;
            }
            ("inactive", Some(NS_CSI)) if config.csi.enabled => {
                self.handle.kept().state.inactive = true;
                self.csi.inactive();
                return Ok(());
            }
            ("message" | "presence" | "iq", _) => {}
            (other, _) => {
                return Err(stream_error(
                    StreamErrorCondition::UnsupportedStanzaType,
                    format!("<{other}> is not a stanza"),
                ))
            }
        }
        if let Some(sm) = &mut self.sm {
            sm.received();
        }
        self.client_stanza(element).await
    }

    /// Turns XEP-0198 on (resumable when `wanted` and allowed, for at most `max`
    /// seconds if the client asks for less than we allow); the `<enabled/>` answer.
    fn enable_sm(&mut self, wanted: bool, max: Option<u64>) -> String {
        let config = &self.shared.config.stream_management;
        let answer = if wanted && config.resume {
            let token = new_token();
            self.shared.resumable(&self.handle, &token);
            self.handle.kept().state.token = Some(token.clone());
            let max = max.map_or(config.hibernate.as_secs(), |m| {
                m.min(config.hibernate.as_secs())
            });
            let enabled =
                format!("<enabled xmlns='{NS_SM}' id='{token}' resume='true' max='{max}'/>");
            self.sm = Some(StreamManagement::new(Some(token), self.shared.ack_policy()));
            enabled
        } else {
            self.sm = Some(StreamManagement::new(None, self.shared.ack_policy()));
            format!("<enabled xmlns='{NS_SM}'/>")
        };
        debug!(jid = %self.handle.jid, resume = wanted, "stream management enabled");
        answer
    }

    /// XEP-0198 elements after binding: `<enable/>`, `<r/>`, `<a/>`.
    async fn stream_management(&mut self, element: &Stanza) -> Result<(), Close> {
        match (element.name(), &mut self.sm) {
            ("enable", Some(_)) => {
                self.conn
                    .write(sm_failed("unexpected-request").as_bytes())
                    .await
            }
            ("enable", None) => {
                let wanted = matches!(element.attr("resume").as_deref(), Some("true" | "1"));
                let max = element.attr("max").and_then(|m| m.parse::<u64>().ok());
                let answer = self.enable_sm(wanted, max);
                self.conn.write(answer.as_bytes()).await
            }
            ("r", Some(sm)) => {
                // Answered with the next write to the client (see `ANSWER_DELAY`).
                sm.asked(Instant::now());
                Ok(())
            }
            ("a", Some(sm)) => {
                let Some(h) = element.attr("h").and_then(|h| h.parse::<u32>().ok()) else {
                    return Err(stream_error(
                        StreamErrorCondition::InvalidXml,
                        "<a/> needs a count 'h'",
                    ));
                };
                match sm.ack(h) {
                    Ok(offline) => {
                        self.shared.delivered(&self.handle, offline);
                        Ok(())
                    }
                    Err(too_high) => Err(Close::Error(
                        StreamError::new(
                            StreamErrorCondition::UndefinedCondition,
                            format!(
                                "you acknowledged {} stanzas; {} were sent",
                                too_high.h, too_high.sent
                            ),
                        )
                        .with_app(format!(
                            "<handled-count-too-high xmlns='{NS_SM}' h='{}' send-count='{}'/>",
                            too_high.h, too_high.sent
                        )),
                    )),
                }
            }
            (name, _) => Err(stream_error(
                StreamErrorCondition::UnsupportedStanzaType,
                format!("<{name}/> of stream management is not expected now"),
            )),
        }
    }

    /// A stanza from the bound client: answered here (session, bind, bad addressing) or
    /// stamped with the full JID and passed to sm.
    async fn client_stanza(&mut self, stanza: Stanza) -> Result<(), Close> {
        crate::metrics::M.stanzas_in.by(stanza.name()).inc();
        if let Some(to) = stanza.to() {
            let valid =
                jrs_stream::xml::unescape(to).is_some_and(|t| jrs_stream::jids::parse(&t).is_ok());
            if !valid {
                if let Some(reply) = stanza.error_reply(
                    StanzaErrorCondition::JidMalformed,
                    "the 'to' address is not a valid JID",
                ) {
                    return self.reply(reply).await;
                }
                return Ok(());
            }
        }
        if stanza.name() == "iq" {
            if stanza.id().is_none() {
                // RFC 6120 8.1.3: an IQ without id is not executed.
                let reply = error_iq(
                    "",
                    StanzaErrorCondition::BadRequest,
                    "an IQ needs an id (RFC 6120 8.1.3)",
                );
                return self.reply(Bytes::from(reply)).await;
            }
            if stanza.kind() == Some("set") {
                if let Some(answer) = own_iq(&stanza) {
                    return self.reply(Bytes::from(answer)).await;
                }
            }
        }
        // Never trust the client's from: stamp the session's full JID.
        let stamped: Bytes = stanza.with_addresses(None, Some(&self.handle.jid));
        if matches!(stanza.name(), "presence" | "iq") {
            crate::protocol::track(&mut self.handle.kept().state, &stanza, &stamped);
        }
        if !self.shared.client_stanza(&self.handle, &stamped) {
            if let Some(reply) = stanza.error_reply(
                StanzaErrorCondition::ServiceUnavailable,
                "the server is restarting",
            ) {
                return self.reply(reply).await;
            }
        }
        Ok(())
    }

    /// An answer c2s itself gives the client (a stanza like any other: counted).
    async fn reply(&mut self, stanza: Bytes) -> Result<(), Close> {
        self.deliver(vec![Item::new(stanza)]).await
    }

    /// Everything the client has not got: unacknowledged, held by CSI, lost in a failed
    /// write, and what sm sent that was not read yet.
    fn undelivered(&mut self) -> Vec<Item> {
        let mut items = self.undelivered_here();
        while let Ok(message) = self.from_sm.try_recv() {
            if let ToClient::Stanza(item) = *message {
                items.push(item);
            }
        }
        items
    }

    /// What the client has not got that is here already: unacknowledged, lost in a
    /// failed write, held by CSI (in the order they were to be sent).
    fn undelivered_here(&mut self) -> Vec<Item> {
        let mut items = self
            .sm
            .as_mut()
            .map(|sm| sm.take_unacked())
            .unwrap_or_default();
        items.append(&mut self.lost);
        items.extend(self.csi.take_held());
        items
    }

    fn counts(&self, sent: usize) -> Counts {
        Counts {
            received: self.sm.as_ref().map_or(0, |sm| sm.h()),
            acked: self.sm.as_ref().map_or(0, |sm| sm.acked()),
            sent,
        }
    }

    /// The session after the relay: ended, or handed to sm to wait for its client.
    async fn finish(&mut self, ending: Ending) -> Close {
        let jid = self.handle.jid.clone();
        match ending {
            // Lost, or silent past the idle timeout (a phone that vanished): the
            // session waits for its client.
            Ending::Close(close) if self.can_hibernate() && connection_lost(&close) => {
                info!(%jid, "connection lost: the session hibernates");
                self.hibernate().await;
                close
            }
            Ending::Close(close) | Ending::Ended(close) => {
                let returned = self.end();
                if returned > 0 {
                    info!(%jid, undelivered = returned, "session ended: returned what the client did not get");
                }
                info!(%jid, "session ended");
                close
            }
            Ending::Collected => {
                info!(%jid, "session resumed on another connection: closing this one");
                let sent = self.sm.as_ref().map_or(0, |sm| sm.unacked());
                let counts = self.counts(sent);
                let items = self.undelivered();
                self.shared.park(&self.handle, counts, &items);
                stream_error(
                    StreamErrorCondition::Conflict,
                    "this session was resumed on another connection",
                )
            }
            Ending::Shutdown => {
                if self.can_hibernate() {
                    info!(%jid, "shutting down: the session hibernates");
                    self.hibernate().await;
                } else {
                    self.end();
                }
                stream_error(
                    StreamErrorCondition::SystemShutdown,
                    "the server is stopping; resume or log in again",
                )
            }
        }
    }

    /// The client is gone but may resume: ask sm to take the session, keep what it
    /// still sends until it answers `collect`, then hand everything over.
    async fn hibernate(&mut self) {
        crate::metrics::M.sessions.by("hibernated").inc();
        self.shared.hibernate(&self.handle);
        let sent = self.sm.as_ref().map_or(0, |sm| sm.unacked());
        let counts = self.counts(sent);
        // What sm sent and the relay did not read yet is read below, in order: a
        // `collect` among it must not be missed.
        let mut items = self.undelivered_here();
        let deadline = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.from_sm.recv()).await {
                Ok(Ok(message)) => match *message {
                    ToClient::Stanza(item) => items.push(item),
                    ToClient::Collect => {
                        debug!(jid = %self.handle.jid, queued = items.len(), "session handed to sm");
                        self.shared.park(&self.handle, counts, &items);
                        return;
                    }
                    ToClient::End(..) => break,
                },
                Ok(Err(_)) | Err(_) => {
                    warn!(jid = %self.handle.jid, "sm did not take the hibernating session: ending it");
                    break;
                }
            }
        }
        self.lost.append(&mut items);
        self.end();
    }

    /// Ends the session at sm, returning what its client did not get; how many.
    ///
    /// The session leaves the table first, then its channel is emptied: a stanza sm
    /// sends meanwhile finds no session and goes back to sm (`Shared::sm_packet`)
    /// rather than into a channel nobody reads.
    fn end(&mut self) -> usize {
        let known = self.shared.forget(&self.handle);
        let items = self.undelivered();
        self.shared.tell_end(&self.handle, known, &items);
        items.len()
    }
}

/// Whether a stream ended because its client vanished (the connection broke, or it
/// stayed silent past the idle timeout), not because it closed or broke a rule.
fn connection_lost(close: &Close) -> bool {
    match close {
        Close::Gone(_) => true,
        Close::Error(e) => e.condition == StreamErrorCondition::ConnectionTimeout,
        Close::Closed => false,
    }
}

/// A resumption token: 16 random bytes, URL-safe base64 (a client keeps it as is).
fn new_token() -> String {
    use base64::Engine;
    let bytes: [u8; 16] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The answer to an IQ set c2s handles itself once bound: the legacy session request
/// (a no-op, RFC 6121 appendix E) and a second bind (refused).
fn own_iq(iq: &Stanza) -> Option<String> {
    let payload = children(iq).into_iter().next()?;
    let id = iq.attr("id").unwrap_or_default();
    match (payload.name.as_str(), payload.ns.as_str()) {
        ("session", NS_SESSION) => Some(result_iq(&id)),
        ("bind", NS_BIND) if iq.to().is_none() => Some(error_iq(
            &id,
            StanzaErrorCondition::NotAllowed,
            "this stream has a resource bound already",
        )),
        _ => None,
    }
}
