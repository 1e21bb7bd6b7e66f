//! A client stream's negotiation (RFC 6120 5-7): STARTTLS, SASL (and XEP-0077
//! registration before it), resource binding or XEP-0198 resumption, as a state machine
//! without I/O. Each state holds only what is valid in it; [`Negotiation::step`] takes one
//! input (a header, an element, the answer of a request) and returns what to do. The
//! driver (`login.rs`) does the I/O: it writes, upgrades to TLS, asks storage, and feeds
//! the results back. The tests below run whole negotiations without a socket.

use std::net::IpAddr;
use std::sync::Arc;

use rand::Rng;

use jrs_auth::{Credentials, ScramKeys};
use jrs_stream::header::open_stream;
use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StanzaErrorCondition, StreamErrorCondition, StreamHeader};
use jrs_sx::features::{features_xml, NS_BIND, NS_SASL, NS_SESSION, NS_SM, NS_TLS};
use jrs_sx::{stream_error, Close, Feature};

use crate::auth_failures::AuthFailures;
use crate::iq::{error_iq, payload, result_iq};
use crate::sasl::{self, ScramExchange, Step};

pub const NS_CLIENT: &str = "jabber:client";
pub const NS_REGISTER: &str = "jabber:iq:register";

/// What negotiation is allowed to offer and accept (from `c2s.xml`).
pub struct Settings {
    /// The served domains.
    pub hosts: Vec<String>,
    /// STARTTLS before anything else.
    pub require_tls: bool,
    /// SASL mechanisms in order of preference (filtered per stream by [`sasl::offered`]).
    pub mechanisms: Vec<String>,
    /// XEP-0077 account creation before authentication.
    pub register: bool,
    /// Failed authentications allowed on one stream before it is closed (RFC 6120
    /// 6.4.5: a few, at most 5).
    pub attempts: u32,
    /// XEP-0198 offered after authentication (resumption before binding).
    pub stream_management: bool,
    /// XEP-0352 offered after authentication.
    pub csi: bool,
    /// Failed logins per address, shared by all streams.
    pub failures: Arc<AuthFailures>,
    /// The served domains' capabilities (XEP-0115), offered once known.
    pub caps: Arc<crate::server_caps::ServerCaps>,
}

impl Settings {
    fn serves(&self, domain: &str) -> bool {
        self.hosts.iter().any(|h| h == domain)
    }
}

/// One input to the machine.
pub enum Input {
    /// The client's stream header (parsed by the driver; a bad one closes the stream).
    Header(StreamHeader),
    /// A top-level element, checked well-formed.
    Element(Stanza),
    /// The transport is TLS now (after [`Action::StartTls`]).
    TlsStarted { exporter: Option<Vec<u8>> },
    /// The stored credentials asked for with [`Action::LookupCredentials`]: none for
    /// an unknown user, an error when storage could not be read.
    Credentials(Result<Option<Credentials>, ()>),
    /// What [`Action::Register`] did.
    Registered(Registration),
}

/// The outcome of an account creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    Created,
    /// The user name is taken.
    Taken,
    /// Storage refused or failed the write.
    NotStored,
    /// Storage could not be read to check the name.
    StorageUnavailable,
}

/// What the driver must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Write our stream header (a stream error needs one first).
    Header(String),
    /// Write these bytes.
    Send(String),
    /// `<proceed/>` was written: upgrade the transport to TLS, answer [`Input::TlsStarted`].
    StartTls,
    /// SASL succeeded: the next thing read is a new stream header.
    Restart,
    /// Read the stored credentials of this bare JID; answer [`Input::Credentials`].
    LookupCredentials(String),
    /// Create this account unless it exists; answer [`Input::Registered`].
    Register { bare: String, password: String },
    /// Slow down a client whose authentication failed (guessing), then go on.
    FailurePause,
    /// Negotiation is done: start the session (or resume one).
    Done(Outcome),
    /// End the stream.
    Close(Close),
}

/// How negotiation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Bind `full`; answer the client's bind request `id` once the session exists.
    Bind {
        bare: String,
        full: String,
        id: String,
    },
    /// XEP-0198: resume the session named `previd`; the client received `h` stanzas.
    Resume {
        bare: String,
        previd: String,
        h: u32,
    },
}

/// Facts about the stream every state may need.
struct Stream {
    peer: IpAddr,
    /// The domain the client addressed (empty until its first header).
    domain: String,
    tls: bool,
    /// tls-exporter channel binding data, when TLS 1.3.
    exporter: Option<Vec<u8>>,
    /// Failed authentications on this stream.
    failures: u32,
}

