//! Stanzas from the network addressed to a domain sm serves (the server itself): IQ
//! gets and sets go to the modules' `Server` routes, answers to sm's own requests to
//! `host::requests`, messages are refused, presence needs no answer.

use std::sync::Arc;

use jid::BareJid;
use tracing::{debug, Instrument};

use jrs_stream::StanzaErrorCondition;

use crate::host::iq::Scope;
use crate::host::iq_routing;
use crate::host::kernel::{Ctx, User};
use crate::host::packet::Packet;

pub fn inbound(ctx: &Arc<Ctx>, p: Packet) {
    let kind = p.kind().unwrap_or("");
    match p.name() {
        "iq" if matches!(kind, "get" | "set") => {
            let Some(domain) = p.to.as_ref().map(|t| t.domain().as_str().to_owned()) else {
                return;
            };
            let ctx = ctx.clone();
            let span = tracing::info_span!(parent: None, "server", domain = %domain);
            // Handlers may wait for storage: not on the router link's reader.
            tokio::spawn(
                async move {
                    let Ok(jid) = BareJid::new(&domain) else {
                        return;
                    };
                    // The server answers as a user without sessions: its domain.
                    let mut u = User::new(ctx, jid);
                    let reply = iq_routing::answer(&mut u, &p, &[Scope::Server], None).await;
                    if let Some(bytes) = reply.into_bytes(p.stanza()) {
                        u.send(bytes);
                    }
                    u.flush();
                }
                .instrument(span),
            );
        }
        "iq" if !ctx.requests.answered(p.stanza()) => {
            debug!(
                kind,
                "IQ answer to the server ignored: no request waits for it"
            );
        }
        "iq" => {}
        "message" if kind != "error" => {
            if let Some(reply) = p
                .stanza()
                .error_reply(StanzaErrorCondition::ServiceUnavailable, "")
            {
                ctx.send(reply);
            }
        }
        // Presence to the server (probes, directed presence) needs no answer.
        _ => {}
    }
}
