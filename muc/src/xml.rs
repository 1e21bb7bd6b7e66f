//! Stanza helpers: namespaces, escaping, error replies, reading children, and the
//! broadcast template that is serialised once and addressed per recipient.

use bytes::{BufMut, BytesMut};
use jrs_stream::children::{children, Child};
use jrs_stream::Stanza;
use minidom::Element;

pub use jrs_stream::xml::escape;

pub const NS_MUC: &str = "http://jabber.org/protocol/muc";
pub const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
pub const NS_MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
pub const NS_DATA: &str = "jabber:x:data";
pub const NS_PING: &str = "urn:xmpp:ping";
pub const NS_SID: &str = "urn:xmpp:sid:0";
pub const NS_OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
pub const NS_DELAY: &str = "urn:xmpp:delay";
pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const NS_CLIENT: &str = "jabber:client";

/// An error condition of RFC 6120 with the type XEP-0045 gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Condition {
    pub name: &'static str,
    pub kind: &'static str,
}

macro_rules! conditions {
    ($($id:ident = $name:literal, $kind:literal;)*) => {
        $(pub const $id: Condition = Condition { name: $name, kind: $kind };)*
    };
}

conditions! {
    BAD_REQUEST = "bad-request", "modify";
    CONFLICT = "conflict", "cancel";
    FEATURE_NOT_IMPLEMENTED = "feature-not-implemented", "cancel";
    FORBIDDEN = "forbidden", "auth";
    INTERNAL_SERVER_ERROR = "internal-server-error", "wait";
    ITEM_NOT_FOUND = "item-not-found", "cancel";
    JID_MALFORMED = "jid-malformed", "modify";
    NOT_ACCEPTABLE = "not-acceptable", "modify";
    // XEP-0410: a self-ping from a session that is not joined.
    NOT_JOINED = "not-acceptable", "cancel";
    NOT_ALLOWED = "not-allowed", "cancel";
    NOT_AUTHORIZED = "not-authorized", "auth";
    REGISTRATION_REQUIRED = "registration-required", "auth";
    RESOURCE_CONSTRAINT = "resource-constraint", "wait";
    // Not implemented, not served here: asking again will not help.
    SERVICE_UNAVAILABLE = "service-unavailable", "cancel";
    // A full room, storage not answering: it may work later.
    SERVICE_UNAVAILABLE_WAIT = "service-unavailable", "wait";
}

/// The `<error/>` element.
pub fn error_element(c: Condition, text: &str) -> String {
    let text = if text.is_empty() {
        String::new()
    } else {
        format!(
            "<text xmlns='{NS_STANZAS}' xml:lang='en'>{}</text>",
            escape(text)
        )
    };
    format!(
        "<error type='{}'><{} xmlns='{NS_STANZAS}'/>{text}</error>",
        c.kind, c.name
    )
}

/// The error reply to `s` (addresses swapped, id kept, `extra` as its first child), or
/// `None` for errors and IQ results, which are never answered.
pub fn error_reply(s: &Stanza, c: Condition, text: &str, extra: &str) -> Option<BytesMut> {
    match s.kind() {
        Some("error") => return None,
        Some("result") if s.name() == "iq" => return None,
        _ => {}
    }
    let mut out = BytesMut::with_capacity(256);
    out.put_slice(b"<");
    out.put_slice(s.name().as_bytes());
    if let Some(to) = s.to() {
        push_attr_raw(&mut out, "from", to);
    }
    if let Some(from) = s.from() {
        push_attr_raw(&mut out, "to", from);
    }
    if let Some(id) = s.id() {
        push_attr_raw(&mut out, "id", id);
    }
    out.put_slice(b" type='error'>");
    out.put_slice(extra.as_bytes());
    out.put_slice(error_element(c, text).as_bytes());
    out.put_slice(b"</");
    out.put_slice(s.name().as_bytes());
    out.put_slice(b">");
    Some(out)
}