/// Where the stream is.
enum State {
    /// Waiting for a stream header; what follows depends on what came before.
    AwaitHeader(AfterHeader),
    /// Plain stream, STARTTLS offered (and, when not required, SASL too).
    OfferedTls,
    /// Waiting for the TLS handshake.
    Upgrading,
    /// SASL mechanisms offered.
    Authenticating,
    /// SASL `<auth>` received; waiting for the user's stored credentials.
    AwaitCredentials(PendingAuth),
    /// A SCRAM challenge was sent; waiting for the client's response.
    Challenged(Challenged),
    /// Registration under way; waiting for storage.
    Registering { id: String },
    /// Authenticated as `bare`; bind (or resume) offered.
    Binding { bare: String },
    /// Negotiation ended (done or closed).
    Finished,
}

enum AfterHeader {
    /// The first header, or the one after TLS.
    Start,
    /// The header after SASL success.
    Authenticated { bare: String },
}

/// An `<auth>` waiting for credentials.
struct PendingAuth {
    mechanism: String,
    /// The bare JID the client named (None: a SCRAM name that is no JID; it runs with
    /// decoy keys and fails at the proof).
    bare: Option<String>,
    initial: Vec<u8>,
}

struct Challenged {
    exchange: Box<ScramExchange>,
    bare: Option<String>,
}

pub struct Negotiation {
    stream: Stream,
    state: State,
}

impl Negotiation {
    /// A new client connection from `peer`; `exporter` is set when it started with TLS.
    pub fn new(peer: IpAddr, tls: bool, exporter: Option<Vec<u8>>) -> Negotiation {
        Negotiation {
            stream: Stream {
                peer,
                domain: String::new(),
                tls,
                exporter,
                failures: 0,
            },
            state: State::AwaitHeader(AfterHeader::Start),
        }
    }

    /// Whether the next input read from the client is a stream header.
    pub fn expects_header(&self) -> bool {
        matches!(self.state, State::AwaitHeader(_))
    }

    /// Our stream header, for a stream error written before one was sent.
    pub fn error_header(&self, settings: &Settings) -> String {
        header(&self.stream.domain, settings)
    }

    pub fn step(&mut self, settings: &Settings, input: Input) -> Vec<Action> {
        let mut out = vec![];
        let state = std::mem::replace(&mut self.state, State::Finished);
        self.state = match self.advance(settings, state, input, &mut out) {
            Ok(next) => next,
            Err(close) => {
                out.push(Action::Close(close));
                State::Finished
            }
        };
        out
    }

    fn advance(
        &mut self,
        settings: &Settings,
        state: State,
        input: Input,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        match (state, input) {
            (State::AwaitHeader(after), Input::Header(h)) => self.header(settings, after, h, out),
            (State::OfferedTls, Input::Element(e)) => {
                if e.name() == "starttls" && e.xmlns() == Some(NS_TLS) {
                    out.push(Action::Send(format!("<proceed xmlns='{NS_TLS}'/>")));
                    out.push(Action::StartTls);
                    Ok(State::Upgrading)
                } else if settings.require_tls {
                    Err(stream_error(
                        StreamErrorCondition::PolicyViolation,
                        "STARTTLS is required first",
                    ))
                } else {
                    self.authenticating(settings, e, out)
                }
            }
            (State::Upgrading, Input::TlsStarted { exporter }) => {
                self.stream.tls = true;
                self.stream.exporter = exporter;
                Ok(State::AwaitHeader(AfterHeader::Start))
            }
            (State::Authenticating, Input::Element(e)) => self.authenticating(settings, e, out),
            (State::AwaitCredentials(auth), Input::Credentials(found)) => {
                let credentials = found.map_err(|()| {
                    stream_error(
                        StreamErrorCondition::InternalServerError,
                        "storage unavailable",
                    )
                })?;
                self.with_credentials(settings, auth, credentials, out)
            }
            (State::Challenged(c), Input::Element(e)) => self.response(settings, c, e, out),
            (State::Registering { id }, Input::Registered(r)) => {
                let id = id.as_str();
                let reply = match r {
                    Registration::Created => result_iq(id),
                    Registration::Taken => error_iq(
                        id,
                        StanzaErrorCondition::Conflict,
                        "that user name is taken",
                    ),
                    Registration::NotStored => error_iq(
                        id,
                        StanzaErrorCondition::InternalServerError,
                        "storage unavailable",
                    ),
                    Registration::StorageUnavailable => {
                        return Err(stream_error(
                            StreamErrorCondition::InternalServerError,
                            "storage unavailable",
                        ))
                    }
                };
                out.push(Action::Send(reply));
                Ok(State::Authenticating)
            }
            (State::Binding { bare }, Input::Element(e)) => self.binding(settings, bare, e, out),
            (State::Finished, _) => Err(Close::Gone("negotiation already ended".into())),
            (_, Input::Header(_)) => Err(stream_error(
                StreamErrorCondition::NotWellFormed,
                "a second stream header",
            )),
            (_, Input::Element(_)) => Err(stream_error(
                StreamErrorCondition::NotWellFormed,
                "expected a stream header",
            )),
            (_, _) => Err(Close::Gone("answer to a request that was not made".into())),
        }
    }

