//! Fan-out packets: one stanza for many recipients, so a group chat room's broadcast is
//! serialised once and crosses each link once (docs/protocol.md, "Fan-out").
//!
//! ```xml
//! <fanout from='room@conference.localhost' to='localhost'>
//!   <r to='alice@localhost/phone'/><r to='bob@localhost/pc'/>
//!   <message from='room@conference.localhost/carol' type='groupchat' id='x'>..</message>
//! </fanout>
//! ```
//!
//! Between sm and c2s the same list rides in a `<session type='fanout'>` packet, each
//! `<r/>` also naming the session (`sid`). The stanza carries no `to`: each recipient's
//! copy is the stanza with ` to='..'` spliced in after its name.
//!
//! Read and written by hand, not with an XML library: these are the project's own
//! elements, every one has been checked well-formed by the router's framer (and by its
//! validator for components it does not trust), and the reader runs once per room
//! broadcast on every hop, where allocating a tree per recipient is what fan-out is
//! meant to avoid.

use bytes::{BufMut, BytesMut};
use jrs_stream::xml::{element_len, tag_len};
use jrs_stream::Stanza;

/// The top-level element (no namespace: the stanza inside stays in the stream's content
/// namespace, as in `<session/>`).
pub const ELEMENT: &str = "fanout";

/// Most recipients one packet carries: a room's broadcast to more is split over
/// several, which keeps every packet well below the stanza limits of the links
/// (about 60 bytes per recipient).
pub const MAX_RECIPIENTS: usize = 256;

/// Most bytes of copies one packet may stand for (recipients times the stanza's size):
/// a hop that must make one copy per recipient (s2s, a third-party component, a grace
/// queue) makes at most this much from one packet, well below a link's queue bound.
pub const MAX_COPY_BYTES: usize = 1 << 20;

/// How many recipients one packet may carry for a stanza of `stanza_len` bytes.
pub fn max_recipients(stanza_len: usize) -> usize {
    (MAX_COPY_BYTES / stanza_len.max(1)).clamp(1, MAX_RECIPIENTS)
}

/// One recipient: attribute values raw (still escaped, as written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipient<'a> {
    pub to: &'a str,
    pub sid: Option<&'a str>,
}

/// The content of a fan-out packet: its recipients and the stanza they all get.
#[derive(Debug)]
pub struct Fanout<'a> {
    pub recipients: Vec<Recipient<'a>>,
    pub stanza: Stanza<&'a [u8]>,
}

/// Why a fan-out packet could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fan-out packet: {0}")]
pub struct FanoutError(pub &'static str);

/// Reads the content of a `<fanout>` (or `<session type='fanout'>`) element: one or
/// more distinct `<r/>` elements (at most [`max_recipients`]), then exactly one
/// `message`, `presence` or `iq` without `to` and without a namespace of its own.
pub fn parse(inner: &[u8]) -> Result<Fanout<'_>, FanoutError> {
    let mut recipients = vec![];
    let mut pos = skip_space(inner, 0);
    while inner[pos..].starts_with(b"<r")
        && matches!(
            inner.get(pos + 2),
            Some(b' ' | b'/' | b'\t' | b'\n' | b'\r')
        )
    {
        let len = tag_len(&inner[pos..]).ok_or(FanoutError("unterminated <r/>"))?;
        let tag = &inner[pos..pos + len];
        if !tag.ends_with(b"/>") {
            return Err(FanoutError("<r> must be empty"));
        }
        let tag = std::str::from_utf8(tag).map_err(|_| FanoutError("not UTF-8"))?;
        let to = raw_attr(tag, "to").ok_or(FanoutError("<r/> without 'to'"))?;
        if to.is_empty() {
            return Err(FanoutError("<r/> with an empty 'to'"));
        }
        let sid = raw_attr(tag, "sid");
        // Raw values are copied into `'`-quoted attributes: one written in `"` quotes
        // may hold a bare `'`, which would end the attribute early there.
        if to.contains('\'') || sid.is_some_and(|s| s.contains('\'')) {
            return Err(FanoutError("a quote in <r/> must be written &apos;"));
        }
        recipients.push(Recipient { to, sid });
        pos = skip_space(inner, pos + len);
    }
    let end = trim_end(inner);
    if pos >= end {
        return Err(FanoutError("no stanza"));
    }
    let rest = &inner[pos..end];
    if element_len(rest) != Some(rest.len()) {
        return Err(FanoutError("more than one stanza"));
    }
    let stanza = Stanza::parse_slice(rest).map_err(|_| FanoutError("the stanza does not parse"))?;
    if !matches!(stanza.name(), "message" | "presence" | "iq") {
        return Err(FanoutError("the stanza must be a message, presence or iq"));
    }
    if stanza.to().is_some() {
        return Err(FanoutError("the stanza must not have 'to'"));
    }
    // Every copy is delivered as if it came alone on the stream: in its content
    // namespace, as the slow path hands stanzas to clients.
    if stanza.xmlns().is_some() {
        return Err(FanoutError("the stanza must not declare a namespace"));
    }
    if recipients.is_empty() {
        return Err(FanoutError("no recipient"));
    }
    if recipients.len() > max_recipients(rest.len()) {
        return Err(FanoutError("too many recipients for the stanza's size"));
    }
    let mut seen = std::collections::HashSet::with_capacity(recipients.len());
    if !recipients.iter().all(|r| seen.insert(r.to)) {
        return Err(FanoutError("a recipient is listed twice"));
    }
    Ok(Fanout { recipients, stanza })
}

