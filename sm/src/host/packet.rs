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

pub use jrs_stream::children::{Child, CONTENT_NS};

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
        self.children
            .get_or_init(|| jrs_stream::children::children(&self.stanza))
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

    /// Adds `xml` (one self-contained element) as the last child. Children already read
    /// stay read, the new one added to them: modules after this one look at the
    /// children again (an archived message's stanza id is added before carbons and
    /// delivery read them), and reading them anew was a parse per message.
    pub fn push_child(&mut self, xml: &str) {
        self.stanza = self.stanza.with_child_appended(xml.as_bytes());
        if let Some(children) = self.children.get_mut() {
            // It sits right before the closing tag.
            let end = memchr::memrchr(b'<', self.stanza.as_slice()).expect("a closing tag");
            children.push(jrs_stream::children::child_at(
                &self.stanza,
                end - xml.len()..end,
            ));
        }
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
        // Children read before stay read, the new one with them, as a fresh read finds.
        for (stanza, child) in [
            (
                "<message to='a@b'><body>hi</body></message >",
                "<stanza-id xmlns='urn:xmpp:sid:0' by='a@b' id='1'/>",
            ),
            (
                "<presence/>",
                "<x xmlns=\"vcard-temp:x:update\"><photo>ab</photo></x>",
            ),
            ("<message><b/></message>", "<thread>t</thread>"),
            ("<message><b/></message>", "<p:x xmlns:p='urn:p'/>"),
            ("<message><b/></message>", "<x xmlns:p='urn:p'><p:y/></x>"),
        ] {
            let mut p = packet(stanza);
            p.children();
            p.push_child(child);
            let text = String::from_utf8(p.bytes().to_vec()).unwrap();
            let fresh = packet(Box::leak(text.into_boxed_str()));
            assert_eq!(p.children(), fresh.children(), "{child}");
        }
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
