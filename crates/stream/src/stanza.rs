//! A top-level element as received: its bytes plus the location of its name and addressing
//! attributes. Nothing below the top-level start tag is parsed, so a router can forward
//! `bytes` unchanged.

use bytes::{Bytes, BytesMut};

use crate::errors::StanzaErrorCondition;
use crate::tag::{Span, StartTag, TagError};

/// Why a top-level element could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StanzaError(pub String);

impl From<TagError> for StanzaError {
    fn from(e: TagError) -> StanzaError {
        StanzaError(e.to_string())
    }
}

/// One top-level element and where its addressing lives inside its bytes. `B` is
/// `Bytes` for an owned stanza, `&[u8]` for one still in a read buffer.
#[derive(Clone, Debug)]
pub struct Stanza<B = Bytes> {
    bytes: B,
    name: Span,
    /// One past the `>` of the start tag.
    head_end: u32,
    empty: bool,
    to: Option<Span>,
    from: Option<Span>,
    kind: Option<Span>,
    id: Option<Span>,
    xmlns: Option<Span>,
    /// Every other attribute of the start tag: (name, raw value). Recorded while the head
    /// is read anyway, so [`Stanza::attr`] never parses the tag again.
    others: Vec<(Span, Span)>,
}

impl Stanza<Bytes> {
    /// Reads the start tag of a complete element (as cut by the framer).
    pub fn parse(bytes: Bytes) -> Result<Stanza, StanzaError> {
        Stanza::<Bytes>::parse_as(bytes)
    }

