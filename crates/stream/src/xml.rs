//! Small XML text helpers used when writing stanzas by hand.

use std::borrow::Cow;

/// Escapes text for use inside an attribute value (either quote) or element content.
pub fn escape(s: &str) -> Cow<'_, str> {
    quick_xml::escape::escape(s)
}

/// Unescapes the predefined entities and character references of a raw attribute value.
pub fn unescape(raw: &str) -> Option<Cow<'_, str>> {
    quick_xml::escape::unescape(raw).ok()
}

/// An element from its start tag without the closing `>` (`<name attr='..'`), its name
/// and its raw content: `<name ../>` when the content is empty.
pub fn element(head: &str, name: &str, content: &[u8]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(head.len() + content.len() + name.len() + 4);
    out.extend_from_slice(head.as_bytes());
    if content.is_empty() {
        out.extend_from_slice(b"/>");
    } else {
        out.push(b'>');
        out.extend_from_slice(content);
        out.extend_from_slice(b"</");
        out.extend_from_slice(name.as_bytes());
        out.push(b'>');
    }
    bytes::Bytes::from(out)
}
