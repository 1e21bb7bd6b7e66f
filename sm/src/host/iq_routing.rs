//! Which module answers an IQ get or set: by its type, whom it is addressed to and its
//! payload element. Every get/set gets an answer; what no module answers is
//! `service-unavailable` (RFC 6120 8.4).

use jid::Jid;
use tracing::debug;

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::host::iq::{Iq, IqKind, Reply, Scope};
use crate::host::kernel::User;
use crate::host::packet::Packet;
use crate::host::session::SessionKey;
use crate::xml::NS_CLIENT;

/// The payload of a get or set, as the IQ table looks it up; `Err` is the error answer.
fn read(stanza: &Stanza) -> Result<minidom::Element, Reply> {
    let kind = stanza.kind().unwrap_or("");
    if !matches!(kind, "get" | "set") {
        return Err(Reply::error(
            StanzaErrorCondition::BadRequest,
            "type must be get, set, result or error",
        ));
    }
    let iq =
        minidom::Element::from_reader_with_prefixes(stanza.as_slice(), Some(NS_CLIENT.to_owned()))
            .map_err(|e| {
                Reply::error(StanzaErrorCondition::BadRequest, format!("unreadable: {e}"))
            })?;
    let mut children = iq.children();
    match (children.next(), children.next()) {
        (Some(p), None) => Ok(p.clone()),
        _ => Err(Reply::error(
            StanzaErrorCondition::BadRequest,
            "an IQ get or set carries exactly one payload element",
        )),
    }
}

/// Finds the module for an IQ get/set and runs it. `scopes` are tried in order.
pub async fn answer(
    u: &mut User,
    p: &Packet,
    scopes: &[Scope],
    session: Option<SessionKey>,
) -> Reply {
    let payload = match read(p.stanza()) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let kind = if p.kind() == Some("get") {
        IqKind::Get
    } else {
        IqKind::Set
    };
    let ns = payload.ns();
    let ctx = u.ctx.clone();
    for scope in scopes {
        if let Some(m) = ctx.modules.iq_handler(kind, *scope, &ns, payload.name()) {
            let iq = Iq {
                stanza: p.stanza().clone(),
                kind,
                scope: *scope,
                session,
                from: p.from.clone(),
                payload,
            };
            debug!(module = m.name(), ns = %ns, "IQ");
            return m.iq(u, &iq).await;
        }
    }
    Reply::not_handled()
}

/// An IQ from the user's session `key` (after the outbound chain passed it).
pub async fn from_client(u: &mut User, key: SessionKey, p: Packet) {
    let own_domain =
        |j: &Jid| j.node().is_none() && j.resource().is_none() && j.domain() == u.jid.domain();
    let scopes: &[Scope] = match &p.to {
        None => &[Scope::Own, Scope::Server],
        Some(j) if u.is_self(j) => &[Scope::Own],
        Some(j) if own_domain(j) => &[Scope::Server],
        Some(j) => {
            let to = j.clone();
            u.route(&to, p.bytes().clone());
            return;
        }
    };
    if matches!(p.kind(), Some("result" | "error")) {
        // An answer to a request sm sent from the domain (host::requests) is awaited;
        // answers to roster pushes and the like need nothing more.
        if u.ctx.requests.answered(p.stanza()) {
            return;
        }
        debug!(
            kind = p.kind().unwrap_or(""),
            "client answer to sm consumed"
        );
        return;
    }
    let reply = answer(u, &p, scopes, Some(key)).await;
    if let Some(bytes) = reply.into_bytes(p.stanza()) {
        u.deliver(key, bytes);
    }
}

/// An IQ from the network to the user (after the inbound chain passed it).
pub async fn inbound(u: &mut User, p: Packet) {
    let kind = p.kind().unwrap_or("");
    let Some(to) = p.to.clone() else { return };
    if let Ok(full) = to.try_as_full() {
        match u.find_resource(full) {
            Some(key) => u.deliver(key, p.for_client()),
            None if matches!(kind, "get" | "set") => {
                u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, "")
            }
            None => debug!(kind, "IQ answer for a resource that is gone"),
        }
        return;
    }
    if !matches!(kind, "get" | "set") {
        // RFC 6121 8.5.2.1.3: results and errors to the bare JID are not delivered.
        debug!(kind, "IQ answer to the bare JID ignored");
        return;
    }
    let reply = answer(u, &p, &[Scope::Contact], None).await;
    if let Some(bytes) = reply.into_bytes(p.stanza()) {
        u.send(bytes);
    }
}
