//! Software version (XEP-0092) of the server.

use crate::xml::Element;

pub const NS_VERSION: &str = "jabber:iq:version";

pub fn version_payload() -> Element {
    Element::new("query", NS_VERSION)
        .with_child(Element::new("name", NS_VERSION).with_text("jabberd-rs"))
        .with_child(Element::new("version", NS_VERSION).with_text(env!("CARGO_PKG_VERSION")))
        .with_child(Element::new("os", NS_VERSION).with_text(std::env::consts::OS))
}
