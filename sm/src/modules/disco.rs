//! Service discovery (XEP-0030) of the server and of accounts. Every feature listed
//! here is answered by sm.

use crate::config::SmConfig;
use crate::xml::Element;

pub const NS_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const NS_ITEMS: &str = "http://jabber.org/protocol/disco#items";

/// Features of the server (a domain sm serves).
pub fn server_features(config: &SmConfig) -> Vec<&'static str> {
    let mut f = vec![
        NS_INFO,
        NS_ITEMS,
        crate::ping::NS_PING,
        crate::version::NS_VERSION,
        crate::time::NS_TIME,
        crate::last::NS_LAST,
        crate::vcard::NS_VCARD,
        // XEP-0160: offline messages are kept for later.
        "msgoffline",
    ];
    if config.register {
        f.push(crate::register::NS_REGISTER);
    }
    f
}

/// Features answered at an account's bare JID.
pub fn account_features() -> Vec<&'static str> {
    vec![
        NS_INFO,
        NS_ITEMS,
        crate::ping::NS_PING,
        crate::last::NS_LAST,
        crate::vcard::NS_VCARD,
    ]
}

fn info(category: &str, kind: &str, name: Option<&str>, features: &[&str]) -> Element {
    let mut identity = Element::new("identity", NS_INFO)
        .with_attr("category", category)
        .with_attr("type", kind);
    if let Some(n) = name {
        identity.set_attr("name", n);
    }
    let mut q = Element::new("query", NS_INFO).with_child(identity);
    for f in features {
        q.push(Element::new("feature", NS_INFO).with_attr("var", *f));
    }
    q
}

pub fn server_info(config: &SmConfig) -> Element {
    info("server", "im", Some("jabberd-rs"), &server_features(config))
}

pub fn account_info() -> Element {
    info("account", "registered", None, &account_features())
}

/// No items: sm knows of no other entities to list yet.
pub fn items() -> Element {
    Element::new("query", NS_ITEMS)
}
