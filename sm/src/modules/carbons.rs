//! Message Carbons (XEP-0280, `urn:xmpp:carbons:2`): a session that enables carbons
//! gets a `<sent/>` copy of what the user's other sessions send, and a `<received/>`
//! copy of what the user receives on other sessions, each wrapped in a XEP-0297
//! `<forwarded/>`. Which messages are copied follows XEP-0280 section 6: chat
//! messages, normal ones with a body (or another instant-messaging payload), never
//! errors, group chat, messages a MUC room sent (private messages included), or
//! messages marked `<private/>` or XEP-0334 `<no-copy/>`.

use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;
use xmpp_parsers::ns::{CARBONS as NS_CARBONS, FORWARD as NS_FORWARD};

use jrs_stream::xml::escape;
use jrs_stream::StanzaErrorCondition;

use crate::config::SmConfig;
use crate::host::{
    Declaration, Disco, Flow, Hook, Iq, IqKind, Module, Packet, Reply, Scope, SessionKey, User,
};

const NS_HINTS: &str = "urn:xmpp:hints";
const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
/// Payloads that make a `normal` message without a body part of a conversation.
const IM_PAYLOADS: [&str; 5] = [
    "http://jabber.org/protocol/chatstates",
    "urn:xmpp:receipts",
    "urn:xmpp:chat-markers:0",
    "eu.siacs.conversations.axolotl",
    "urn:xmpp:omemo:2",
];

pub struct Carbons;

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    if let Some(n) = config.module_settings("carbons")? {
        n.allow(&[], &[])?;
    }
    Ok(Arc::new(Carbons))
}

/// A session that enabled carbons.
#[derive(Debug, Default)]
pub struct Enabled;

/// A message the sender marked `<private/>` (noted on the packet before the marker is
/// removed, XEP-0280 section 8).
#[derive(Debug, Default)]
struct Private;

/// Whether `p` is a message XEP-0280 section 6 copies (whichever way it goes).
pub fn eligible(p: &Packet) -> bool {
    if p.name() != "message" {
        return false;
    }
    let conversational = match p.kind().unwrap_or("normal") {
        "chat" => true,
        "normal" => p.has_body() || IM_PAYLOADS.iter().any(|ns| p.has_ns(ns)),
        _ => false,
    };
    conversational
        && !p.has("private", NS_CARBONS)
        && !p.has("no-copy", NS_HINTS)
        && p.notes.get::<Private>().is_none()
}

/// `<message from=BARE to=FULL type=..><WRAPPER xmlns=carbons><forwarded>..` around
/// `p` (XEP-0280 sections 6 and 7).
fn wrap(u: &User, to: &str, wrapper: &str, p: &Packet) -> Bytes {
    let kind = p
        .kind()
        .map(|k| format!(" type='{}'", escape(k)))
        .unwrap_or_default();
    let inner = p.forwardable();
    let mut out = Vec::with_capacity(inner.len() + 200);
    out.extend_from_slice(
        format!(
            "<message from='{}' to='{}'{kind}><{wrapper} xmlns='{NS_CARBONS}'><forwarded xmlns='{NS_FORWARD}'>",
            escape(&u.bare),
            escape(to)
        )
        .as_bytes(),
    );
    out.extend_from_slice(&inner);
    out.extend_from_slice(format!("</forwarded></{wrapper}></message>").as_bytes());
    Bytes::from(out)
}

/// Sends a `wrapper` copy of `p` to every carbons-enabled session not in `skip`.
fn copy(u: &mut User, wrapper: &str, p: &Packet, skip: &[SessionKey]) {
    let targets: Vec<(SessionKey, String)> = u
        .sessions
        .iter()
        .filter(|s| s.state.get::<Enabled>().is_some() && !skip.contains(&s.key))
        .map(|s| (s.key, s.full.clone()))
        .collect();
    for (key, full) in targets {
        let copy = wrap(u, &full, wrapper, p);
        u.deliver(key, copy);
    }
}

#[async_trait::async_trait]
impl Module for Carbons {
    fn name(&self) -> &'static str {
        "carbons"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(
                IqKind::Set,
                &[Scope::Server, Scope::Own],
                NS_CARBONS,
                "enable",
            )
            .iq(
                IqKind::Set,
                &[Scope::Server, Scope::Own],
                NS_CARBONS,
                "disable",
            )
            .feature(Disco::Server, NS_CARBONS)
            // Sent copies before the message leaves; private markers noted before the
            // message is delivered; received copies once it was.
            .hook(Hook::Outbound, 500)
            .hook(Hook::Inbound, 300)
            .hook(Hook::Delivered, 0)
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        let Some(key) = iq.session else {
            return Reply::error(
                StanzaErrorCondition::NotAllowed,
                "carbons are for the sessions of this server's users",
            );
        };
        let Some(s) = u.session_mut(key) else {
            return Reply::not_handled();
        };
        if iq.payload.name() == "enable" {
            s.state.insert(Enabled);
            debug!("carbons enabled");
        } else {
            s.state.remove::<Enabled>();
            debug!("carbons disabled");
        }
        Reply::empty()
    }

    async fn outbound(&self, u: &mut User, from: SessionKey, p: &mut Packet) -> Flow {
        // Messages to the user's own account are copied when received (they are).
        let to_self = p.to.as_ref().is_none_or(|to| u.is_same_user(to));
        if !to_self && eligible(p) {
            copy(u, "sent", p, &[from]);
        }
        Flow::Pass
    }

    async fn inbound(&self, _u: &mut User, p: &mut Packet) -> Flow {
        // XEP-0280 section 8: the recipient's server removes the marker.
        if p.name() == "message"
            && p.remove_children(|_, c| c.name == "private" && c.ns == NS_CARBONS)
        {
            p.notes.insert(Private);
        }
        Flow::Pass
    }

    async fn delivered(&self, u: &mut User, p: &Packet, to: &[SessionKey]) {
        // Not what a MUC room sent, private messages from occupants included.
        if eligible(p) && !p.has("x", NS_MUC_USER) {
            copy(u, "received", p, to);
        }
    }
}
