//! The XMPP side: service discovery, the streamhost query and activation (XEP-0065).

use std::sync::Arc;

use bytes::Bytes;
use jid::Jid;
use jrs_component::{ComponentReader, Outbox};
use jrs_stream::children::children;
use jrs_stream::xml::{escape, unescape};
use jrs_stream::{Stanza, StanzaErrorCondition};
use sha1::{Digest, Sha1};
use tracing::{debug, info};

use crate::config::ProxyConfig;
use crate::relay::{Activation, Relay};

pub const NS_BYTESTREAMS: &str = "http://jabber.org/protocol/bytestreams";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const NS_PING: &str = "urn:xmpp:ping";

pub struct Service {
    pub config: ProxyConfig,
    pub relay: Arc<Relay>,
}

/// DST.ADDR of a stream: hex SHA-1 of SID + initiator JID + target JID (XEP-0065 5.3.2).
pub fn stream_address(sid: &str, initiator: &str, target: &str) -> String {
    let mut h = Sha1::new();
    h.update(sid.as_bytes());
    h.update(initiator.as_bytes());
    h.update(target.as_bytes());
    hex::encode(h.finalize())
}

impl Service {
    fn me(&self) -> &str {
        &self.config.router.name
    }

    /// The answer to one stanza from the router, if any.
    pub fn answer(&self, stanza: &Stanza) -> Option<Bytes> {
        if stanza.name() != "iq" || !matches!(stanza.kind(), Some("get" | "set")) {
            return None;
        }
        let kids = children(stanza);
        let Some(child) = kids.first().filter(|_| kids.len() == 1) else {
            return stanza.error_reply(StanzaErrorCondition::BadRequest, "one child expected");
        };
        let el = Stanza::parse(Bytes::copy_from_slice(
            &stanza.as_slice()[child.span.clone()],
        ))
        .ok()?;
        let get = stanza.kind() == Some("get");
        let to_me = stanza
            .attr("to")
            .is_some_and(|t| t.eq_ignore_ascii_case(self.me()));
        if !to_me {
            return stanza.error_reply(StanzaErrorCondition::ServiceUnavailable, "");
        }
        let user = stanza
            .attr("from")
            .and_then(|f| Jid::new(&f).ok())
            .map(|j| j.to_bare());
        let allowed = user.as_ref().is_some_and(|u| self.config.allows(u));
        match (child.ns.as_str(), child.name.as_str(), get) {
            (NS_DISCO_INFO, "query", true) if el.attr("node").is_none() => {
                self.result(stanza, &format!(
                    "<query xmlns='{NS_DISCO_INFO}'>\
                     <identity category='proxy' type='bytestreams' name='SOCKS5 Bytestreams'/>\
                     <feature var='{NS_DISCO_INFO}'/><feature var='{NS_DISCO_ITEMS}'/>\
                     <feature var='{NS_PING}'/><feature var='{NS_BYTESTREAMS}'/></query>"
                ))
            }
            (NS_DISCO_ITEMS, "query", true) if el.attr("node").is_none() => {
                self.result(stanza, &format!("<query xmlns='{NS_DISCO_ITEMS}'/>"))
            }
            (NS_DISCO_INFO | NS_DISCO_ITEMS, "query", true) => {
                stanza.error_reply(StanzaErrorCondition::ItemNotFound, "no such node")
            }
            (NS_PING, "ping", true) => self.result(stanza, ""),
            (NS_BYTESTREAMS, "query", _) if !allowed => stanza.error_reply(
                StanzaErrorCondition::Forbidden,
                "only users of this server may use this proxy",
            ),
            (NS_BYTESTREAMS, "query", true) => self.result(
                stanza,
                &format!(
                    "<query xmlns='{NS_BYTESTREAMS}'><streamhost jid='{}' host='{}' port='{}'/></query>",
                    escape(self.me()),
                    escape(&self.config.streamhost_host),
                    self.config.streamhost_port
                ),
            ),
            (NS_BYTESTREAMS, "query", false) => self.activate(stanza, &el),
            _ => stanza.error_reply(StanzaErrorCondition::ServiceUnavailable, ""),
        }
    }

    fn result(&self, stanza: &Stanza, content: &str) -> Option<Bytes> {
        let mut s = format!(
            "<iq type='result' from='{}' id='{}'",
            escape(self.me()),
            escape(stanza.id().unwrap_or(""))
        );
        if let Some(from) = stanza.attr("from") {
            s.push_str(&format!(" to='{}'", escape(&from)));
        }
        s.push('>');
        s.push_str(content);
        s.push_str("</iq>");
        Some(Bytes::from(s))
    }