/// Whether the start tag of a `<fanout>` packet has attributes other than `from` and
/// `to` (a namespace declaration there would change what the stanza inside means once
/// it travels alone).
pub fn has_other_attributes(packet: &Stanza<impl AsRef<[u8]>>) -> bool {
    let bytes = packet.as_slice();
    let head_len = packet.inner().as_ptr() as usize - bytes.as_ptr() as usize;
    let head = &bytes[..head_len.min(bytes.len())];
    let Ok(head) = std::str::from_utf8(head) else {
        return true;
    };
    let mut rest = head.trim_start_matches('<');
    rest = rest.trim_start_matches(|c: char| !c.is_ascii_whitespace() && c != '/' && c != '>');
    loop {
        rest = rest.trim_start();
        let Some(eq) = rest.find('=') else {
            return false;
        };
        let key = rest[..eq].trim_end();
        if key != "from" && key != "to" {
            return true;
        }
        rest = rest[eq + 1..].trim_start();
        let Some(quote) = rest.chars().next().filter(|q| *q == '\'' || *q == '"') else {
            return true;
        };
        let Some(close) = rest[1..].find(quote) else {
            return true;
        };
        rest = &rest[close + 2..];
    }
}

/// Appends a `<session type='fanout'>` packet from sm (`from`) to a c2s instance with
/// the sessions (each `<r/>` with its `sid`) and the stanza.
pub fn session_packet<'a>(
    from: &str,
    c2s: &str,
    recipients: impl IntoIterator<Item = Recipient<'a>>,
    stanza: &[u8],
) -> bytes::Bytes {
    let mut out = BytesMut::with_capacity(stanza.len() + 4096);
    out.put_slice(b"<session type='fanout' from='");
    out.put_slice(jrs_stream::xml::escape(from).as_bytes());
    out.put_slice(b"' to='");
    out.put_slice(jrs_stream::xml::escape(c2s).as_bytes());
    out.put_slice(b"'>");
    for r in recipients {
        recipient(r, &mut out);
    }
    out.put_slice(stanza);
    out.put_slice(b"</session>");
    out.freeze()
}

/// Appends the stanza addressed to `to` (raw: already escaped).
pub fn address(stanza: &Stanza<&[u8]>, to: &str, out: &mut BytesMut) {
    let bytes = stanza.as_slice();
    // The name starts right after `<`.
    let name_end = 1 + stanza.name().len();
    out.reserve(bytes.len() + to.len() + 6);
    out.put_slice(&bytes[..name_end]);
    out.put_slice(b" to='");
    out.put_slice(to.as_bytes());
    out.put_u8(b'\'');
    out.put_slice(&bytes[name_end..]);
}

/// The stanza addressed to `to` (raw), as its own buffer.
pub fn addressed(stanza: &Stanza<&[u8]>, to: &str) -> bytes::Bytes {
    let mut out = BytesMut::new();
    address(stanza, to, &mut out);
    out.freeze()
}

