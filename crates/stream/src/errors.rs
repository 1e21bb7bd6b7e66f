//! Stream errors (RFC 6120 4.9) and stanza errors (RFC 6120 8.3).

use std::fmt;

use crate::xml::escape;
use crate::{NS_STANZA_ERRORS, NS_STREAM_ERRORS};

/// The stream error conditions of RFC 6120 4.9.3 that this project sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamErrorCondition {
    BadFormat,
    Conflict,
    ConnectionTimeout,
    HostUnknown,
    InternalServerError,
    InvalidFrom,
    InvalidNamespace,
    InvalidXml,
    NotAuthorized,
    NotWellFormed,
    PolicyViolation,
    Reset,
    ResourceConstraint,
    RestrictedXml,
    SystemShutdown,
    UndefinedCondition,
    UnsupportedEncoding,
    UnsupportedStanzaType,
    UnsupportedVersion,
}

impl StreamErrorCondition {
    pub fn name(self) -> &'static str {
        use StreamErrorCondition::*;
        match self {
            BadFormat => "bad-format",
            Conflict => "conflict",
            ConnectionTimeout => "connection-timeout",
            HostUnknown => "host-unknown",
            InternalServerError => "internal-server-error",
            InvalidFrom => "invalid-from",
            InvalidNamespace => "invalid-namespace",
            InvalidXml => "invalid-xml",
            NotAuthorized => "not-authorized",
            NotWellFormed => "not-well-formed",
            PolicyViolation => "policy-violation",
            Reset => "reset",
            ResourceConstraint => "resource-constraint",
            RestrictedXml => "restricted-xml",
            SystemShutdown => "system-shutdown",
            UndefinedCondition => "undefined-condition",
            UnsupportedEncoding => "unsupported-encoding",
            UnsupportedStanzaType => "unsupported-stanza-type",
            UnsupportedVersion => "unsupported-version",
        }
    }
}

/// A stream error: sent to the peer, then the stream is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    pub condition: StreamErrorCondition,
    pub text: String,
    /// An application-specific condition element (RFC 6120 4.9.4), as XML.
    pub app: Option<String>,
}

impl StreamError {
    pub fn new(condition: StreamErrorCondition, text: impl Into<String>) -> Self {
        StreamError {
            condition,
            text: text.into(),
            app: None,
        }
    }

    /// With an application-specific condition element (`xml`, self-contained).
    pub fn with_app(mut self, xml: impl Into<String>) -> Self {
        self.app = Some(xml.into());
        self
    }

    /// The `<stream:error/>` element followed by the stream close tag.
    pub fn to_xml(&self) -> String {
        let mut s = format!(
            "<stream:error><{} xmlns='{}'/>",
            self.condition.name(),
            NS_STREAM_ERRORS
        );
        if !self.text.is_empty() {
            s.push_str(&format!(
                "<text xmlns='{}' xml:lang='en'>{}</text>",
                NS_STREAM_ERRORS,
                escape(&self.text)
            ));
        }
        if let Some(app) = &self.app {
            s.push_str(app);
        }
        s.push_str("</stream:error></stream:stream>");
        s
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.condition.name(), self.text)
    }
}

impl std::error::Error for StreamError {}

/// The stanza error conditions of RFC 6120 8.3.3 that this project sends, with their
/// default error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StanzaErrorCondition {
    BadRequest,
    Conflict,
    FeatureNotImplemented,
    Forbidden,
    InternalServerError,
    ItemNotFound,
    JidMalformed,
    NotAcceptable,
    NotAllowed,
    NotAuthorized,
    PolicyViolation,
    RecipientUnavailable,
    RemoteServerNotFound,
    RemoteServerTimeout,
    ResourceConstraint,
    ServiceUnavailable,
    UndefinedCondition,
    UnexpectedRequest,
}

impl StanzaErrorCondition {
    pub fn name(self) -> &'static str {
        use StanzaErrorCondition::*;
        match self {
            BadRequest => "bad-request",
            Conflict => "conflict",
            FeatureNotImplemented => "feature-not-implemented",
            Forbidden => "forbidden",
            InternalServerError => "internal-server-error",
            ItemNotFound => "item-not-found",
            JidMalformed => "jid-malformed",
            NotAcceptable => "not-acceptable",
            NotAllowed => "not-allowed",
            NotAuthorized => "not-authorized",
            PolicyViolation => "policy-violation",
            RecipientUnavailable => "recipient-unavailable",
            RemoteServerNotFound => "remote-server-not-found",
            RemoteServerTimeout => "remote-server-timeout",
            ResourceConstraint => "resource-constraint",
            ServiceUnavailable => "service-unavailable",
            UndefinedCondition => "undefined-condition",
            UnexpectedRequest => "unexpected-request",
        }
    }

    /// The `type` attribute RFC 6120 8.3.3 gives this condition.
    pub fn error_type(self) -> &'static str {
        use StanzaErrorCondition::*;
        match self {
            BadRequest | JidMalformed | NotAcceptable | PolicyViolation => "modify",
            NotAuthorized | Forbidden => "auth",
            InternalServerError | RecipientUnavailable | ResourceConstraint
            | RemoteServerTimeout | UnexpectedRequest => "wait",
            _ => "cancel",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        use StanzaErrorCondition::*;
        [
            BadRequest,
            Conflict,
            FeatureNotImplemented,
            Forbidden,
            InternalServerError,
            ItemNotFound,
            JidMalformed,
            NotAcceptable,
            NotAllowed,
            NotAuthorized,
            PolicyViolation,
            RecipientUnavailable,
            RemoteServerNotFound,
            RemoteServerTimeout,
            ResourceConstraint,
            ServiceUnavailable,
            UndefinedCondition,
            UnexpectedRequest,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }

    /// The `<error/>` child element of an error stanza.
    pub fn to_xml(self, text: &str) -> String {
        let mut s = format!(
            "<error type='{}'><{} xmlns='{}'/>",
            self.error_type(),
            self.name(),
            NS_STANZA_ERRORS
        );
        if !text.is_empty() {
            s.push_str(&format!(
                "<text xmlns='{}' xml:lang='en'>{}</text>",
                NS_STANZA_ERRORS,
                escape(text)
            ));
        }
        s.push_str("</error>");
        s
    }
}
