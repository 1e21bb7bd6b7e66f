//! RFC 7395 framing (XMPP over WebSocket), sans I/O, for either end of the connection:
//! the stream bytes one side writes become WebSocket messages, and the messages it
//! receives become stream bytes. With it the stream machinery written for TCP
//! (negotiation, sessions, stream management, limits; a client's framed reader) serves
//! WebSocket connections unchanged: c2s uses the [`Role::Server`] side
//! (`c2s/src/web/websocket.rs`, and BOSH's output), the bench's WebSocket client the
//! [`Role::Client`] side.
//!
//! | WebSocket (RFC 7395) | stream (RFC 6120) |
//! |---|---|
//! | `<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to=.. from=.. version=../>` | `<stream:stream xmlns='jabber:client' ...>` (also each restart), either direction |
//! | `<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>` | `</stream:stream>` |
//! | one top-level element per message, with the namespaces it relies on declared (`xmlns='jabber:client'`, `xmlns:stream=..`) | the same element |
//!
//! Written by hand: no crate does this translation, and it is a matter of a few tags.

use std::borrow::Cow;

use bytes::{Buf, BytesMut};
use jrs_stream::xml::{element_len, escape, tag_len};
use jrs_stream::Stanza;

pub const NS_FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
const NS_CLIENT: &str = "jabber:client";

/// Which end of the WebSocket this side is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// The server (c2s): receives the client's messages, sends the server's stream.
    #[default]
    Server,
    /// A client: sends its stream as messages, receives the server's messages.
    Client,
}

/// A received message that is not RFC 7395 framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FramingError(pub &'static str);

/// The stream bytes for one message the server received from its client (empty for
/// whitespace).
pub fn from_client(message: &str) -> Result<Cow<'_, [u8]>, FramingError> {
    to_stream(Role::Server, message)
}

/// The stream bytes for one message a client received from the server (empty for
/// whitespace): `<open/>` becomes the server's stream header, `<close/>` its end.
pub fn from_server(message: &str) -> Result<Cow<'_, [u8]>, FramingError> {
    to_stream(Role::Client, message)
}

/// The stream bytes for one message received by `role` from its peer.
pub fn to_stream(role: Role, message: &str) -> Result<Cow<'_, [u8]>, FramingError> {
    let text = message.trim();
    if text.is_empty() {
        return Ok(Cow::Borrowed(&[]));
    }
    if element_len(text.as_bytes()) != Some(text.len()) {
        return Err(FramingError("a message must hold exactly one element"));
    }
    let name_is = |name: &str| {
        text.strip_prefix('<')
            .and_then(|t| t.strip_prefix(name))
            .is_some_and(|t| {
                t.starts_with(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
            })
    };
    if name_is("open") || name_is("close") {
        let e = Stanza::parse_slice(text.as_bytes())
            .map_err(|_| FramingError("unreadable framing element"))?;
        if e.attr("xmlns").as_deref() != Some(NS_FRAMING) {
            return Err(FramingError(
                "<open/> and <close/> must be in urn:ietf:params:xml:ns:xmpp-framing",
            ));
        }
        if name_is("close") {
            return Ok(Cow::Borrowed(b"</stream:stream>"));
        }
        let mut header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAMS}'"
        );
        for name in ["to", "from", "version", "xml:lang", "id"] {
            if let Some(v) = e.attr(name) {
                header.push_str(&format!(" {name}='{}'", escape(&v)));
            }
        }
        header.push('>');
        return Ok(Cow::Owned(header.into_bytes()));
    }
    // A client has no business sending stream-namespace elements at all; the server
    // sends `<stream:features/>` and `<stream:error/>`, but never a header.
    let header_like = match role {
        Role::Server => text.starts_with("<stream:"),
        Role::Client => text.starts_with("<stream:stream"),
    };
    if header_like || text.starts_with("<?") {
        return Err(FramingError(
            "stream headers are not used over WebSocket (RFC 7395 3.3)",
        ));
    }
    Ok(Cow::Borrowed(text.as_bytes()))
}

/// A stream error as a WebSocket message.
pub fn stream_error(condition: &str, text: &str) -> String {
    format!(
        "<stream:error xmlns:stream='{NS_STREAMS}'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
         <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>{}</text></stream:error>",
        escape(text)
    )
}

/// The `<close/>` message.
pub fn close() -> String {
    format!("<close xmlns='{NS_FRAMING}'/>")
}

/// Cuts the stream bytes one side writes into WebSocket messages for its peer: the
/// stream header becomes `<open/>` (with `from` and `id` from a server, `to` from a
/// client), `</stream:stream>` becomes [`Outgoing::Close`], each top-level element one
/// message. The XML declaration and whitespace between elements are dropped.
#[derive(Default)]
pub struct Splitter {
    role: Role,
    buf: BytesMut,
}

