//! Namespaces, stream headers and the small elements of server-to-server streams.

use bytes::{Bytes, BytesMut};
use jrs_stream::xml::{escape, unescape};
use jrs_stream::Stanza;
use quick_xml::events::Event;
use quick_xml::Reader;

pub const NS_SERVER: &str = "jabber:server";
pub const NS_DIALBACK: &str = "jabber:server:dialback";

/// Our stream header: `jabber:server` with the dialback prefix declared (the shared
/// header writer cannot declare `xmlns:db`).
pub fn header(from: &str, to: &str, id: Option<&str>) -> String {
    let mut s = format!(
        "<?xml version='1.0'?><stream:stream xmlns='{NS_SERVER}' \
         xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='{NS_DIALBACK}'"
    );
    if !from.is_empty() {
        s.push_str(&format!(" from='{}'", escape(from)));
    }
    if !to.is_empty() {
        s.push_str(&format!(" to='{}'", escape(to)));
    }
    if let Some(id) = id {
        s.push_str(&format!(" id='{}'", escape(id)));
    }
    s.push_str(" version='1.0'>");
    s
}

/// The domain of a JID attribute as received (still escaped); `None` when it is not a
/// valid JID.
pub fn domain_of(raw: &str) -> Option<String> {
    let text = unescape(raw)?;
    let jid = jid::Jid::new(&text).ok()?;
    Some(jid.domain().as_str().to_ascii_lowercase())
}

/// A dialback element (`db:result` or `db:verify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialback {
    pub verify: bool,
    pub from: String,
    pub to: String,
    pub id: Option<String>,
    pub kind: Option<String>,
    pub key: String,
}

impl Dialback {
    /// Reads a `db:result` / `db:verify` element (the `db` prefix is declared on the
    /// stream header, so these are not validated as self-contained stanzas; they must be
    /// simple: attributes and text only). `None` when `s` is not a dialback element.
    pub fn parse(s: &Stanza) -> Option<Result<Dialback, String>> {
        let verify = match (s.name(), s.xmlns()) {
            ("db:result", _) | ("result", Some(NS_DIALBACK)) => false,
            ("db:verify", _) | ("verify", Some(NS_DIALBACK)) => true,
            _ => return None,
        };
        let inner = s.inner();
        let key = match std::str::from_utf8(inner) {
            Ok(k) if !k.contains('<') && !k.contains('&') => k.trim().to_owned(),
            _ => return Some(Err("a dialback key must be plain text".into())),
        };
        let attr = |name: &str| s.attr(name).map(|v| v.to_ascii_lowercase());
        let (Some(from), Some(to)) = (attr("from"), attr("to")) else {
            return Some(Err("a dialback element needs from and to".into()));
        };
        if jid::Jid::new(&from).is_err() || jid::Jid::new(&to).is_err() {
            return Some(Err("bad domain in a dialback element".into()));
        }
        Some(Ok(Dialback {
            verify,
            from,
            to,
            id: s.attr("id"),
            kind: s.attr("type"),
            key,
        }))
    }
}

pub fn db_result_request(from: &str, to: &str, key: &str) -> String {
    format!(
        "<db:result from='{}' to='{}'>{}</db:result>",
        escape(from),
        escape(to),
        escape(key)
    )
}

pub fn db_result_answer(from: &str, to: &str, valid: bool) -> String {
    let kind = if valid { "valid" } else { "invalid" };
    format!(
        "<db:result from='{}' to='{}' type='{kind}'/>",
        escape(from),
        escape(to)
    )
}

pub fn db_verify_request(from: &str, to: &str, id: &str, key: &str) -> String {
    format!(
        "<db:verify from='{}' to='{}' id='{}'>{}</db:verify>",
        escape(from),
        escape(to),
        escape(id),
        escape(key)
    )
}

