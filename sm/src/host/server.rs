//! Stanzas addressed to a domain sm serves (the server itself): IQs answered here
//! (disco, ping, version, time, last activity, vCard), everything else refused.

use tracing::debug;

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::context::Ctx;
use crate::stanzas::Reply;
use crate::xml::Element;
use crate::{disco, last, ping, register, stanzas, time, vcard, version};

/// Answers an IQ get/set whose payload is `p`, addressed to the server.
pub fn server_iq(ctx: &Ctx, stanza: &Stanza, p: &Element) -> Reply {
    let get = stanza.kind() == Some("get");
    match (p.ns.as_str(), p.local_name()) {
        (disco::NS_INFO, "query") if get && p.attr("node").is_none() => {
            Reply::with(disco::server_info(&ctx.config))
        }
        (disco::NS_ITEMS, "query") if get && p.attr("node").is_none() => {
            Reply::with(disco::items())
        }
        (disco::NS_INFO | disco::NS_ITEMS, "query") if get => {
            Reply::error(StanzaErrorCondition::ItemNotFound, "no such node")
        }
        (ping::NS_PING, "ping") if get => Reply::empty(),
        (version::NS_VERSION, "query") if get => Reply::with(version::version_payload()),
        (time::NS_TIME, "time") if get => Reply::with(time::time_payload()),
        (last::NS_LAST, "query") if get => last::uptime(ctx),
        (vcard::NS_VCARD, "vCard") if get => Reply::with(vcard::empty()),
        (register::NS_REGISTER, "query") => Reply::error(
            StanzaErrorCondition::NotAllowed,
            "accounts are registered while connecting, before login",
        ),
        _ => Reply::error(StanzaErrorCondition::ServiceUnavailable, ""),
    }
}

/// A packet from the router addressed to the server itself.
pub fn inbound(ctx: &Ctx, stanza: Stanza) {
    let kind = stanza.kind().unwrap_or("");
    let reply = match stanza.name() {
        "iq" if matches!(kind, "get" | "set") => {
            let payload = stanzas::parse(&stanza).ok().and_then(|iq| {
                let mut it = iq.elements().cloned();
                match (it.next(), it.next()) {
                    (Some(p), None) => Some(p),
                    _ => None,
                }
            });
            match payload {
                Some(p) => server_iq(ctx, &stanza, &p),
                None => Reply::error(
                    StanzaErrorCondition::BadRequest,
                    "an IQ get or set carries exactly one payload element",
                ),
            }
        }
        "iq" => {
            debug!(kind, "IQ answer to the server ignored");
            return;
        }
        "message" if kind != "error" => Reply::error(StanzaErrorCondition::ServiceUnavailable, ""),
        // Presence to the server (probes, directed presence) needs no answer.
        _ => return,
    };
    if let Some(bytes) = reply.into_bytes(&stanza) {
        ctx.send(bytes);
    }
}