/// Appends `<fanout from='FROM' to='TO'>` (both raw; a bare `'`, which a value read
/// from `"` quotes may hold, is written `&apos;`).
pub fn open(from: &str, to: &str, out: &mut BytesMut) {
    out.put_slice(b"<fanout from='");
    out.put_slice(requote(from).as_bytes());
    out.put_slice(b"' to='");
    out.put_slice(requote(to).as_bytes());
    out.put_slice(b"'>");
}

/// A raw attribute value made fit for `'` quotes.
fn requote(raw: &str) -> std::borrow::Cow<'_, str> {
    if raw.contains('\'') {
        raw.replace('\'', "&apos;").into()
    } else {
        raw.into()
    }
}

/// Appends one `<r to='..' sid='..'/>` (raw values).
pub fn recipient(r: Recipient<'_>, out: &mut BytesMut) {
    out.put_slice(b"<r to='");
    out.put_slice(r.to.as_bytes());
    if let Some(sid) = r.sid {
        out.put_slice(b"' sid='");
        out.put_slice(sid.as_bytes());
    }
    out.put_slice(b"'/>");
}

/// The end tag of a `<fanout>` packet.
pub const END: &[u8] = b"</fanout>";

/// Appends the stanza and `</fanout>`.
pub fn close(stanza: &[u8], out: &mut BytesMut) {
    out.put_slice(stanza);
    out.put_slice(END);
}

/// A whole `<fanout>` packet.
pub fn packet<'a>(
    from: &str,
    to: &str,
    recipients: impl IntoIterator<Item = Recipient<'a>>,
    stanza: &[u8],
) -> bytes::Bytes {
    let mut out = BytesMut::with_capacity(stanza.len() + 256);
    open(from, to, &mut out);
    for r in recipients {
        recipient(r, &mut out);
    }
    close(stanza, &mut out);
    out.freeze()
}

fn skip_space(b: &[u8], mut pos: usize) -> usize {
    while pos < b.len() && b[pos].is_ascii_whitespace() {
        pos += 1;
    }
    pos
}