pub fn db_verify_answer(from: &str, to: &str, id: &str, valid: bool) -> String {
    let kind = if valid { "valid" } else { "invalid" };
    format!(
        "<db:verify from='{}' to='{}' id='{}' type='{kind}'/>",
        escape(from),
        escape(to),
        escape(id)
    )
}

/// A stanza from a `jabber:server` stream in the router's content namespace: an explicit
/// `xmlns='jabber:server'` on the top-level element is dropped (the element then
/// inherits the component stream's namespace, as the router expects). Stanzas without
/// one pass unchanged. `None` for any other namespace.
pub fn to_internal(s: &Stanza) -> Option<Bytes> {
    match s.xmlns() {
        None => Some(s.bytes().clone()),
        Some(NS_SERVER) => Some(strip_xmlns(s)),
        Some(_) => None,
    }
}

fn strip_xmlns(s: &Stanza) -> Bytes {
    let bytes = s.as_slice();
    let mut reader = Reader::from_reader(bytes);
    let Ok(Event::Start(e) | Event::Empty(e)) = reader.read_event() else {
        return s.bytes().clone();
    };
    let head_end = reader.buffer_position() as usize;
    let empty = bytes[..head_end].ends_with(b"/>");
    let mut out = BytesMut::with_capacity(bytes.len());
    out.extend_from_slice(b"<");
    out.extend_from_slice(e.name().as_ref().as_bytes());
    for attr in e.attributes().with_checks(false).flatten() {
        if attr.key.as_ref() == "xmlns" {
            continue;
        }
        let quote = if attr.value.contains('\'') {
            b'"'
        } else {
            b'\''
        };
        out.extend_from_slice(b" ");
        out.extend_from_slice(attr.key.as_ref().as_bytes());
        out.extend_from_slice(&[b'=', quote]);
        out.extend_from_slice(attr.value.as_bytes());
        out.extend_from_slice(&[quote]);
    }
    out.extend_from_slice(if empty { b"/>" } else { b">" });
    out.extend_from_slice(&bytes[head_end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(s: &'static str) -> Stanza {
        Stanza::parse(Bytes::from_static(s.as_bytes())).unwrap()
    }

    #[test]
    fn reads_dialback_elements() {
        let d = Dialback::parse(&stanza(
            "<db:result from='A.example' to='b.example'> abc </db:result>",
        ))
        .unwrap()
        .unwrap();
        assert!(!d.verify);
        assert_eq!(
            (d.from.as_str(), d.to.as_str(), d.key.as_str()),
            ("a.example", "b.example", "abc")
        );
        let d = Dialback::parse(&stanza(
            "<verify xmlns='jabber:server:dialback' from='a' to='b' id='i' type='valid'/>",
        ))
        .unwrap()
        .unwrap();
        assert!(d.verify && d.kind.as_deref() == Some("valid") && d.id.as_deref() == Some("i"));
        assert!(Dialback::parse(&stanza("<message to='a'/>")).is_none());
        assert!(
            Dialback::parse(&stanza("<db:result from='a' to='b'><x/></db:result>"))
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn maps_the_server_namespace() {
        let s =
            stanza("<message xmlns='jabber:server' to='a@b' from='c@d'><body>x</body></message>");
        assert_eq!(
            &to_internal(&s).unwrap()[..],
            b"<message to='a@b' from='c@d'><body>x</body></message>"
        );
        let s = stanza("<presence xmlns='jabber:server' to='a@b'/>");
        assert_eq!(&to_internal(&s).unwrap()[..], b"<presence to='a@b'/>");
        assert!(to_internal(&stanza("<message xmlns='jabber:client'/>")).is_none());
        let s = stanza("<iq to='a' type='get' id='1'/>");
        assert_eq!(to_internal(&s).unwrap(), s.bytes().clone());
    }

    #[test]
    fn domains() {
        assert_eq!(domain_of("u@B.Example/r").as_deref(), Some("b.example"));
        assert_eq!(domain_of("b.example").as_deref(), Some("b.example"));
        assert!(domain_of("@@").is_none());
    }
}
