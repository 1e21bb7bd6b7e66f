//! Client sessions as sm holds them, and the session protocol packets sm writes to c2s
//! (start / started / stanza / end, see docs/protocol.md "Sessions").

use bytes::Bytes;
use jid::FullJid;

use jrs_stream::xml::escape;
use jrs_stream::{StanzaErrorCondition, StreamErrorCondition, NS_STANZA_ERRORS, NS_STREAM_ERRORS};

use crate::host::state::State;
use crate::xml::Element;

/// A session as c2s names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    /// The c2s instance holding the client connection (`c2s-1`).
    pub c2s: String,
    pub sid: String,
    pub jid: FullJid,
}

/// Names one session of a user for as long as it lives (indices shift as sessions end).
pub type SessionKey = u32;

/// One client session of the user: what RFC 6121 delivery needs of every session, and
/// the typed state modules keep on it.
#[derive(Debug)]
pub struct Session {
    pub key: SessionKey,
    pub c2s: String,
    pub sid: String,
    pub jid: FullJid,
    /// The full JID as text.
    pub full: String,
    /// Sent initial presence and not unavailable since.
    pub available: bool,
    pub priority: i32,
    /// The last broadcast presence (from = full JID, no `to`) while available.
    pub presence: Option<Element>,
    /// What modules keep about this session (carbons enabled, directed presence, ...).
    pub state: State,
}

impl Session {
    pub fn new(key: SessionKey, r: &SessionRef) -> Session {
        Session {
            key,
            c2s: r.c2s.clone(),
            sid: r.sid.clone(),
            full: r.jid.to_string(),
            jid: r.jid.clone(),
            available: false,
            priority: 0,
            presence: None,
            state: State::default(),
        }
    }

    pub fn reference(&self) -> SessionRef {
        SessionRef {
            c2s: self.c2s.clone(),
            sid: self.sid.clone(),
            jid: self.jid.clone(),
        }
    }

    pub fn is(&self, r: &SessionRef) -> bool {
        self.c2s == r.c2s && self.sid == r.sid && self.jid == r.jid
    }
}

/// A session packet to c2s: `<session type=KIND to=C2S from=ME jid= sid=>inner</session>`.
pub fn packet(me: &str, kind: &str, s: &SessionRef, inner: &[u8]) -> Bytes {
    let head = format!(
        "<session type='{kind}' to='{}' from='{}' jid='{}' sid='{}'",
        escape(&s.c2s),
        escape(me),
        escape(s.jid.as_str()),
        escape(&s.sid)
    );
    jrs_stream::xml::element(&head, "session", inner)
}

/// `end` telling c2s why sm ended the session: a stream error condition.
pub fn end(me: &str, s: &SessionRef, c: StreamErrorCondition) -> Bytes {
    let inner = format!("<{} xmlns='{NS_STREAM_ERRORS}'/>", c.name());
    packet(me, "end", s, inner.as_bytes())
}

/// An `end` refusing a start: the stanza error condition first (c2s fails the bind with
/// it), then a text.
pub fn refuse_start(me: &str, s: &SessionRef, c: StanzaErrorCondition, text: &str) -> Bytes {
    let inner = format!(
        "<{} xmlns='{NS_STANZA_ERRORS}'/><text xmlns='{NS_STANZA_ERRORS}'>{}</text>",
        c.name(),
        escape(text)
    );
    packet(me, "end", s, inner.as_bytes())
}

/// `reset` is not among the conditions jrs-stream sends to peers; c2s turns it into the
/// stream error `<reset/>` (RFC 6120 4.9.3.16).
pub fn end_reset(me: &str, s: &SessionRef) -> Bytes {
    packet(
        me,
        "end",
        s,
        format!("<reset xmlns='{NS_STREAM_ERRORS}'/>").as_bytes(),
    )
}
