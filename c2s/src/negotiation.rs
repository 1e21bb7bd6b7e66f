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
use jrs_sx::features::{
    features_xml, Sasl2Inline, NS_BIND, NS_CSI, NS_SASL, NS_SASL2, NS_SESSION, NS_SM, NS_TLS,
};
use jrs_sx::{stream_error, Close, Feature};

use crate::auth_failures::AuthFailures;
use crate::fast::{self, Record};
use crate::iq::{error_iq, payload, result_iq};
use crate::sasl::{self, ScramExchange, Step};
use crate::sasl2;
use crate::scram::{self, ChannelBinding, ScramServer};

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
    /// XEP-0388 SASL2 with XEP-0386 Bind 2 offered next to SASL.
    pub sasl2: bool,
    /// XEP-0484 FAST (with SASL2, over TLS): the tokens' lifetime.
    pub fast: Option<std::time::Duration>,
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
    TlsStarted { cb: ChannelBinding },
    /// The stored credentials asked for with [`Action::LookupCredentials`]: none for
    /// an unknown user, an error when storage could not be read.
    Credentials(Result<Option<Credentials>, ()>),
    /// What [`Action::Register`] did.
    Registered(Registration),
    /// The answer to [`Action::LookupFast`]: the credentials and the FAST record (empty
    /// when none).
    Fast(Result<(Option<Credentials>, Vec<u8>), ()>),
    /// Whether [`Action::StoreFast`] was stored.
    FastStored(bool),
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
    /// Read the credentials and the XEP-0484 tokens of this bare JID; answer
    /// [`Input::Fast`].
    LookupFast(String),
    /// Store this user's XEP-0484 token record; answer [`Input::FastStored`].
    StoreFast { bare: String, record: String },
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
    /// SASL2 succeeded: resume and/or bind inline as `Done` says, and write its
    /// `<success/>` (with what that gave).
    Sasl2(Box<sasl2::Done>),
}

