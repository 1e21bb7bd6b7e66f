//! State shared by every client connection of this c2s process: configuration, TLS,
//! storage client, the router link, and the table of sessions by id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use jrs_component::{Outbox, TopLevel};
use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StanzaErrorCondition, StreamErrorCondition};
use jrs_xdb::XdbClient;

use crate::auth_failures::AuthFailures;
use crate::config::C2sConfig;
use crate::negotiation;
use crate::tls::Tls;

/// Bytes read from a client at a time (stanzas are usually far smaller, and most clients
/// are idle: memory per connection).
const CLIENT_READ_SIZE: usize = 1024;

/// What the router side hands a client connection.
pub enum ToClient {
    /// A stanza to write to the client as it is.
    Stanza(Bytes),
    /// sm ended the session: send this stream error and close.
    End(StreamErrorCondition, String),
}

/// sm's answer to a session start: the sm instance, or the condition of its refusal.
pub type Started = Result<String, String>;

/// One bound client session.
pub struct SessionHandle {
    pub sid: String,
    pub jid: String,
    pub bare: String,
    /// Boxed: a channel allocates its slots 32 at a time, and an idle client should cost
    /// 32 pointers there.
    pub to_client: mpsc::UnboundedSender<Box<ToClient>>,
    /// Resolved by sm's `started` (or `end`) answer.
    started: Mutex<Option<oneshot::Sender<Started>>>,
    /// The sm instance holding the session.
    sm: Mutex<Option<String>>,
}

pub struct Shared {
    pub config: C2sConfig,
    pub tls: Tls,
    /// This instance's component name (`c2s`, `c2s-2`).
    pub me: String,
    pub xdb: XdbClient,
    /// What stream negotiation offers and accepts.
    pub negotiation: negotiation::Settings,
    router: Mutex<Option<Outbox>>,
    sessions: Mutex<HashMap<String, Arc<SessionHandle>>>,
    next_sid: AtomicU64,
}

impl Shared {
    pub fn new(config: C2sConfig, tls: Tls, me: String) -> Shared {
        Shared {
            xdb: XdbClient::new(me.clone(), Duration::from_secs(5)),
            negotiation: negotiation::Settings {
                hosts: config.hosts.iter().map(|h| h.name.clone()).collect(),
                require_tls: config.require_tls,
                mechanisms: config.mechanisms.clone(),
                register: config.register,
                attempts: config.auth_attempts,
                stream_management: false,
                csi: false,
                failures: Arc::new(AuthFailures::new(config.auth_failures, config.auth_window)),
            },
            config,
            tls,
            me,
            router: Mutex::new(None),
            sessions: Mutex::new(HashMap::new()),
            next_sid: AtomicU64::new(1),
        }
    }

    /// What each client connection is allowed.
    pub fn connection_settings(&self) -> jrs_sx::connection::Settings {
        jrs_sx::connection::Settings {
            limits: self.config.limits,
            read_size: CLIENT_READ_SIZE,
            idle: self.config.idle_timeout,
            rate_bytes: self.config.rate_bytes,
        }
    }

    /// Sends bytes to the router; false while the link is down.
    pub fn send(&self, bytes: impl Into<Bytes>) -> bool {
        match &*self.router.lock().expect("router lock") {
            Some(outbox) => outbox.send(bytes),
            None => false,
        }
    }

    /// The `<session/>` packet for `handle`, wrapping `content` (a stanza) if any.
    pub fn session_packet(&self, kind: &str, handle: &SessionHandle, content: &[u8]) -> Bytes {
        let head = format!(
            "<session type='{kind}' to='{}' from='{}' jid='{}' sid='{}'",
            escape(&handle.bare),
            escape(&self.me),
            escape(&handle.jid),
            escape(&handle.sid)
        );
        jrs_stream::xml::element(&head, "session", content)
    }

