//! Building and reading stanzas as trees: for the handlers that change a stanza's
//! content (presence broadcast, stored messages) rather than forward its bytes.

use bytes::Bytes;

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::host::packet::CONTENT_NS;
use crate::xml::{Element, Node, XmlError, NS_CLIENT};

/// The stanza as a tree in the `jabber:client` namespace.
pub fn parse(stanza: &Stanza) -> Result<Element, XmlError> {
    let mut e = Element::parse(stanza.as_slice(), NS_CLIENT)?;
    if e.ns != NS_CLIENT && CONTENT_NS.contains(&e.ns.as_str()) {
        let from = e.ns.clone();
        remap_ns(&mut e, &from);
    }
    Ok(e)
}

fn remap_ns(e: &mut Element, from: &str) {
    // Depth is bounded by the framer (and the parser); plain recursion is fine.
    if e.ns == from {
        e.ns = NS_CLIENT.to_owned();
    }
    for c in &mut e.children {
        if let Node::Element(c) = c {
            remap_ns(c, from);
        }
    }
}

/// Reparses bytes we built ourselves.
pub fn reparse(bytes: impl Into<Bytes>) -> Stanza {
    Stanza::parse(bytes.into()).expect("sm writes well-formed stanzas")
}

/// `<presence/>` of `kind` (None: available) between two addresses.
pub fn presence(kind: Option<&str>, from: &str, to: &str) -> Element {
    let mut p = Element::new("presence", NS_CLIENT);
    if let Some(k) = kind {
        p.set_attr("type", k);
    }
    p.set_attr("from", from);
    p.set_attr("to", to);
    p
}

/// A refusal sm makes itself: the data would not fit in one storage fragment.
pub fn too_large(what: &str, max: usize) -> jrs_xdb::XdbError {
    jrs_xdb::XdbError::Refused(jrs_xdb::Refusal::new(
        StanzaErrorCondition::ResourceConstraint,
        format!("{what} would exceed the {max} bytes one storage record may hold"),
    ))
}
