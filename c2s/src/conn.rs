//! One client connection: stream negotiation (STARTTLS, SASL, resource binding) and then
//! the session, relaying stanzas between the client and its sm instance.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use jrs_auth::{Credentials, NS_AUTH};
use jrs_component::{FramedReader, ReadError};
use jrs_stream::header::open_stream;
use jrs_stream::validate::validate_stanza;
use jrs_stream::xml::escape;
use jrs_stream::{
    Frame, Stanza, StanzaErrorCondition, StreamError, StreamErrorCondition, StreamHeader,
};

use crate::config::TlsMode;
use crate::limits::ByteRate;
use crate::sasl::{self, ScramExchange, Step};
use crate::shared::{SessionHandle, Shared, ToClient};
use crate::stream::ClientStream;

pub const NS_CLIENT: &str = "jabber:client";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_REGISTER: &str = "jabber:iq:register";
const NS_REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";

/// Bytes read from a client at a time (stanzas are usually far smaller).
const CLIENT_READ_SIZE: usize = 1024;

/// Pause before answering a failed authentication: slows guessing, not honest users.
const FAILURE_DELAY: Duration = Duration::from_millis(300);

/// How a connection ends.
enum Close {
    /// Send this stream error (after our header, if not sent yet) and close.
    Error(StreamError),
    /// The client closed its stream: close ours.
    Closed,
    /// The connection is gone.
    Gone,
}

impl From<StreamError> for Close {
    fn from(e: StreamError) -> Close {
        Close::Error(e)
    }
}

fn stream_error(condition: StreamErrorCondition, text: impl Into<String>) -> Close {
    Close::Error(StreamError::new(condition, text))
}

struct Conn {
    shared: Arc<Shared>,
    peer: SocketAddr,
    reader: FramedReader<ClientStream>,
    /// The domain the client's stream is addressed to.
    domain: String,
    header_sent: bool,
    exporter: Option<Vec<u8>>,
    rate: ByteRate,
    last_write: Instant,
}

/// Serves one accepted TCP connection.
pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, mode: TlsMode) {
    let stream = match mode {
        TlsMode::StartTls => ClientStream::Plain(tcp),
        TlsMode::Direct => {
            let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.direct.clone());
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => ClientStream::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let exporter = stream.exporter();
    let mut conn = Conn {
        rate: ByteRate::new(shared.config.rate_bytes),
        reader: FramedReader::with_read_size(stream, shared.config.limits, CLIENT_READ_SIZE),
        shared,
        peer,
        domain: String::new(),
        header_sent: false,
        exporter,
        last_write: Instant::now(),
    };
    let close = conn.run().await;
    let last = match close {
        Close::Error(e) => {
            debug!(%peer, error = %e, "closing with a stream error");
            if !conn.header_sent {
                let _ = conn
                    .write(conn.header(&StreamHeader::default()).as_bytes())
                    .await;
            }
            Some(e.to_xml())
        }
        Close::Closed => Some("</stream:stream>".to_owned()),
        Close::Gone => None,
    };
    if let Some(last) = last {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = conn.write(last.as_bytes()).await;
            let _ = conn.reader.get_mut().shutdown().await;
        })
        .await;
        // Closing a socket with unread input resets the connection, and the reset can
        // destroy the stream error before the client reads it: read what is left first.
        drain(conn.reader.get_mut(), Duration::from_secs(1)).await;
    }
}

