//! `stanza`: the head of a top-level element (crates/stream/src/stanza.rs) read from
//! any bytes, as the router reads what trusted components send and c2s a BOSH `<body>`
//! (neither validated first), and everything built from it: attributes, the content,
//! the rewritten copies (addresses, namespace, error replies), its top-level children
//! (crates/stream/src/children.rs) and the tag scanners of crates/stream/src/xml.rs.
//! For an element the edges would pass, the copies must be well-formed again.

use bytes::Bytes;
use jrs_stream::validate::validate_stanza;
use jrs_stream::xml::{element_len, tag_len};
use jrs_stream::{addr, StanzaErrorCondition};
use jrs_stream::{children::children, Stanza};

use crate::support::edge_checked;

pub fn run(data: &[u8]) {
    let _ = (tag_len(data), element_len(data));
    // As the framer cuts it: nothing around the element.
    let valid = edge_checked(data) && data.trim_ascii().len() == data.len();
    if let Ok(s) = Stanza::parse_slice(data) {
        exercise(&s.to_owned(), valid);
    }
    if let Ok(s) = Stanza::parse(Bytes::copy_from_slice(data)) {
        let _ = s.into_bytes();
    }
}

/// Everything a stanza offers; `valid`: it passed the edge's checks, so what is built
/// from it must pass them too.
pub fn exercise(s: &Stanza, valid: bool) {
    let _ = (s.name(), s.kind(), s.id(), s.xmlns(), s.is_empty_element());
    for jid in [s.to(), s.from()].into_iter().flatten() {
        let _ = (addr::domain(jid), addr::bare(jid));
    }
    for name in [
        "to", "from", "type", "id", "xmlns", "xml:lang", "ns", "sid", "rid",
    ] {
        let _ = s.attr(name);
    }
    let inner = s.inner();
    assert!(inner.len() <= s.as_slice().len());
    let copies = [
        s.with_xmlns(None),
        s.with_xmlns(Some("jabber:client")),
        s.with_addresses(Some("a@b/c'\"&<>"), None),
        s.with_addresses(None, Some("x.example")),
    ];
    let replies = [
        s.error_reply(
            StanzaErrorCondition::ServiceUnavailable,
            "no <route> & 'no' \"way\"",
        ),
        s.error_reply_with(
            StanzaErrorCondition::NotAcceptable,
            "",
            "<blocked xmlns='urn:xmpp:blocking:errors'/>",
        ),
    ];
    if !valid {
        return;
    }
    for child in children(s) {
        let bytes = &s.as_slice()[child.span.clone()];
        assert!(
            bytes.starts_with(b"<") && bytes.ends_with(b">"),
            "child span {:?} is not an element",
            child.span
        );
    }
    for copy in copies.iter().chain(replies.iter().flatten()) {
        if let Err(e) = validate_stanza(copy) {
            panic!(
                "a copy of a valid stanza is not well-formed ({e}): {}",
                String::from_utf8_lossy(copy)
            );
        }
    }
}
