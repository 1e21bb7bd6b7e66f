//! State shared by every client connection of this c2s process: configuration, TLS,
//! storage client, the router link, the table of sessions by id, and the shutdown signal.
//! The packets of the session protocol with sm are `protocol.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use jrs_component::{fanout, Outbox, TopLevel};
use jrs_stream::{Stanza, StanzaErrorCondition, StreamErrorCondition};
use jrs_xdb::XdbClient;

use crate::auth_failures::AuthFailures;
use crate::config::C2sConfig;
use crate::negotiation;
use crate::protocol::{
    self, Answer, Counts, Item, Lost, Resumption, SessionHandle, ToClient, ToClientSender,
};
use crate::session::stream_management::AckPolicy;
use crate::tls::Tls;

/// Bytes read from a client at a time (stanzas are usually far smaller, and most clients
/// are idle: memory per connection).
const CLIENT_READ_SIZE: usize = 1024;

/// How long a session whose sm instance went away waits for one to restore it on, and
/// then how long sm may take to answer `restore`: past either, the client gets
/// `<reset/>` and logs in again (docs/c2s.md, "When sm or the router restarts").
const SM_WAIT: Duration = Duration::from_secs(60);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Shared {
    pub config: C2sConfig,
    /// The certificates and TLS settings new connections get (replaced on SIGHUP).
    tls: std::sync::RwLock<Tls>,
    /// This instance's component name (`c2s`, `c2s-2`).
    pub me: String,
    pub xdb: XdbClient,
    /// What stream negotiation offers and accepts.
    pub negotiation: negotiation::Settings,
    router: Mutex<Option<Outbox>>,
    sessions: Mutex<HashMap<String, Arc<SessionHandle>>>,
    /// The hosts each connected sm instance bound a `session` route for (link notices):
    /// where a session whose sm went away can be restored.
    sm_hosts: Mutex<HashMap<String, HashSet<String>>>,
    /// Session ids are `{boot}-{n}`: a restarted c2s never reuses the ids of its
    /// previous run, which sm may still hold (a resumption waiting for a `park`).
    boot: String,
    next_sid: AtomicU64,
    /// Sessions relaying or ending on a connection (`session::Live`): a stopping process
    /// waits for them, as one may be between leaving the table and telling sm.
    relays: AtomicUsize,
    /// Set on SIGTERM: every session ends (or hibernates) and new streams are refused.
    shutdown: watch::Sender<bool>,
}

impl Shared {
    /// The TLS settings for a new connection.
    pub fn tls(&self) -> Tls {
        self.tls.read().expect("tls lock").clone()
    }

