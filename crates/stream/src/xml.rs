//! Small XML text helpers used when writing stanzas by hand.

use std::borrow::Cow;

use crate::scan::find_any;

/// Escapes text for use inside an attribute value (either quote) or element content, as
/// quick-xml's `escape` does (`<`, `>`, `&`, both quotes and `\r`). Most text has nothing
/// to escape (addresses, ids, a message's payload written into an archive batch), and
/// quick-xml finds that a byte at a time; eight at a time first takes about half the
/// instructions (docs/benchmarks.md, "Addresses parsed once").
pub fn escape(s: &str) -> Cow<'_, str> {
    if find_any(s.as_bytes(), [b'<', b'>', b'&', b'\'', b'"', b'\r']).is_none() {
        return Cow::Borrowed(s);
    }
    quick_xml::escape::escape(s)
}

/// Unescapes the predefined entities and character references of a raw attribute value.
pub fn unescape(raw: &str) -> Option<Cow<'_, str>> {
    quick_xml::escape::unescape(raw).ok()
}

/// An element from its start tag without the closing `>` (`<name attr='..'`), its name
/// and its raw content: `<name ../>` when the content is empty.
pub fn element(head: &str, name: &str, content: &[u8]) -> bytes::Bytes {
    element_from_parts(&[head], name, content)
}

/// [`element`] with the start tag given in pieces (values already escaped), written
/// with one allocation: no `format!` of the head first (sm wraps every stanza it
/// delivers so, and the formatting was a tenth of its time under load).
pub fn element_from_parts(head: &[&str], name: &str, content: &[u8]) -> bytes::Bytes {
    let head_len: usize = head.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(head_len + content.len() + name.len() + 4);
    for part in head {
        out.extend_from_slice(part.as_bytes());
    }
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

/// The length of the tag at the start of `bytes` (`<...>` through its `>`, quoted
/// attribute values skipped, since `>` may stand in them), or `None` if it does not end.
/// For input already known to be well-formed, where a full reader is not needed.
pub fn tag_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let i = at + find_any(&bytes[at..], [b'>', b'"', b'\''])?;
        match bytes[i] {
            b'>' => return Some(i + 1),
            quote => at = i + 1 + find_any(&bytes[i + 1..], [quote])? + 1,
        }
    }
}

/// The length of the element at the start of `bytes` (start tag through its end tag),
/// or `None` if it does not end there: tags counted by depth, CDATA skipped. For input
/// already known to be well-formed, like [`tag_len`].
pub fn element_len(bytes: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut pos = 0;
    loop {
        let lt = pos + memchr::memchr(b'<', &bytes[pos..])?;
        let rest = &bytes[lt..];
        if rest.starts_with(b"<![CDATA[") {
            pos = lt + memchr::memmem::find(rest, b"]]>")? + 3;
            continue;
        }
        let len = tag_len(rest)?;
        let tag = &rest[..len];
        pos = lt + len;
        if tag.starts_with(b"</") {
            depth = depth.checked_sub(1)?;
        } else if !tag.ends_with(b"/>") {
            depth += 1;
        }
        if depth == 0 {
            return Some(pos);
        }
    }
}

#[cfg(test)]
mod element_len_tests {
    use super::{element_len, tag_len};

    #[test]
    fn finds_the_end_of_a_tag() {
        assert_eq!(tag_len(b"<a>rest"), Some(3));
        assert_eq!(tag_len(b"<a b='>' c=\"'>\"/>x"), Some(17));
        assert_eq!(
            tag_len(b"<message to='someone@example.org/resource'>"),
            Some(43)
        );
        assert_eq!(tag_len(b"<a b='>"), None);
        assert_eq!(tag_len(b"<a b"), None);
    }

    #[test]
    fn finds_the_end_of_the_first_element() {
        assert_eq!(element_len(b"<a/><b/>"), Some(4));
        assert_eq!(
            element_len(b"<a x='>'><a></a><![CDATA[</a>]]></a> "),
            Some(36)
        );
        assert_eq!(element_len(b"<a><b>"), None);
        assert_eq!(element_len(b"<a"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_quick_xml_does() {
        for special in ['<', '>', '&', '\'', '"', '\r', 'a', 'é', '\n'] {
            for len in 0..20 {
                for at in 0..len {
                    let mut s: Vec<char> = "abcdefghijklmnopqrsé".chars().take(len).collect();
                    s[at] = special;
                    let s: String = s.into_iter().collect();
                    assert_eq!(escape(&s), quick_xml::escape::escape(s.as_str()), "{s:?}");
                    assert_eq!(
                        matches!(escape(&s), Cow::Borrowed(_)),
                        !"<>&'\"\r".contains(special),
                        "{s:?}"
                    );
                }
            }
        }
    }
}
