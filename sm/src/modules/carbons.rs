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
    Declaration, Disco, Flow, Hook, Iq, IqKind, Module, Packet, Reply, Scope, Session, SessionKey,
    SessionState, Stanzas, User,
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
            .stanzas(Hook::Outbound, Stanzas::Message, 500)
            .stanzas(Hook::Inbound, Stanzas::Message, 300)
            .hook(Hook::Delivered, 0)
            .hook(Hook::SessionRestored, 0)
    }

    fn session_state(&self, s: &Session, state: &mut SessionState) {
        state.carbons = s.state.get::<Enabled>().is_some();
    }

    async fn session_restored(&self, u: &mut User, key: SessionKey, state: &SessionState) {
        if let Some(s) = u.session_mut(key).filter(|_| state.carbons) {
            s.state.insert(Enabled);
        }
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
            if let Err(r) = iq.parse::<xmpp_parsers::carbons::Enable>() {
                return r;
            }
            s.state.insert(Enabled);
            debug!("carbons enabled");
        } else {
            if let Err(r) = iq.parse::<xmpp_parsers::carbons::Disable>() {
                return r;
            }
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
        if p.remove_children(|_, c| c.name == "private" && c.ns == NS_CARBONS) {
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

#[cfg(test)]
mod tests {
    use crate::modules::testing::*;

    const ENABLE: &str = "<iq type='set' id='c1'><enable xmlns='urn:xmpp:carbons:2'/></iq>";

    async fn alice() -> crate::host::User {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 5).await;
        online(&mut u, "laptop", 1).await;
        send(&mut u, "laptop", ENABLE).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "laptop", &["id='c1'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        u
    }

    #[tokio::test]
    async fn received_copies_go_to_enabled_sessions_that_did_not_get_the_message() {
        let mut u = alice().await;
        let chat = "<message from='bob@example.com/x' to='alice@localhost' type='chat'><body>hi</body></message>";
        inbound(&mut u, chat).await;
        let out = take(&mut u);
        assert_eq!(to(&out, "phone", &["<body>hi</body>"]).len(), 1, "{out:?}");
        let copies = to(
            &out,
            "laptop",
            &[
                "<received xmlns='urn:xmpp:carbons:2'>",
                "<forwarded xmlns='urn:xmpp:forward:0'>",
                "from='alice@localhost'",
                "to='alice@localhost/laptop'",
                "<message xmlns='jabber:client' from='bob@example.com/x'",
            ],
        );
        assert_eq!(copies.len(), 1, "{out:?}");
        // Addressed to the laptop itself: the original there, no copy anywhere.
        inbound(
            &mut u,
            &chat.replace("to='alice@localhost'", "to='alice@localhost/laptop'"),
        )
        .await;
        let out = take(&mut u);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].0 == "laptop" && !out[0].1.contains("received"));
    }

    #[tokio::test]
    async fn sent_copies_go_to_the_other_enabled_sessions() {
        let mut u = alice().await;
        send(
            &mut u,
            "phone",
            "<message to='bob@example.com' type='chat' id='s1'><body>yo</body></message>",
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["to='bob@example.com'", "<body>yo</body>"]).len(),
            1,
            "{out:?}"
        );
        assert_eq!(
            to(
                &out,
                "laptop",
                &[
                    "<sent xmlns='urn:xmpp:carbons:2'>",
                    "from='alice@localhost/phone'"
                ]
            )
            .len(),
            1,
            "{out:?}"
        );
        assert!(to(&out, "phone", &["sent"]).is_empty());
        // The laptop's own messages are not copied back to it.
        send(
            &mut u,
            "laptop",
            "<message to='bob@example.com' type='chat'><body>yo</body></message>",
        )
        .await;
        assert!(to(&take(&mut u), "laptop", &["sent"]).is_empty());
    }

    #[tokio::test]
    async fn private_no_copy_group_chat_and_muc_messages_are_not_copied() {
        let mut u = alice().await;
        for m in [
            "<message to='bob@example.com' type='chat'><body>x</body><private xmlns='urn:xmpp:carbons:2'/></message>",
            "<message to='bob@example.com' type='chat'><body>x</body><no-copy xmlns='urn:xmpp:hints'/></message>",
            "<message to='room@muc.example.com' type='groupchat'><body>x</body></message>",
            "<message to='bob@example.com'><thread>t</thread></message>",
        ] {
            send(&mut u, "phone", m).await;
            let out = take(&mut u);
            assert!(to(&out, "laptop", &[]).is_empty(), "{m}: {out:?}");
        }
        // The recipient's server removes <private/> and copies nothing.
        inbound(&mut u, "<message from='bob@example.com/x' to='alice@localhost' type='chat'><body>x</body><private xmlns='urn:xmpp:carbons:2'/></message>").await;
        let out = take(&mut u);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(
            out[0].0 == "phone" && !out[0].1.contains("private"),
            "{out:?}"
        );
        // A private message from a room occupant is the room's, not a conversation's.
        inbound(&mut u, "<message from='room@muc.example.com/nick' to='alice@localhost' type='chat'><body>x</body><x xmlns='http://jabber.org/protocol/muc#user'/></message>").await;
        assert!(to(&take(&mut u), "laptop", &[]).is_empty());
    }

    #[tokio::test]
    async fn disabling_stops_copies() {
        let mut u = alice().await;
        send(
            &mut u,
            "laptop",
            "<iq type='set' id='c2'><disable xmlns='urn:xmpp:carbons:2'/></iq>",
        )
        .await;
        take(&mut u);
        send(
            &mut u,
            "phone",
            "<message to='bob@example.com' type='chat'><body>yo</body></message>",
        )
        .await;
        assert!(to(&take(&mut u), "laptop", &[]).is_empty());
    }
}