/// Reads and discards until the peer closes, for at most `limit`.
async fn drain<R: tokio::io::AsyncRead + Unpin>(io: &mut R, limit: Duration) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(limit, async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

impl Conn {
    async fn write(&mut self, data: &[u8]) -> Result<(), Close> {
        let io = self.reader.get_mut();
        io.write_all(data).await.map_err(|_| Close::Gone)?;
        io.flush().await.map_err(|_| Close::Gone)?;
        self.last_write = Instant::now();
        Ok(())
    }

    /// The next element, with the idle timeout and the byte rate applied.
    async fn next(&mut self) -> Result<Stanza, Close> {
        let idle = self.shared.config.idle_timeout;
        let frame = match tokio::time::timeout(idle, self.reader.next_frame()).await {
            Err(_) => {
                return Err(stream_error(
                    StreamErrorCondition::ConnectionTimeout,
                    "idle for too long",
                ))
            }
            Ok(Ok(frame)) => frame,
            Ok(Err(ReadError::Stream(e))) => return Err(e.into()),
            Ok(Err(ReadError::Closed)) | Ok(Err(ReadError::Io(_))) => return Err(Close::Gone),
        };
        let bytes = match frame {
            Frame::Element(bytes) => bytes,
            Frame::StreamClose => return Err(Close::Closed),
            Frame::StreamOpen(_) => unreachable!("a stream header is read by open_stream"),
        };
        if let Some(pause) = self.rate.take(bytes.len()) {
            tokio::time::sleep(pause).await;
        }
        validate_stanza(&bytes)?;
        Stanza::parse(bytes)
            .map_err(|e| stream_error(StreamErrorCondition::NotWellFormed, e.to_string()))
    }

    fn header(&self, _peer_header: &StreamHeader) -> String {
        let id = format!("{:016x}", rand::rng().random::<u64>());
        let from = if self.domain.is_empty() {
            self.shared.config.hosts[0].name.clone()
        } else {
            self.domain.clone()
        };
        open_stream(
            NS_CLIENT,
            &[
                ("from", &from),
                ("id", &id),
                ("version", "1.0"),
                ("xml:lang", "en"),
            ],
        )
    }

    /// Reads the client's stream header and answers with ours and `features`.
    async fn open_stream(&mut self, features: impl FnOnce(&Conn) -> String) -> Result<(), Close> {
        let idle = self.shared.config.idle_timeout;
        let frame = match tokio::time::timeout(idle, self.reader.next_frame()).await {
            Err(_) => {
                return Err(stream_error(
                    StreamErrorCondition::ConnectionTimeout,
                    "no stream header",
                ))
            }
            Ok(Ok(f)) => f,
            Ok(Err(ReadError::Stream(e))) => return Err(e.into()),
            Ok(Err(_)) => return Err(Close::Gone),
        };
        let Frame::StreamOpen(bytes) = frame else {
            return Err(stream_error(
                StreamErrorCondition::NotWellFormed,
                "expected a stream header",
            ));
        };
        let header = StreamHeader::parse(&bytes, Some(NS_CLIENT))?;
        let to = header.to.as_deref().unwrap_or("").to_ascii_lowercase();
        if !self.domain.is_empty() && to != self.domain {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                "a restarted stream must keep its domain",
            ));
        }
        self.domain = to.clone();
        let ours = self.header(&header);
        self.write(ours.as_bytes()).await?;
        self.header_sent = true;
        if !self.shared.config.serves(&to) {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                format!("'{to}' is not served here"),
            ));
        }
        if header.version.as_deref() != Some("1.0") {
            return Err(stream_error(
                StreamErrorCondition::UnsupportedVersion,
                "XMPP 1.0 streams only",
            ));
        }
        let features = format!("<stream:features>{}</stream:features>", features(self));
        self.write(features.as_bytes()).await
    }

    async fn run(&mut self) -> Close {
        // Boxed: negotiation's state is large and short-lived; the task then spends its
        // life in the relay loop, and its size is that of its largest await point.
        match Box::pin(self.negotiate()).await {
            Ok((full, bind_id)) => self.session(full, bind_id).await,
            Err(close) => close,
        }
    }

    /// STARTTLS, authentication and resource binding. Returns the full JID to bind and
    /// the id of the client's bind request (answered once sm started the session).
    async fn negotiate(&mut self) -> Result<(String, String), Close> {
        let config_requires_tls = self.shared.config.require_tls;
        // 1. TLS, unless the connection started with it.
        if !self.reader.get_mut().is_tls() {
            self.open_stream(|c| {
                let required = if config_requires_tls {
                    "<required/>"
                } else {
                    ""
                };
                let mut f = format!("<starttls xmlns='{NS_TLS}'>{required}</starttls>");
                if !config_requires_tls {
                    f.push_str(&c.mechanisms());
                }
                f
            })
            .await?;
            let first = self.next().await?;
            if first.name() == "starttls" && first.xmlns() == Some(NS_TLS) {
                self.starttls().await?;
                self.open_stream(|c| c.auth_features()).await?;
            } else if config_requires_tls {
                return Err(stream_error(
                    StreamErrorCondition::PolicyViolation,
                    "STARTTLS is required first",
                ));
            } else {
                return self.authenticate(Some(first)).await;
            }
        } else {
            self.open_stream(|c| c.auth_features()).await?;
        }
        self.authenticate(None).await
    }

    fn mechanisms(&self) -> String {
        let tls = self.reader.get_ref().is_tls();
        let list: String =
            sasl::offered(&self.shared.config.mechanisms, tls, self.exporter.is_some())
                .iter()
                .map(|m| format!("<mechanism>{m}</mechanism>"))
                .collect();
        let mut f = format!("<mechanisms xmlns='{NS_SASL}'>{list}</mechanisms>");
        if self.shared.config.register {
            f.push_str(&format!("<register xmlns='{NS_REGISTER_FEATURE}'/>"));
        }
        f
    }

    fn auth_features(&self) -> String {
        self.mechanisms()
    }

    async fn starttls(&mut self) -> Result<(), Close> {
        if self.reader.has_buffered() {
            return Err(stream_error(
                StreamErrorCondition::PolicyViolation,
                "data after <starttls/> before <proceed/>",
            ));
        }
        self.write(format!("<proceed xmlns='{NS_TLS}'/>").as_bytes())
            .await?;
        let limits = self.shared.config.limits;
        let stream = std::mem::replace(
            &mut self.reader,
            FramedReader::new(ClientStream::Detached, limits),
        );
        let ClientStream::Plain(tcp) = stream.into_inner() else {
            return Err(Close::Gone);
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(self.shared.tls.starttls.clone());
        let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => ClientStream::Tls(Box::new(tls)),
            _ => return Err(Close::Gone),
        };
        self.exporter = tls.exporter();
        self.reader = FramedReader::with_read_size(tls, limits, CLIENT_READ_SIZE);
        self.header_sent = false;
        Ok(())
    }

    /// SASL (and in-band registration before it). On success the stream restarts and the
    /// client binds a resource.
    async fn authenticate(
        &mut self,
        mut pending: Option<Stanza>,
    ) -> Result<(String, String), Close> {
        let user = loop {
            let element = match pending.take() {
                Some(e) => e,
                None => self.next().await?,
            };
            match (element.name(), element.xmlns()) {
                ("auth", Some(NS_SASL)) => {
                    if let Some(user) = self.sasl(&element).await? {
                        break user;
                    }
                }
                ("iq", _) if self.shared.config.register => self.register(&element).await?,
                _ => {
                    return Err(stream_error(
                        StreamErrorCondition::NotAuthorized,
                        "authenticate first",
                    ));
                }
            }
        };
        // RFC 6120 6.4.6: the stream restarts after success.
        self.reader.restart();
        self.header_sent = false;
        self.open_stream(|_| {
            format!("<bind xmlns='{NS_BIND}'/><session xmlns='{NS_SESSION}'><optional/></session>")
        })
        .await?;
        info!(peer = %self.peer, user = %user, "authenticated");
        self.bind(&user).await
    }

    /// One SASL exchange. Returns the authenticated bare JID, or `None` after a failure
    /// (the client may try again).
    async fn sasl(&mut self, auth: &Stanza) -> Result<Option<String>, Close> {
        let mechanism = auth.attr("mechanism").unwrap_or_default();
        let tls = self.reader.get_ref().is_tls();
        if !sasl::offered(&self.shared.config.mechanisms, tls, self.exporter.is_some())
            .contains(&mechanism.as_str())
        {
            self.write(
                format!("<failure xmlns='{NS_SASL}'><invalid-mechanism/></failure>").as_bytes(),
            )
            .await?;
            return Ok(None);
        }
        if !self.shared.failures.allowed(self.peer.ip()) {
            warn!(peer = %self.peer, "too many failed logins from this address");
            self.write(
                format!("<failure xmlns='{NS_SASL}'><temporary-auth-failure/><text xml:lang='en'>too many failed attempts: try again later</text></failure>")
                    .as_bytes(),
            )
            .await?;
            return Ok(None);
        }
        let Some(initial) = sasl::decode_payload(&String::from_utf8_lossy(auth.inner())) else {
            self.write(
                format!("<failure xmlns='{NS_SASL}'><incorrect-encoding/></failure>").as_bytes(),
            )
            .await?;
            return Ok(None);
        };
        let outcome = if mechanism == "PLAIN" {
            self.plain(&initial).await?
        } else {
            self.scram(&mechanism, initial).await?
        };
        match outcome {
            Some((bare, additional)) => {
                let payload = if additional.is_empty() {
                    String::new()
                } else {
                    sasl::encode_payload(&additional)
                };
                self.write(format!("<success xmlns='{NS_SASL}'>{payload}</success>").as_bytes())
                    .await?;
                Ok(Some(bare))
            }
            None => {
                self.shared.failures.record(self.peer.ip());
                tokio::time::sleep(FAILURE_DELAY).await;
                self.write(
                    format!("<failure xmlns='{NS_SASL}'><not-authorized/></failure>").as_bytes(),
                )
                .await?;
                Ok(None)
            }
        }
    }

    /// The bare JID for a SASL username on this stream's domain, normalised.
    fn bare_jid(&self, username: &str) -> Option<String> {
        jid::BareJid::new(&format!("{username}@{}", self.domain))
            .ok()
            .filter(|j| j.node().is_some())
            .map(|j| j.to_string())
    }

    async fn credentials(&self, bare: &str) -> Result<Option<Credentials>, Close> {
        match self.shared.xdb.get(bare, NS_AUTH).await {
            Ok(data) => Ok(Credentials::parse(&data).unwrap_or_else(|e| {
                warn!(user = bare, "unreadable credentials: {e}");
                None
            })),
            Err(e) => {
                warn!(user = bare, "cannot read credentials: {e}");
                Err(stream_error(
                    StreamErrorCondition::InternalServerError,
                    "storage unavailable",
                ))
            }
        }
    }

    async fn plain(&mut self, data: &[u8]) -> Result<Option<(String, Vec<u8>)>, Close> {
        let Some(message) = sasl::parse_plain(data) else {
            return Ok(None);
        };
        let Some(bare) = self.bare_jid(&message.username) else {
            return Ok(None);
        };
        if !message.authzid.is_empty() && message.authzid != bare {
            return Ok(None);
        }
        let ok = self
            .credentials(&bare)
            .await?
            .is_some_and(|c| sasl::plain_matches(&c, &message.password));
        Ok(ok.then_some((bare, vec![])))
    }

    async fn scram(
        &mut self,
        mechanism: &str,
        initial: Vec<u8>,
    ) -> Result<Option<(String, Vec<u8>)>, Close> {
        let hash = sasl::scram_hash(mechanism).expect("offered SCRAM mechanism");
        let bare = sasl::scram_username(&initial).and_then(|u| self.bare_jid(&u));
        let keys = match &bare {
            Some(bare) => self
                .credentials(bare)
                .await?
                .and_then(|c| c.keys(hash).cloned()),
            None => None,
        };
        // Unknown users go through the same exchange with keys nobody knows.
        let keys = keys.unwrap_or_else(|| sasl::decoy_keys(hash));
        // Channel binding data goes in whenever -PLUS was offered on this stream: rsasl then
        // also refuses a client that says it could bind but saw no -PLUS (a downgrade).
        let plus_offered = sasl::offered(
            &self.shared.config.mechanisms,
            true,
            self.exporter.is_some(),
        )
        .iter()
        .any(|m| m.ends_with("-PLUS"));
        let exporter = if plus_offered {
            self.exporter.clone()
        } else {
            None
        };
        let mut exchange = match ScramExchange::start(mechanism, keys, exporter) {
            Ok(exchange) => exchange,
            Err(e) => {
                warn!(peer = %self.peer, "cannot run {mechanism}: {e}");
                return Ok(None);
            }
        };
        let mut input = initial;
        loop {
            match exchange.step(&input) {
                Step::Challenge(data) => {
                    self.write(
                        format!(
                            "<challenge xmlns='{NS_SASL}'>{}</challenge>",
                            sasl::encode_payload(&data)
                        )
                        .as_bytes(),
                    )
                    .await?;
                    let response = self.next().await?;
                    match (response.name(), response.xmlns()) {
                        ("response", Some(NS_SASL)) => {}
                        ("abort", Some(NS_SASL)) => {
                            self.write(
                                format!("<failure xmlns='{NS_SASL}'><aborted/></failure>")
                                    .as_bytes(),
                            )
                            .await?;
                            return Ok(None);
                        }
                        _ => {
                            return Err(stream_error(
                                StreamErrorCondition::NotAuthorized,
                                "expected a SASL response",
                            ))
                        }
                    }
                    let Some(data) =
                        sasl::decode_payload(&String::from_utf8_lossy(response.inner()))
                    else {
                        return Ok(None);
                    };
                    input = data;
                }
                Step::Success {
                    username,
                    additional,
                } => {
                    // The proof was checked against `bare`'s keys; make sure it is the name
                    // the exchange authenticated.
                    let same = bare
                        .as_deref()
                        .is_some_and(|b| self.bare_jid(&username).as_deref() == Some(b));
                    return Ok(if same {
                        bare.map(|b| (b, additional))
                    } else {
                        None
                    });
                }
                Step::Failure => return Ok(None),
            }
        }
    }

    /// XEP-0077 before authentication: the form, and account creation.
    async fn register(&mut self, iq: &Stanza) -> Result<(), Close> {
        let id = escape(iq.id().unwrap_or("")).into_owned();
        let inner = String::from_utf8_lossy(iq.inner()).into_owned();
        if !inner.contains(NS_REGISTER) {
            return Err(stream_error(
                StreamErrorCondition::NotAuthorized,
                "authenticate first",
            ));
        }
        match iq.kind() {
            Some("get") => {
                let form = format!(
                    "<iq type='result' id='{id}'><query xmlns='{NS_REGISTER}'><instructions>Choose a user name and password.</instructions><username/><password/></query></iq>"
                );
                self.write(form.as_bytes()).await
            }
            Some("set") => {
                let username = crate::xml::child_text(iq.inner(), "username").unwrap_or_default();
                let password = crate::xml::child_text(iq.inner(), "password").unwrap_or_default();
                let reply = match (self.bare_jid(&username), password.is_empty()) {
                    (Some(bare), false) => match self.credentials(&bare).await? {
                        Some(_) => error_iq(
                            &id,
                            StanzaErrorCondition::Conflict,
                            "that user name is taken",
                        ),
                        None => {
                            let record = Credentials::from_password(&password).to_xml();
                            match self.shared.xdb.set(&bare, NS_AUTH, record).await {
                                Ok(()) => {
                                    info!(user = %bare, peer = %self.peer, "account registered");
                                    format!("<iq type='result' id='{id}'/>")
                                }
                                Err(e) => {
                                    warn!(user = %bare, "registration not stored: {e}");
                                    error_iq(
                                        &id,
                                        StanzaErrorCondition::InternalServerError,
                                        "storage unavailable",
                                    )
                                }
                            }
                        }
                    },
                    _ => error_iq(
                        &id,
                        StanzaErrorCondition::NotAcceptable,
                        "a valid user name and a password are required",
                    ),
                };
                self.write(reply.as_bytes()).await
            }
            _ => {
                self.write(error_iq(&id, StanzaErrorCondition::BadRequest, "").as_bytes())
                    .await
            }
        }
    }

    /// Resource binding (and the legacy session request before it). Starts the session
    /// with sm.
    async fn bind(&mut self, bare: &str) -> Result<(String, String), Close> {
        loop {
            let iq = self.next().await?;
            let id = escape(iq.id().unwrap_or("")).into_owned();
            let inner = String::from_utf8_lossy(iq.inner()).into_owned();
            if iq.name() != "iq" {
                return Err(stream_error(
                    StreamErrorCondition::NotAuthorized,
                    "bind a resource first",
                ));
            }
            if inner.contains(NS_SESSION) {
                self.write(format!("<iq type='result' id='{id}'/>").as_bytes())
                    .await?;
                continue;
            }
            if iq.kind() != Some("set") || !inner.contains(NS_BIND) {
                self.write(
                    error_iq(
                        &id,
                        StanzaErrorCondition::NotAuthorized,
                        "bind a resource first",
                    )
                    .as_bytes(),
                )
                .await?;
                continue;
            }
            let requested =
                crate::xml::child_text(iq.inner(), "resource").filter(|r| !r.is_empty());
            let resource =
                requested.unwrap_or_else(|| format!("{:012x}", rand::rng().random::<u64>() >> 16));
            let Ok(full) = jid::FullJid::new(&format!("{bare}/{resource}")) else {
                self.write(
                    error_iq(
                        &id,
                        StanzaErrorCondition::BadRequest,
                        "that resource is not allowed",
                    )
                    .as_bytes(),
                )
                .await?;
                continue;
            };
            return Ok((full.to_string(), id));
        }
    }

    /// The bound session: starts it with sm, then relays until either side ends it.
    async fn session(&mut self, full: String, bind_id: String) -> Close {
        let bare = full.split('/').next().unwrap_or("").to_owned();
        let (to_client, mut from_sm) = mpsc::unbounded_channel();
        let (handle, started) = self.shared.start_session(&full, &bare, to_client);
        let answer = tokio::time::timeout(Duration::from_secs(10), started).await;
        let reply = match answer {
            Ok(Ok(Ok(_sm))) => format!(
                "<iq type='result' id='{bind_id}'><bind xmlns='{NS_BIND}'><jid>{}</jid></bind></iq>",
                escape(&full)
            ),
            Ok(Ok(Err(condition))) => {
                let cond = StanzaErrorCondition::parse(&condition).unwrap_or(StanzaErrorCondition::InternalServerError);
                self.shared.end_session(&handle);
                error_iq(&bind_id, cond, "the session manager refused the session")
            }
            _ => {
                self.shared.end_session(&handle);
                error_iq(&bind_id, StanzaErrorCondition::InternalServerError, "the session manager did not answer")
            }
        };
        let bound = reply.contains("type='result'");
        if let Err(close) = self.write(reply.as_bytes()).await {
            self.shared.end_session(&handle);
            return close;
        }
        if !bound {
            return stream_error(
                StreamErrorCondition::InternalServerError,
                "no session could be started",
            );
        }
        info!(peer = %self.peer, jid = %full, sid = %handle.sid, "session started");
        let close = self.relay(&handle, &mut from_sm).await;
        self.shared.end_session(&handle);
        info!(jid = %full, "session ended");
        close
    }

    async fn relay(
        &mut self,
        handle: &SessionHandle,
        from_sm: &mut mpsc::UnboundedReceiver<Box<ToClient>>,
    ) -> Close {
        let keepalive = self.shared.config.keepalive;
        loop {
            let idle_write = tokio::time::sleep_until((self.last_write + keepalive).into());
            tokio::select! {
                element = self.next() => {
                    let stanza = match element {
                        Ok(s) => s,
                        Err(close) => return close,
                    };
                    if let Err(close) = self.client_stanza(handle, stanza).await {
                        return close;
                    }
                }
                message = from_sm.recv() => match message.map(|m| *m) {
                    Some(ToClient::Stanza(bytes)) => {
                        // Whatever else is queued for this client goes out in the same
                        // write: one system call for a burst, not one per stanza.
                        let mut burst = bytes.to_vec();
                        let mut end = None;
                        while burst.len() < 64 * 1024 {
                            match from_sm.try_recv().map(|m| *m) {
                                Ok(ToClient::Stanza(more)) => burst.extend_from_slice(&more),
                                Ok(ToClient::End(condition, text)) => {
                                    end = Some(stream_error(condition, text));
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        if let Err(close) = self.write(&burst).await {
                            return close;
                        }
                        if let Some(end) = end {
                            return end;
                        }
                    }
                    Some(ToClient::End(condition, text)) => return stream_error(condition, text),
                    None => return stream_error(StreamErrorCondition::SystemShutdown, "shutting down"),
                },
                _ = idle_write => {
                    if let Err(close) = self.write(b" ").await {
                        return close;
                    }
                }
            }
        }
    }

    /// A stanza from the bound client: answered here (session, bind) or stamped with the
    /// full JID and passed to sm.
    async fn client_stanza(&mut self, handle: &SessionHandle, stanza: Stanza) -> Result<(), Close> {
        match stanza.name() {
            "message" | "presence" | "iq" => {}
            other => {
                return Err(stream_error(
                    StreamErrorCondition::UnsupportedStanzaType,
                    format!("<{other}> is not a stanza"),
                ))
            }
        }
        if let Some(to) = stanza.to() {
            let valid = jrs_stream::xml::unescape(to).is_some_and(|t| jid::Jid::new(&t).is_ok());
            if !valid {
                if let Some(reply) = stanza.error_reply(
                    StanzaErrorCondition::JidMalformed,
                    "the 'to' address is not a valid JID",
                ) {
                    self.write(&reply).await?;
                }
                return Ok(());
            }
        }
        if stanza.name() == "iq" && stanza.kind() == Some("set") {
            let inner = stanza.inner();
            if contains(inner, NS_SESSION.as_bytes()) {
                let id = escape(stanza.id().unwrap_or("")).into_owned();
                return self
                    .write(format!("<iq type='result' id='{id}'/>").as_bytes())
                    .await;
            }
            if contains(inner, NS_BIND.as_bytes()) && stanza.to().is_none() {
                let id = escape(stanza.id().unwrap_or("")).into_owned();
                return self
                    .write(
                        error_iq(
                            &id,
                            StanzaErrorCondition::NotAllowed,
                            "this stream has a resource bound already",
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        }
        // Never trust the client's from: stamp the session's full JID.
        let stamped: Bytes = stanza.with_addresses(None, Some(&handle.jid));
        if !self
            .shared
            .send(self.shared.session_packet("stanza", handle, &stamped))
        {
            if let Some(reply) = stanza.error_reply(
                StanzaErrorCondition::ServiceUnavailable,
                "the server is restarting",
            ) {
                self.write(&reply).await?;
            }
        }
        Ok(())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn error_iq(id: &str, condition: StanzaErrorCondition, text: &str) -> String {
    format!("<iq type='error' id='{id}'>{}</iq>", condition.to_xml(text))
}
