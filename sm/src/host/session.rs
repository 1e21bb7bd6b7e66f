//! Client sessions: the session protocol with c2s (start / started / stanza / end, see
//! docs/protocol.md), replacement on conflict, ends for unknown sessions, and the end of
//! every session on a c2s instance that went away.

use bytes::Bytes;
use jid::{FullJid, Jid};
use tracing::{debug, info, warn};

use jrs_stream::xml::escape;
use jrs_stream::{StanzaErrorCondition, StreamErrorCondition, NS_STANZA_ERRORS, NS_STREAM_ERRORS};

use crate::context::Ctx;
use crate::user::User;
use crate::users::SessionRef;
use crate::xml::Element;

/// One client session of the user.
#[derive(Debug)]
pub struct Session {
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
    /// Entities that received directed available presence (RFC 6121 4.6).
    pub directed: Vec<Jid>,
    /// Asked for the roster: gets roster pushes and subscription requests.
    pub interested: bool,
    /// Status text of the client's last unavailable presence (for jabber:iq:last).
    pub last_status: Option<String>,
}

impl Session {
    pub fn reference(&self) -> SessionRef {
        SessionRef {
            c2s: self.c2s.clone(),
            sid: self.sid.clone(),
            jid: self.jid.clone(),
        }
    }
}

/// A session packet to c2s: `<session type=KIND to=C2S from=ME jid= sid=>inner</session>`.
pub fn packet(ctx: &Ctx, kind: &str, s: &SessionRef, inner: &[u8]) -> Bytes {
    let head = format!(
        "<session type='{kind}' to='{}' from='{}' jid='{}' sid='{}'",
        escape(&s.c2s),
        escape(&ctx.me),
        escape(s.jid.as_str()),
        escape(&s.sid)
    );
    jrs_stream::xml::element(&head, "session", inner)
}

/// The child of an `end` sent by sm: a stream error condition.
fn stream_condition(c: StreamErrorCondition) -> String {
    format!("<{} xmlns='{NS_STREAM_ERRORS}'/>", c.name())
}

/// An `end` refusing a start: the stanza error condition first (c2s fails the bind with
/// it), then a text.
pub fn refuse_start(ctx: &Ctx, s: &SessionRef, c: StanzaErrorCondition, text: &str) -> Bytes {
    let inner = format!(
        "<{} xmlns='{NS_STANZA_ERRORS}'/><text xmlns='{NS_STANZA_ERRORS}'>{}</text>",
        c.name(),
        escape(text)
    );
    packet(ctx, "end", s, inner.as_bytes())
}

/// `reset` is not among the conditions jrs-stream sends to peers; c2s turns it into the
/// stream error `<reset/>` (RFC 6120 4.9.3.16).
pub fn end_reset(ctx: &Ctx, s: &SessionRef) -> Bytes {
    packet(
        ctx,
        "end",
        s,
        format!("<reset xmlns='{NS_STREAM_ERRORS}'/>").as_bytes(),
    )
}

impl User {
    /// The index of the session `r` names, if it is one of ours.
    pub fn find(&self, r: &SessionRef) -> Option<usize> {
        self.sessions
            .iter()
            .position(|s| s.c2s == r.c2s && s.sid == r.sid && s.jid == r.jid)
    }

    pub fn find_resource(&self, full: &FullJid) -> Option<usize> {
        self.sessions.iter().position(|s| &s.jid == full)
    }

    /// Sends a stanza to the client of session `idx`.
    pub fn deliver(&self, idx: usize, stanza: &[u8]) {
        let s = &self.sessions[idx];
        self.ctx
            .send(packet(&self.ctx, "stanza", &s.reference(), stanza));
    }

    /// `end` with `<reset/>` for a session we do not know (we restarted, or it ended).
    pub fn reset(&self, r: &SessionRef) {
        debug!(jid = %r.jid, sid = %r.sid, c2s = %r.c2s, "unknown session: reset");
        self.ctx.send(end_reset(&self.ctx, r));
    }

    pub async fn start(&mut self, r: SessionRef) {
        if let Some(idx) = self.find(&r) {
            // A repeated start for the same session: answer it again.
            self.ctx.send(packet(&self.ctx, "started", &r, b""));
            debug!(idx, "repeated start");
            return;
        }
        if let Some(old) = self.find_resource(&r.jid) {
            // RFC 6120 7.7.2.2: the new session replaces the old one.
            info!(resource = r.jid.resource().as_str(), old_c2s = %self.sessions[old].c2s,
                  old_sid = %self.sessions[old].sid, "session replaced (conflict)");
            self.end_session(old, Some(StreamErrorCondition::Conflict))
                .await;
        }
        if self.sessions.len() >= self.ctx.config.sessions_max {
            warn!(
                max = self.ctx.config.sessions_max,
                "session refused: too many sessions"
            );
            let text = format!(
                "at most {} sessions per account",
                self.ctx.config.sessions_max
            );
            self.ctx.send(refuse_start(
                &self.ctx,
                &r,
                StanzaErrorCondition::ResourceConstraint,
                &text,
            ));
            return;
        }
        self.removed = false;
        self.ctx.accounts.remember(&self.bare, true);
        self.sessions.push(Session {
            full: r.jid.to_string(),
            c2s: r.c2s.clone(),
            sid: r.sid.clone(),
            jid: r.jid.clone(),
            available: false,
            priority: 0,
            presence: None,
            directed: vec![],
            interested: false,
            last_status: None,
        });
        info!(resource = r.jid.resource().as_str(), sid = %r.sid, c2s = %r.c2s, "session started");
        self.ctx.send(packet(&self.ctx, "started", &r, b""));
    }

    /// `end` from c2s: the client's stream closed.
    pub async fn end_from_c2s(&mut self, r: SessionRef) {
        match self.find(&r) {
            Some(idx) => {
                info!(resource = r.jid.resource().as_str(), sid = %r.sid, "session ended by c2s");
                self.end_session(idx, None).await;
            }
            None => self.reset(&r),
        }
    }

    /// Ends session `idx`: unavailable presence where it was seen, last activity when it
    /// was the last session, and (with `tell`) an `end` to its c2s saying why.
    pub async fn end_session(&mut self, idx: usize, tell: Option<StreamErrorCondition>) {
        let s = self.sessions.remove(idx);
        if let Some(c) = tell {
            self.ctx.send(packet(
                &self.ctx,
                "end",
                &s.reference(),
                stream_condition(c).as_bytes(),
            ));
        }
        if s.available || !s.directed.is_empty() {
            // RFC 6121 4.5.2: the server generates unavailable presence for the client.
            let mut unavailable = crate::stanzas::presence(Some("unavailable"), &s.full, "");
            unavailable.remove_attr("to");
            if let Some(text) = &s.last_status {
                unavailable.push(crate::presence::status(text));
            }
            self.broadcast_unavailable(s.available, &s.directed, &unavailable)
                .await;
        }
        if self.sessions.is_empty() && !self.removed {
            self.save_logout(s.last_status.as_deref()).await;
        }
    }

    /// A c2s instance disconnected: its sessions are gone (no `end` can reach it).
    pub async fn c2s_gone(&mut self, c2s: &str) {
        while let Some(idx) = self.sessions.iter().position(|s| s.c2s == c2s) {
            info!(resource = self.sessions[idx].jid.resource().as_str(), %c2s,
                  "session ended: its c2s disconnected");
            self.end_session(idx, None).await;
        }
    }

    /// Our router link dropped: c2s reset every client of ours.
    pub async fn link_lost(&mut self) {
        while !self.sessions.is_empty() {
            self.end_session(0, None).await;
        }
    }
}