    /// Reads the certificates again (SIGHUP): new connections get them, open ones keep
    /// theirs. On an error the old ones stay.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        let tls = crate::tls::load(&self.config.hosts, self.config.compact_tls_records)?;
        *self.tls.write().expect("tls lock") = tls;
        Ok(())
    }

    pub fn new(config: C2sConfig, tls: Tls, me: String) -> Shared {
        Shared {
            xdb: XdbClient::new(me.clone(), Duration::from_secs(5)),
            negotiation: negotiation::Settings {
                hosts: config.hosts.iter().map(|h| h.name.clone()).collect(),
                require_tls: config.require_tls,
                mechanisms: config.mechanisms.clone(),
                register: config.register,
                attempts: config.auth_attempts,
                stream_management: config.stream_management.enabled,
                csi: config.csi.enabled,
                failures: Arc::new(AuthFailures::new(config.auth_failures, config.auth_window)),
                caps: Arc::default(),
                sasl2: config.sasl2,
                fast: config.fast.enabled.then_some(config.fast.token_lifetime),
            },
            config,
            tls: std::sync::RwLock::new(tls),
            me,
            router: Mutex::new(None),
            sessions: Mutex::new(HashMap::new()),
            sm_hosts: Mutex::default(),
            boot: format!("{:08x}", rand::random::<u32>()),
            next_sid: AtomicU64::new(1),
            relays: AtomicUsize::new(0),
            shutdown: watch::channel(false).0,
        }
    }

    /// What each client connection is allowed.
    pub fn connection_settings(&self) -> jrs_sx::connection::Settings {
        jrs_sx::connection::Settings {
            limits: self.config.limits,
            read_size: CLIENT_READ_SIZE,
            idle: self.config.idle_timeout,
            rate_bytes: self.config.rate_bytes,
            traffic: Some(&crate::metrics::M.traffic),
        }
    }

    /// Sends bytes to the router; false while the link is down.
    pub fn send(&self, bytes: impl Into<Bytes>) -> bool {
        match &*self.router.lock().expect("router lock") {
            Some(outbox) => outbox.send(bytes),
            None => false,
        }
    }

    /// When sessions ask their clients for acknowledgements.
    pub fn ack_policy(&self) -> AckPolicy {
        let sm = &self.config.stream_management;
        AckPolicy {
            every: sm.ack_every,
            after: sm.ack_after,
        }
    }

    /// A receiver that sees `true` once the process is shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// SIGTERM: tells every session to end or hibernate, then waits (at most `limit`)
    /// until they have told sm.
    pub async fn shut_down(&self, limit: Duration) {
        self.shutdown.send_replace(true);
        // New clients go to another instance sharing our ports, if one runs.
        jrs_component::transport::stop_accepting();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Sessions whose client left while their sm was away wait for a restore that
            // may never come before the stop: not waited for (what they hold is dropped).
            let (sessions, leaving) = {
                let sessions = self.sessions.lock().expect("sessions lock");
                let leaving = sessions.values().filter(|h| h.ends_after_restore()).count();
                (sessions.len() - leaving, leaving)
            };
            let left = sessions + self.relays.load(Ordering::Acquire);
            if left == 0 {
                if leaving > 0 {
                    warn!(sessions = leaving, "sessions of clients that left while their sm was away end unrestored: what they sent is dropped");
                }
                // The last `park`s and `end`s are queued for the router: written before
                // the process exits, or what they carry would be lost.
                let outbox = self.router.lock().expect("router lock").clone();
                if let Some(outbox) = outbox {
                    let _ = tokio::time::timeout_at(deadline, outbox.flushed()).await;
                }
                info!("every session ended or handed to sm");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(sessions = left, "stop timeout: sessions still open");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A session's relay starts (its guard ends it).
    pub fn relay_started(self: &Arc<Self>) -> RelayGuard {
        self.relays.fetch_add(1, Ordering::AcqRel);
        RelayGuard(self.clone())
    }

    fn new_sid(&self) -> String {
        let n = self.next_sid.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.boot)
    }

    fn register(
        &self,
        jid: &str,
        bare: &str,
        to_client: ToClientSender,
    ) -> (Arc<SessionHandle>, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        let handle = Arc::new(SessionHandle::new(
            self.new_sid(),
            jid.to_owned(),
            bare.to_owned(),
            to_client,
            tx,
        ));
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(handle.sid.clone(), handle.clone());
        (handle, rx)
    }

    /// Registers a new session and asks sm to start it; resolves with sm's answer.
    pub fn start_session(
        &self,
        jid: &str,
        bare: &str,
        to_client: ToClientSender,
    ) -> (Arc<SessionHandle>, oneshot::Receiver<Answer>) {
        let (handle, rx) = self.register(jid, bare, to_client);
        self.send(protocol::packet(&self.me, "start", &handle, &[], b""));
        (handle, rx)
    }

    /// Asks sm to resume the session `token` of `bare` on a new session id here; resolves
    /// with the session's full JID, counts and queue, or a refusal.
    pub fn resume_session(
        &self,
        bare: &str,
        token: &str,
        to_client: ToClientSender,
    ) -> (Arc<SessionHandle>, oneshot::Receiver<Answer>) {
        // The full JID is sm's to tell: until then the handle names the bare JID.
        let (handle, rx) = self.register(bare, bare, to_client);
        self.send(protocol::packet(
            &self.me,
            "resume",
            &handle,
            &[("previd", token)],
            b"",
        ));
        (handle, rx)
    }

    /// Takes a session out of the table; false when it was not there.
    pub fn forget(&self, handle: &SessionHandle) -> bool {
        self.sessions
            .lock()
            .expect("sessions lock")
            .remove(&handle.sid)
            .is_some()
    }

    /// Forgets a session sm refused (no `end` to send).
    pub fn drop_session(&self, handle: &SessionHandle) {
        self.forget(handle);
    }

    /// Ends a session whose client went away, telling sm, with what the client did not
    /// receive (sm stores it offline, gives it to another session, or bounces it). Sent
    /// for a session sm ended already too when there is something to return.
    pub fn end_session(&self, handle: &Arc<SessionHandle>, undelivered: &[Item]) {
        let known = self.forget(handle);
        self.tell_end(handle, known, undelivered);
    }

    /// Tells sm that a session taken out of the table (`known`: it was in it) ended,
    /// with what its client did not receive. A session whose sm is away ends after its
    /// restore instead ([`Shared::end_after_restore`]).
    pub fn tell_end(&self, handle: &Arc<SessionHandle>, known: bool, undelivered: &[Item]) {
        if known && !self.shutting_down() && self.end_after_restore(handle, undelivered) {
            return;
        }
        if let Some(Lost::Waiting { held, .. }) = handle.kept().lost.take() {
            if !held.is_empty() {
                warn!(jid = %handle.jid, held = held.len(), "session ended while its sm was away and c2s stops: what its client sent meanwhile is dropped");
            }
        }
        if known || !undelivered.is_empty() {
            let items = protocol::items(undelivered);
            self.send(protocol::packet(&self.me, "end", handle, &[], &items));
        }
    }

    /// The client of a session waiting for its sm left: the session goes back into the
    /// table to be restored like the others, and its `end` follows the restore and what
    /// the client sent meanwhile (which sm must deliver: the client may have had it
    /// acknowledged). Contacts see it go then. False when the session is not waiting.
    fn end_after_restore(&self, handle: &Arc<SessionHandle>, undelivered: &[Item]) -> bool {
        {
            let mut kept = handle.kept();
            let Some(Lost::Waiting { held, ending, .. }) = &mut kept.lost else {
                return false;
            };
            info!(jid = %handle.jid, held = held.len(), "session ended while its sm was away: it ends after its restore");
            ending
                .get_or_insert_with(Vec::new)
                .extend_from_slice(undelivered);
        }
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(handle.sid.clone(), handle.clone());
        // An sm instance may have come back meanwhile.
        self.restore_waiting();
        true
    }

    /// The client of a resumable session is gone: sm stops sending and answers
    /// `collect` (the relay then calls [`Shared::park`]).
    pub fn hibernate(&self, handle: &SessionHandle) {
        self.send(protocol::packet(&self.me, "hibernate", handle, &[], b""));
    }

    /// Hands a session to sm to keep until it is resumed or times out: its counts and
    /// what the client has not acknowledged or received.
    pub fn park(&self, handle: &SessionHandle, counts: Counts, items: &[Item]) {
        self.forget(handle);
        let sm = &self.config.stream_management;
        let (received, acked, sent) = (
            counts.received.to_string(),
            counts.acked.to_string(),
            counts.sent.to_string(),
        );
        let (timeout, max) = (
            sm.hibernate.as_secs_f64().to_string(),
            sm.max_queue.to_string(),
        );
        self.send(protocol::packet(
            &self.me,
            "park",
            handle,
            &[
                ("h", &received),
                ("acked", &acked),
                ("sent", &sent),
                ("timeout", &timeout),
                ("max", &max),
            ],
            &protocol::items(items),
        ));
    }

    /// The session may be resumed with `token`.
    pub fn resumable(&self, handle: &SessionHandle, token: &str) {
        self.send(protocol::packet(
            &self.me,
            "resumable",
            handle,
            &[("token", token)],
            b"",
        ));
    }

    /// The client has `count` more of the offline messages sm gave this session.
    pub fn delivered(&self, handle: &SessionHandle, count: usize) {
        if count > 0 {
            self.send(protocol::packet(
                &self.me,
                "delivered",
                handle,
                &[("count", &count.to_string())],
                b"",
            ));
        }
    }

    /// The `session` packet carrying a client's stanza to sm; held while the session's
    /// sm is away (false past [`protocol::HELD_MAX`], or while the router link is down).
    pub fn client_stanza(&self, handle: &SessionHandle, stanza: &[u8]) -> bool {
        let packet = protocol::packet(&self.me, "stanza", handle, &[], stanza);
        let mut kept = handle.kept();
        match &mut kept.lost {
            Some(Lost::Waiting { held, .. }) if held.len() < protocol::HELD_MAX => {
                held.push(packet);
                true
            }
            Some(Lost::Waiting { .. }) => false,
            // Under the lock: a restore and what was held go out before this.
            _ => self.send(packet),
        }
    }

    /// Serves the router link until it drops.
    pub async fn serve_router(
        &self,
        mut reader: jrs_component::ComponentReader,
        outbox: Outbox,
    ) -> anyhow::Result<()> {
        *self.router.lock().expect("router lock") = Some(outbox.clone());
        self.xdb.set_outbox(outbox.clone());
        let caps = &self.negotiation.caps;
        caps.ask(&outbox, &self.me, &self.negotiation.hosts);
        loop {
            let stanza = match reader.next().await {
                Ok(stanza) => stanza,
                Err(e) => {
                    self.link_lost();
                    return Err(e);
                }
            };
            match TopLevel::classify(stanza.name()) {
                _ if stanza.name() == "xdb" => {
                    self.xdb.answer(&stanza);
                }
                _ if stanza.name() == "session" => self.sm_packet(&stanza),
                _ if stanza.name() == "iq" && caps.answered(&stanza) => {}
                TopLevel::Notice => {
                    // A component that connects may be an sm with other modules.
                    if stanza.attr("event").as_deref() == Some("connected") {
                        caps.ask(&outbox, &self.me, &self.negotiation.hosts);
                    }
                    self.notice(&stanza)
                }
                _ => {
                    // Nothing else is addressed to c2s itself.
                    if let Some(reply) = stanza.error_reply(
                        StanzaErrorCondition::ServiceUnavailable,
                        "the client connection manager offers no services",
                    ) {
                        outbox.send(reply);
                    }
                }
            }
        }
    }

    fn sm_packet(&self, packet: &Stanza) {
        if packet.kind() == Some("fanout") {
            return self.sm_fanout(packet);
        }
        let sid = packet.attr("sid").unwrap_or_default();
        let handle = {
            let sessions = self.sessions.lock().expect("sessions lock");
            let handle = sessions.get(&sid);
            if let (Some(handle), Some("stanza")) = (handle, packet.kind()) {
                // Into the session's channel under the table's lock: an ending session
                // leaves the table before it empties its channel, so a stanza is either
                // in the channel by then or finds no session (and goes back to sm).
                let item = protocol::stanza_item(packet);
                if let Some(Lost::Waiting {
                    ending: Some(undelivered),
                    ..
                }) = &mut handle.kept().lost
                {
                    // Its client left: back to sm with the session's `end` (checked
                    // before sending: the ended relay may not have dropped its channel
                    // yet, and nobody reads it any more).
                    undelivered.push(item);
                    return;
                }
                match handle
                    .to_client
                    .unbounded_send(Box::new(ToClient::Stanza(item)))
                {
                    Ok(()) => return,
                    // Nobody reads that channel any more (a session ending after its
                    // restore): back to sm as for a session we no longer have, below.
                    Err(_) => None,
                }
            } else {
                handle.cloned()
            }
        };
        let Some(handle) = handle else {
            if packet.kind() == Some("end") {
                let returned = protocol::queued_items(packet).len();
                if returned > 0 {
                    // sm refused or did not know a session that ended after its client
                    // left (a restore refused): what the client sent cannot go now.
                    warn!(
                        sid,
                        jid = packet.attr("jid").unwrap_or_default(),
                        returned,
                        "client stanzas returned for a session that ended: dropped"
                    );
                }
            }
            // Only live traffic is answered: never an `end` or a bounced packet (an
            // error), which could loop between us and the router.
            if matches!(packet.kind(), Some("stanza" | "started" | "resumed")) {
                // A session we no longer have: tell sm it ended, returning what it sent.
                debug!(sid, "packet for an unknown session");
                let jid = packet.attr("jid").unwrap_or_default();
                let gone = SessionHandle::gone(sid, jid);
                let undelivered = match packet.kind() {
                    Some("stanza") => protocol::items(&[protocol::stanza_item(packet)]),
                    Some("resumed") => protocol::items(&protocol::queued_items(packet)),
                    _ => vec![],
                };
                self.send(protocol::packet(&self.me, "end", &gone, &[], &undelivered));
            }
            return;
        };
        let to_client = |message: ToClient| {
            let _ = handle.to_client.unbounded_send(Box::new(message));
        };
        match packet.kind() {
            Some("started") => {
                handle.set_sm(packet.from());
                handle.answer(Answer::Started);
            }
            Some("resumed") => {
                let Some(jid) = packet.attr("jid") else {
                    return;
                };
                // Only the session of the user who asked: never another user's queue.
                let bare = jid.split('/').next().unwrap_or_default();
                if !bare.eq_ignore_ascii_case(&handle.bare) {
                    warn!(sid, asked = %handle.bare, got = %bare, "resumed: a session of another user; returned");
                    let gone = SessionHandle::gone(sid, jid.clone());
                    let items = protocol::items(&protocol::queued_items(packet));
                    self.send(protocol::packet(&self.me, "end", &gone, &[], &items));
                    return;
                }
                // The handle now names the session's full JID.
                let resumed = Arc::new(handle.with_jid(jid, packet.from()));
                // What sm knows of the session, to tell it again should it lose it.
                resumed.kept().state = protocol::SessionState::decode(packet);
                self.sessions
                    .lock()
                    .expect("sessions lock")
                    .insert(sid, resumed.clone());
                let count = |name| {
                    packet
                        .attr(name)
                        .and_then(|v| v.parse::<u32>().ok())
                        .unwrap_or(0)
                };
                handle.answer(Answer::Resumed(Resumption {
                    handle: resumed,
                    received: count("h"),
                    acked: count("acked"),
                    sent: count("sent"),
                    items: protocol::queued_items(packet),
                }));
            }
            Some("collect") => to_client(ToClient::Collect),
            Some("restored") => {
                let mut kept = handle.kept();
                if matches!(kept.lost, Some(Lost::Restoring { .. })) {
                    kept.lost = None;
                    handle.set_sm(packet.from());
                    info!(jid = %handle.jid, sm = packet.from().unwrap_or(""), "session restored");
                    crate::metrics::M.sessions.by("restored").inc();
                }
            }
            Some("error") if matches!(handle.kept().lost, Some(Lost::Waiting { .. })) => {
                // Sent before we heard that sm went away, and bounced: the client's
                // stanza is lost (the router held it past its grace period).
                debug!(jid = %handle.jid, "a packet for a session waiting for its sm bounced");
            }
            Some("end")
                if handle.kept().lost.is_some()
                    && protocol::first_element_name(packet.inner()).as_deref() == Some("reset") =>
            {
                // The new sm did not know the session yet: what it returns was sent
                // before we heard that its sm went away. Sent again after the restore.
                self.send_again(&handle, protocol::queued_items(packet));
            }
            _ if handle.kept().lost.is_some() && matches!(packet.kind(), Some("error" | "end")) => {
                // No sm could restore the session (or one refused): log in again.
                info!(jid = %handle.jid, kind = packet.kind().unwrap_or(""), "session not restored: reset");
                self.reset(&handle);
            }
            Some("error") => {
                // The router bounced what we sent for this session: no sm is reachable.
                self.forget(&handle);
                if handle.answer(Answer::Refused("service-unavailable".into())) {
                    return;
                }
                to_client(ToClient::End(
                    StreamErrorCondition::InternalServerError,
                    "the session manager is unavailable".into(),
                ));
            }
            Some("end") => {
                let condition = protocol::first_element_name(packet.inner());
                self.forget(&handle);
                if handle.answer(Answer::Refused(
                    condition
                        .clone()
                        .unwrap_or_else(|| "internal-server-error".into()),
                )) {
                    return;
                }
                let (cond, text) = match condition.as_deref() {
                    Some("conflict") => (
                        StreamErrorCondition::Conflict,
                        "replaced by a new session of the same resource",
                    ),
                    Some("not-authorized") => (
                        StreamErrorCondition::NotAuthorized,
                        "the account was removed",
                    ),
                    Some("reset") => (
                        StreamErrorCondition::Reset,
                        "the session manager restarted: log in again",
                    ),
                    Some("policy-violation") => (
                        StreamErrorCondition::PolicyViolation,
                        "disconnected by an administrator",
                    ),
                    _ => (
                        StreamErrorCondition::InternalServerError,
                        "the session manager ended the session",
                    ),
                };
                to_client(ToClient::End(cond, text.into()));
            }
            other => warn!(kind = ?other, "unknown session packet type"),
        }
    }

    /// `<session type='fanout'>`: one stanza (a room's broadcast) for several sessions,
    /// each `<r to='JID' sid='..'/>`; every session gets the stanza addressed to its JID,
    /// as if sm had sent it a `stanza` packet. A session we no longer have is ended
    /// towards sm with its copy, as for a `stanza` packet.
    fn sm_fanout(&self, packet: &Stanza) {
        let f = match fanout::parse(packet.inner()) {
            Ok(f) => f,
            Err(e) => {
                warn!(from = packet.from().unwrap_or(""), error = %e, "malformed fan-out packet from sm ignored");
                return;
            }
        };
        let mut gone = vec![];
        {
            let sessions = self.sessions.lock().expect("sessions lock");
            for r in &f.recipients {
                let sid = r.sid.unwrap_or("");
                let item = Item {
                    bytes: fanout::addressed(&f.stanza, r.to),
                    offline: false,
                };
                match sessions.get(sid) {
                    // Under the table's lock, as in `sm_packet`.
                    Some(handle) => {
                        let _ = handle
                            .to_client
                            .unbounded_send(Box::new(ToClient::Stanza(item)));
                    }
                    None => gone.push((sid.to_owned(), r.to, item)),
                }
            }
        }
        for (sid, to, item) in gone {
            debug!(sid, "fan-out for an unknown session");
            let jid = jrs_stream::xml::unescape(to).unwrap_or_default();
            let handle = SessionHandle::gone(sid, jid.into_owned());
            let undelivered = protocol::items(&[item]);
            self.send(protocol::packet(
                &self.me,
                "end",
                &handle,
                &[],
                &undelivered,
            ));
        }
    }

    /// Link notices: which sm instances serve which hosts; when one disconnects, the
    /// sessions it held wait for an instance to restore them on (docs/c2s.md).
    fn notice(&self, notice: &Stanza) {
        let Some(name) = notice.attr("name") else {
            return;
        };
        let session_route = notice.attr("route").as_deref() == Some("session");
        let host = notice.attr("host").unwrap_or_default();
        match notice.attr("event").as_deref() {
            Some("bound") if session_route => {
                self.sm_hosts
                    .lock()
                    .expect("sm hosts lock")
                    .entry(name)
                    .or_default()
                    .insert(host);
                self.restore_waiting();
            }
            Some("unbound") if session_route => {
                if let Some(hosts) = self.sm_hosts.lock().expect("sm hosts lock").get_mut(&name) {
                    hosts.remove(&host);
                }
            }
            Some("disconnected") => {
                self.sm_hosts.lock().expect("sm hosts lock").remove(&name);
                let lost = self.suspend(|h| h.sm().as_deref() == Some(name.as_str()));
                if lost > 0 {
                    info!(sm = %name, sessions = lost, "session manager instance went away: its sessions wait to be restored");
                }
                // Another instance may serve their users now.
                self.restore_waiting();
            }
            _ => {}
        }
    }

    /// Our router link dropped: every session's sm will have lost it (sm keeps sessions
    /// over its own link's loss only until their c2s restores them). Restored once the
    /// link is back and an sm instance is bound.
    fn link_lost(&self) {
        self.sm_hosts.lock().expect("sm hosts lock").clear();
        // Sessions being restored too: their `restore` may be lost with the link.
        let lost = self
            .suspend(|h| h.sm().is_some() || matches!(h.kept().lost, Some(Lost::Restoring { .. })));
        if lost > 0 {
            info!(
                sessions = lost,
                "router link lost: sessions wait to be restored"
            );
        }
    }

    /// Marks the sessions `which` picks as lost by their sm; how many.
    fn suspend(&self, which: impl Fn(&SessionHandle) -> bool) -> usize {
        let sessions = self.sessions.lock().expect("sessions lock");
        let mut n = 0;
        for h in sessions.values().filter(|h| which(h)) {
            h.set_sm(None);
            let mut kept = h.kept();
            if !matches!(kept.lost, Some(Lost::Waiting { .. })) {
                kept.lost = Some(Lost::Waiting {
                    since: std::time::Instant::now(),
                    held: vec![],
                    ending: None,
                });
            }
            n += 1;
        }
        n
    }

    /// Sends `restore` for every waiting session whose host an sm instance serves now,
    /// then what its client sent meanwhile.
    fn restore_waiting(&self) {
        let hosts: HashSet<String> = self
            .sm_hosts
            .lock()
            .expect("sm hosts lock")
            .values()
            .flatten()
            .cloned()
            .collect();
        if hosts.is_empty() {
            return;
        }
        let waiting: Vec<Arc<SessionHandle>> = self
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .filter(|h| hosts.contains(h.domain()))
            .filter(|h| matches!(h.kept().lost, Some(Lost::Waiting { .. })))
            .cloned()
            .collect();
        if waiting.is_empty() {
            return;
        }
        info!(
            sessions = waiting.len(),
            "restoring sessions at the session manager"
        );
        for h in waiting {
            let mut kept = h.kept();
            let Some(Lost::Waiting { held, ending, .. }) = kept.lost.take() else {
                continue;
            };
            let (attrs, content) = kept.state.encode();
            let attrs: Vec<(&str, &str)> = attrs.iter().map(|(n, v)| (*n, v.as_str())).collect();
            self.send(protocol::packet(&self.me, "restore", &h, &attrs, &content));
            for packet in held {
                self.send(packet);
            }
            match ending {
                Some(undelivered) => {
                    drop(kept);
                    self.forget(&h);
                    let items = protocol::items(&undelivered);
                    self.send(protocol::packet(&self.me, "end", &h, &[], &items));
                    info!(jid = %h.jid, "session restored to end it: its client had left");
                }
                None => {
                    kept.lost = Some(Lost::Restoring {
                        since: std::time::Instant::now(),
                    })
                }
            }
        }
    }

    /// Client stanzas sm returned for a session being restored: before what is held
    /// (they were sent first), or after the `restore` that went out already.
    fn send_again(&self, handle: &SessionHandle, items: Vec<Item>) {
        if items.is_empty() {
            return;
        }
        debug!(jid = %handle.jid, stanzas = items.len(), "returned by sm before the restore: sent again");
        let packets = items
            .iter()
            .map(|i| protocol::packet(&self.me, "stanza", handle, &[], &i.bytes));
        let mut kept = handle.kept();
        match &mut kept.lost {
            Some(Lost::Waiting { held, .. }) => {
                let later = std::mem::take(held);
                held.extend(packets);
                held.extend(later);
            }
            _ => {
                for p in packets {
                    self.send(p);
                }
            }
        }
    }

    /// Ends session `handle` with `<reset/>`: its client logs in again.
    fn reset(&self, handle: &SessionHandle) {
        let (held, undelivered) = match self.forget_kept(handle) {
            Some(Lost::Waiting { held, ending, .. }) => (held.len(), ending.map_or(0, |e| e.len())),
            _ => (0, 0),
        };
        if held + undelivered > 0 {
            warn!(jid = %handle.jid, held, undelivered, "stanzas held for a session that was not restored are dropped");
        }
        let _ = handle.to_client.unbounded_send(Box::new(ToClient::End(
            StreamErrorCondition::Reset,
            "the session manager restarted: log in again".into(),
        )));
    }

    /// Takes a session out of the table, with what it waited for.
    fn forget_kept(&self, handle: &SessionHandle) -> Option<Lost> {
        self.forget(handle);
        handle.kept().lost.take()
    }

    /// Every second: sessions that waited too long for an sm, or for sm's answer to
    /// `restore`, are reset (their clients log in again).
    pub async fn watch_restores(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let late: Vec<Arc<SessionHandle>> = self
                .sessions
                .lock()
                .expect("sessions lock")
                .values()
                .filter(|h| match &h.kept().lost {
                    Some(Lost::Waiting { since, .. }) => since.elapsed() > SM_WAIT,
                    Some(Lost::Restoring { since }) => since.elapsed() > RESTORE_TIMEOUT,
                    None => false,
                })
                .cloned()
                .collect();
            for h in late {
                warn!(jid = %h.jid, "no session manager restored the session: reset");
                self.reset(&h);
            }
        }
    }
}

/// Counts a session's relay while it lives ([`Shared::relay_started`]).
pub struct RelayGuard(Arc<Shared>);

impl Drop for RelayGuard {
    fn drop(&mut self) {
        self.0.relays.fetch_sub(1, Ordering::AcqRel);
    }
}