    /// `<query sid='..'><activate>TARGET</activate></query>` from the initiator.
    fn activate(&self, stanza: &Stanza, query: &Stanza) -> Option<Bytes> {
        let sid = query.attr("sid").filter(|s| !s.is_empty());
        let target = children(query)
            .into_iter()
            .find(|c| c.name == "activate")
            .and_then(|c| {
                Stanza::parse_slice(&query.as_slice()[c.span])
                    .ok()
                    .map(|a| a.inner().to_vec())
            })
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|t| unescape(t.trim()).map(|t| t.into_owned()))
            .filter(|t| Jid::new(t).is_ok());
        let (Some(sid), Some(target), Some(initiator)) = (sid, target, stanza.attr("from")) else {
            return stanza.error_reply(
                StanzaErrorCondition::BadRequest,
                "activation needs sid and <activate>TARGET-JID</activate>",
            );
        };
        let addr = stream_address(&sid, &initiator, &target);
        let user = Jid::new(&initiator)
            .map(|j| j.to_bare().to_string())
            .unwrap_or_default();
        match self.relay.activate(&addr, &user) {
            Activation::Started => {
                info!(stream = &addr[..8], %initiator, %target, "stream activated");
                self.result(stanza, "")
            }
            Activation::NotFound => stanza.error_reply(
                StanzaErrorCondition::ItemNotFound,
                "the initiator and the target are not both connected for that stream",
            ),
            Activation::TooMany => stanza.error_reply(
                StanzaErrorCondition::ResourceConstraint,
                "too many streams through this proxy at once",
            ),
            Activation::Busy => stanza.error_reply(
                StanzaErrorCondition::ResourceConstraint,
                "the proxy relays as many streams as it may; try again later",
            ),
        }
    }
}

/// Serves one router link until it drops.
pub async fn serve(
    service: Arc<Service>,
    mut reader: ComponentReader,
    outbox: Outbox,
) -> anyhow::Result<()> {
    loop {
        let stanza = reader.next().await?;
        match service.answer(&stanza) {
            Some(reply) => {
                outbox.send(reply);
            }
            None => debug!(name = stanza.name(), "not answered"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::RelayLimits;
    use std::path::PathBuf;
    use std::time::Duration;

    fn service() -> Service {
        let node = jrs_config::Node::parse_str(
            "<proxy65><router name='proxy.localhost' secret='s'/><host>localhost</host>\
             <listen port='7777'/><streamhost host='proxy.example' port='7000'/></proxy65>",
            Arc::new(PathBuf::from("p.xml")),
        )
        .unwrap();
        Service {
            config: ProxyConfig::from_node(&node).unwrap(),
            relay: Relay::new(RelayLimits {
                bandwidth: 0,
                streams_per_user: 1,
                max_waiting: 4,
                per_address: 4,
                max_streams: 2,
                handshake: Duration::from_secs(1),
                idle: Duration::from_secs(1),
                pending: Duration::from_secs(1),
            }),
        }
    }

    fn answer(s: &Service, from: &str, kind: &str, body: &str) -> String {
        let st = Stanza::parse(Bytes::from(format!(
            "<iq type='{kind}' id='i' from='{from}' to='proxy.localhost'>{body}</iq>"
        )))
        .unwrap();
        String::from_utf8(s.answer(&st).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn address_is_the_xep_example() {
        // XEP-0065 example: SID vxf9n471bn46, requester romeo@montague.lit/orchard,
        // target juliet@capulet.lit/balcony.
        assert_eq!(
            stream_address(
                "vxf9n471bn46",
                "romeo@montague.lit/orchard",
                "juliet@capulet.lit/balcony"
            ),
            hex::encode(Sha1::digest(
                b"vxf9n471bn46romeo@montague.lit/orchardjuliet@capulet.lit/balcony"
            ))
        );
    }

    #[tokio::test]
    async fn disco_streamhost_and_activation_errors() {
        let s = service();
        let info = answer(
            &s,
            "a@localhost/r",
            "get",
            &format!("<query xmlns='{NS_DISCO_INFO}'/>"),
        );
        assert!(
            info.contains("category='proxy' type='bytestreams'"),
            "{info}"
        );
        let host = answer(
            &s,
            "a@localhost/r",
            "get",
            &format!("<query xmlns='{NS_BYTESTREAMS}'/>"),
        );
        assert!(
            host.contains("<streamhost jid='proxy.localhost' host='proxy.example' port='7000'/>"),
            "{host}"
        );
        let stranger = answer(
            &s,
            "a@example.net/r",
            "get",
            &format!("<query xmlns='{NS_BYTESTREAMS}'/>"),
        );
        assert!(stranger.contains("forbidden"), "{stranger}");
        let none = answer(
            &s,
            "a@localhost/r",
            "set",
            &format!("<query xmlns='{NS_BYTESTREAMS}' sid='s1'><activate>b@localhost/x</activate></query>"),
        );
        assert!(none.contains("item-not-found"), "{none}");
        let bad = answer(
            &s,
            "a@localhost/r",
            "set",
            &format!("<query xmlns='{NS_BYTESTREAMS}' sid='s1'/>"),
        );
        assert!(bad.contains("bad-request"), "{bad}");
    }
}