fn trim_end(b: &[u8]) -> usize {
    let mut end = b.len();
    while end > 0 && b[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    end
}

/// The raw value of attribute `name` in a start tag known to be well-formed.
fn raw_attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    // Past the element name.
    let mut rest = tag.trim_start_matches('<');
    rest = rest.trim_start_matches(|c: char| !c.is_ascii_whitespace() && c != '/' && c != '>');
    loop {
        rest = rest.trim_start();
        let eq = rest.find('=')?;
        let key = rest[..eq].trim_end();
        rest = rest[eq + 1..].trim_start();
        let quote = rest.chars().next()?;
        if quote != '\'' && quote != '"' {
            return None;
        }
        let close = rest[1..].find(quote)? + 1;
        if key == name {
            return Some(&rest[1..close]);
        }
        rest = &rest[close + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_recipients_and_the_stanza() {
        let inner = b" <r to='a@l/x'/><r to=\"b@l/y&apos;z\" sid='s-1'/>\n<message from='r@c/n' type='groupchat'><body>hi</body></message> ";
        let f = parse(inner).expect("parses");
        assert_eq!(
            f.recipients,
            [
                Recipient {
                    to: "a@l/x",
                    sid: None
                },
                Recipient {
                    to: "b@l/y&apos;z",
                    sid: Some("s-1")
                }
            ]
        );
        assert_eq!(f.stanza.name(), "message");
        assert_eq!(
            &addressed(&f.stanza, f.recipients[1].to)[..],
            b"<message to='b@l/y&apos;z' from='r@c/n' type='groupchat'><body>hi</body></message>"
        );
    }

    #[test]
    fn addresses_empty_elements() {
        let f = parse(b"<r to='a@l/x'/><presence from='r@c/n'/>").expect("parses");
        assert_eq!(
            &addressed(&f.stanza, "a@l/x")[..],
            b"<presence to='a@l/x' from='r@c/n'/>"
        );
    }

    #[test]
    fn refuses_what_is_not_one_stanza_without_to() {
        for (inner, why) in [
            (&b"<r to='a@l'/>"[..], "no stanza"),
            (b"<r to='a@l'/><message/><message/>", "more than one stanza"),
            (
                b"<r to='a@l'/><message to='x@y'/>",
                "the stanza must not have 'to'",
            ),
            (
                b"<r to='a@l'/><fanout/>",
                "the stanza must be a message, presence or iq",
            ),
            (b"<r/><message/>", "<r/> without 'to'"),
            (b"<r to=''/><message/>", "<r/> with an empty 'to'"),
            (b"<r to='a'></r><message/>", "<r> must be empty"),
            (
                b"<r to=\"a'b@l\"/><message/>",
                "a quote in <r/> must be written &apos;",
            ),
            (b"<message/>", "no recipient"),
            (
                b"<r to='a@l'/><r to='a@l'/><message/>",
                "a recipient is listed twice",
            ),
            (
                b"<r to='a@l'/><message xmlns='jabber:client'/>",
                "the stanza must not declare a namespace",
            ),
        ] {
            assert_eq!(
                parse(inner).unwrap_err(),
                FanoutError(why),
                "{}",
                String::from_utf8_lossy(inner)
            );
        }
        // Nested elements of the same name and CDATA do not end the stanza early.
        let f =
            parse(b"<r to='a@l'/><message><message/><body><![CDATA[</message>]]></body></message>");
        assert!(f.is_ok());
    }

    #[test]
    fn builds_what_it_reads() {
        let p = packet(
            "r@c",
            "l",
            [
                Recipient {
                    to: "a@l/x",
                    sid: Some("7"),
                },
                Recipient {
                    to: "b@l/y",
                    sid: None,
                },
            ],
            b"<message from='r@c/n'/>",
        );
        let s = Stanza::parse(p).expect("parses");
        assert_eq!(s.name(), ELEMENT);
        assert_eq!((s.from(), s.to()), (Some("r@c"), Some("l")));
        let f = parse(s.inner()).expect("content parses");
        assert_eq!(f.recipients.len(), 2);
        assert_eq!(f.recipients[0].sid, Some("7"));
        // A value read from `"` quotes keeps its meaning in `'` quotes.
        let p = packet(
            "r'@c",
            "l",
            [Recipient {
                to: "a@l",
                sid: None,
            }],
            b"<message/>",
        );
        let s = Stanza::parse(p).unwrap();
        assert_eq!(s.attr("from").as_deref(), Some("r'@c"));
        assert!(!has_other_attributes(&s));
    }

    #[test]
    fn limits_and_attributes() {
        assert_eq!(max_recipients(100), MAX_RECIPIENTS);
        assert_eq!(max_recipients(64 * 1024), 16);
        assert_eq!(max_recipients(usize::MAX), 1);
        let big = format!("<message><body>{}</body></message>", "x".repeat(64 * 1024));
        let mut inner: String = (0..17).map(|i| format!("<r to='u{i}@l'/>")).collect();
        inner.push_str(&big);
        assert_eq!(
            parse(inner.as_bytes()).unwrap_err(),
            FanoutError("too many recipients for the stanza's size")
        );
        for (packet, other) in [
            (
                "<fanout from='a' to='b'><r to='x'/><message/></fanout>",
                false,
            ),
            (
                "<fanout from=\"a\" to='b' ><r to='x'/><message/></fanout>",
                false,
            ),
            (
                "<fanout xmlns:e='urn:x' from='a' to='b'><r to='x'/><message/></fanout>",
                true,
            ),
            (
                "<fanout from='a' to='b' xmlns='jabber:client'><r to='x'/><message/></fanout>",
                true,
            ),
        ] {
            let s = Stanza::parse(bytes::Bytes::from(packet)).unwrap();
            assert_eq!(has_other_attributes(&s), other, "{packet}");
        }
        let p = session_packet(
            "sm",
            "c2s",
            [Recipient {
                to: "a@l/r",
                sid: Some("s1"),
            }],
            b"<message/>",
        );
        assert_eq!(&p[..], b"<session type='fanout' from='sm' to='c2s'><r to='a@l/r' sid='s1'/><message/></session>");
    }
}
