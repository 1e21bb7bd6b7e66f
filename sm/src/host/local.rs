//! Local delivery: a stanza a user's task sends to a user of a domain that this instance
//! alone serves goes straight to that user's task (`host::inbound`), as the router would
//! have sent it back here, without the round trip through the router (two socket
//! crossings, the router's framing and routing, sm's link reader: about a fifth of a
//! lone message's CPU, docs/benchmarks.md "Local delivery").
//!
//! - *Who serves the domain*: the router's link notices (`host::components`). While
//!   another sm instance shares the domain, the router chooses the recipient's instance
//!   by hashing the bare JID, so everything goes through it; so it does before the
//!   notices are replayed after sm's link came back. (While the link is down, local
//!   delivery goes on with what sm knew.) A second instance binding the domain is seen
//!   when its notice arrives: until then a stanza for a user the router now gives to it
//!   still reaches the user's sessions held here, or offline storage (both shared).
//! - *Order*: the decision is made for every packet a task sends (`User::flush`), not
//!   only for what modules route, so everything one task sends to one recipient takes
//!   the same way and arrives in the order sent. When a domain comes to be served by this
//!   instance alone ([`confirm`]), sm first pings itself through the router and
//!   delivers locally only once the answer is back: whatever was sent through the
//!   router before (by this instance's tasks, or held by the router for an instance
//!   that left) has reached the recipients' queues by then, ahead of what comes after.
//! - *Loss*: a stanza handed over here lives in sm's memory until the recipient's task
//!   sends what it produces, as one read from the router lives until its user's task
//!   handles it (docs/sm.md, "When sm or the router restarts"); an sm killed in that
//!   instant loses it either way. On the router path it would have waited in sm's
//!   outbox, which dies with sm too.
//! - `<delivery local="false"/>` in sm.xml sends everything through the router.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jrs_stream::{addr, Stanza};

use tracing::{info, Instrument};

use crate::host::kernel::Ctx;

/// How long a confirmation waits for its answer before it is sent again.
const CONFIRM_WAIT: Duration = Duration::from_secs(5);

/// The stanza in `packet`, when it is one to deliver here rather than send to the router:
/// a message, presence or IQ addressed to a user (a JID with a node) of a domain this
/// instance alone serves.
pub fn takes(ctx: &Ctx, packet: &Bytes) -> Option<Stanza> {
    // The same first checks on the bytes, so that packets not taken are not parsed.
    if !ctx.config.local_delivery || !is_stanza(packet) || !ctx.components.delivers_any_locally() {
        return None;
    }
    let stanza = Stanza::parse(packet.clone()).ok()?;
    takes_parsed(ctx, &stanza).then_some(stanza)
}

/// [`takes`] for a stanza already parsed (`Output::RouteStanza`).
pub fn takes_parsed(ctx: &Ctx, stanza: &Stanza) -> bool {
    if !ctx.config.local_delivery
        || !matches!(stanza.name(), "message" | "presence" | "iq")
        || !ctx.components.delivers_any_locally()
    {
        return false;
    }
    let Some(domain) = stanza.to().and_then(user_domain) else {
        return false;
    };
    // The router routes by the domain in lower case: so is it looked up here, or
    // `bob@LocalHost` and `bob@localhost` would take different ways to the same user.
    if domain.bytes().any(|b| b.is_ascii_uppercase()) {
        ctx.components
            .delivers_locally(&ctx.me, &domain.to_ascii_lowercase())
    } else {
        ctx.components.delivers_locally(&ctx.me, domain)
    }
}

/// Starts confirming each domain this instance has come to serve alone (called after
/// each link notice): a ping from the domain to itself through the router, and local
/// delivery once its answer is back with no change of the domain's holders meanwhile.
pub fn confirm(ctx: &Arc<Ctx>) {
    if !ctx.config.local_delivery {
        return;
    }
    for domain in ctx.components.to_confirm(&ctx.me) {
        let span = tracing::info_span!(parent: None, "local", %domain);
        tokio::spawn(confirm_domain(ctx.clone(), domain).instrument(span));
    }
}

async fn confirm_domain(ctx: Arc<Ctx>, domain: String) {
    while ctx.components.still_confirming(&ctx.me, &domain) {
        let epoch = ctx.components.epoch();
        // Answered by the `ping` module, or with an error when it does not run: either
        // way the answer crossed the router twice, after everything sent before.
        let ping = "<ping xmlns='urn:xmpp:ping'/>";
        let answer = ctx.ask("get", &domain, &domain, ping, CONFIRM_WAIT).await;
        if answer.is_some() && ctx.components.settle(&ctx.me, &domain, epoch) {
            info!("served by this instance alone: stanzas between its users go from task to task, not through the router");
            return;
        }
    }
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

/// The domain of `to` when it names a user (`node@domain` with or without a resource).
fn user_domain(to: &str) -> Option<&str> {
    let (node, domain) = addr::bare(to).split_once('@')?;
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