    /// The bytes exactly as received.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The stanza with `xml` (whole elements) added after its last child. The start tag
    /// keeps its place, so what was read of it holds: nothing is parsed again (sm adds
    /// a stanza id to every message it archives).
    pub fn with_child_appended(&self, xml: &[u8]) -> Stanza {
        let old = self.bytes.as_ref();
        let name = &old[self.name.start as usize..self.name.end as usize];
        let mut out = BytesMut::with_capacity(old.len() + xml.len() + name.len() + 3);
        let mut appended = self.clone();
        if self.empty {
            // `<message .../>` becomes `<message ...>XML</message>`: the start tag ends
            // where its `/` was.
            let slash = memchr::memrchr(b'/', &old[..self.head_end as usize])
                .expect("an empty element's start tag ends in '/>'");
            out.extend_from_slice(&old[..slash]);
            out.extend_from_slice(b">");
            out.extend_from_slice(xml);
            out.extend_from_slice(b"</");
            out.extend_from_slice(name);
            out.extend_from_slice(b">");
            appended.head_end = slash as u32 + 1;
            appended.empty = false;
        } else {
            let close = memchr::memrchr(b'<', old).expect("an element with content ends in a tag");
            out.extend_from_slice(&old[..close]);
            out.extend_from_slice(xml);
            out.extend_from_slice(&old[close..]);
        }
        appended.bytes = out.freeze();
        appended
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

impl<'a> Stanza<&'a [u8]> {
    /// Reads the start tag of a complete element still inside a read buffer.
    pub fn parse_slice(bytes: &'a [u8]) -> Result<Stanza<&'a [u8]>, StanzaError> {
        Stanza::parse_as(bytes)
    }

    /// A copy that owns its bytes.
    pub fn to_owned(&self) -> Stanza {
        Stanza {
            bytes: Bytes::copy_from_slice(self.bytes),
            name: self.name.clone(),
            head_end: self.head_end,
            empty: self.empty,
            to: self.to.clone(),
            from: self.from.clone(),
            kind: self.kind.clone(),
            id: self.id.clone(),
            xmlns: self.xmlns.clone(),
            others: self.others.clone(),
        }
    }
}

impl<B: AsRef<[u8]>> Stanza<B> {
    fn parse_as(bytes: B) -> Result<Stanza<B>, StanzaError> {
        let slice = bytes.as_ref();
        let (mut tag, name) = StartTag::new(slice)?;
        let (mut to, mut from, mut kind, mut id, mut xmlns) = (None, None, None, None, None);
        let mut others = Vec::new();
        while let Some((key, value)) = tag.next_attribute()? {
            let slot = match &slice[key.start as usize..key.end as usize] {
                b"to" => &mut to,
                b"from" => &mut from,
                b"type" => &mut kind,
                b"id" => &mut id,
                b"xmlns" => &mut xmlns,
                _ => {
                    others.push((key, value));
                    continue;
                }
            };
            *slot = Some(value);
        }
        let (head_end, empty) = tag.end();
        // XML text is UTF-8: checked once for the tag, so every name and value read from
        // it is (the body is the validator's, where stanzas come in).
        if std::str::from_utf8(&slice[..head_end as usize]).is_err() {
            return Err(StanzaError("bad start tag: not UTF-8".into()));
        }
        Ok(Stanza {
            bytes,
            name,
            head_end,
            empty,
            to,
            from,
            kind,
            id,
            xmlns,
            others,
        })
    }

    fn text(&self, span: &Span) -> &str {
        let bytes = &self.bytes.as_ref()[span.start as usize..span.end as usize];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: every span lies in the start tag, which `parse_as` checked to be UTF-8
        // (`with_child_appended` keeps the tag's bytes), and is cut at ASCII delimiters
        // (`<`, quotes, `=`, spaces), which never fall inside a multi-byte character, so
        // it is UTF-8 too; `B` is `Bytes` or a shared slice, which never change. Checked
        // at every call instead, the same few names and addresses were validated again
        // and again: a tenth of the router's instructions per message (docs/benchmarks.md,
        // "Framing and start tags eight bytes at a time").
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    /// The element's bytes as received.
    pub fn as_slice(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// The element's qualified name, as written (`message`, `iq`, `stream:error`, ...).
    pub fn name(&self) -> &str {
        self.text(&self.name)
    }

    /// The raw (still escaped) `to` attribute.
    pub fn to(&self) -> Option<&str> {
        self.to.as_ref().map(|s| self.text(s))
    }

    /// The raw (still escaped) `from` attribute.
    pub fn from(&self) -> Option<&str> {
        self.from.as_ref().map(|s| self.text(s))
    }

    /// The raw `type` attribute.
    pub fn kind(&self) -> Option<&str> {
        self.kind.as_ref().map(|s| self.text(s))
    }

    /// The raw `id` attribute.
    pub fn id(&self) -> Option<&str> {
        self.id.as_ref().map(|s| self.text(s))
    }

    /// The `xmlns` attribute of the top-level element, if it declares one.
    pub fn xmlns(&self) -> Option<&str> {
        self.xmlns.as_ref().map(|s| self.text(s))
    }

    /// Any attribute of the top-level element, unescaped.
    pub fn attr(&self, name: &str) -> Option<String> {
        let raw = match name {
            "to" => self.to(),
            "from" => self.from(),
            "type" => self.kind(),
            "id" => self.id(),
            "xmlns" => self.xmlns(),
            _ => self
                .others
                .iter()
                .find(|(key, _)| self.text(key) == name)
                .map(|(_, value)| self.text(value)),
        }?;
        if !raw.contains('&') {
            return Some(raw.to_owned());
        }
        quick_xml::escape::unescape(raw)
            .ok()
            .map(|v| v.into_owned())
    }

    /// Whether the element was written as `<name/>`.
    pub fn is_empty_element(&self) -> bool {
        self.empty
    }

    /// The content between the start and the end tag (empty for `<name/>`).
    pub fn inner(&self) -> &[u8] {
        if self.empty {
            return &[];
        }
        let bytes = self.bytes.as_ref();
        let end = memchr::memrchr(b'<', bytes).unwrap_or(bytes.len());
        &bytes[self.head_end as usize..end.max(self.head_end as usize)]
    }

    /// The same element with new `to` and/or `from` (unescaped text; `None` keeps the
    /// attribute as received). Used by the edges that stamp authenticated addresses.
    pub fn with_addresses(&self, to: Option<&str>, from: Option<&str>) -> Bytes {
        self.rewrite_head(
            |out| {
                for (key, new, raw) in [("from", from, self.from()), ("to", to, self.to())] {
                    match (new, raw) {
                        (Some(text), _) => {
                            push_raw_attr(out, key, crate::xml::escape(text).as_bytes())
                        }
                        (None, Some(raw)) => push_raw_attr(out, key, raw),
                        (None, None) => {}
                    }
                }
                if let Some(kind) = self.kind() {
                    push_raw_attr(out, "type", kind);
                }
            },
            None,
        )
    }

    /// The same element with its top-level `xmlns` replaced by `ns` (`None` removes it),
    /// everything else as received. sm uses it to hand stanzas to clients (no `xmlns`:
    /// the client stream supplies `jabber:client`) and to embed them in other stanzas
    /// (`xmlns='jabber:client'` declared, as XEP-0297 forwarding needs).
    pub fn with_xmlns(&self, ns: Option<&str>) -> Bytes {
        let mut out = BytesMut::with_capacity(self.bytes.as_ref().len() + 32);
        self.write_with_xmlns(ns, &mut out);
        out.freeze()
    }

    /// [`Stanza::with_xmlns`], appended to `out` (no copy of its own).
    pub fn write_with_xmlns(&self, ns: Option<&str>, out: &mut BytesMut) {
        let bytes = self.bytes.as_ref();
        match &self.xmlns {
            Some(span) => {
                // From the space before `xmlns` to the closing quote (`xmlns = 'x'` is
                // well-formed too: walk back over the quote, `=` and any spaces).
                let mut start = span.start as usize - 1;
                while start > 0 && matches!(bytes[start - 1], b'=' | b' ' | b'\t' | b'\r' | b'\n') {
                    start -= 1;
                }
                start -= "xmlns".len();
                while start > 0 && bytes[start - 1].is_ascii_whitespace() {
                    start -= 1;
                }
                out.extend_from_slice(&bytes[..start]);
                if let Some(ns) = ns {
                    push_raw_attr(out, "xmlns", crate::xml::escape(ns).as_bytes());
                }
                out.extend_from_slice(&bytes[span.end as usize + 1..]);
            }
            None => {
                let name_end = self.name.end as usize;
                out.extend_from_slice(&bytes[..name_end]);
                if let Some(ns) = ns {
                    push_raw_attr(out, "xmlns", crate::xml::escape(ns).as_bytes());
                }
                out.extend_from_slice(&bytes[name_end..]);
            }
        }
    }

    /// The error reply to this element, with `extra` (an application-specific condition
    /// element, RFC 6120 8.3.2) inside `<error/>` after the condition.
    pub fn error_reply_with(
        &self,
        condition: StanzaErrorCondition,
        text: &str,
        extra: &str,
    ) -> Option<Bytes> {
        let reply = self.error_reply(condition, text)?;
        let close = b"</error>";
        let at = memchr::memmem::rfind(&reply, close)?;
        let mut out = BytesMut::with_capacity(reply.len() + extra.len());
        out.extend_from_slice(&reply[..at]);
        out.extend_from_slice(extra.as_bytes());
        out.extend_from_slice(&reply[at..]);
        Some(out.freeze())
    }

    /// The error reply to this element (RFC 6120 8.3): addresses swapped, `type='error'`,
    /// the original content kept and an `<error/>` child added. Returns `None` when the
    /// element must not be answered with an error: it is itself an error, or an IQ result
    /// (RFC 6120 8.2.3), which would risk loops.
    pub fn error_reply(&self, condition: StanzaErrorCondition, text: &str) -> Option<Bytes> {
        match self.kind() {
            Some("error") => return None,
            Some("result") if self.name() == "iq" => return None,
            _ => {}
        }
        let error = condition.to_xml(text);
        Some(self.rewrite_head(
            |out| {
                if let Some(to) = self.to() {
                    push_raw_attr(out, "from", to);
                }
                if let Some(from) = self.from() {
                    push_raw_attr(out, "to", from);
                }
                push_raw_attr(out, "type", "error");
            },
            Some(error.as_bytes()),
        ))
    }

    /// Copies the element, replacing `to`, `from` and `type` with what `addressing` writes
    /// and appending `extra` as the last child.
    fn rewrite_head(&self, addressing: impl FnOnce(&mut BytesMut), extra: Option<&[u8]>) -> Bytes {
        let name = self.name();
        let mut out =
            BytesMut::with_capacity(self.bytes.as_ref().len() + extra.map_or(0, <[u8]>::len) + 64);
        out.extend_from_slice(b"<");
        out.extend_from_slice(name.as_bytes());
        let bytes = self.bytes.as_ref();
        if let Ok((mut tag, _)) = StartTag::new(bytes) {
            while let Ok(Some((key, value))) = tag.next_attribute() {
                let key = &bytes[key.start as usize..key.end as usize];
                if matches!(key, b"to" | b"from" | b"type") {
                    continue;
                }
                push_raw_attr(
                    &mut out,
                    key,
                    &bytes[value.start as usize..value.end as usize],
                );
            }
        }
        addressing(&mut out);
        let inner = self.inner();
        if inner.is_empty() && extra.is_none() {
            out.extend_from_slice(b"/>");
            return out.freeze();
        }
        out.extend_from_slice(b">");
        out.extend_from_slice(inner);
        if let Some(extra) = extra {
            out.extend_from_slice(extra);
        }
        out.extend_from_slice(b"</");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b">");
        out.freeze()
    }
}

/// Appends ` key='value'` where `value` is already escaped XML attribute text. Picks the
/// quote that does not occur in the value (escaped text contains at most one kind raw).
fn push_raw_attr(out: &mut BytesMut, key: impl AsRef<[u8]>, raw: impl AsRef<[u8]>) {
    let (key, raw) = (key.as_ref(), raw.as_ref());
    let quote = if raw.contains(&b'\'') { b'"' } else { b'\'' };
    out.extend_from_slice(b" ");
    out.extend_from_slice(key);
    out.extend_from_slice(&[b'=', quote]);
    out.extend_from_slice(raw);
    out.extend_from_slice(&[quote]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_appended_keeps_what_was_read_of_the_start_tag() {
        for original in [
            &b"<message to='a@b' from='c@d/e' type='chat' id='1' xml:lang='en'><body>hi</body></message>"[..],
            b"<message to='a@b' id='2' foo=\"x/y\"/>",
            b"<message to='a@b' id='3' />",
            b"<presence/>",
        ] {
            let stanza = Stanza::parse(Bytes::copy_from_slice(original)).unwrap();
            let appended = stanza.with_child_appended(b"<stanza-id xmlns='urn:xmpp:sid:0' id='9'/>");
            let again = Stanza::parse(appended.bytes().clone()).unwrap();
            let s = std::str::from_utf8(appended.as_slice()).unwrap();
            assert!(s.contains("<stanza-id xmlns='urn:xmpp:sid:0' id='9'/></"), "{s}");
            assert!(crate::validate::validate_stanza(appended.as_slice()).is_ok(), "{s}");
            for st in [&appended, &again] {
                assert_eq!(st.name(), stanza.name());
                assert_eq!(st.to(), stanza.to());
                assert_eq!(st.from(), stanza.from());
                assert_eq!(st.kind(), stanza.kind());
                assert_eq!(st.id(), stanza.id());
                assert_eq!(st.attr("foo"), stanza.attr("foo"));
                assert_eq!(st.attr("xml:lang"), stanza.attr("xml:lang"));
                assert!(!st.is_empty_element());
            }
            assert_eq!(appended.inner(), again.inner());
        }
    }

    #[test]
    fn reads_start_tags_as_xml_writes_them() {
        // Whitespace of every kind around `=` and between attributes, both quotes, a `>`
        // and the other quote inside values, an empty element.
        let s = Stanza::parse(Bytes::from_static(
            b"<message\n\tto = \"a@b/c'd\"\r\n from='x>y' type='chat'id='1' a:b='&lt;'/>",
        ))
        .unwrap();
        assert_eq!(s.name(), "message");
        assert_eq!(s.to(), Some("a@b/c'd"));
        assert_eq!(s.from(), Some("x>y"));
        assert_eq!((s.kind(), s.id()), (Some("chat"), Some("1")));
        assert_eq!(s.attr("a:b").as_deref(), Some("<"));
        assert!(s.is_empty_element());
        let s = Stanza::parse(Bytes::from_static(b"<iq type='get' ><ping/></iq>")).unwrap();
        assert_eq!((s.name(), s.inner()), ("iq", &b"<ping/>"[..]));
        for bad in [
            &b"text"[..],
            b"<?xml version='1.0'?>",
            b"<!-- c -->",
            b"</iq>",
            b"< iq/>",
            b"<iq type/>",
            b"<iq type=get/>",
            b"<iq type='get/>",
            b"<iq type='get'",
            b"<iq =''/>",
            b"<i'q/>",
            b"<iq to='\xff'/>",
        ] {
            assert!(Stanza::parse(Bytes::from_static(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_addressing() {
        let s = Stanza::parse(Bytes::from_static(
            b"<message to='a@b/c' from=\"x.y\" type='chat' id='1'><body>hi</body></message>",
        ))
        .unwrap();
        assert_eq!(s.name(), "message");
        assert_eq!(s.to(), Some("a@b/c"));
        assert_eq!(s.from(), Some("x.y"));
        assert_eq!(s.kind(), Some("chat"));
        assert_eq!(s.id(), Some("1"));
        assert_eq!(s.inner(), b"<body>hi</body>");
    }

    #[test]
    fn error_reply_swaps_addresses_and_keeps_content() {
        let s = Stanza::parse(Bytes::from_static(
            b"<iq to='a.example' from='b.example' type='get' id='q1'><ping xmlns='urn:xmpp:ping'/></iq>",
        ))
        .unwrap();
        let reply = s
            .error_reply(StanzaErrorCondition::ServiceUnavailable, "no route")
            .unwrap();
        let r = Stanza::parse(reply).unwrap();
        assert_eq!(r.to(), Some("b.example"));
        assert_eq!(r.from(), Some("a.example"));
        assert_eq!(r.kind(), Some("error"));
        assert_eq!(r.id(), Some("q1"));
        let inner = std::str::from_utf8(r.inner()).unwrap();
        assert!(inner.starts_with("<ping xmlns='urn:xmpp:ping'/><error type='cancel'>"));
        assert!(inner.contains("service-unavailable"));
    }

    #[test]
    fn errors_are_never_answered() {
        let s = Stanza::parse(Bytes::from_static(
            b"<message to='a' from='b' type='error'/>",
        ))
        .unwrap();
        assert!(s
            .error_reply(StanzaErrorCondition::ServiceUnavailable, "")
            .is_none());
        let s = Stanza::parse(Bytes::from_static(
            b"<iq to='a' from='b' type='result' id='1'/>",
        ))
        .unwrap();
        assert!(s
            .error_reply(StanzaErrorCondition::ServiceUnavailable, "")
            .is_none());
    }

    #[test]
    fn empty_element_reply_gets_content() {
        let s = Stanza::parse(Bytes::from_static(b"<presence to='a' from='b'/>")).unwrap();
        let r = s
            .error_reply(StanzaErrorCondition::RemoteServerNotFound, "")
            .unwrap();
        assert!(r.ends_with(b"</error></presence>"));
    }

    #[test]
    fn replaces_the_top_level_namespace() {
        let s = Stanza::parse(Bytes::from_static(
            b"<message xmlns='jabber:server' to='a'><body>x</body></message>",
        ))
        .unwrap();
        assert_eq!(
            &s.with_xmlns(None)[..],
            b"<message to='a'><body>x</body></message>"
        );
        assert_eq!(
            &s.with_xmlns(Some("jabber:client"))[..],
            b"<message xmlns='jabber:client' to='a'><body>x</body></message>"
        );
        let s = Stanza::parse(Bytes::from_static(
            b"<iq xmlns = \"jabber:server\" id='1'/>",
        ))
        .unwrap();
        assert_eq!(&s.with_xmlns(None)[..], b"<iq id='1'/>");
        let s = Stanza::parse(Bytes::from_static(b"<message to='a'/>")).unwrap();
        assert_eq!(
            &s.with_xmlns(Some("jabber:client"))[..],
            b"<message xmlns='jabber:client' to='a'/>"
        );
        let r = s
            .error_reply_with(
                StanzaErrorCondition::NotAcceptable,
                "",
                "<blocked xmlns='urn:xmpp:blocking:errors'/>",
            )
            .unwrap();
        assert!(r.ends_with(b"<blocked xmlns='urn:xmpp:blocking:errors'/></error></message>"));
    }

    #[test]
    fn rewrites_addresses() {
        let s = Stanza::parse(Bytes::from_static(
            b"<message to='a' from='forged' type='chat'><body/></message>",
        ))
        .unwrap();
        let r = Stanza::parse(s.with_addresses(None, Some("real&me"))).unwrap();
        assert_eq!(r.from(), Some("real&amp;me"));
        assert_eq!(r.to(), Some("a"));
        assert_eq!(r.inner(), b"<body/>");
    }
}
