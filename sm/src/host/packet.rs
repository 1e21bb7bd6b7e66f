//! A stanza on its way through sm's chains: the bytes as received (forwarded unchanged
//! wherever nobody changes them), its parsed addresses, and, read only when a module
//! asks, the name, namespace and place of each top-level child. Modules that add or
//! remove a child (stanza-id, carbons' private) splice bytes; nothing is re-serialised.

use std::ops::Range;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use jid::Jid;

use jrs_stream::Stanza;

use crate::host::state::State;
use crate::xml::NS_CLIENT;

/// Namespaces a stanza's top level may carry on a component link; its unqualified
/// children (`body`, `thread`, ...) are in the content namespace, `jabber:client` to sm.
pub const CONTENT_NS: [&str; 3] = [NS_CLIENT, "jabber:server", "jabber:component:accept"];

/// One top-level child: local name, resolved namespace (`jabber:client` for the
/// content namespace), and its bytes' place in the stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub name: String,
    pub ns: String,
    pub span: Range<usize>,
}

#[derive(Debug)]
pub struct Packet {
    stanza: Stanza,
    /// The recipient, when the stanza has a (valid) `to`.
    pub to: Option<Jid>,
    /// The sender, when the stanza has a (valid) `from`.
    pub from: Option<Jid>,
    /// What modules noted about this stanza for the hooks that see it after them.
    pub notes: State,
    children: OnceLock<Vec<Child>>,
}

impl Packet {
    pub fn new(stanza: Stanza, to: Option<Jid>, from: Option<Jid>) -> Packet {
        Packet {
            stanza,
            to,
            from,
            notes: State::default(),
            children: OnceLock::new(),
        }
    }

    pub fn stanza(&self) -> &Stanza {
        &self.stanza
    }

    pub fn bytes(&self) -> &Bytes {
        self.stanza.bytes()
    }

    /// `message`, `presence` or `iq`.
    pub fn name(&self) -> &str {
        self.stanza.name()
    }

    /// The `type` attribute, if any.
    pub fn kind(&self) -> Option<&str> {
        self.stanza.kind()
    }

    pub fn children(&self) -> &[Child] {
        self.children.get_or_init(|| scan(&self.stanza))
    }

    pub fn child(&self, name: &str, ns: &str) -> Option<&Child> {
        self.children()
            .iter()
            .find(|c| c.name == name && c.ns == ns)
    }

    pub fn has(&self, name: &str, ns: &str) -> bool {
        self.child(name, ns).is_some()
    }

    /// Whether any child is in namespace `ns`.
    pub fn has_ns(&self, ns: &str) -> bool {
        self.children().iter().any(|c| c.ns == ns)
    }

    pub fn child_bytes(&self, child: &Child) -> &[u8] {
        &self.stanza.as_slice()[child.span.clone()]
    }

    /// The `<body/>` of a message (RFC 6121 5.2.3).
    pub fn has_body(&self) -> bool {
        self.has("body", NS_CLIENT)
    }

    /// Removes the children `drop` picks; true if any was removed.
    pub fn remove_children(&mut self, drop: impl Fn(&Packet, &Child) -> bool) -> bool {
        let gone: Vec<Range<usize>> = self
            .children()
            .iter()
            .filter(|c| drop(self, c))
            .map(|c| c.span.clone())
            .collect();
        if gone.is_empty() {
            return false;
        }
        let old = self.stanza.as_slice();
        let mut out = BytesMut::with_capacity(old.len());
        let mut at = 0;
        for span in gone {
            out.extend_from_slice(&old[at..span.start]);
            at = span.end;
        }
        out.extend_from_slice(&old[at..]);
        self.replace(out.freeze());
        true
    }

    /// Adds `xml` (one self-contained element) as the last child.
    pub fn push_child(&mut self, xml: &str) {
        let old = self.stanza.as_slice();
        let name = self.stanza.name().to_owned();
        let mut out = BytesMut::with_capacity(old.len() + xml.len() + name.len() + 3);
        if self.stanza.is_empty_element() {
            // `<message .../>` becomes `<message ...>XML</message>`.
            let slash = old.len() - 2;
            out.extend_from_slice(&old[..slash]);
            out.extend_from_slice(b">");
            out.extend_from_slice(xml.as_bytes());
            out.extend_from_slice(format!("</{name}>").as_bytes());
        } else {
            let close = memchr::memrchr(b'<', old).expect("an element with content ends in a tag");
            out.extend_from_slice(&old[..close]);
            out.extend_from_slice(xml.as_bytes());
            out.extend_from_slice(&old[close..]);
        }
        self.replace(out.freeze());
    }

    fn replace(&mut self, bytes: Bytes) {
        self.stanza =
            Stanza::parse(bytes).expect("splicing whole children keeps the stanza well-formed");
        self.children = OnceLock::new();
    }