    /// A stream header: ours in answer, then the features of the stage.
    fn header(
        &mut self,
        settings: &Settings,
        after: AfterHeader,
        h: StreamHeader,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        let to = h.to.as_deref().unwrap_or("").to_ascii_lowercase();
        if !self.stream.domain.is_empty() && to != self.stream.domain {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                "a restarted stream must keep its domain",
            ));
        }
        self.stream.domain = to;
        out.push(Action::Header(header(&self.stream.domain, settings)));
        if !settings.serves(&self.stream.domain) {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                format!("'{}' is not served here", self.stream.domain),
            ));
        }
        if h.version.as_deref() != Some("1.0") {
            return Err(stream_error(
                StreamErrorCondition::UnsupportedVersion,
                "XMPP 1.0 streams only",
            ));
        }
        let (features, next) = match after {
            AfterHeader::Start if !self.stream.tls => {
                let mut f = vec![Feature::StartTls {
                    required: settings.require_tls,
                }];
                if !settings.require_tls {
                    f.extend(self.auth_features(settings));
                }
                (f, State::OfferedTls)
            }
            AfterHeader::Start => (self.auth_features(settings), State::Authenticating),
            AfterHeader::Authenticated { bare } => {
                let mut f = vec![Feature::Bind, Feature::Session];
                if settings.stream_management {
                    f.push(Feature::StreamManagement);
                }
                if settings.csi {
                    f.push(Feature::ClientStateIndication);
                }
                (f, State::Binding { bare })
            }
        };
        let mut features = features;
        // Informational, so not next to a required STARTTLS (RFC 6120 5.3.1 wants it
        // alone).
        let tls_required_next = !self.stream.tls && settings.require_tls;
        if let Some((ver, ecaps2)) = settings.caps.ver(&self.stream.domain) {
            if !tls_required_next {
                features.push(Feature::Caps { ver, ecaps2 });
            }
        }
        out.push(Action::Send(features_xml(&features)));
        Ok(next)
    }

    fn offered(&self, settings: &Settings) -> Vec<String> {
        sasl::offered(
            &settings.mechanisms,
            self.stream.tls,
            self.stream.exporter.is_some(),
        )
        .into_iter()
        .map(str::to_owned)
        .collect()
    }

    fn auth_features(&self, settings: &Settings) -> Vec<Feature> {
        let mut f = vec![Feature::Mechanisms(self.offered(settings))];
        if settings.register {
            f.push(Feature::Register);
        }
        f
    }

    /// An element before authentication: `<auth>`, or a registration IQ.
    fn authenticating(
        &mut self,
        settings: &Settings,
        e: Stanza,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        match (e.name(), e.xmlns()) {
            ("auth", Some(NS_SASL)) => self.auth(settings, &e, out),
            ("iq", _) if settings.register => self.register(e, out),
            _ => Err(stream_error(
                StreamErrorCondition::NotAuthorized,
                "authenticate first",
            )),
        }
    }

    /// `<auth mechanism=..>initial</auth>`.
    fn auth(
        &mut self,
        settings: &Settings,
        auth: &Stanza,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        let mechanism = auth.attr("mechanism").unwrap_or_default();
        if !self.offered(settings).contains(&mechanism) {
            return self.failed(settings, "<invalid-mechanism/>", false, out);
        }
        if !settings.failures.allowed(self.stream.peer) {
            tracing::warn!(peer = %self.stream.peer, "too many failed logins from this address");
            return self.failed(
                settings,
                "<temporary-auth-failure/><text xml:lang='en'>too many failed attempts: try again later</text>",
                false,
                out,
            );
        }
        let Some(initial) = sasl::decode_payload(&String::from_utf8_lossy(auth.inner())) else {
            return self.failed(settings, "<incorrect-encoding/>", false, out);
        };
        let bare = if mechanism == "PLAIN" {
            let Some(message) = sasl::parse_plain(&initial) else {
                return self.failed(settings, "<not-authorized/>", true, out);
            };
            match self.bare_jid(&message.username) {
                Some(bare) if message.authzid.is_empty() || message.authzid == bare => Some(bare),
                _ => return self.failed(settings, "<not-authorized/>", true, out),
            }
        } else {
            sasl::scram_username(&initial).and_then(|u| self.bare_jid(&u))
        };
        let pending = PendingAuth {
            mechanism,
            bare,
            initial,
        };
        match pending.bare.clone() {
            Some(bare) => {
                out.push(Action::LookupCredentials(bare));
                Ok(State::AwaitCredentials(pending))
            }
            // A SCRAM name that is no JID: the exchange runs with decoy keys.
            None => self.with_credentials(settings, pending, None, out),
        }
    }

    fn with_credentials(
        &mut self,
        settings: &Settings,
        auth: PendingAuth,
        credentials: Option<Credentials>,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        if auth.mechanism == "PLAIN" {
            let password = sasl::parse_plain(&auth.initial)
                .map(|m| m.password)
                .unwrap_or_default();
            let ok = credentials.is_some_and(|c| sasl::plain_matches(&c, &password));
            return match (ok, auth.bare) {
                (true, Some(bare)) => Ok(self.succeeded(bare, &[], out)),
                _ => self.failed(settings, "<not-authorized/>", true, out),
            };
        }
        let hash = sasl::scram_hash(&auth.mechanism).expect("offered SCRAM mechanism");
        // Unknown users go through the same exchange with keys nobody knows.
        let keys: ScramKeys = credentials
            .and_then(|c| c.keys(hash).cloned())
            .unwrap_or_else(|| sasl::decoy_keys(hash));
        // Channel binding data goes in whenever -PLUS was offered on this stream: rsasl then
        // also refuses a client that says it could bind but saw no -PLUS (a downgrade).
        let plus_offered = self.offered(settings).iter().any(|m| m.ends_with("-PLUS"));
        let exporter = plus_offered.then(|| self.stream.exporter.clone()).flatten();
        let mut exchange = match ScramExchange::start(&auth.mechanism, keys, exporter) {
            Ok(exchange) => Box::new(exchange),
            Err(e) => {
                tracing::warn!(peer = %self.stream.peer, "cannot run {}: {e}", auth.mechanism);
                return self.failed(settings, "<temporary-auth-failure/>", false, out);
            }
        };
        let step = exchange.step(&auth.initial);
        self.scram_step(
            settings,
            Challenged {
                exchange,
                bare: auth.bare,
            },
            step,
            out,
        )
    }

    fn scram_step(
        &mut self,
        settings: &Settings,
        c: Challenged,
        step: Step,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        match step {
            Step::Challenge(data) => {
                out.push(Action::Send(format!(
                    "<challenge xmlns='{NS_SASL}'>{}</challenge>",
                    sasl::encode_payload(&data)
                )));
                Ok(State::Challenged(c))
            }
            Step::Success {
                username,
                additional,
            } => {
                // The proof was checked against `bare`'s keys; make sure it is the name
                // the exchange authenticated.
                match c.bare {
                    Some(bare) if self.bare_jid(&username).as_deref() == Some(bare.as_str()) => {
                        Ok(self.succeeded(bare, &additional, out))
                    }
                    _ => self.failed(settings, "<not-authorized/>", true, out),
                }
            }
            Step::Failure => self.failed(settings, "<not-authorized/>", true, out),
        }
    }

    /// The client's answer to a challenge.
    fn response(
        &mut self,
        settings: &Settings,
        mut c: Challenged,
        e: Stanza,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        match (e.name(), e.xmlns()) {
            ("response", Some(NS_SASL)) => {}
            ("abort", Some(NS_SASL)) => return self.failed(settings, "<aborted/>", false, out),
            _ => {
                return Err(stream_error(
                    StreamErrorCondition::NotAuthorized,
                    "expected a SASL response",
                ))
            }
        }
        let Some(data) = sasl::decode_payload(&String::from_utf8_lossy(e.inner())) else {
            return self.failed(settings, "<incorrect-encoding/>", false, out);
        };
        let step = c.exchange.step(&data);
        self.scram_step(settings, c, step, out)
    }

    fn succeeded(&mut self, bare: String, additional: &[u8], out: &mut Vec<Action>) -> State {
        let payload = if additional.is_empty() {
            String::new()
        } else {
            sasl::encode_payload(additional)
        };
        out.push(Action::Send(format!(
            "<success xmlns='{NS_SASL}'>{payload}</success>"
        )));
        // RFC 6120 6.4.6: the stream restarts after success.
        out.push(Action::Restart);
        tracing::info!(peer = %self.stream.peer, user = %bare, "authenticated");
        State::AwaitHeader(AfterHeader::Authenticated { bare })
    }

    /// A failed attempt: `<failure>` with `condition`; past the attempts allowed on one
    /// stream, the stream closes (RFC 6120 6.4.5). `guess`: a wrong name or password,
    /// which counts against the address too and is answered slowly.
    fn failed(
        &mut self,
        settings: &Settings,
        condition: &str,
        guess: bool,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        if guess {
            settings.failures.record(self.stream.peer);
            out.push(Action::FailurePause);
        }
        out.push(Action::Send(format!(
            "<failure xmlns='{NS_SASL}'>{condition}</failure>"
        )));
        self.stream.failures += 1;
        if self.stream.failures >= settings.attempts {
            tracing::warn!(peer = %self.stream.peer, attempts = self.stream.failures, "too many failed authentications on one stream: closing it");
            return Err(stream_error(
                StreamErrorCondition::PolicyViolation,
                format!(
                    "{} failed authentication attempts on this stream",
                    self.stream.failures
                ),
            ));
        }
        Ok(State::Authenticating)
    }

    /// XEP-0077 before authentication: the form, and account creation.
    fn register(&mut self, iq: Stanza, out: &mut Vec<Action>) -> Result<State, Close> {
        let query = payload(&iq).filter(|p| p.is("query", NS_REGISTER));
        let Some(query) = query else {
            return Err(stream_error(
                StreamErrorCondition::NotAuthorized,
                "authenticate first",
            ));
        };
        let Some(id) = iq.attr("id") else {
            out.push(Action::Send(error_iq(
                "",
                StanzaErrorCondition::BadRequest,
                "an IQ needs an id (RFC 6120 8.1.3)",
            )));
            return Ok(State::Authenticating);
        };
        let reply = match iq.kind() {
            Some("get") => format!(
                "<iq type='result' id='{}'><query xmlns='{NS_REGISTER}'><instructions>Choose a user name and password.</instructions><username/><password/></query></iq>",
                escape(&id)
            ),
            Some("set") => {
                let text = |name: &str| {
                    query
                        .get_child(name, NS_REGISTER)
                        .map(|c| c.text())
                        .unwrap_or_default()
                };
                let (username, password) = (text("username"), text("password"));
                match self.bare_jid(&username) {
                    Some(bare) if !password.is_empty() => {
                        out.push(Action::Register { bare, password });
                        return Ok(State::Registering { id });
                    }
                    _ => error_iq(
                        &id,
                        StanzaErrorCondition::NotAcceptable,
                        "a valid user name and a password are required",
                    ),
                }
            }
            _ => error_iq(&id, StanzaErrorCondition::BadRequest, ""),
        };
        out.push(Action::Send(reply));
        Ok(State::Authenticating)
    }

    /// After authentication: resource binding (and the legacy session request), or
    /// XEP-0198 resumption.
    fn binding(
        &mut self,
        settings: &Settings,
        bare: String,
        e: Stanza,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        if settings.stream_management && e.xmlns() == Some(NS_SM) {
            match e.name() {
                "resume" => {
                    let previd = e.attr("previd").unwrap_or_default();
                    let h = e.attr("h").and_then(|h| h.parse::<u32>().ok());
                    let Some(h) = h.filter(|_| !previd.is_empty()) else {
                        out.push(Action::Send(sm_failed("bad-request")));
                        return Ok(State::Binding { bare });
                    };
                    out.push(Action::Done(Outcome::Resume {
                        bare: bare.clone(),
                        previd,
                        h,
                    }));
                    // Back here if the resumption fails: the client may bind instead.
                    return Ok(State::Binding { bare });
                }
                "enable" => {
                    // XEP-0198 3: only after binding.
                    out.push(Action::Send(sm_failed("unexpected-request")));
                    return Ok(State::Binding { bare });
                }
                _ => {}
            }
        }
        if e.name() != "iq" {
            return Err(stream_error(
                StreamErrorCondition::NotAuthorized,
                "bind a resource first",
            ));
        }
        let Some(id) = e.attr("id") else {
            out.push(Action::Send(error_iq(
                "",
                StanzaErrorCondition::BadRequest,
                "an IQ needs an id (RFC 6120 8.1.3)",
            )));
            return Ok(State::Binding { bare });
        };
        let request = payload(&e);
        if request
            .as_ref()
            .is_some_and(|p| p.is("session", NS_SESSION))
        {
            out.push(Action::Send(result_iq(&id)));
            return Ok(State::Binding { bare });
        }
        let bind = request.filter(|p| p.is("bind", NS_BIND));
        let (Some("set"), Some(bind)) = (e.kind(), bind) else {
            out.push(Action::Send(error_iq(
                &id,
                StanzaErrorCondition::NotAuthorized,
                "bind a resource first",
            )));
            return Ok(State::Binding { bare });
        };
        let requested = bind
            .get_child("resource", NS_BIND)
            .map(|r| r.text())
            .filter(|r| !r.is_empty());
        let resource =
            requested.unwrap_or_else(|| format!("{:012x}", rand::rng().random::<u64>() >> 16));
        let Ok(full) = jid::FullJid::new(&format!("{bare}/{resource}")) else {
            out.push(Action::Send(error_iq(
                &id,
                StanzaErrorCondition::BadRequest,
                "that resource is not allowed",
            )));
            return Ok(State::Binding { bare });
        };
        out.push(Action::Done(Outcome::Bind {
            bare,
            full: full.to_string(),
            id,
        }));
        Ok(State::Finished)
    }

    /// The bare JID for a SASL or registration user name on this stream's domain,
    /// normalised.
    fn bare_jid(&self, username: &str) -> Option<String> {
        jid::BareJid::new(&format!("{username}@{}", self.stream.domain))
            .ok()
            .filter(|j| j.node().is_some())
            .map(|j| j.to_string())
    }
}

