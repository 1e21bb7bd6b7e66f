//! RFC 7395 framing, sans I/O: what a WebSocket client sends becomes the bytes of an
//! ordinary client stream, and what c2s writes to that stream becomes WebSocket
//! messages. The stream machinery of TCP clients (negotiation, sessions, stream
//! management, limits) then serves WebSocket clients unchanged.
//!
//! | WebSocket (RFC 7395) | stream (RFC 6120) |
//! |---|---|
//! | `<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to=.. version=../>` | `<stream:stream xmlns='jabber:client' ...>` (also each restart) |
//! | `<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>` | `</stream:stream>` |
//! | one top-level element per message | the same element |
//!
//! Written by hand: no crate does this translation, and it is a matter of a few tags.

use std::borrow::Cow;

use bytes::{Buf, BytesMut};
use jrs_stream::xml::{element_len, escape, tag_len};
use jrs_stream::Stanza;

pub const NS_FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
const NS_CLIENT: &str = "jabber:client";

/// A client's message that is not RFC 7395 framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FramingError(pub &'static str);

/// The stream bytes for one message from the client (empty for whitespace).
pub fn from_client(message: &str) -> Result<Cow<'_, [u8]>, FramingError> {
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
            .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>'))
    };
    if name_is("open") || name_is("close") {
        let e = Stanza::parse_slice(text.as_bytes())
            .map_err(|_| FramingError("unreadable framing element"))?;
        if e.attr("xmlns").as_deref() != Some(NS_FRAMING) {
            return Err(FramingError("<open/> and <close/> must be in urn:ietf:params:xml:ns:xmpp-framing"));
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
    if text.starts_with("<stream:") || text.starts_with("<?") {
        return Err(FramingError("stream headers are not used over WebSocket (RFC 7395 3.3)"));
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

/// Cuts what c2s writes to the stream into WebSocket messages.
#[derive(Default)]
pub struct Splitter {
    buf: BytesMut,
}

/// One message for the client, and whether the stream ended with it.
#[derive(Debug, PartialEq, Eq)]
pub enum ToClient {
    Message(String),
    Close,
}

impl Splitter {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if the bytes so far hold one.
    pub fn next(&mut self) -> Option<ToClient> {
        loop {
            // Whitespace between elements: keepalives, which WebSocket has its own of.
            let space = self.buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
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
                return Some(ToClient::Close);
            }
            if self.buf.starts_with(b"<stream:stream") {
                let len = tag_len(&self.buf)?;
                let tag = self.buf.split_to(len);
                return Some(ToClient::Message(open_from_header(&tag)));
            }
            let len = element_len(&self.buf)?;
            let element = self.buf.split_to(len);
            return Some(ToClient::Message(qualified(&element)));
        }
    }
}

/// `<open/>` for the server's stream header.
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
    let name_end = text[1..]
        .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
        .map_or(text.len(), |i| i + 1);
    let insert = if text.starts_with("<stream:") {
        format!(" xmlns:stream='{NS_STREAMS}'")
    } else if !declared {
        format!(" xmlns='{NS_CLIENT}'")
    } else {
        return text.into_owned();
    };
    format!("{}{insert}{}", &text[..name_end], &text[name_end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_framing_becomes_stream_bytes() {
        let open = from_client("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>").unwrap();
        assert_eq!(
            std::str::from_utf8(&open).unwrap(),
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
        );
        assert_eq!(&*from_client("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>").unwrap(), b"</stream:stream>");
        assert_eq!(&*from_client(" <message xmlns='jabber:client'/>\n").unwrap(), b"<message xmlns='jabber:client'/>");
        assert!(from_client("  ").unwrap().is_empty());
    }

    #[test]
    fn client_errors() {
        for bad in [
            "<open to='localhost'/>",
            "<message/><message/>",
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
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
            Some(ToClient::Message(
                "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='localhost' id='x1' version='1.0' xml:lang='en'/>".into()
            ))
        );
        assert_eq!(
            s.next(),
            Some(ToClient::Message(
                "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms></stream:features>".into()
            ))
        );
        assert_eq!(s.next(), None, "the message is not complete yet");
        s.push(b"type='chat'><body><![CDATA[</message>]]></body></message><success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></stream:stream>");
        assert_eq!(
            s.next(),
            Some(ToClient::Message(
                "<message xmlns='jabber:client' to='a@b' type='chat'><body><![CDATA[</message>]]></body></message>".into()
            ))
        );
        assert_eq!(
            s.next(),
            Some(ToClient::Message("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>".into()))
        );
        assert_eq!(s.next(), Some(ToClient::Close));
        assert_eq!(s.next(), None);
    }
}
