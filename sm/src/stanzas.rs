//! Building and reading stanzas: trees from `Stanza` bytes, replies, IQ results.

use bytes::Bytes;
use jid::Jid;

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::xml::{Element, Node, XmlError, NS_CLIENT};

/// Namespaces a stanza's top-level element may carry on a component link; inside sm and
/// towards clients they all mean the content namespace `jabber:client`.
const STREAM_CONTENT_NS: [&str; 3] = [NS_CLIENT, "jabber:server", "jabber:component:accept"];

/// The stanza as a tree in the `jabber:client` namespace.
pub fn parse(stanza: &Stanza) -> Result<Element, XmlError> {
    let mut e = Element::parse(stanza.as_slice(), NS_CLIENT)?;
    if e.ns != NS_CLIENT && STREAM_CONTENT_NS.contains(&e.ns.as_str()) {
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

/// The stanza's bytes as a client must receive them: without a stream-level `xmlns` on
/// the top-level element (the session element and the client stream provide it).
pub fn for_client(stanza: &Stanza) -> Bytes {
    match stanza.xmlns() {
        None => stanza.bytes().clone(),
        Some(_) => match parse(stanza) {
            Ok(e) => Bytes::from(e.to_stanza()),
            Err(_) => stanza.bytes().clone(),
        },
    }
}

/// Reparses bytes we built ourselves.
pub fn reparse(bytes: impl Into<Bytes>) -> Stanza {
    Stanza::parse(bytes.into()).expect("sm writes well-formed stanzas")
}

/// A jid attribute, parsed (and normalised).
pub fn jid_attr(stanza: &Stanza, name: &str) -> Option<Result<Jid, jid::Error>> {
    stanza.attr(name).map(|s| Jid::new(&s))
}

/// The answer of an IQ handler.
#[derive(Debug)]
pub enum Reply {
    /// A result, with this payload (or none).
    Result(Option<Element>),
    Error(StanzaErrorCondition, String),
}

impl Reply {
    pub fn error(condition: StanzaErrorCondition, text: impl Into<String>) -> Reply {
        Reply::Error(condition, text.into())
    }

    pub fn empty() -> Reply {
        Reply::Result(None)
    }

    pub fn with(payload: Element) -> Reply {
        Reply::Result(Some(payload))
    }

    /// The bytes answering `request` (an IQ get or set); `None` only if the request was
    /// itself an error or result.
    pub fn into_bytes(self, request: &Stanza) -> Option<Bytes> {
        match self {
            Reply::Error(c, text) => request.error_reply(c, &text),
            Reply::Result(payload) => {
                let mut iq = Element::new("iq", NS_CLIENT).with_attr("type", "result");
                if let Some(id) = request.attr("id") {
                    iq.set_attr("id", id);
                }
                if let Some(from) = request.attr("from") {
                    iq.set_attr("to", from);
                }
                if let Some(to) = request.attr("to") {
                    iq.set_attr("from", to);
                }
                if let Some(p) = payload {
                    iq.push(p);
                }
                Some(Bytes::from(iq.to_stanza()))
            }
        }
    }
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

/// The answer for a failed storage operation: `resource-constraint` when a size or count
/// limit refused it, else `internal-server-error` (type `wait`: try again later).
pub fn storage_error(e: &jrs_xdb::XdbError) -> Reply {
    match e {
        jrs_xdb::XdbError::Refused(r)
            if r.condition == StanzaErrorCondition::ResourceConstraint =>
        {
            Reply::error(StanzaErrorCondition::ResourceConstraint, r.text.clone())
        }
        _ => Reply::error(
            StanzaErrorCondition::InternalServerError,
            format!("storage is not available right now ({e}); try again"),
        ),
    }
}

/// A refusal sm makes itself: the data would not fit in one storage fragment.
pub fn too_large(what: &str, max: usize) -> jrs_xdb::XdbError {
    jrs_xdb::XdbError::Refused(jrs_xdb::Refusal::new(
        StanzaErrorCondition::ResourceConstraint,
        format!("{what} would exceed the {max} bytes one storage record may hold"),
    ))
}
