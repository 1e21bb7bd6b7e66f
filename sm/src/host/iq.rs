//! IQ routing: what sm answers itself (for the server, for the user's own account, and
//! on behalf of the account to others) and what it passes on. Every get/set gets an
//! answer: unknown payloads are `service-unavailable` (RFC 6120 8.4).

use jid::Jid;
use tracing::debug;

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::stanzas::{self, Reply};
use crate::user::User;
use crate::users::Inbound;
use crate::xml::Element;
use crate::{disco, last, ping, private, register, roster, server, vcard};

/// Who a client's IQ is for, when sm answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// No `to`: the server answers for the account (RFC 6120 10.3.3).
    NoTo,
    /// The user's own bare JID.
    Own,
    /// The user's domain.
    Server,
}

/// The one payload element of a get/set (RFC 6120 8.2.3), or the error to answer.
fn payload(stanza: &Stanza) -> Result<Element, Reply> {
    let iq = stanzas::parse(stanza)
        .map_err(|e| Reply::error(StanzaErrorCondition::BadRequest, format!("unreadable: {e}")))?;
    let mut it = iq.elements();
    let (first, second) = (it.next().cloned(), it.next().is_some());
    match (first, second) {
        (Some(p), false) => Ok(p),
        _ => Err(Reply::error(
            StanzaErrorCondition::BadRequest,
            "an IQ get or set carries exactly one payload element",
        )),
    }
}

impl User {
    /// An IQ from the user's client.
    pub async fn iq_from_client(&mut self, idx: usize, stanza: Stanza, to: Option<Jid>) {
        let target = match &to {
            None => Some(Target::NoTo),
            Some(j) if self.is_self(j) => Some(Target::Own),
            Some(j)
                if j.node().is_none()
                    && j.resource().is_none()
                    && j.domain() == self.jid.domain() =>
            {
                Some(Target::Server)
            }
            Some(_) => None,
        };
        let kind = stanza.kind().unwrap_or("");
        if matches!(kind, "result" | "error") {
            match target {
                // Answers to roster pushes and the like: nothing more to do.
                Some(_) => debug!(kind, "client answer to sm consumed"),
                None => self.ctx.send(stanza.bytes().clone()),
            }
            return;
        }
        let Some(target) = target else {
            self.ctx.send(stanza.bytes().clone());
            return;
        };
        let reply = if !matches!(kind, "get" | "set") {
            Some(Reply::error(
                StanzaErrorCondition::BadRequest,
                "type must be get, set, result or error",
            ))
        } else {
            match payload(&stanza) {
                Err(r) => Some(r),
                Ok(p) => self.own_iq(idx, &stanza, &p, target).await,
            }
        };
        if let Some(bytes) = reply.and_then(|r| r.into_bytes(&stanza)) {
            if idx < self.sessions.len() {
                self.deliver(idx, &bytes);
            }
        }
    }

    /// IQs the user sends to their own account or server; `None` when already answered.
    async fn own_iq(
        &mut self,
        idx: usize,
        stanza: &Stanza,
        p: &Element,
        target: Target,
    ) -> Option<Reply> {
        let get = stanza.kind() == Some("get");
        let ns = p.ns.as_str();
        let name = p.local_name();
        if (ns, name) == (register::NS_REGISTER, "query") && target != Target::Own {
            return self.register_iq(idx, stanza, p).await;
        }
        if target == Target::Server {
            return Some(server::server_iq(&self.ctx, stanza, p));
        }
        Some(match (ns, name) {
            (roster::NS_ROSTER, "query") => self.roster_iq(idx, stanza, p).await,
            (vcard::NS_VCARD, "vCard") => self.vcard_iq(stanza, p, true).await,
            (private::NS_PRIVATE, "query") => self.private_iq(stanza, p).await,
            (last::NS_LAST, "query") if get => self.last_iq(None).await,
            (ping::NS_PING, "ping") if get => Reply::empty(),
            (disco::NS_INFO, "query") if get && p.attr("node").is_none() => {
                Reply::with(disco::account_info())
            }
            (disco::NS_ITEMS, "query") if get && p.attr("node").is_none() => {
                Reply::with(disco::items())
            }
            (disco::NS_INFO | disco::NS_ITEMS, "query") if get => {
                Reply::error(StanzaErrorCondition::ItemNotFound, "no such node")
            }
            // Without 'to', what the account does not answer the server may.
            _ if target == Target::NoTo => server::server_iq(&self.ctx, stanza, p),
            _ => Reply::error(StanzaErrorCondition::ServiceUnavailable, ""),
        })
    }

    /// An IQ from the network to this user.
    pub async fn iq_inbound(&mut self, inb: Inbound) {
        let stanza = &inb.stanza;
        let kind = stanza.kind().unwrap_or("");
        if let Ok(full) = inb.to.try_as_full() {
            match self.find_resource(full) {
                Some(idx) => self.deliver(idx, &stanzas::for_client(stanza)),
                None if matches!(kind, "get" | "set") => self.answer(
                    stanza,
                    Reply::error(StanzaErrorCondition::ServiceUnavailable, ""),
                ),
                None => debug!(kind, "IQ answer for a resource that is gone"),
            }
            return;
        }
        if !matches!(kind, "get" | "set") {
            // 8.5.2.1.3: results and errors to the bare JID are not delivered.
            debug!(kind, "IQ answer to the bare JID ignored");
            return;
        }
        match self.exists().await {
            Ok(true) => {}
            Ok(false) => {
                return self.answer(
                    stanza,
                    Reply::error(StanzaErrorCondition::ServiceUnavailable, ""),
                );
            }
            Err(e) => return self.answer(stanza, stanzas::storage_error(&e)),
        }
        let p = match payload(stanza) {
            Ok(p) => p,
            Err(r) => return self.answer(stanza, r),
        };
        let get = kind == "get";
        let reply = match (p.ns.as_str(), p.local_name()) {
            (disco::NS_INFO, "query") if get && p.attr("node").is_none() => {
                Reply::with(disco::account_info())
            }
            (disco::NS_ITEMS, "query") if get && p.attr("node").is_none() => {
                Reply::with(disco::items())
            }
            (disco::NS_INFO | disco::NS_ITEMS, "query") if get => {
                Reply::error(StanzaErrorCondition::ItemNotFound, "no such node")
            }
            (ping::NS_PING, "ping") if get => Reply::empty(),
            (vcard::NS_VCARD, "vCard") => self.vcard_iq(stanza, &p, false).await,
            (last::NS_LAST, "query") if get => self.last_iq(inb.from.as_ref()).await,
            _ => Reply::error(StanzaErrorCondition::ServiceUnavailable, ""),
        };
        self.answer(stanza, reply);
    }

    /// Sends a reply to a request that came from the network.
    fn answer(&self, request: &Stanza, reply: Reply) {
        if let Some(bytes) = reply.into_bytes(request) {
            self.ctx.send(bytes);
        }
    }
}