/// Our stream header for `domain` (the first served domain when the client named none).
fn header(domain: &str, settings: &Settings) -> String {
    let id = format!("{:016x}", rand::rng().random::<u64>());
    let from = if domain.is_empty() {
        settings.hosts[0].as_str()
    } else {
        domain
    };
    open_stream(
        NS_CLIENT,
        &[
            ("from", from),
            ("id", &id),
            ("version", "1.0"),
            ("xml:lang", "en"),
        ],
    )
}

/// XEP-0198 `<failed/>` with a stanza error condition.
pub fn sm_failed(condition: &str) -> String {
    format!(
        "<failed xmlns='{NS_SM}'><{condition} xmlns='{}'/></failed>",
        jrs_stream::NS_STANZA_ERRORS
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use bytes::Bytes;
    use std::time::Duration;

    fn settings() -> Settings {
        Settings {
            hosts: vec!["example.org".into()],
            require_tls: true,
            mechanisms: crate::config::ALL_MECHANISMS
                .iter()
                .map(|m| m.to_string())
                .collect(),
            register: false,
            attempts: 3,
            stream_management: true,
            csi: true,
            failures: Arc::new(AuthFailures::new(100, Duration::from_secs(60))),
            caps: Arc::default(),
        }
    }

    fn header_input(to: &str) -> Input {
        let xml = format!(
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{to}' version='1.0'>"
        );
        Input::Header(StreamHeader::parse(&Bytes::from(xml), Some(NS_CLIENT)).unwrap())
    }

    fn el(xml: &str) -> Input {
        Input::Element(Stanza::parse(Bytes::from(xml.to_owned())).unwrap())
    }

    fn sends(actions: &[Action]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    fn closed(actions: &[Action]) -> Option<StreamErrorCondition> {
        actions.iter().find_map(|a| match a {
            Action::Close(Close::Error(e)) => Some(e.condition),
            _ => None,
        })
    }

    fn plain(user: &str, password: &str) -> Input {
        let payload =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        el(&format!(
            "<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{payload}</auth>"
        ))
    }

    fn alice() -> Credentials {
        Credentials::from_password("secret")
    }

    /// Up to the mechanisms offered over TLS.
    fn over_tls(s: &Settings) -> Negotiation {
        let mut n = Negotiation::new("192.0.2.1".parse().unwrap(), false, None);
        let a = n.step(s, header_input("example.org"));
        assert!(matches!(a[0], Action::Header(_)));
        assert!(sends(&a).contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"));
        assert!(
            !sends(&a).contains("mechanisms"),
            "no SASL before TLS when TLS is required"
        );
        let a = n.step(s, el("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"));
        assert!(sends(&a).contains("<proceed"));
        assert!(matches!(a.last(), Some(Action::StartTls)));
        assert!(n.step(s, Input::TlsStarted { exporter: None }).is_empty());
        assert!(n.expects_header());
        let a = n.step(s, header_input("example.org"));
        assert!(sends(&a).contains("<mechanism>PLAIN</mechanism>"));
        assert!(
            !sends(&a).contains("-PLUS"),
            "no -PLUS without channel binding data"
        );
        n
    }

    /// Through a PLAIN login to the bind features.
    fn logged_in(s: &Settings) -> Negotiation {
        let mut n = over_tls(s);
        let a = n.step(s, plain("Alice", "secret"));
        assert!(matches!(&a[..], [Action::LookupCredentials(b)] if b == "alice@example.org"));
        let a = n.step(s, Input::Credentials(Ok(Some(alice()))));
        assert!(sends(&a).contains("<success"));
        assert!(matches!(a.last(), Some(Action::Restart)));
        let a = n.step(s, header_input("example.org"));
        let f = sends(&a);
        assert!(f.contains("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"));
        assert!(
            f.contains("<sm xmlns='urn:xmpp:sm:3'/>")
                && f.contains("<csi xmlns='urn:xmpp:csi:0'/>")
        );
        n
    }

    #[test]
    fn tls_then_plain_then_bind() {
        let s = settings();
        let mut n = logged_in(&s);
        let a = n.step(
            &s,
            el("<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"),
        );
        assert_eq!(sends(&a), "<iq type='result' id='s'/>");
        let a = n.step(&s, el("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>phone</resource></bind></iq>"));
        assert!(
            matches!(&a[..], [Action::Done(Outcome::Bind { bare, full, id })]
            if bare == "alice@example.org" && full == "alice@example.org/phone" && id == "b")
        );
    }

    #[test]
    fn tls_is_required_first() {
        let s = settings();
        let mut n = Negotiation::new("192.0.2.1".parse().unwrap(), false, None);
        n.step(&s, header_input("example.org"));
        let a = n.step(&s, plain("alice", "secret"));
        assert_eq!(closed(&a), Some(StreamErrorCondition::PolicyViolation));
    }

    #[test]
    fn unknown_domain_and_old_versions_are_refused() {
        let s = settings();
        let mut n = Negotiation::new("192.0.2.1".parse().unwrap(), false, None);
        let a = n.step(&s, header_input("other.org"));
        assert!(
            matches!(a[0], Action::Header(_)),
            "a stream error needs our header first"
        );
        assert_eq!(closed(&a), Some(StreamErrorCondition::HostUnknown));
        let mut n = Negotiation::new("192.0.2.1".parse().unwrap(), false, None);
        let xml = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.org'>";
        let h = StreamHeader::parse(&Bytes::from_static(xml.as_bytes()), Some(NS_CLIENT)).unwrap();
        assert_eq!(
            closed(&n.step(&s, Input::Header(h))),
            Some(StreamErrorCondition::UnsupportedVersion)
        );
    }

    #[test]
    fn a_restarted_stream_keeps_its_domain() {
        let s = settings();
        let mut n = over_tls(&s);
        n.step(&s, plain("alice", "secret"));
        n.step(&s, Input::Credentials(Ok(Some(alice()))));
        let a = n.step(&s, header_input("other.org"));
        assert_eq!(closed(&a), Some(StreamErrorCondition::HostUnknown));
    }

    #[test]
    fn failed_attempts_close_the_stream_after_the_limit() {
        let s = settings();
        let mut n = over_tls(&s);
        for i in 1..=3 {
            let a = n.step(&s, plain("alice", "wrong"));
            assert!(matches!(&a[..], [Action::LookupCredentials(_)]));
            let a = n.step(&s, Input::Credentials(Ok(Some(alice()))));
            assert!(matches!(a[0], Action::FailurePause));
            assert!(sends(&a).contains("<not-authorized/>"));
            if i < 3 {
                assert_eq!(closed(&a), None, "attempt {i}");
            } else {
                assert_eq!(closed(&a), Some(StreamErrorCondition::PolicyViolation));
            }
        }
        // Unknown mechanisms count too (no endless attempts of any kind).
        let mut n = over_tls(&s);
        for _ in 0..2 {
            let a = n.step(
                &s,
                el(&format!("<auth xmlns='{NS_SASL}' mechanism='X-NONE'/>")),
            );
            assert!(sends(&a).contains("<invalid-mechanism/>") && closed(&a).is_none());
        }
        let a = n.step(
            &s,
            el(&format!("<auth xmlns='{NS_SASL}' mechanism='X-NONE'/>")),
        );
        assert_eq!(closed(&a), Some(StreamErrorCondition::PolicyViolation));
    }

    #[test]
    fn failures_per_address_are_shared_between_streams() {
        let mut s = settings();
        s.failures = Arc::new(AuthFailures::new(2, Duration::from_secs(60)));
        s.attempts = 5;
        let mut n = over_tls(&s);
        for _ in 0..2 {
            n.step(&s, plain("alice", "wrong"));
            n.step(&s, Input::Credentials(Ok(None)));
        }
        let mut other = over_tls(&s);
        let a = other.step(&s, plain("alice", "secret"));
        assert!(
            sends(&a).contains("<temporary-auth-failure/>"),
            "{}",
            sends(&a)
        );
    }

    #[test]
    fn storage_failure_closes_with_internal_server_error() {
        let s = settings();
        let mut n = over_tls(&s);
        n.step(&s, plain("alice", "secret"));
        let a = n.step(&s, Input::Credentials(Err(())));
        assert_eq!(closed(&a), Some(StreamErrorCondition::InternalServerError));
    }

    #[test]
    fn scram_starts_with_a_challenge_and_abort_is_one_failure() {
        let s = settings();
        let mut n = over_tls(&s);
        let first = base64::engine::general_purpose::STANDARD.encode("n,,n=alice,r=abcdefghijkl");
        let a = n.step(
            &s,
            el(&format!(
                "<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-1'>{first}</auth>"
            )),
        );
        assert!(matches!(&a[..], [Action::LookupCredentials(b)] if b == "alice@example.org"));
        let a = n.step(&s, Input::Credentials(Ok(Some(alice()))));
        assert!(sends(&a).starts_with("<challenge"), "{}", sends(&a));
        let a = n.step(&s, el(&format!("<abort xmlns='{NS_SASL}'/>")));
        assert_eq!(
            sends(&a),
            format!("<failure xmlns='{NS_SASL}'><aborted/></failure>")
        );
        // Anything else while challenged ends the stream.
        let a = n.step(
            &s,
            el(&format!(
                "<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-1'>{first}</auth>"
            )),
        );
        n.step(&s, Input::Credentials(Ok(None)));
        assert!(closed(&a).is_none());
        let a = n.step(&s, el("<iq type='get' id='x'/>"));
        assert_eq!(closed(&a), Some(StreamErrorCondition::NotAuthorized));
    }

    #[test]
    fn binding_errors_keep_the_stream() {
        let s = settings();
        let mut n = logged_in(&s);
        let a = n.step(
            &s,
            el("<iq type='get' id='1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"),
        );
        assert!(sends(&a).contains("<not-authorized"));
        let a = n.step(
            &s,
            el("<iq type='set'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"),
        );
        assert!(sends(&a).contains("<bad-request"), "an IQ without id");
        let a = n.step(&s, el("<enable xmlns='urn:xmpp:sm:3'/>"));
        assert!(
            sends(&a).contains("<unexpected-request"),
            "enable before bind"
        );
        // A bind with a substring of the namespace in some text is no bind.
        let a = n.step(
            &s,
            el("<iq type='set' id='2'><x xmlns='urn:x'>urn:ietf:params:xml:ns:xmpp-bind</x></iq>"),
        );
        assert!(sends(&a).contains("<not-authorized"));
        let a = n.step(
            &s,
            el("<iq type='set' id='3'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"),
        );
        assert!(
            matches!(&a[..], [Action::Done(Outcome::Bind { full, .. })] if full.starts_with("alice@example.org/"))
        );
        let mut n = logged_in(&s);
        let a = n.step(&s, el("<message to='bob@example.org'/>"));
        assert_eq!(closed(&a), Some(StreamErrorCondition::NotAuthorized));
    }

    #[test]
    fn resume_is_offered_before_binding() {
        let s = settings();
        let mut n = logged_in(&s);
        let a = n.step(&s, el("<resume xmlns='urn:xmpp:sm:3' previd='abc' h='7'/>"));
        assert!(
            matches!(&a[..], [Action::Done(Outcome::Resume { previd, h: 7, .. })] if previd == "abc")
        );
        // A failed resumption leaves the client free to bind.
        let a = n.step(&s, el("<resume xmlns='urn:xmpp:sm:3' previd='abc'/>"));
        assert!(sends(&a).contains("<bad-request"));
        let a = n.step(
            &s,
            el("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"),
        );
        assert!(matches!(&a[..], [Action::Done(Outcome::Bind { .. })]));
    }

    #[test]
    fn registration_before_login() {
        let mut s = settings();
        s.register = true;
        s.require_tls = false;
        let mut n = Negotiation::new("192.0.2.1".parse().unwrap(), false, None);
        let a = n.step(&s, header_input("example.org"));
        let f = sends(&a);
        assert!(f.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"));
        assert!(f.contains("<register xmlns='http://jabber.org/features/iq-register'/>"));
        assert!(
            f.contains("SCRAM-SHA-1") && !f.contains("PLAIN"),
            "PLAIN only over TLS"
        );
        let a = n.step(
            &s,
            el("<iq type='get' id='f'><query xmlns='jabber:iq:register'/></iq>"),
        );
        assert!(sends(&a).contains("<username/>"));
        let a = n.step(&s, el("<iq type='set' id='r'><query xmlns='jabber:iq:register'><username>Bob</username><password>pw</password></query></iq>"));
        assert!(
            matches!(&a[..], [Action::Register { bare, password }] if bare == "bob@example.org" && password == "pw")
        );
        let a = n.step(&s, Input::Registered(Registration::Taken));
        assert!(sends(&a).contains("<conflict"));
        let a = n.step(&s, el("<iq type='set' id='r'><query xmlns='jabber:iq:register'><username>x</username></query></iq>"));
        assert!(sends(&a).contains("<not-acceptable"));
        let a = n.step(
            &s,
            el("<iq type='get' id='v'><query xmlns='jabber:iq:version'/></iq>"),
        );
        assert_eq!(closed(&a), Some(StreamErrorCondition::NotAuthorized));
    }
}
