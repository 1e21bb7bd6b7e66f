//! The top-level children of a stanza, read over the tag boundaries without a general
//! XML reader: name, namespace and place of each. For stanzas already checked to be
//! well-formed (at the edges: c2s, s2s, the router for other components).

use std::ops::Range;

use crate::stanza::Stanza;

/// Namespaces a stanza's top level may carry; its unqualified children (`body`,
/// `thread`, ...) are in the stream's content namespace, reported as `jabber:client`.
pub const CONTENT_NS: [&str; 3] = [NS_CLIENT, "jabber:server", "jabber:component:accept"];
pub const NS_CLIENT: &str = "jabber:client";

/// One top-level child: local name, resolved namespace (`jabber:client` for the
/// content namespace), and its bytes' place in the stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub name: String,
    pub ns: String,
    pub span: Range<usize>,
}

/// The top-level children of a stanza, namespaces resolved.
///
/// Written by hand over the tag boundaries: this runs for nearly every message (sm's
/// carbons and archive look at the children), and a general XML reader here cost a
/// sixth of sm's time per message. It can be this simple because every stanza reaching sm was
/// checked well-formed at the edge (c2s, s2s, or the router for other components), with
/// no comments, processing instructions or DTDs; CDATA sections are skipped.
pub fn children(stanza: &Stanza) -> Vec<Child> {
    let mut out = vec![];
    if stanza.is_empty_element() {
        return out;
    }
    let bytes = stanza.as_slice();
    // The content starts right after the stanza's start tag.
    let inner = stanza.inner();
    let base = inner.as_ptr() as usize - bytes.as_ptr() as usize;
    let head = &bytes[..base];
    let mut depth = 0usize;
    let mut open: Option<(String, String, usize)> = None;
    let mut pos = 0;
    while let Some(lt) = memchr::memchr(b'<', &inner[pos..]) {
        let at = pos + lt;
        let rest = &inner[at..];
        if rest.starts_with(b"<![CDATA[") {
            match memchr::memmem::find(rest, b"]]>") {
                Some(end) => pos = at + end + 3,
                None => return out,
            }
            continue;
        }
        let Some(len) = crate::xml::tag_len(rest) else {
            return out;
        };
        let tag = &rest[..len];
        pos = at + len;
        if tag.starts_with(b"</") {
            if depth == 1 {
                if let Some((name, ns, start)) = open.take() {
                    out.push(Child {
                        name,
                        ns,
                        span: base + start..base + pos,
                    });
                }
            }
            depth = depth.saturating_sub(1);
            continue;
        }
        let empty = tag.ends_with(b"/>");
        if depth == 0 {
            let (name, ns) = name_and_ns(tag, head);
            if empty {
                out.push(Child {
                    name,
                    ns,
                    span: base + at..base + pos,
                });
            } else {
                open = Some((name, ns, at));
                depth = 1;
            }
        } else if !empty {
            depth += 1;
        }
    }
    out
}

/// The top-level child of `stanza` whose bytes are at `span` (one whole element, as
/// [`children`] would report it): for a caller that added it and knows where.
pub fn child_at(stanza: &Stanza, span: Range<usize>) -> Child {
    let bytes = stanza.as_slice();
    let head = &bytes[..stanza.inner().as_ptr() as usize - bytes.as_ptr() as usize];
    let element = &bytes[span.clone()];
    let tag = &element[..crate::xml::tag_len(element).unwrap_or(element.len())];
    let (name, ns) = name_and_ns(tag, head);
    Child { name, ns, span }
}

/// A child's local name and namespace from its start tag: declared on it (directly or
/// for its prefix), a prefix the stanza's own tag declares, or the content namespace
/// (`jabber:client`).
fn name_and_ns(tag: &[u8], stanza_head: &[u8]) -> (String, String) {
    let end = tag
        .iter()
        .position(|b| b.is_ascii_whitespace() || *b == b'/' || *b == b'>')
        .unwrap_or(tag.len());
    let qname = text(&tag[1..end]);
    let (prefix, local) = match qname.split_once(':') {
        Some((p, l)) => (Some(p), l),
        None => (None, qname.as_ref()),
    };
    let decl = match prefix {
        None => "xmlns".to_owned(),
        Some(p) => format!("xmlns:{p}"),
    };
    let ns = attr_value(&tag[end..], &decl)
        .or_else(|| prefix.and_then(|_| attr_value(stanza_head, &decl)))
        .map(|ns| {
            if CONTENT_NS.contains(&ns.as_str()) {
                NS_CLIENT.to_owned()
            } else {
                ns
            }
        })
        .unwrap_or_else(|| {
            if prefix.is_none() {
                NS_CLIENT.to_owned()
            } else {
                String::new()
            }
        });
    (local.to_owned(), ns)
}

/// Bytes of a stanza as text. They were checked as UTF-8 where they came in: the usual
/// check, a word at a time for ASCII, first (`from_utf8_lossy` walks them in chunks).
fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.into(),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// The (unescaped) value of attribute `name` among the attributes of a tag.
fn attr_value(attrs: &[u8], name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&attrs[from..], name.as_bytes()) {
        let at = from + i;
        from = at + name.len();
        // A whole attribute name: after whitespace, then `=` (spaces allowed around it).
        if at == 0 || !attrs[at - 1].is_ascii_whitespace() {
            continue;
        }
        let mut j = at + name.len();
        while j < attrs.len() && attrs[j].is_ascii_whitespace() {
            j += 1;
        }
        if attrs.get(j) != Some(&b'=') {
            continue;
        }
        j += 1;
        while j < attrs.len() && attrs[j].is_ascii_whitespace() {
            j += 1;
        }
        let quote = *attrs.get(j)?;
        let close = memchr::memchr(quote, &attrs[j + 1..])?;
        let raw = text(&attrs[j + 1..j + 1 + close]);
        return Some(
            quick_xml::escape::unescape(&raw)
                .map(|v| v.into_owned())
                .unwrap_or_else(|_| raw.into_owned()),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn names(s: &'static str) -> Vec<(String, String)> {
        let stanza = Stanza::parse(Bytes::from_static(s.as_bytes())).unwrap();
        children(&stanza)
            .into_iter()
            .map(|c| (c.name, c.ns))
            .collect()
    }

    #[test]
    fn reads_names_and_namespaces() {
        assert_eq!(
            names("<iq type='set' id='1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>"),
            [("bind".to_owned(), "urn:ietf:params:xml:ns:xmpp-bind".to_owned())]
        );
        assert_eq!(
            names("<message><body>hi</body><p:x xmlns:p='urn:p'/></message>"),
            [
                ("body".to_owned(), NS_CLIENT.to_owned()),
                ("x".to_owned(), "urn:p".to_owned())
            ]
        );
        assert!(names("<presence/>").is_empty());
    }
}
