//! The task of one user: takes the user's events in order and hands each to the module
//! for its concern (sessions, presence, subscriptions, roster, messages, IQs).

use std::sync::Arc;

use jid::{BareJid, Jid};
use tokio::sync::mpsc;
use tracing::{debug, info_span, Instrument};

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::context::Ctx;
use crate::roster::Roster;
use crate::sessions::Session;
use crate::stanzas;
use crate::users::{Event, Inbound, SessionRef};

pub struct User {
    pub ctx: Arc<Ctx>,
    pub jid: BareJid,
    /// The bare JID as text.
    pub bare: String,
    pub sessions: Vec<Session>,
    /// The roster, once loaded (this task is its only writer).
    pub roster: Option<Roster>,
    /// The account was removed while this task ran: store nothing more for it.
    pub removed: bool,
    next_id: u64,
}

impl User {
    pub fn new(ctx: Arc<Ctx>, jid: BareJid) -> User {
        User {
            bare: jid.to_string(),
            ctx,
            jid,
            sessions: vec![],
            roster: None,
            removed: false,
            next_id: 0,
        }
    }

    /// A fresh id for stanzas sm originates (roster pushes).
    pub fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("sm{}", self.next_id)
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Box<Event>>) {
        loop {
            let Some(event) = rx.recv().await else { break };
            // Boxed: a task waits at `recv` most of its life, and its size is that of its
            // largest await point, which would be this handler's.
            Box::pin(self.handle(*event)).await;
            if self.sessions.is_empty() && self.ctx.users.retire(&self.jid, &rx) {
                break;
            }
        }
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Start(r) => {
                let span = session_span(&r);
                self.start(r).instrument(span).await
            }
            Event::End(r) => {
                let span = session_span(&r);
                self.end_from_c2s(r).instrument(span).await
            }
            Event::Stanza(r, stanza) => {
                let span = session_span(&r);
                self.client_stanza(r, stanza).instrument(span).await
            }
            Event::Inbound(inbound) => self.inbound(inbound).await,
            Event::C2sGone(c2s) => self.c2s_gone(&c2s).await,
            Event::LinkLost => self.link_lost().await,
        }
    }

    /// A stanza the client sent (outbound processing).
    async fn client_stanza(&mut self, r: SessionRef, stanza: Stanza) {
        let Some(idx) = self.find(&r) else {
            self.reset(&r);
            return;
        };
        // c2s stamps the full JID; make sure of it.
        let full = self.sessions[idx].full.clone();
        let stanza = if stanza.attr("from").as_deref() != Some(full.as_str()) {
            stanzas::reparse(stanza.with_addresses(None, Some(&full)))
        } else {
            stanza
        };
        let to = match stanzas::jid_attr(&stanza, "to") {
            None => None,
            Some(Ok(j)) => Some(j),
            Some(Err(e)) => {
                if let Some(reply) =
                    stanza.error_reply(StanzaErrorCondition::JidMalformed, &format!("'to': {e}"))
                {
                    self.deliver(idx, &reply);
                }
                return;
            }
        };
        match stanza.name() {
            "message" => self.message_from_client(idx, stanza, to).await,
            "presence" => self.presence_from_client(idx, stanza, to).await,
            "iq" => self.iq_from_client(idx, stanza, to).await,
            other => debug!("ignoring <{other}> from the client"),
        }
    }

    /// A packet from the router addressed to this user (inbound processing).
    async fn inbound(&mut self, inbound: Inbound) {
        let span = info_span!(
            "inbound",
            from = inbound.from.as_ref().map(|j| j.as_str()).unwrap_or("")
        );
        async {
            match inbound.stanza.name() {
                "message" => self.message_inbound(inbound).await,
                "presence" => self.presence_inbound(inbound).await,
                "iq" => self.iq_inbound(inbound).await,
                _ => {}
            }
        }
        .instrument(span)
        .await
    }

    /// Whether the account exists: yes while it has sessions, else storage (cached).
    /// A storage failure is `Err` (callers answer `internal-server-error`).
    pub async fn exists(&self) -> Result<bool, jrs_xdb::XdbError> {
        if !self.sessions.is_empty() {
            return Ok(true);
        }
        if self.removed {
            return Ok(false);
        }
        self.ctx.accounts.exists(&self.ctx.xdb, &self.bare).await
    }

    /// Indices of sessions that sent initial presence.
    pub fn available(&self) -> Vec<usize> {
        (0..self.sessions.len())
            .filter(|&i| self.sessions[i].available)
            .collect()
    }

    /// Whether `jid` is this user's bare JID or one of its full JIDs.
    pub fn is_same_user(&self, jid: &Jid) -> bool {
        jid.node() == self.jid.node() && jid.domain() == self.jid.domain()
    }

    /// Whether `jid` is exactly this user's bare JID.
    pub fn is_self(&self, jid: &Jid) -> bool {
        jid.resource().is_none() && self.is_same_user(jid)
    }
}

fn session_span(r: &SessionRef) -> tracing::Span {
    info_span!("session", resource = r.jid.resource().as_str(), sid = %r.sid)
}