    /// Registers a new session and asks sm to start it; resolves with sm's answer.
    pub fn start_session(
        &self,
        jid: &str,
        bare: &str,
        to_client: mpsc::UnboundedSender<Box<ToClient>>,
    ) -> (Arc<SessionHandle>, oneshot::Receiver<Started>) {
        let sid = format!("{}", self.next_sid.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        let handle = Arc::new(SessionHandle {
            sid: sid.clone(),
            jid: jid.to_owned(),
            bare: bare.to_owned(),
            to_client,
            started: Mutex::new(Some(tx)),
            sm: Mutex::new(None),
        });
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(sid, handle.clone());
        self.send(self.session_packet("start", &handle, b""));
        (handle, rx)
    }

    /// Forgets a session whose client went away, telling sm.
    pub fn end_session(&self, handle: &SessionHandle) {
        if self
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(&handle.sid)
            .is_some()
        {
            self.send(self.session_packet("end", handle, b""));
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
        loop {
            let stanza = reader.next().await?;
            match TopLevel::classify(stanza.name()) {
                _ if stanza.name() == "xdb" => {
                    self.xdb.answer(&stanza);
                }
                _ if stanza.name() == "session" => self.sm_packet(&stanza),
                TopLevel::Notice => self.notice(&stanza),
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
        let sid = packet.attr("sid").unwrap_or_default();
        let handle = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(&sid)
            .cloned();
        let Some(handle) = handle else {
            // Only live traffic is answered: never an `end` or a bounced packet (an
            // error), which could loop between us and the router.
            if matches!(packet.kind(), Some("stanza" | "started")) {
                // A session we no longer have: tell sm it ended.
                debug!(sid, "packet for an unknown session");
                let jid = packet.attr("jid").unwrap_or_default();
                let bare = jid.split('/').next().unwrap_or("").to_owned();
                let gone = SessionHandle {
                    sid,
                    jid,
                    bare,
                    to_client: mpsc::unbounded_channel().0,
                    started: Mutex::new(None),
                    sm: Mutex::new(None),
                };
                self.send(self.session_packet("end", &gone, b""));
            }
            return;
        };
        match packet.kind() {
            Some("started") => {
                *handle.sm.lock().expect("sm lock") = packet.from().map(str::to_owned);
                if let Some(tx) = handle.started.lock().expect("started lock").take() {
                    let _ = tx.send(Ok(packet.from().unwrap_or("").to_owned()));
                }
            }
            Some("stanza") => {
                let _ = handle
                    .to_client
                    .send(Box::new(ToClient::Stanza(Bytes::copy_from_slice(
                        packet.inner(),
                    ))));
            }
            Some("error") => {
                // The router bounced what we sent for this session: no sm is reachable.
                self.sessions
                    .lock()
                    .expect("sessions lock")
                    .remove(&handle.sid);
                if let Some(tx) = handle.started.lock().expect("started lock").take() {
                    let _ = tx.send(Err("service-unavailable".into()));
                    return;
                }
                let _ = handle.to_client.send(Box::new(ToClient::End(
                    StreamErrorCondition::InternalServerError,
                    "the session manager is unavailable".into(),
                )));
            }
            Some("end") => {
                let condition = first_element_name(packet.inner());
                self.sessions
                    .lock()
                    .expect("sessions lock")
                    .remove(&handle.sid);
                if let Some(tx) = handle.started.lock().expect("started lock").take() {
                    let _ = tx.send(Err(
                        condition.unwrap_or_else(|| "internal-server-error".into())
                    ));
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
                    _ => (
                        StreamErrorCondition::InternalServerError,
                        "the session manager ended the session",
                    ),
                };
                let _ = handle
                    .to_client
                    .send(Box::new(ToClient::End(cond, text.into())));
            }
            other => warn!(kind = ?other, "unknown session packet type"),
        }
    }

    /// A component disconnected: the sessions its sm instance held are gone.
    fn notice(&self, notice: &Stanza) {
        if notice.attr("event").as_deref() != Some("disconnected") {
            return;
        }
        let Some(name) = notice.attr("name") else {
            return;
        };
        let lost: Vec<Arc<SessionHandle>> = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            let ids: Vec<String> = sessions
                .values()
                .filter(|h| h.sm.lock().expect("sm lock").as_deref() == Some(name.as_str()))
                .map(|h| h.sid.clone())
                .collect();
            ids.iter().filter_map(|id| sessions.remove(id)).collect()
        };
        if !lost.is_empty() {
            info!(sm = %name, sessions = lost.len(), "session manager instance went away: closing its clients' streams");
        }
        for h in lost {
            let _ = h.to_client.send(Box::new(ToClient::End(
                StreamErrorCondition::Reset,
                "the session manager restarted: log in again".into(),
            )));
        }
    }
}

/// The name of the first element in `content` (a condition inside `<session type='end'>`).
fn first_element_name(content: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(content).ok()?;
    let start = text.find('<')? + 1;
    let name: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '/' && *c != '>')
        .collect();
    (!name.is_empty()).then_some(name)
}
