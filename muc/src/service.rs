//! Stanzas to the service itself (`conference.localhost`): disco#info and the room
//! directory in disco#items (XEP-0045 6.1-6.3: the public rooms of every instance, from
//! the directory's log read again when older than `directory::CACHE`), ping;
//! everything else is refused.

use std::sync::Arc;

use jrs_stream::children::children;
use jrs_stream::Stanza;

use crate::xml::{self, NS_DISCO_INFO, NS_DISCO_ITEMS, NS_MUC, NS_OCCUPANT_ID, NS_PING};
use crate::Ctx;
use tracing::warn;

pub fn handle(ctx: &Arc<Ctx>, s: &Stanza) {
    if let Some(reply) = answer(ctx, s) {
        ctx.send(reply);
    }
}

/// The directory, once the log is read again (if the last read is not recent; a read
/// that fails leaves the last one).
fn directory(ctx: &Arc<Ctx>, s: &Stanza) {
    let (ctx, s) = (ctx.clone(), s.clone());
    tokio::spawn(async move {
        if let Err(e) = ctx.directory.refresh(&ctx.store, false).await {
            warn!("could not read the room directory: {e}");
        }
        let mut q = format!("<query xmlns='{NS_DISCO_ITEMS}'>");
        for (jid, name) in ctx.directory.public() {
            q.push_str(&format!("<item{}", xml::attr("jid", &jid)));
            if !name.is_empty() {
                q.push_str(&xml::attr("name", &name));
            }
            q.push_str("/>");
        }
        q.push_str("</query>");
        ctx.send(xml::iq_result(&s, &q).freeze());
    });
}

fn answer(ctx: &Arc<Ctx>, s: &Stanza) -> Option<bytes::Bytes> {
    let refuse = |c, text| xml::error_reply(s, c, text, "").map(|b| b.freeze());
    match (s.name(), s.kind().unwrap_or("")) {
        ("presence", _) => None,
        ("iq", "get") => {
            let parts = children(s);
            let payload = match parts.first() {
                Some(p) => xml::parse_child(s, p)?,
                None => return refuse(xml::BAD_REQUEST, "an IQ needs a payload"),
            };
            if payload.attr("node").is_some() {
                return refuse(xml::ITEM_NOT_FOUND, "no such node");
            }
            let body = match (payload.name(), payload.ns().as_str()) {
                ("query", NS_DISCO_INFO) => {
                    let mut q = format!(
                        "<query xmlns='{NS_DISCO_INFO}'><identity category='conference' type='text' name='Chatrooms'/>"
                    );
                    for f in [
                        NS_MUC,
                        NS_DISCO_INFO,
                        NS_DISCO_ITEMS,
                        NS_PING,
                        NS_OCCUPANT_ID,
                        "urn:xmpp:sid:0",
                        "http://jabber.org/protocol/muc#self-ping-optimization",
                    ] {
                        q.push_str(&format!("<feature var='{f}'/>"));
                    }
                    q.push_str("</query>");
                    q
                }
                ("query", NS_DISCO_ITEMS) => {
                    directory(ctx, s);
                    return None;
                }
                ("ping", NS_PING) => String::new(),
                _ => return refuse(xml::SERVICE_UNAVAILABLE, "not implemented by this service"),
            };
            Some(xml::iq_result(s, &body).freeze())
        }
        ("iq", "set") => refuse(xml::SERVICE_UNAVAILABLE, "not implemented by this service"),
        ("message", _) => refuse(
            xml::SERVICE_UNAVAILABLE,
            "this is a group chat service; address a room",
        ),
        _ => None,
    }
}