    /// The bytes as a client receives them: no top-level `xmlns` (the client stream
    /// supplies `jabber:client`).
    pub fn for_client(&self) -> Bytes {
        match self.stanza.xmlns() {
            None => self.stanza.bytes().clone(),
            Some(_) => self.stanza.with_xmlns(None),
        }
    }

    /// The bytes to embed in another stanza (XEP-0297 forwarding, archives):
    /// `xmlns='jabber:client'` declared on the top level.
    pub fn forwardable(&self) -> Bytes {
        match self.stanza.xmlns() {
            Some(NS_CLIENT) => self.stanza.bytes().clone(),
            _ => self.stanza.with_xmlns(Some(NS_CLIENT)),
        }
    }
}

/// The top-level children of a stanza, namespaces resolved.
///
/// Written by hand over the tag boundaries: this runs for nearly every message (carbons
/// and the archive look at the children), and a general XML reader here cost a sixth of
/// sm's time per message. It can be this simple because every stanza reaching sm was
/// checked well-formed at the edge (c2s, s2s, or the router for other components), with
/// no comments, processing instructions or DTDs; CDATA sections are skipped.
fn scan(stanza: &Stanza) -> Vec<Child> {
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
        let Some(len) = jrs_stream::xml::tag_len(rest) else {
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

/// A child's local name and namespace from its start tag: declared on it (directly or
/// for its prefix), a prefix the stanza's own tag declares, or the content namespace
/// (`jabber:client` to sm).
fn name_and_ns(tag: &[u8], stanza_head: &[u8]) -> (String, String) {
    let end = tag
        .iter()
        .position(|b| b.is_ascii_whitespace() || *b == b'/' || *b == b'>')
        .unwrap_or(tag.len());
    let qname = String::from_utf8_lossy(&tag[1..end]);
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
        let raw = String::from_utf8_lossy(&attrs[j + 1..j + 1 + close]);
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

    fn packet(s: &'static str) -> Packet {
        Packet::new(
            Stanza::parse(Bytes::from_static(s.as_bytes())).unwrap(),
            None,
            None,
        )
    }

    #[test]
    fn reads_children_with_their_namespaces() {
        let p = packet(
            "<message xmlns='jabber:server' type='chat'><body>hi</body>\
             <x:private xmlns:x='urn:xmpp:carbons:2'/><thread>t</thread>\
             <store xmlns='urn:xmpp:hints'/></message>",
        );
        let names: Vec<(&str, &str)> = p
            .children()
            .iter()
            .map(|c| (c.name.as_str(), c.ns.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("body", NS_CLIENT),
                ("private", "urn:xmpp:carbons:2"),
                ("thread", NS_CLIENT),
                ("store", "urn:xmpp:hints")
            ]
        );
        assert!(p.has_body());
        assert_eq!(p.child_bytes(&p.children()[0]), b"<body>hi</body>");
    }

    #[test]
    fn reads_prefixes_cdata_nesting_and_spacing() {
        let p = packet(
            "<message xmlns:c='urn:xmpp:carbons:2' xmlns = 'jabber:server'>\
             <c:private/><body><![CDATA[</body><x/>]]></body>\
             <x xmlns = \"urn:a\" b='>'><y><z/></y></x>\
             <active xmlns='http://jabber.org/protocol/chatstates'/></message>",
        );
        let names: Vec<(&str, &str)> = p
            .children()
            .iter()
            .map(|c| (c.name.as_str(), c.ns.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("private", "urn:xmpp:carbons:2"),
                ("body", NS_CLIENT),
                ("x", "urn:a"),
                ("active", "http://jabber.org/protocol/chatstates")
            ]
        );
        assert_eq!(
            p.child_bytes(&p.children()[2]),
            b"<x xmlns = \"urn:a\" b='>'><y><z/></y></x>"
        );
        assert!(packet("<message/>").children().is_empty());
    }

    #[test]
    fn splices_children() {
        let mut p = packet(
            "<message to='a@b'><body>hi</body><stanza-id xmlns='urn:xmpp:sid:0' by='a@b' id='forged'/></message>",
        );
        assert!(p.remove_children(|_, c| c.name == "stanza-id"));
        assert_eq!(
            &p.bytes()[..],
            b"<message to='a@b'><body>hi</body></message>"
        );
        p.push_child("<stanza-id xmlns='urn:xmpp:sid:0' by='a@b' id='1'/>");
        assert_eq!(
            &p.bytes()[..],
            b"<message to='a@b'><body>hi</body><stanza-id xmlns='urn:xmpp:sid:0' by='a@b' id='1'/></message>"
        );
        assert!(p.has("stanza-id", "urn:xmpp:sid:0"));
        let mut e = packet("<message to='a@b'/>");
        e.push_child("<x xmlns='y'/>");
        assert_eq!(
            &e.bytes()[..],
            b"<message to='a@b'><x xmlns='y'/></message>"
        );
        assert_eq!(
            &e.forwardable()[..],
            b"<message xmlns='jabber:client' to='a@b'><x xmlns='y'/></message>"
        );
    }
}
