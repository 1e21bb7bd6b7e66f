//! Client sessions as sm holds them, and the session protocol packets sm writes to c2s
//! (see docs/protocol.md "Sessions"). A session is live (its c2s relays to the client) or
//! held here: hibernating until its client resumes it (XEP-0198), or being handed from
//! one connection to another; stanzas for a held session wait in its queue.

use std::time::Instant;

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
    /// The XEP-0198 resumption token c2s gave its client, when resumable.
    pub resume_token: Option<String>,
    /// Whether the client can be reached now.
    pub link: Link,
    /// Kept over the loss of sm's own router link: ends unless its c2s restores it.
    pub stale: bool,
    /// The `session{resource sid}` span of its client's stanzas, made at the first one
    /// and kept: making a span per stanza was a twentieth of sm's instructions.
    pub span: Option<tracing::Span>,
}

/// Whether sm can reach a session's client.
#[derive(Debug, Default)]
pub enum Link {
    /// Its c2s relays to the client.
    #[default]
    Live,
    /// Held here: stanzas for it wait.
    Held(Box<Held>),
}

/// A session without a connection.
#[derive(Debug, Default)]
pub struct Held {
    /// What the client has not received, oldest first.
    pub items: Vec<Queued>,
    /// Set once c2s handed the session over (`park`); until then c2s is asked to
    /// (`collect`) and its part of the queue is still to come.
    pub parked: Option<Parked>,
    /// A new connection waiting for this session (`resume`).
    pub resumer: Option<Resumer>,
}

/// The state of a parked session.
#[derive(Debug, Clone)]
pub struct Parked {
    /// The XEP-0198 counts: stanzas received from the client, acknowledged by it.
    pub received: u32,
    pub acked: u32,
    /// How many of the queue's first stanzas the client was sent.
    pub sent: u32,
    pub since: Instant,
    /// Names this parking (a timer for an older one finds another number).
    pub generation: u64,
    /// Stanzas the queue may hold; past it the session ends.
    pub max: usize,
    /// Counted among the process's hibernating sessions (`Ctx::parked`).
    pub counted: bool,
}

/// A c2s connection that asked to resume a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumer {
    pub c2s: String,
    pub sid: String,
}

/// A stanza waiting for a held session's client.
pub use jrs_component::session::Queued;

/// The client-side part of a session c2s hands over (`park`).
#[derive(Debug, Clone)]
pub struct Park {
    pub received: u32,
    pub acked: u32,
    /// How many of `items` (the first ones) the client was sent: it can acknowledge no
    /// more than these.
    pub sent: u32,
    /// How long to wait for the client.
    pub timeout: std::time::Duration,
    pub max: usize,
    pub items: Vec<Queued>,
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
            resume_token: None,
            link: Link::Live,
            stale: false,
            span: None,
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self.link, Link::Live)
    }

    /// Parked here, independent of any c2s.
    pub fn is_parked(&self) -> bool {
        matches!(&self.link, Link::Held(h) if h.parked.is_some())
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
    packet_with(me, kind, s, "", inner)
}

/// [`packet`] with `extra` attributes (` name='value'`, escaped) after the addressing.
fn packet_with(me: &str, kind: &str, s: &SessionRef, extra: &str, inner: &[u8]) -> Bytes {
    let head = [
        "<session type='",
        kind,
        "' to='",
        &escape(&s.c2s),
        "' from='",
        &escape(me),
        "' jid='",
        &escape(s.jid.as_str()),
        "' sid='",
        &escape(&s.sid),
        "'",
        extra,
    ];
    jrs_stream::xml::element_from_parts(&head, "session", inner)
}

/// `stanza` with `offline='1'`: a message from offline storage, to confirm once the
/// client has it.
pub fn offline_stanza(me: &str, s: &SessionRef, stanza: &[u8]) -> Bytes {
    packet_with(me, "stanza", s, " offline='1'", stanza)
}

/// `resumed`: the session, its counts, state and queue, handed to the connection that
/// resumed it.
pub fn resumed(
    me: &str,
    s: &SessionRef,
    parked: &Parked,
    items: &[Queued],
    state: &jrs_component::session::SessionState,
) -> Bytes {
    let (attrs, content) = state.encode();
    let mut head = format!(
        "<session type='resumed' to='{}' from='{}' jid='{}' sid='{}' h='{}' acked='{}' sent='{}'",
        escape(&s.c2s),
        escape(me),
        escape(s.jid.as_str()),
        escape(&s.sid),
        parked.received,
        parked.acked,
        parked.sent
    );
    for (name, value) in attrs {
        head.push_str(&format!(" {name}='{}'", escape(&value)));
    }
    let mut inner = content;
    inner.extend(jrs_component::session::encode(items));
    jrs_stream::xml::element(&head, "session", &inner)
}

/// A refusal of a `resume` from `c2s` for session id `sid` of `bare`.
pub fn refuse_resume(me: &str, c2s: &str, sid: &str, bare: &str) -> Bytes {
    let head = format!(
        "<session type='end' to='{}' from='{}' jid='{}' sid='{}'",
        escape(c2s),
        escape(me),
        escape(bare),
        escape(sid)
    );
    let inner = format!("<item-not-found xmlns='{NS_STANZA_ERRORS}'/>");
    jrs_stream::xml::element(&head, "session", inner.as_bytes())
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
