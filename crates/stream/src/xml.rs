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
