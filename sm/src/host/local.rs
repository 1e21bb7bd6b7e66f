//! Local delivery: a stanza a user's task sends to a user of a domain that this instance
//! alone serves goes straight to that user's task (`host::inbound`), as the router would
//! have sent it back here, without the round trip through the router (two socket
//! crossings, the router's framing and routing, sm's link reader: about a fifth of a
//! lone message's CPU, docs/benchmarks.md "Local delivery").
//!
//! - *Who serves the domain*: the router's link notices (`host::components`). While
//!   another sm instance shares the domain, the router chooses the recipient's instance
//!   by hashing the bare JID, so everything goes through it; so it does while sm's link
//!   is down or the notices have not been replayed yet. A second instance binding the
//!   domain is seen when its notice arrives: until then a stanza for a user the router
//!   now gives to it still reaches the user's sessions held here, or offline storage
//!   (both shared), never nowhere.
//! - *Order*: the decision is made for every packet a task sends (`User::flush`), not
//!   only for what modules route, so everything one task sends to one recipient takes
//!   the same way and arrives in the order sent.
//! - *Loss*: a stanza handed over here lives in sm's memory until the recipient's task
//!   sends what it produces, as one read from the router lives until its user's task
//!   handles it (docs/sm.md, "When sm or the router goes away"); an sm killed in that
//!   instant loses it either way. On the router path it would have waited in sm's
//!   outbox, which dies with sm too.
//! - `<delivery local="false"/>` in sm.xml sends everything through the router.

use bytes::Bytes;
use jrs_stream::Stanza;

use crate::host::kernel::Ctx;

/// The stanza in `packet`, when it is one to deliver here rather than send to the router:
/// a message, presence or IQ addressed to a user (a JID with a node) of a domain this
/// instance alone serves.
pub fn takes(ctx: &Ctx, packet: &Bytes) -> Option<Stanza> {
    if !ctx.config.local_delivery || !is_stanza(packet) {
        return None;
    }
    let stanza = Stanza::parse(packet.clone()).ok()?;
    let domain = user_domain(stanza.to()?)?;
    ctx.components
        .alone_serves(&ctx.me, domain)
        .then_some(stanza)
}

/// Whether `packet` starts with a stanza's start tag (session packets to c2s, the other
/// thing a task sends, never do): checked before parsing anything.
fn is_stanza(packet: &[u8]) -> bool {
    [&b"<message"[..], b"<presence", b"<iq"].iter().any(|name| {
        packet.starts_with(name)
            && packet
                .get(name.len())
                .is_some_and(|&c| matches!(c, b' ' | b'\t' | b'\r' | b'\n' | b'>' | b'/'))
    })
}

/// The domain of `to` when it names a user (`node@domain` with or without a resource):
/// a node holds neither `@` nor `/`, so the first `/` ends the bare JID and an `@`
/// before it ends the node.
fn user_domain(to: &str) -> Option<&str> {
    let bare = to.split_once('/').map_or(to, |(bare, _)| bare);
    let (node, domain) = bare.split_once('@')?;
    (!node.is_empty() && !domain.is_empty()).then_some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_domain_of_a_user() {
        assert_eq!(user_domain("alice@localhost"), Some("localhost"));
        assert_eq!(user_domain("alice@localhost/phone"), Some("localhost"));
        assert_eq!(user_domain("alice@localhost/a@b/c"), Some("localhost"));
        assert_eq!(user_domain("localhost"), None);
        assert_eq!(user_domain("localhost/a@b"), None);
        assert_eq!(user_domain("@localhost"), None);
        assert_eq!(user_domain("alice@"), None);
    }

    #[test]
    fn knows_stanzas_from_other_packets() {
        assert!(is_stanza(b"<message to='a@b'/>"));
        assert!(is_stanza(b"<presence/>"));
        assert!(is_stanza(b"<iq\nid='1'/>"));
        assert!(!is_stanza(b"<session type='stanza'/>"));
        assert!(!is_stanza(b"<messages/>"));
        assert!(!is_stanza(b"<iq"));
        assert!(!is_stanza(b" <message/>"));
    }
}