/// One message for the peer, or the end of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing {
    Message(String),
    /// `</stream:stream>`: send [`close`] (the caller may want to close the WebSocket).
    Close,
}

impl Splitter {
    pub fn new(role: Role) -> Splitter {
        Splitter {
            role,
            buf: BytesMut::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if the bytes so far hold one.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Outgoing> {
        loop {
            // Whitespace between elements: keepalives, which WebSocket has its own of.
            let space = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buf.advance(space);
            if self.buf.is_empty() {
                return None;
            }
            if self.buf.starts_with(b"<?") {
                let end = memchr::memmem::find(&self.buf, b"?>")?;
                self.buf.advance(end + 2);
                continue;
            }
            if self.buf.starts_with(b"</stream:stream") {
                let len = tag_len(&self.buf)?;
                self.buf.advance(len);
                return Some(Outgoing::Close);
            }
            if self.buf.starts_with(b"<stream:stream") {
                let len = tag_len(&self.buf)?;
                let tag = self.buf.split_to(len);
                return Some(Outgoing::Message(open_from_header(&tag)));
            }
            let len = element_len(&self.buf)?;
            let element = self.buf.split_to(len);
            return Some(Outgoing::Message(qualified(&element)));
        }
    }
}

/// `<open/>` for a stream header (the server's or the client's).
fn open_from_header(tag: &[u8]) -> String {
    // The start tag as an empty element, to read its attributes.
    let mut empty = tag[..tag.len() - 1].to_vec();
    empty.extend_from_slice(b"/>");
    let mut open = format!("<open xmlns='{NS_FRAMING}'");
    if let Ok(header) = Stanza::parse_slice(&empty) {
        for name in ["from", "to", "id", "version", "xml:lang"] {
            if let Some(v) = header.attr(name) {
                open.push_str(&format!(" {name}='{}'", escape(&v)));
            }
        }
    }
    open.push_str("/>");
    open
}

/// The element with the namespace declarations it leaned on in the stream: each
/// WebSocket message is a document of its own (RFC 7395 3.3.3).
fn qualified(element: &[u8]) -> String {
    let text = String::from_utf8_lossy(element);
    let declared = Stanza::parse_slice(element)
        .ok()
        .is_some_and(|e| e.xmlns().is_some());
    // By characters: the bytes before the first `<` are not necessarily one byte each
    // (nor UTF-8: then `text` has U+FFFD for them).
    let name_end = text
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c.is_ascii_whitespace() || c == '/' || c == '>')
        .map_or(text.len(), |(i, _)| i);
    let insert = if text.starts_with("<stream:") {
        format!(" xmlns:stream='{NS_STREAMS}'")
    } else if !declared {
        format!(" xmlns='{NS_CLIENT}'")
    } else {
        return text.into_owned();
    };
    format!("{}{insert}{}", &text[..name_end], &text[name_end..])
}

/// XEP-0206: the client stream bytes one BOSH request's `<body/>` stands for: a new
/// stream header (to `to`) when it restarts the stream (`xmpp:restart='true'`), else its
/// content; then the stream's end when it terminates the session (`type='terminate'`).
pub fn bosh_to_stream(terminate: bool, restart: bool, to: &str, inner: &[u8]) -> Vec<u8> {
    let mut payload = if restart {
        format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' \
             xmlns:stream='{NS_STREAMS}' to='{}' version='1.0'>",
            escape(to)
        )
        .into_bytes()
    } else {
        inner.to_vec()
    };
    if terminate {
        payload.extend_from_slice(b"</stream:stream>");
    }
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_framing_becomes_stream_bytes() {
        let open = from_client(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>",
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&open).unwrap(),
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
        );
        assert_eq!(
            &*from_client("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>").unwrap(),
            b"</stream:stream>"
        );
        assert_eq!(
            &*from_client(" <message xmlns='jabber:client'/>\n").unwrap(),
            b"<message xmlns='jabber:client'/>"
        );
        assert!(from_client("  ").unwrap().is_empty());
    }

    #[test]
    fn client_errors() {
        for bad in [
            "<open to='localhost'/>",
            "<message/><message/>",
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'/>",
            "<message>",
        ] {
            assert!(from_client(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_output_becomes_messages() {
        let mut s = Splitter::default();
        s.push(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='localhost' id='x1' version='1.0' xml:lang='en'><stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms></stream:features> <message to='a@b' ");
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='localhost' id='x1' version='1.0' xml:lang='en'/>".into()
            ))
        );
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms></stream:features>".into()
            ))
        );
        assert_eq!(s.next(), None, "the message is not complete yet");
        s.push(b"type='chat'><body><![CDATA[</message>]]></body></message><success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></stream:stream>");
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<message xmlns='jabber:client' to='a@b' type='chat'><body><![CDATA[</message>]]></body></message>".into()
            ))
        );
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>".into()
            ))
        );
        assert_eq!(s.next(), Some(Outgoing::Close));
        assert_eq!(s.next(), None);
    }

    #[test]
    fn odd_bytes_between_elements_do_not_panic() {
        // Found by fuzzing (docs/fuzzing.md): text before an element starting with a
        // multi-byte character, or with bytes that are not UTF-8.
        for junk in [
            &b"\xff\xff<message/>"[..],
            "\u{e9}<message/>".as_bytes(),
            b"x<a/>",
        ] {
            let mut s = Splitter::default();
            s.push(junk);
            assert!(matches!(s.next(), Some(Outgoing::Message(_))));
        }
    }

    // The client side.

    #[test]
    fn client_stream_becomes_messages() {
        let mut s = Splitter::new(Role::Client);
        assert_eq!(s.role(), Role::Client);
        s.push(b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>");
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>"
                    .into()
            ))
        );
        assert_eq!(s.next(), None);
        s.push(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>biws</auth>",
        );
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>biws</auth>".into()
            ))
        );
        // Several stanzas in one write: one message each, in the client namespace.
        s.push(b"<message to='b@localhost/m' type='chat' id='1'><body>hi</body></message><presence/> <iq type='get' id='p'");
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<message xmlns='jabber:client' to='b@localhost/m' type='chat' id='1'><body>hi</body></message>".into()
            ))
        );
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<presence xmlns='jabber:client'/>".into()
            ))
        );
        assert_eq!(s.next(), None, "the iq is not complete yet");
        s.push(b"/></stream:stream>");
        assert_eq!(
            s.next(),
            Some(Outgoing::Message(
                "<iq xmlns='jabber:client' type='get' id='p'/>".into()
            ))
        );
        assert_eq!(s.next(), Some(Outgoing::Close));
        assert_eq!(s.next(), None);
    }

    #[test]
    fn server_messages_become_stream_bytes() {
        let open = from_server(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='localhost' id='x1' version='1.0' xml:lang='en'/>",
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&open).unwrap(),
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' from='localhost' version='1.0' xml:lang='en' id='x1'>"
        );
        let features = "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>";
        assert_eq!(&*from_server(features).unwrap(), features.as_bytes());
        let error = stream_error("policy-violation", "too big");
        assert_eq!(&*from_server(&error).unwrap(), error.as_bytes());
        assert_eq!(
            &*from_server(
                "<message xmlns='jabber:client' from='a@localhost/r'><body>x</body></message>"
            )
            .unwrap(),
            b"<message xmlns='jabber:client' from='a@localhost/r'><body>x</body></message>"
        );
        assert_eq!(&*from_server(&close()).unwrap(), b"</stream:stream>");
        assert!(from_server("\n").unwrap().is_empty());
        for bad in [
            "<open from='localhost'/>",
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' from='localhost'/>",
            "<?xml version='1.0'?>",
            "<message/><message/>",
        ] {
            assert!(from_server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn both_sides_compose() {
        // A client's stream through its splitter and the server's translation reads as
        // the same stream at c2s; the server's answer back the same way at the client.
        let mut client = Splitter::new(Role::Client);
        client.push(b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'><message to='x@localhost'/></stream:stream>");
        let mut at_server = Vec::new();
        while let Some(m) = client.next() {
            let m = match m {
                Outgoing::Message(m) => m,
                Outgoing::Close => close(),
            };
            at_server.extend_from_slice(&from_client(&m).unwrap());
        }
        assert_eq!(
            std::str::from_utf8(&at_server).unwrap(),
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
             to='localhost' version='1.0'><message xmlns='jabber:client' to='x@localhost'/></stream:stream>"
        );
        let mut server = Splitter::new(Role::Server);
        server.push(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='localhost' id='i' version='1.0'><stream:features/>");
        let mut at_client = Vec::new();
        while let Some(Outgoing::Message(m)) = server.next() {
            at_client.extend_from_slice(&from_server(&m).unwrap());
        }
        assert_eq!(
            std::str::from_utf8(&at_client).unwrap(),
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
             from='localhost' version='1.0' id='i'><stream:features xmlns:stream='http://etherx.jabber.org/streams'/>"
        );
    }
}