/// ` name='value'` with an already escaped value (as read from a stanza).
fn push_attr_raw(out: &mut BytesMut, name: &str, raw: &str) {
    out.put_slice(b" ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"='");
    // Raw values may hold `'` if they were quoted with `"`.
    out.put_slice(raw.replace('\'', "&apos;").as_bytes());
    out.put_slice(b"'");
}

/// An IQ result with `payload`.
pub fn iq_result(s: &Stanza, payload: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(128 + payload.len());
    out.put_slice(b"<iq type='result'");
    if let Some(to) = s.to() {
        push_attr_raw(&mut out, "from", to);
    }
    if let Some(from) = s.from() {
        push_attr_raw(&mut out, "to", from);
    }
    if let Some(id) = s.id() {
        push_attr_raw(&mut out, "id", id);
    }
    if payload.is_empty() {
        out.put_slice(b"/>");
    } else {
        out.put_slice(b">");
        out.put_slice(payload.as_bytes());
        out.put_slice(b"</iq>");
    }
    out
}

/// The namespace prefix declarations (`xmlns:P='V'`) among a tag's attributes: prefix,
/// quote character and the value as written (still escaped).
fn prefix_declarations(tag: &[u8]) -> Vec<(String, u8, String)> {
    let mut out = vec![];
    // Attribute by attribute (names, `=`, quoted values), so that text inside a value
    // is never taken for a declaration.
    let mut j = tag
        .iter()
        .position(|b| b.is_ascii_whitespace() || *b == b'/' || *b == b'>')
        .unwrap_or(tag.len());
    let skip_ws = |mut j: usize| {
        while j < tag.len() && tag[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    loop {
        j = skip_ws(j);
        if j >= tag.len() || tag[j] == b'/' || tag[j] == b'>' {
            break;
        }
        let name_start = j;
        while j < tag.len() && !tag[j].is_ascii_whitespace() && tag[j] != b'=' {
            j += 1;
        }
        let name = &tag[name_start..j];
        j = skip_ws(j);
        if tag.get(j) != Some(&b'=') {
            break;
        }
        j = skip_ws(j + 1);
        let Some(&quote) = tag.get(j) else { break };
        if quote != b'\'' && quote != b'"' {
            break;
        }
        let Some(close) = tag[j + 1..].iter().position(|b| *b == quote) else {
            break;
        };
        let value = &tag[j + 1..j + 1 + close];
        j = j + 2 + close;
        if let Some(prefix) = name.strip_prefix(b"xmlns:") {
            if !prefix.is_empty() {
                out.push((
                    String::from_utf8_lossy(prefix).into_owned(),
                    quote,
                    String::from_utf8_lossy(value).into_owned(),
                ));
            }
        }
    }
    out
}

/// The stanza's start tag.
fn stanza_head(s: &Stanza) -> &[u8] {
    if s.is_empty_element() {
        return s.as_slice();
    }
    let inner_at = s.inner().as_ptr() as usize - s.as_slice().as_ptr() as usize;
    &s.as_slice()[..inner_at]
}

/// The bytes of a top-level child, self-contained: a namespace prefix the stanza's own
/// start tag declares (`<message xmlns:a='urn:x'>..<a:b/>`) is declared again on the
/// child's start tag, so that the child can be copied into another stanza (and kept in
/// history) without leaving a prefix undeclared.
pub fn child_bytes(s: &Stanza, child: &Child) -> String {
    let bytes = &s.as_slice()[child.span.clone()];
    let text = String::from_utf8_lossy(bytes);
    let head = stanza_head(s);
    let declared = prefix_declarations(head);
    if declared.is_empty() {
        return text.into_owned();
    }
    let tag_len = jrs_stream::xml::tag_len(bytes).unwrap_or(bytes.len());
    let own = prefix_declarations(&bytes[..tag_len]);
    let name_end = bytes
        .iter()
        .position(|b| b.is_ascii_whitespace() || *b == b'/' || *b == b'>')
        .unwrap_or(bytes.len());
    let mut extra = String::new();
    for (prefix, quote, value) in declared {
        if own.iter().any(|(p, _, _)| *p == prefix) {
            continue;
        }
        let q = quote as char;
        extra.push_str(&format!(" xmlns:{prefix}={q}{value}{q}"));
    }
    let mut out = String::with_capacity(text.len() + extra.len());
    out.push_str(&String::from_utf8_lossy(&bytes[..name_end]));
    out.push_str(&extra);
    out.push_str(&String::from_utf8_lossy(&bytes[name_end..]));
    out
}

/// All top-level children of a stanza, each self-contained (see [`child_bytes`]).
pub fn inner_bytes(s: &Stanza) -> String {
    let head = stanza_head(s);
    if prefix_declarations(head).is_empty() {
        return String::from_utf8_lossy(s.inner()).into_owned();
    }
    children(s).iter().map(|c| child_bytes(s, c)).collect()
}

/// A top-level child parsed into a tree (unqualified children get `jabber:client`).
pub fn parse_child(s: &Stanza, child: &Child) -> Option<Element> {
    let wrapped = format!("<w xmlns='{NS_CLIENT}'>{}</w>", child_bytes(s, child));
    let w: Element = wrapped.parse().ok()?;
    w.children().next().cloned()
}

/// The first top-level child `name` in `ns`, parsed.
pub fn child(s: &Stanza, name: &str, ns: &str) -> Option<Element> {
    children(s)
        .iter()
        .find(|c| c.name == name && c.ns == ns)
        .and_then(|c| parse_child(s, c))
}

/// A stanza serialised once with the recipient left open: `head` ends inside the
/// opening `to='` quote, `tail` starts with the closing quote. Addressing it to each
/// recipient copies bytes; nothing is serialised again.
#[derive(Debug, Clone, Default)]
pub struct Template {
    pub head: String,
    pub tail: String,
}

impl Template {
    /// `<NAME ATTRS to='` … `'>` + `content` + `</NAME>` (`attrs` already escaped, with
    /// a leading space each).
    pub fn new(name: &str, attrs: &str, content: &str) -> Template {
        Template {
            head: format!("<{name}{attrs} to='"),
            tail: if content.is_empty() {
                "'/>".to_owned()
            } else {
                format!("'>{content}</{name}>")
            },
        }
    }

    /// Appends the stanza addressed to `to` (unescaped).
    pub fn write(&self, to: &str, out: &mut BytesMut) {
        out.reserve(self.head.len() + self.tail.len() + to.len());
        out.put_slice(self.head.as_bytes());
        out.put_slice(escape(to).as_bytes());
        out.put_slice(self.tail.as_bytes());
    }

    /// Appends the stanza without a `to` (for a fan-out packet, which addresses it).
    pub fn write_unaddressed(&self, out: &mut BytesMut) {
        let head = self.head.strip_suffix(" to='").unwrap_or(&self.head);
        out.put_slice(head.as_bytes());
        out.put_slice(
            self.tail
                .strip_prefix('\'')
                .unwrap_or(&self.tail)
                .as_bytes(),
        );
    }

    /// The stanza addressed to `to`, as a string (tests and single sends).
    #[cfg(test)]
    pub fn to(&self, to: &str) -> String {
        let mut out = BytesMut::new();
        self.write(to, &mut out);
        String::from_utf8(out.to_vec()).expect("utf-8")
    }
}

/// `' name='value'` with the value escaped.
pub fn attr(name: &str, value: &str) -> String {
    format!(" {name}='{}'", escape(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn error_reply_swaps_addresses() {
        let s = Stanza::parse(Bytes::from_static(
            b"<presence from='a@b/c' to='r@conf/n' id='x'><x xmlns='http://jabber.org/protocol/muc'/></presence>",
        ))
        .unwrap();
        let r = error_reply(
            &s,
            CONFLICT,
            "",
            "<x xmlns='http://jabber.org/protocol/muc'/>",
        )
        .unwrap();
        let r = String::from_utf8(r.to_vec()).unwrap();
        assert!(
            r.starts_with("<presence from='r@conf/n' to='a@b/c' id='x' type='error'>"),
            "{r}"
        );
        assert!(r.contains("<error type='cancel'><conflict "), "{r}");
    }

    #[test]
    fn template_addresses_per_recipient() {
        let t = Template::new(
            "message",
            " from='r@c/n' type='groupchat'",
            "<body>hi</body>",
        );
        assert_eq!(
            t.to("a@b/<c>"),
            "<message from='r@c/n' type='groupchat' to='a@b/&lt;c&gt;'><body>hi</body></message>"
        );
    }

    #[test]
    fn copied_children_declare_the_stanzas_prefixes() {
        let s = Stanza::parse(Bytes::from_static(
            b"<message xmlns:a='urn:x' xmlns:c=\"urn:'c\" to='r@c'><a:b v=\" xmlns:a='no'\"/><a:d xmlns:a='urn:own'/><e/></message>",
        ))
        .unwrap();
        let parts = children(&s);
        let copies: Vec<String> = parts.iter().map(|c| child_bytes(&s, c)).collect();
        assert_eq!(
            copies,
            [
                "<a:b xmlns:a='urn:x' xmlns:c=\"urn:'c\" v=\" xmlns:a='no'\"/>",
                "<a:d xmlns:c=\"urn:'c\" xmlns:a='urn:own'/>",
                "<e xmlns:a='urn:x' xmlns:c=\"urn:'c\"/>",
            ]
        );
        // Each copy parses on its own.
        for c in &copies {
            let _: Element = format!("<w xmlns='{NS_CLIENT}'>{c}</w>").parse().unwrap();
        }
        assert_eq!(inner_bytes(&s), copies.concat());
    }

    #[test]
    fn children_parse_with_namespace() {
        let s = Stanza::parse(Bytes::from_static(
            b"<message to='r@c'><subject>S &amp; T</subject><x xmlns='jabber:x:data' type='submit'/></message>",
        ))
        .unwrap();
        assert_eq!(child(&s, "subject", NS_CLIENT).unwrap().text(), "S & T");
        assert_eq!(
            child(&s, "x", NS_DATA).unwrap().attr("type"),
            Some("submit")
        );
    }
}