/// Facts about the stream every state may need.
struct Stream {
    peer: IpAddr,
    /// The domain the client addressed (empty until its first header).
    domain: String,
    tls: bool,
    /// Channel binding data (tls-exporter when TLS 1.3, tls-server-end-point over TLS).
    cb: ChannelBinding,
    /// Failed authentications on this stream.
    failures: u32,
    /// The mechanism of the authentication under way, as a metrics label.
    mechanism: &'static str,
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
    /// SASL2 `<authenticate>` received; waiting for credentials (and FAST tokens).
    AwaitCredentials2(Box<Pending2>),
    /// A SASL2 SCRAM challenge was sent.
    Challenged2(Box<Challenged2>),
    /// SASL2 succeeded; waiting for the FAST record to be stored.
    StoringFast(Box<sasl2::Done>),
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

/// A SASL2 `<authenticate>` waiting for storage.
struct Pending2 {
    req: sasl2::Request,
    bare: Option<String>,
}

struct Challenged2 {
    req: sasl2::Request,
    bare: Option<String>,
    scram: ScramServer,
    credentials: Option<Credentials>,
    record: Option<Record>,
}

pub struct Negotiation {
    stream: Stream,
    state: State,
}

impl Negotiation {
    /// A new client connection from `peer`; `cb` is set when it started with TLS.
    pub fn new(peer: IpAddr, tls: bool, cb: ChannelBinding) -> Negotiation {
        Negotiation {
            stream: Stream {
                peer,
                domain: String::new(),
                tls,
                cb,
                failures: 0,
                mechanism: "other",
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
            (State::Upgrading, Input::TlsStarted { cb }) => {
                self.stream.tls = true;
                self.stream.cb = cb;
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
            (State::AwaitCredentials2(p), Input::Credentials(found)) => {
                let credentials = found.map_err(|()| storage_unavailable())?;
                self.with_credentials2(settings, *p, credentials, None, out)
            }
            (State::AwaitCredentials2(p), Input::Fast(found)) => {
                let (credentials, record) = found.map_err(|()| storage_unavailable())?;
                let record = Record::parse(&record);
                self.with_credentials2(settings, *p, credentials, Some(record), out)
            }
            (State::Challenged2(c), Input::Element(e)) => self.response2(settings, *c, e, out),
            (State::StoringFast(done), Input::FastStored(stored)) => {
                if !stored {
                    tracing::warn!(user = %done.bare, "FAST tokens not stored");
                    return self.failed2(
                        settings,
                        "temporary-auth-failure",
                        Some("storage unavailable"),
                        false,
                        out,
                    );
                }
                Ok(self.finish2(*done, out))
            }
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
        sasl::offered(&settings.mechanisms, self.stream.tls, self.stream.cb.any())
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    fn auth_features(&self, settings: &Settings) -> Vec<Feature> {
        let mut f = vec![Feature::Mechanisms(self.offered(settings))];
        if settings.sasl2 {
            let mut bind2 = vec![];
            if settings.stream_management {
                bind2.push(NS_SM.to_owned());
            }
            if settings.csi {
                bind2.push(NS_CSI.to_owned());
            }
            // Enabled by sm's carbons module, which c2s asks on the client's behalf.
            bind2.push(crate::sasl2::NS_CARBONS.to_owned());
            f.push(Feature::Sasl2 {
                mechanisms: self.offered(settings),
                inline: Sasl2Inline {
                    bind2: Some(bind2),
                    sm: settings.stream_management,
                    fast: self.fast_mechanisms(settings),
                },
            });
        }
        if let Some(types) = self.cb_types() {
            f.push(Feature::SaslChannelBinding(
                types.iter().map(|t| t.to_string()).collect(),
            ));
        }
        if settings.register {
            f.push(Feature::Register);
        }
        f
    }

    /// XEP-0440: the channel binding types, advertised over TLS when there are any.
    fn cb_types(&self) -> Option<Vec<&'static str>> {
        (self.stream.tls && self.stream.cb.any()).then(|| self.stream.cb.types())
    }

    /// FAST mechanisms on this stream (over TLS only, XEP-0484 8).
    fn fast_mechanisms(&self, settings: &Settings) -> Vec<String> {
        if settings.sasl2 && settings.fast.is_some() && self.stream.tls {
            fast::mechanisms(&self.stream.cb)
        } else {
            vec![]
        }
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
            ("authenticate", Some(NS_SASL2)) if settings.sasl2 => {
                self.authenticate2(settings, &e, out)
            }
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
        self.stream.mechanism = crate::metrics::mechanism(&mechanism);
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
        let cb = if plus_offered {
            self.stream.cb.clone()
        } else {
            ChannelBinding::default()
        };
        let mut exchange = match ScramExchange::start(&auth.mechanism, keys, cb) {
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
        crate::metrics::auth(self.stream.mechanism, true);
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
        self.count_failure(settings)
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

    /// XEP-0388 `<authenticate/>`.
    fn authenticate2(
        &mut self,
        settings: &Settings,
        e: &Stanza,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        let Some(mut req) = sasl2::parse(e) else {
            return self.failed2(settings, "malformed-request", None, false, out);
        };
        let mechanism = req.mechanism.clone();
        self.stream.mechanism = crate::metrics::mechanism(&mechanism);
        let fast_mechanisms = self.fast_mechanisms(settings);
        let ht = fast::is_ht(&mechanism);
        if !(self.offered(settings).contains(&mechanism) || fast_mechanisms.contains(&mechanism)) {
            return self.failed2(settings, "invalid-mechanism", None, false, out);
        }
        if !settings.failures.allowed(self.stream.peer) {
            tracing::warn!(peer = %self.stream.peer, "too many failed logins from this address");
            return self.failed2(
                settings,
                "temporary-auth-failure",
                Some("too many failed attempts: try again later"),
                false,
                out,
            );
        }
        // A token can only be given for a FAST mechanism of this stream, to a user agent
        // that names itself.
        if req
            .request_token
            .as_ref()
            .is_some_and(|m| !fast_mechanisms.contains(m) || req.user_agent.id.is_none())
        {
            req.request_token = None;
        }
        let Some(initial) = req.initial.clone() else {
            return self.failed2(settings, "incorrect-encoding", None, false, out);
        };
        let bare = if mechanism == "PLAIN" {
            let Some(message) = sasl::parse_plain(&initial) else {
                return self.failed2(settings, "not-authorized", None, true, out);
            };
            match self.bare_jid(&message.username) {
                Some(bare) if message.authzid.is_empty() || message.authzid == bare => Some(bare),
                _ => return self.failed2(settings, "not-authorized", None, true, out),
            }
        } else if ht {
            let bare = fast::parse_initial(&initial).and_then(|(name, _)| self.authcid_jid(&name));
            match bare {
                Some(bare) if req.user_agent.id.is_some() => Some(bare),
                _ => return self.failed2(settings, "not-authorized", None, true, out),
            }
        } else {
            sasl::scram_username(&initial).and_then(|u| self.bare_jid(&u))
        };
        let needs_record = ht || req.request_token.is_some();
        let pending = Pending2 { req, bare };
        match pending.bare.clone() {
            Some(bare) if needs_record => {
                out.push(Action::LookupFast(bare));
                Ok(State::AwaitCredentials2(Box::new(pending)))
            }
            Some(bare) => {
                out.push(Action::LookupCredentials(bare));
                Ok(State::AwaitCredentials2(Box::new(pending)))
            }
            None => self.with_credentials2(settings, pending, None, None, out),
        }
    }

    fn with_credentials2(
        &mut self,
        settings: &Settings,
        p: Pending2,
        credentials: Option<Credentials>,
        record: Option<Record>,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        let mechanism = p.req.mechanism.as_str();
        let initial = p.req.initial.clone().unwrap_or_default();
        if mechanism == "PLAIN" {
            let password = sasl::parse_plain(&initial)
                .map(|m| m.password)
                .unwrap_or_default();
            let ok = credentials
                .as_ref()
                .is_some_and(|c| sasl::plain_matches(c, &password));
            return match (ok, p.bare) {
                (true, Some(bare)) => {
                    self.succeeded2(settings, p.req, bare, vec![], credentials, record, out)
                }
                _ => self.failed2(settings, "not-authorized", None, true, out),
            };
        }
        if fast::is_ht(mechanism) {
            let (Some(bare), Some(c), Some(mut rec)) = (p.bare, credentials, record) else {
                return self.failed2(settings, "not-authorized", None, true, out);
            };
            let proof = fast::parse_initial(&initial)
                .map(|(_, proof)| proof)
                .unwrap_or_default();
            let cb = fast::cb_data(mechanism, &self.stream.cb)
                .unwrap_or_default()
                .to_vec();
            let id = p.req.user_agent.id.clone().unwrap_or_default();
            let count = p.req.fast.and_then(|f| f.count);
            let now = chrono::Utc::now().timestamp();
            return match rec.authenticate(
                &id,
                mechanism,
                &proof,
                &cb,
                count,
                &fast::generation(&c),
                now,
            ) {
                Ok(responder) => {
                    self.succeeded2(settings, p.req, bare, responder, Some(c), Some(rec), out)
                }
                Err(fast::Refusal::Expired) => self.failed2(
                    settings,
                    "credentials-expired",
                    Some("the token is no longer valid"),
                    false,
                    out,
                ),
                Err(fast::Refusal::NotAuthorized) => {
                    self.failed2(settings, "not-authorized", None, true, out)
                }
            };
        }
        let hash = sasl::scram_hash(mechanism).expect("offered SCRAM mechanism");
        let keys = credentials
            .as_ref()
            .and_then(|c| c.keys(hash).cloned())
            .unwrap_or_else(|| sasl::decoy_keys(hash));
        let offered = self.offered(settings);
        let plus_offered = offered.iter().any(|m| m.ends_with("-PLUS"));
        // XEP-0474: the SASL2 list and the XEP-0440 types, signed by the client's proof.
        let types = self.cb_types();
        let ssdp = scram::ssdp(hash, &offered, types.as_deref());
        let cb = if plus_offered {
            self.stream.cb.clone()
        } else {
            ChannelBinding::default()
        };
        let mut server = ScramServer::new(mechanism, keys, plus_offered, cb, Some(ssdp));
        let step = server.step(&initial);
        let c = Challenged2 {
            req: p.req,
            bare: p.bare,
            scram: server,
            credentials,
            record,
        };
        self.scram_step2(settings, c, step, out)
    }

    fn scram_step2(
        &mut self,
        settings: &Settings,
        c: Challenged2,
        step: Step,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        match step {
            Step::Challenge(data) => {
                out.push(Action::Send(format!(
                    "<challenge xmlns='{NS_SASL2}'>{}</challenge>",
                    sasl::encode_payload(&data)
                )));
                Ok(State::Challenged2(Box::new(c)))
            }
            Step::Success {
                username,
                additional,
            } => match c.bare {
                Some(bare)
                    if self.bare_jid(&username).as_deref() == Some(bare.as_str())
                        && (c.scram.authzid.is_empty() || c.scram.authzid == bare) =>
                {
                    self.succeeded2(
                        settings,
                        c.req,
                        bare,
                        additional,
                        c.credentials,
                        c.record,
                        out,
                    )
                }
                _ => self.failed2(settings, "not-authorized", None, true, out),
            },
            Step::Failure => self.failed2(settings, "not-authorized", None, true, out),
        }
    }

    fn response2(
        &mut self,
        settings: &Settings,
        mut c: Challenged2,
        e: Stanza,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        match (e.name(), e.xmlns()) {
            ("response", Some(NS_SASL2)) => {}
            ("abort", Some(NS_SASL2)) => {
                return self.failed2(settings, "aborted", None, false, out)
            }
            _ => {
                return Err(stream_error(
                    StreamErrorCondition::NotAuthorized,
                    "expected a SASL2 response",
                ))
            }
        }
        let Some(data) = sasl::decode_payload(&String::from_utf8_lossy(e.inner())) else {
            return self.failed2(settings, "incorrect-encoding", None, false, out);
        };
        let step = c.scram.step(&data);
        self.scram_step2(settings, c, step, out)
    }

    /// Authenticated with SASL2: FAST tokens updated (and stored first when they
    /// changed), then negotiation ends with what `<success/>` needs.
    #[allow(clippy::too_many_arguments)]
    fn succeeded2(
        &mut self,
        settings: &Settings,
        req: sasl2::Request,
        bare: String,
        additional: Vec<u8>,
        credentials: Option<Credentials>,
        record: Option<Record>,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        let mut token = None;
        let mut store = None;
        if let (Some(lifetime), Some(mut rec), Some(c), Some(id)) = (
            settings.fast,
            record,
            credentials,
            req.user_agent.id.as_deref(),
        ) {
            let stored = rec.clone();
            let used = fast::is_ht(&req.mechanism).then_some(req.mechanism.as_str());
            let invalidate = req.fast.is_some_and(|f| f.invalidate);
            let issued = rec.after_login(
                id,
                used,
                invalidate,
                req.request_token.as_deref(),
                &fast::generation(&c),
                lifetime.as_secs() as i64,
                chrono::Utc::now().timestamp(),
            );
            token = issued.map(|i| i.xml());
            // `authenticate` may have changed the record already (slots, count).
            if rec != stored || token.is_some() || used.is_some() {
                store = Some(rec.to_xml());
            }
        }
        let bind = req.bind.as_ref().map(|b| {
            let ua = req.user_agent.id.as_deref();
            let with_tag = sasl2::resource(&bare, b.tag.as_deref(), ua);
            let full = jid::FullJid::new(&format!("{bare}/{with_tag}"))
                .or_else(|_| {
                    jid::FullJid::new(&format!("{bare}/{}", sasl2::resource(&bare, None, ua)))
                })
                .map(|j| j.to_string())
                .unwrap_or_else(|_| format!("{bare}/{}", sasl2::resource(&bare, None, None)));
            sasl2::Bind2 {
                full,
                sm: b.sm.filter(|_| settings.stream_management),
                inactive: b.inactive && settings.csi,
                carbons: b.carbons,
            }
        });
        let resume = req.resume.clone().filter(|_| settings.stream_management);
        let mut unbound = vec![Feature::Bind, Feature::Session];
        let mut bound = vec![];
        if settings.stream_management {
            unbound.push(Feature::StreamManagement);
            if resume.is_none() && bind.as_ref().is_some_and(|b| b.sm.is_none()) {
                bound.push(Feature::StreamManagement);
            }
        }
        if settings.csi {
            unbound.push(Feature::ClientStateIndication);
            bound.push(Feature::ClientStateIndication);
        }
        if let Some((ver, ecaps2)) = settings.caps.ver(&self.stream.domain) {
            unbound.push(Feature::Caps {
                ver: ver.clone(),
                ecaps2: ecaps2.clone(),
            });
            bound.push(Feature::Caps { ver, ecaps2 });
        }
        let done = sasl2::Done {
            bare: bare.clone(),
            additional,
            token,
            resume,
            bind,
            features_unbound: features_xml(&unbound),
            features_bound: features_xml(&bound),
        };
        match store {
            Some(record) => {
                out.push(Action::StoreFast { bare, record });
                Ok(State::StoringFast(Box::new(done)))
            }
            None => Ok(self.finish2(done, out)),
        }
    }

    fn finish2(&mut self, done: sasl2::Done, out: &mut Vec<Action>) -> State {
        crate::metrics::auth(self.stream.mechanism, true);
        tracing::info!(peer = %self.stream.peer, user = %done.bare, "authenticated (SASL2)");
        let bare = done.bare.clone();
        out.push(Action::Done(Outcome::Sasl2(Box::new(done))));
        // Back here when nothing was bound (or a resumption failed): the client binds.
        State::Binding { bare }
    }

    /// A failed SASL2 attempt (RFC 6120 6.5 `condition`), counted as [`Self::failed`].
    fn failed2(
        &mut self,
        settings: &Settings,
        condition: &str,
        text: Option<&str>,
        guess: bool,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        if guess {
            settings.failures.record(self.stream.peer);
            out.push(Action::FailurePause);
        }
        out.push(Action::Send(sasl2::failure(condition, text)));
        self.count_failure(settings)
    }

    fn count_failure(&mut self, settings: &Settings) -> Result<State, Close> {
        crate::metrics::auth(self.stream.mechanism, false);
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

    /// An HT authcid: a user name on this domain, or a bare JID of it.
    fn authcid_jid(&self, name: &str) -> Option<String> {
        match name.split_once('@') {
            Some((node, domain)) if domain.eq_ignore_ascii_case(&self.stream.domain) => {
                self.bare_jid(node)
            }
            Some(_) => None,
            None => self.bare_jid(name),
        }
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

fn storage_unavailable() -> Close {
    stream_error(
        StreamErrorCondition::InternalServerError,
        "storage unavailable",
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
            sasl2: true,
            fast: Some(Duration::from_secs(1000)),
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
        let mut n = Negotiation::new(
            "192.0.2.1".parse().unwrap(),
            false,
            ChannelBinding::default(),
        );
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
        assert!(n
            .step(
                s,
                Input::TlsStarted {
                    cb: ChannelBinding::default()
                }
            )
            .is_empty());
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
        let mut n = Negotiation::new(
            "192.0.2.1".parse().unwrap(),
            false,
            ChannelBinding::default(),
        );
        n.step(&s, header_input("example.org"));
        let a = n.step(&s, plain("alice", "secret"));
        assert_eq!(closed(&a), Some(StreamErrorCondition::PolicyViolation));
    }

    #[test]
    fn unknown_domain_and_old_versions_are_refused() {
        let s = settings();
        let mut n = Negotiation::new(
            "192.0.2.1".parse().unwrap(),
            false,
            ChannelBinding::default(),
        );
        let a = n.step(&s, header_input("other.org"));
        assert!(
            matches!(a[0], Action::Header(_)),
            "a stream error needs our header first"
        );
        assert_eq!(closed(&a), Some(StreamErrorCondition::HostUnknown));
        let mut n = Negotiation::new(
            "192.0.2.1".parse().unwrap(),
            false,
            ChannelBinding::default(),
        );
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
        let mut n = Negotiation::new(
            "192.0.2.1".parse().unwrap(),
            false,
            ChannelBinding::default(),
        );
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

    // SASL2, Bind 2, FAST.

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    fn done(actions: &[Action]) -> Option<&sasl2::Done> {
        actions.iter().find_map(|a| match a {
            Action::Done(Outcome::Sasl2(d)) => Some(&**d),
            _ => None,
        })
    }

    /// Over TLS with both channel bindings, mechanisms offered.
    fn over_tls2(s: &Settings) -> (Negotiation, String) {
        let mut n = Negotiation::new(
            "192.0.2.1".parse().unwrap(),
            true,
            ChannelBinding {
                exporter: Some(vec![7; 32]),
                endpoint: Some(vec![9; 32]),
            },
        );
        let f = sends(&n.step(s, header_input("example.org")));
        (n, f)
    }

    #[test]
    fn sasl2_features_list_inline_bind_sm_fast_and_binding_types() {
        let s = settings();
        let (_, f) = over_tls2(&s);
        assert!(
            f.contains(
                "<authentication xmlns='urn:xmpp:sasl:2'><mechanism>SCRAM-SHA-256-PLUS</mechanism>"
            ),
            "{f}"
        );
        assert!(f.contains("<bind xmlns='urn:xmpp:bind:0'><inline><feature var='urn:xmpp:sm:3'/><feature var='urn:xmpp:csi:0'/><feature var='urn:xmpp:carbons:2'/></inline></bind>"));
        assert!(f.contains("<sm xmlns='urn:xmpp:sm:3'/><fast xmlns='urn:xmpp:fast:0'><mechanism>HT-SHA-256-EXPR</mechanism><mechanism>HT-SHA-256-ENDP</mechanism><mechanism>HT-SHA-256-NONE</mechanism></fast>"));
        assert!(f.contains("<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'><channel-binding type='tls-server-end-point'/><channel-binding type='tls-exporter'/></sasl-channel-binding>"));
        // Legacy SASL is still offered alongside.
        assert!(f.contains("<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"));
        // Without TLS: no FAST, no PLAIN, no channel binding.
        let mut s = settings();
        s.require_tls = false;
        let mut n = Negotiation::new(
            "192.0.2.1".parse().unwrap(),
            false,
            ChannelBinding::default(),
        );
        let f = sends(&n.step(&s, header_input("example.org")));
        assert!(
            f.contains("<authentication")
                && !f.contains("<fast")
                && !f.contains("sasl-channel-binding")
        );
    }

    #[test]
    fn sasl2_plain_with_bind2_and_inline_sm() {
        let s = settings();
        let (mut n, _) = over_tls2(&s);
        let a = n.step(&s, el(&format!(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>{}</initial-response>\
             <user-agent id='ua-1'><software>T</software></user-agent>\
             <bind xmlns='urn:xmpp:bind:0'><tag>Test</tag><enable xmlns='urn:xmpp:sm:3' resume='true'/><inactive xmlns='urn:xmpp:csi:0'/></bind>\
             </authenticate>", b64(b"\0alice\0secret"))));
        assert!(matches!(&a[..], [Action::LookupCredentials(b)] if b == "alice@example.org"));
        let a = n.step(&s, Input::Credentials(Ok(Some(alice()))));
        let d = done(&a).expect("done");
        let bind = d.bind.as_ref().unwrap();
        assert!(
            bind.full.starts_with("alice@example.org/Test/"),
            "{}",
            bind.full
        );
        assert_eq!(
            bind.sm,
            Some(sasl2::SmEnable {
                resume: true,
                max: None
            })
        );
        assert!(bind.inactive && d.token.is_none());
        let success = d.success(&bind.full, &sasl2::Done::bound("<enabled/>"), true);
        assert!(success.starts_with(&format!("<success xmlns='urn:xmpp:sasl:2'><authorization-identifier>{}</authorization-identifier><bound xmlns='urn:xmpp:bind:0'><enabled/></bound></success><stream:features>", bind.full)), "{success}");
        assert!(!d.features_bound.contains("<sm ") && !d.features_bound.contains("<bind "));
        // Without Bind 2 the success names the bare JID and offers binding.
        let success = d.success("alice@example.org", "", false);
        assert!(success.contains("<authorization-identifier>alice@example.org</authorization-identifier></success><stream:features><bind"));
    }

    #[test]
    fn sasl2_failures_and_wrong_mechanisms() {
        let s = settings();
        let (mut n, _) = over_tls2(&s);
        let a = n.step(&s, el(&format!("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>{}</initial-response></authenticate>", b64(b"\0alice\0wrong"))));
        assert!(matches!(&a[..], [Action::LookupCredentials(_)]));
        let a = n.step(&s, Input::Credentials(Ok(Some(alice()))));
        assert!(sends(&a).contains("<failure xmlns='urn:xmpp:sasl:2'><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>"), "{}", sends(&a));
        let a = n.step(
            &s,
            el("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='X-NONE'/>"),
        );
        assert!(sends(&a).contains("<invalid-mechanism xmlns="));
        let a = n.step(
            &s,
            el("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='X-NONE'/>"),
        );
        assert_eq!(closed(&a), Some(StreamErrorCondition::PolicyViolation));
    }

    /// A SCRAM-SHA-256 client for the tests (RFC 5802 with the SSDP attribute kept).
    fn scram_final(first_bare: &str, gs2: &[u8], server_first: &str) -> String {
        use jrs_auth::ScramHash;
        let attrs: Vec<&str> = server_first.split(',').collect();
        let salt = base64::engine::general_purpose::STANDARD
            .decode(&attrs[1][2..])
            .unwrap();
        let keys = jrs_auth::ScramKeys::derive(ScramHash::Sha256, "secret", &salt, 4096);
        // ClientKey = ClientProof xor ClientSignature; rebuild it from the stored keys by
        // deriving the salted password the same way the client does.
        let mut salted = [0u8; 32];
        let mut u = scram::hmac(
            ScramHash::Sha256,
            b"secret",
            &[salt.as_slice(), &[0, 0, 0, 1]].concat(),
        );
        salted.copy_from_slice(&u);
        for _ in 1..4096 {
            u = scram::hmac(ScramHash::Sha256, b"secret", &u);
            salted.iter_mut().zip(&u).for_each(|(a, b)| *a ^= b);
        }
        let client_key = scram::hmac(ScramHash::Sha256, &salted, b"Client Key");
        assert_eq!(scram::hash(ScramHash::Sha256, &client_key), keys.stored_key);
        let without = format!("c={},{}", b64(gs2), attrs[0]);
        let auth = format!("{first_bare},{server_first},{without}");
        let sig = scram::hmac(ScramHash::Sha256, &keys.stored_key, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        format!("{without},p={}", b64(&proof))
    }

    #[test]
    fn sasl2_scram_plus_with_ssdp_then_fast_token_in_one_round_trip() {
        let s = settings();
        let (mut n, features) = over_tls2(&s);
        let bare_first = "n=alice,r=clientnonce";
        let gs2 = b"p=tls-server-end-point,,";
        let a = n.step(&s, el(&format!(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='SCRAM-SHA-256-PLUS'><initial-response>{}</initial-response>\
             <user-agent id='ua-1'/><request-token xmlns='urn:xmpp:fast:0' mechanism='HT-SHA-256-ENDP'/></authenticate>",
            b64(&[gs2.as_slice(), bare_first.as_bytes()].concat()))));
        assert!(matches!(&a[..], [Action::LookupFast(b)] if b == "alice@example.org"));
        let a = n.step(
            &s,
            Input::Fast(Ok((Some(Credentials::from_password("secret")), vec![]))),
        );
        let challenge = sends(&a);
        let payload = challenge
            .trim_start_matches("<challenge xmlns='urn:xmpp:sasl:2'>")
            .trim_end_matches("</challenge>");
        let server_first = String::from_utf8(sasl::decode_payload(payload).unwrap()).unwrap();
        // XEP-0474: the hash of the list the features advertised.
        let offered: Vec<String> = [
            "SCRAM-SHA-256-PLUS",
            "SCRAM-SHA-1-PLUS",
            "SCRAM-SHA-256",
            "SCRAM-SHA-1",
            "PLAIN",
        ]
        .iter()
        .map(|m| m.to_string())
        .collect();
        assert!(features.contains("<mechanism>PLAIN</mechanism></mechanisms>"));
        let h = scram::ssdp(
            jrs_auth::ScramHash::Sha256,
            &offered,
            Some(&["tls-server-end-point", "tls-exporter"]),
        );
        assert!(server_first.ends_with(&format!(",h={h}")), "{server_first}");
        // A stripped list hashes differently: the client would notice.
        assert_ne!(
            h,
            scram::ssdp(jrs_auth::ScramHash::Sha256, &offered[2..], None)
        );
        let fin = scram_final(
            bare_first,
            &[gs2.as_slice(), &[9; 32]].concat(),
            &server_first,
        );
        let a = n.step(
            &s,
            el(&format!(
                "<response xmlns='urn:xmpp:sasl:2'>{}</response>",
                b64(fin.as_bytes())
            )),
        );
        let Some(Action::StoreFast { bare, record }) = a.first() else {
            panic!("{a:?}")
        };
        assert_eq!(bare, "alice@example.org");
        let a = n.step(&s, Input::FastStored(true));
        let d = done(&a).expect("done").clone();
        assert!(String::from_utf8(d.additional.clone())
            .unwrap()
            .starts_with("v="));
        let token_xml = d.token.clone().expect("a token");
        let token = token_xml
            .split("token='")
            .nth(1)
            .unwrap()
            .split('\'')
            .next()
            .unwrap()
            .to_owned();
        // Reconnect: HT-SHA-256-ENDP in one round trip.
        let record = record.clone();
        let ht = |n: &mut Negotiation, token: &str, cb: &[u8]| {
            let proof = scram::hmac(
                jrs_auth::ScramHash::Sha256,
                token.as_bytes(),
                &[b"Initiator".as_slice(), cb].concat(),
            );
            let a = n.step(&s, el(&format!(
                "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='HT-SHA-256-ENDP'><initial-response>{}</initial-response>\
                 <user-agent id='ua-1'/><bind xmlns='urn:xmpp:bind:0'/><fast xmlns='urn:xmpp:fast:0'/></authenticate>",
                b64(&[b"alice\0".as_slice(), &proof].concat()))));
            assert!(matches!(&a[..], [Action::LookupFast(_)]));
            n.step(
                &s,
                Input::Fast(Ok((
                    Some(Credentials::from_password("secret")),
                    record.as_bytes().to_vec(),
                ))),
            )
        };
        let (mut n2, _) = over_tls2(&s);
        let a = ht(&mut n2, &token, &[9; 32]);
        // Credentials from another password: a changed password expires the token.
        assert!(sends(&a).contains("<credentials-expired"), "{}", sends(&a));
        // The right generation: keep the credentials the token was issued under.
        let creds = Credentials::from_password("secret");
        let mut rec = Record::parse(record.as_bytes());
        for c in &mut rec.clients {
            for t in [&mut c.current, &mut c.new].into_iter().flatten() {
                t.generation = fast::generation(&creds);
            }
        }
        let record = rec.to_xml();
        let (mut n3, _) = over_tls2(&s);
        let proof = scram::hmac(
            jrs_auth::ScramHash::Sha256,
            token.as_bytes(),
            &[b"Initiator".as_slice(), &[9u8; 32]].concat(),
        );
        n3.step(&s, el(&format!(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='HT-SHA-256-ENDP'><initial-response>{}</initial-response>\
             <user-agent id='ua-1'/><bind xmlns='urn:xmpp:bind:0'/><fast xmlns='urn:xmpp:fast:0'/></authenticate>",
            b64(&[b"alice\0".as_slice(), &proof].concat()))));
        let a = n3.step(
            &s,
            Input::Fast(Ok((Some(creds.clone()), record.as_bytes().to_vec()))),
        );
        assert!(matches!(a.first(), Some(Action::StoreFast { .. })), "{a:?}");
        let d = done(&n3.step(&s, Input::FastStored(true)))
            .expect("done")
            .clone();
        let responder = scram::hmac(
            jrs_auth::ScramHash::Sha256,
            token.as_bytes(),
            &[b"Responder".as_slice(), &[9u8; 32]].concat(),
        );
        assert_eq!(d.additional, responder);
        assert!(d.bind.is_some());
        // A wrong token is refused.
        let (mut n4, _) = over_tls2(&s);
        n4.step(&s, el(&format!(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='HT-SHA-256-ENDP'><initial-response>{}</initial-response><user-agent id='ua-1'/></authenticate>",
            b64(b"alice\0wrongproof"))));
        let a = n4.step(
            &s,
            Input::Fast(Ok((Some(creds), record.as_bytes().to_vec()))),
        );
        assert!(sends(&a).contains("<not-authorized"));
    }

    #[test]
    fn sasl2_inline_resume_is_passed_on() {
        let s = settings();
        let (mut n, _) = over_tls2(&s);
        n.step(&s, el(&format!(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>{}</initial-response>\
             <resume xmlns='urn:xmpp:sm:3' previd='tok' h='4'/></authenticate>", b64(b"\0alice\0secret"))));
        let a = n.step(&s, Input::Credentials(Ok(Some(alice()))));
        let d = done(&a).unwrap();
        assert_eq!(d.resume, Some(("tok".into(), 4)));
        assert!(d.bind.is_none());
        // A failed resumption without Bind 2 leaves the client to bind.
        let a = n.step(
            &s,
            el("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"),
        );
        assert!(matches!(&a[..], [Action::Done(Outcome::Bind { .. })]));
    }
}
