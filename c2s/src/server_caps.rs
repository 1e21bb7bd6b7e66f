//! The server's own entity capabilities in the stream features (XEP-0115 6.3), so that
//! a client learns what the server supports without asking. c2s does not know which
//! modules sm runs: it asks each served domain's disco#info through the router when the
//! link comes up and when a component connects (an sm restart may change its modules),
//! and offers the hash of the answer.

use std::collections::HashMap;
use std::sync::RwLock;

use tracing::{debug, info};
use xmpp_parsers::disco::DiscoInfoResult;
use xmpp_parsers::ns::DISCO_INFO;

use jrs_component::Outbox;
use jrs_stream::xml::escape;
use jrs_stream::Stanza;

/// The id prefix of our queries (the rest is the domain).
const ID: &str = "caps:";

#[derive(Default)]
pub struct ServerCaps {
    /// By served domain: the XEP-0115 `ver` and the XEP-0390 hash of its disco#info.
    vers: RwLock<HashMap<String, (String, String)>>,
}

impl ServerCaps {
    /// The capabilities hashes of `domain` (XEP-0115, XEP-0390), once known.
    pub fn ver(&self, domain: &str) -> Option<(String, String)> {
        self.vers.read().expect("caps lock").get(domain).cloned()
    }

    /// Asks every domain of `hosts` for its disco#info, from `me` (our component name).
    pub fn ask(&self, outbox: &Outbox, me: &str, hosts: &[String]) {
        for host in hosts {
            outbox.send(format!(
                "<iq type='get' id='{ID}{}' from='{}' to='{}'><query xmlns='{DISCO_INFO}'/></iq>",
                escape(host),
                escape(me),
                escape(host)
            ));
        }
    }

    /// Takes the answer to one of our queries; false if `iq` is not one.
    pub fn answered(&self, iq: &Stanza) -> bool {
        let Some(domain) = iq
            .attr("id")
            .and_then(|id| id.strip_prefix(ID).map(str::to_owned))
        else {
            return false;
        };
        if iq.attr("from").as_deref() != Some(domain.as_str()) {
            debug!(%domain, "an answer to a capabilities query from elsewhere: ignored");
            return true;
        }
        if iq.kind() != Some("result") {
            debug!(%domain, "no disco#info for the server's capabilities");
            return true;
        }
        let info = String::from_utf8_lossy(iq.inner())
            .parse::<minidom::Element>()
            .ok()
            .and_then(|q| DiscoInfoResult::try_from(q).ok());
        let hashes = info.and_then(|i| {
            let ver = jrs_sx::caps::ver(&i, "sha-1")?;
            Some((ver, jrs_sx::caps::ecaps2(&i, jrs_sx::caps::ECAPS2_ALGO)?))
        });
        let Some((ver, ecaps2)) = hashes else {
            debug!(%domain, "unreadable disco#info for the server's capabilities");
            return true;
        };
        info!(%domain, %ver, "server capabilities offered to clients");
        self.vers
            .write()
            .expect("caps lock")
            .insert(domain, (ver, ecaps2));
        true
    }
}
