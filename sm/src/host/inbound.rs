//! A `normal` stanza for someone sm serves, as the router delivers it (`crate::link`) or
//! as a user's task hands it over without the router (`host::local`): to the task of
//! the user it is addressed to, to the server's handlers (`host::server`) or to the
//! admin commands when it is addressed to the domain, with an error reply when the
//! address is malformed or not served here.

use std::sync::Arc;

use jrs_stream::{jids, Stanza, StanzaErrorCondition};

use crate::host::registry::Event;
use crate::host::task::dispatch;
use crate::host::{admin, server, Ctx, Packet};

pub fn addressed(ctx: &Arc<Ctx>, stanza: Stanza) {
    let to = match stanza.attr("to").map(|t| jids::parse(&t)) {
        Some(Ok(j)) => j,
        Some(Err(e)) => {
            if let Some(r) =
                stanza.error_reply(StanzaErrorCondition::JidMalformed, &format!("'to': {e}"))
            {
                ctx.send(r);
            }
            return;
        }
        None => return,
    };
    if to.node().is_none() && admin::is_for_me(ctx, to.domain().as_str(), &stanza) {
        return admin::request(ctx, stanza);
    }
    if !ctx.config.serves(to.domain().as_str()) {
        if let Some(r) =
            stanza.error_reply(StanzaErrorCondition::ServiceUnavailable, "not served here")
        {
            ctx.send(r);
        }
        return;
    }
    let from = stanza.attr("from").and_then(|f| jids::parse(&f).ok());
    if to.node().is_none() {
        if to.resource().is_none() {
            server::inbound(ctx, Packet::new(stanza, Some(to), from));
        } else if let Some(r) = stanza.error_reply(StanzaErrorCondition::ServiceUnavailable, "") {
            ctx.send(r);
        }
        return;
    }
    let user = to.clone().into_bare();
    dispatch(
        ctx,
        &user,
        Event::Inbound(Packet::new(stanza, Some(to), from)),
    );
}
