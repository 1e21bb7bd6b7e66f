//! A stanza on its way through sm's chains: the bytes as received (forwarded unchanged
//! wherever nobody changes them), its parsed addresses, and, read only when a module
//! asks, the name, namespace and place of each top-level child. Modules that add or
//! remove a child (stanza-id, carbons' private) splice bytes; nothing is re-serialised.

use std::ops::Range;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use jid::Jid;
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

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
        self.children.get_or_init(|| scan(self.stanza.as_slice()))
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

/// The top-level children of a stanza, namespaces resolved. Stanzas reaching sm were
/// validated at the edge; anything unreadable yields the children read so far.
fn scan(bytes: &[u8]) -> Vec<Child> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return vec![];
    };
    let mut reader = NsReader::from_str(text);
    let mut out = vec![];
    let mut depth = 0usize;
    let mut open: Option<(String, String, usize)> = None;
    loop {
        let before = reader.buffer_position() as usize;
        let Ok((ns, event)) = reader.read_resolved_event() else {
            return out;
        };
        let ns = match ns {
            ResolveResult::Bound(n) => {
                let n = n.into_inner();
                if CONTENT_NS.contains(&n) {
                    NS_CLIENT.to_owned()
                } else {
                    n.to_owned()
                }
            }
            _ => NS_CLIENT.to_owned(),
        };
        match event {
            Event::Start(e) => {
                if depth == 1 {
                    open = Some((e.local_name().as_ref().to_owned(), ns, before));
                }
                depth += 1;
            }
            Event::Empty(e) if depth == 1 => {
                let end = reader.buffer_position() as usize;
                out.push(Child {
                    name: e.local_name().as_ref().to_owned(),
                    ns,
                    span: before..end,
                });
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if depth == 1 {
                    if let Some((name, ns, start)) = open.take() {
                        out.push(Child {
                            name,
                            ns,
                            span: start..reader.buffer_position() as usize,
                        });
                    }
                }
            }
            Event::Eof => return out,
            _ => {}
        }
    }
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
