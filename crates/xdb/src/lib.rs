//! Storage requests and results (the `xdb` packet type), specified in `docs/protocol.md`.
//!
//! ```xml
//! <xdb xmlns='urn:jabberd-rs:xdb:0' type='get' to='alice@localhost' from='sm-1'
//!      ns='jabber:iq:roster' id='7'/>
//! <xdb xmlns='urn:jabberd-rs:xdb:0' type='result' to='sm-1' from='alice@localhost'
//!      ns='jabber:iq:roster' id='7'>...stored fragment...</xdb>
//! ```
//! The owner is the `to` of a request: a bare JID, or a domain for data of the host. The
//! router routes requests by the owner's domain, so one storage component per domain.

pub mod archive;
pub mod client;
pub mod mam;

pub use client::{XdbClient, XdbError};

use bytes::Bytes;

use jrs_component::protocol::NS_XDB;
use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StanzaErrorCondition};

/// What a request asks of the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Return the stored fragment (empty when nothing is stored).
    Get,
    /// Replace the fragment with the request's content.
    Set,
    /// Remove the fragment; with `ns='*'`, everything stored for the owner.
    Delete,
    /// Add the request's content after the stored fragment (lists such as offline
    /// messages); `max-items` refuses the append with `resource-constraint` when the
    /// result would hold more top-level elements.
    Append,
    /// Return the fragment and remove it, in one durable step.
    Take,
    /// For a domain owner: the bare JIDs that have data stored, as `<owner jid='..'/>`.
    /// With `ns='*'` ([`LIST_CONTENTS`]), for any owner (a user, or a domain for the
    /// host's own data): what that owner has stored, as [`Contents`].
    List,
    /// Adds items to the end of the archive `ns` (see [`archive`]); `max-items` and
    /// `max-age` apply retention after it.
    ArchiveAppend,
    /// Returns a page of the archive `ns` (see [`archive::Query`], [`archive::Page`]).
    ArchiveQuery,
    /// Applies retention (`max-items`, `max-age`) to the archive `ns`.
    ArchiveTrim,
    /// Replaces the stanza of one item of the archive `ns`, found by id (a tombstone
    /// of a retracted message, see [`archive::retraction_to_xml`]).
    ArchiveRetract,
}

/// When the data of a write must be on disk (the request's `flush` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flush {
    /// Before the answer (the default, and the only choice but for `set` and
    /// `archive-append`).
    #[default]
    Now,
    /// `flush='later'`, on `set` and `archive-append` only: storage may answer once
    /// reads see the write, and puts it on disk within a second, or when it stops. For
    /// writes nothing waits for and whose loss in a crash harms little, which would
    /// otherwise cost a disk flush each: the last activity time at logout (XEP-0012),
    /// and the archive copy of a message that was delivered or stored offline
    /// (XEP-0313).
    Later,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Delete => "delete",
            Op::Append => "append",
            Op::Take => "take",
            Op::List => "list",
            Op::ArchiveAppend => "archive-append",
            Op::ArchiveQuery => "archive-query",
            Op::ArchiveTrim => "archive-trim",
            Op::ArchiveRetract => "archive-retract",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        [
            Op::Get,
            Op::Set,
            Op::Delete,
            Op::Append,
            Op::Take,
            Op::List,
            Op::ArchiveAppend,
            Op::ArchiveQuery,
            Op::ArchiveTrim,
            Op::ArchiveRetract,
        ]
        .into_iter()
        .find(|o| o.name() == s)
    }
}

/// The `ns` of a `list` asking for what one owner has stored ([`Contents`]) instead of
/// a domain's owners.
pub const LIST_CONTENTS: &str = "*";

/// What one owner has stored: the answer to `list` with `ns='*'`, written
/// `<ns name='..'/>` per namespace holding a fragment (or an appended list) and
/// `<archive ns='..'/>` per archive, each in byte order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    pub namespaces: Vec<String>,
    pub archives: Vec<String>,
}

impl Contents {
    pub fn to_xml(&self) -> Bytes {
        let mut out = String::new();
        for ns in &self.namespaces {
            out.push_str(&format!("<ns name='{}'/>", escape(ns)));
        }
        for ns in &self.archives {
            out.push_str(&format!("<archive ns='{}'/>", escape(ns)));
        }
        Bytes::from(out)
    }

    /// Reads an answer (elements in any order, as the router merges the answers of
    /// several stores); the lists come out sorted, each name once.
    pub fn parse(content: &[u8]) -> Result<Contents, Refusal> {
        let bad = |t: String| Refusal::new(StanzaErrorCondition::BadRequest, t);
        let mut namespaces = std::collections::BTreeSet::new();
        let mut archives = std::collections::BTreeSet::new();
        let mut reader = quick_xml::Reader::from_reader(content);
        let mut depth = 0usize;
        loop {
            let event = reader
                .read_event()
                .map_err(|e| bad(format!("a contents list that is not well-formed: {e}")))?;
            let start = match event {
                quick_xml::events::Event::Eof => break,
                quick_xml::events::Event::Start(s) => {
                    depth += 1;
                    if depth > 1 {
                        continue;
                    }
                    s
                }
                quick_xml::events::Event::Empty(s) if depth == 0 => s,
                quick_xml::events::Event::End(_) => {
                    depth = depth.saturating_sub(1);
                    continue;
                }
                _ => continue,
            };
            let (target, key) = match start.name().as_ref() {
                "ns" => (&mut namespaces, "name"),
                "archive" => (&mut archives, "ns"),
                _ => continue,
            };
            for a in start.attributes().flatten() {
                if a.key.as_ref() == key {
                    let value = quick_xml::escape::unescape(&a.value)
                        .map_err(|e| bad(format!("a bad name in a contents list: {e}")))?;
                    target.insert(value.into_owned());
                }
            }
        }
        Ok(Contents {
            namespaces: namespaces.into_iter().collect(),
            archives: archives.into_iter().collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.archives.is_empty()
    }
}

/// A parsed storage request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub owner: String,
    pub ns: String,
    pub id: String,
    pub from: String,
    pub max_items: Option<usize>,
    /// Archive retention by age, in seconds (archive operations only).
    pub max_age: Option<u64>,
    pub flush: Flush,
    pub content: Bytes,
}

/// A request that cannot be served, with the error condition to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub condition: StanzaErrorCondition,
    pub text: String,
}

impl Refusal {
    pub fn new(condition: StanzaErrorCondition, text: impl Into<String>) -> Refusal {
        Refusal {
            condition,
            text: text.into(),
        }
    }
}

/// The error answer to the request `stanza`, logged as a warning: how the storage
/// components refuse a request.
pub fn refused(stanza: &Stanza, refusal: &Refusal) -> Bytes {
    tracing::warn!(
        from = stanza.from().unwrap_or(""),
        to = stanza.to().unwrap_or(""),
        condition = refusal.condition.name(),
        "{}",
        refusal.text
    );
    stanza
        .error_reply(refusal.condition, &refusal.text)
        .expect("requests are never errors or results")
}

impl Request {
    pub fn parse(stanza: &Stanza) -> Result<Request, Refusal> {
        let bad = |t: &str| Refusal::new(StanzaErrorCondition::BadRequest, t);
        let op = stanza
            .kind()
            .and_then(Op::parse)
            .ok_or_else(|| bad("type must be get, set, delete, append, take, list, archive-append, archive-query, archive-trim or archive-retract"))?;
        let owner = stanza
            .attr("to")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("'to' (the owner) is required"))?;
        let ns = stanza.attr("ns").unwrap_or_default();
        if ns.is_empty() && op != Op::List {
            return Err(bad("'ns' is required"));
        }
        let max_items = match stanza.attr("max-items") {
            None => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| bad("max-items must be a whole number"))?,
            ),
        };
        let max_age = match stanza.attr("max-age") {
            None => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| bad("max-age must be a whole number of seconds"))?,
            ),
        };
        let flush = match stanza.attr("flush").as_deref() {
            None | Some("now") => Flush::Now,
            Some("later") if matches!(op, Op::Set | Op::ArchiveAppend) => Flush::Later,
            Some("later") => return Err(bad("flush='later' is for set and archive-append only")),
            Some(_) => return Err(bad("flush must be 'now' or 'later'")),
        };
        Ok(Request {
            op,
            owner,
            ns,
            id: stanza.attr("id").unwrap_or_default(),
            from: stanza.attr("from").unwrap_or_default(),
            max_items,
            max_age,
            flush,
            content: stanza.bytes().slice_ref(stanza.inner()),
        })
    }

    /// Whether what it writes must be on disk before it is answered: every write but
    /// one with `flush='later'`; reads write nothing.
    pub fn durable_before_answer(&self) -> bool {
        self.flush == Flush::Now && !matches!(self.op, Op::Get | Op::List | Op::ArchiveQuery)
    }

    /// The request as sent on the wire.
    pub fn to_xml(&self) -> String {
        String::from_utf8_lossy(&self.to_bytes()).into_owned()
    }

    /// The request as sent on the wire, its content copied once.
    pub fn to_bytes(&self) -> Bytes {
        let mut numbers = (itoa::Buffer::new(), itoa::Buffer::new());
        let max_items = self.max_items.map(|n| numbers.0.format(n));
        let max_age = self.max_age.map(|n| numbers.1.format(n));
        let mut extra: [&str; 7] = [""; 7];
        if let Some(n) = max_items {
            extra[..3].copy_from_slice(&[" max-items='", n, "'"]);
        }
        if let Some(n) = max_age {
            extra[3..6].copy_from_slice(&[" max-age='", n, "'"]);
        }
        if self.flush == Flush::Later {
            extra[6] = " flush='later'";
        }
        self.element(
            self.op.name(),
            (&self.owner, &self.from),
            &extra,
            &self.content,
        )
    }

    /// The successful answer, carrying `content` (may be empty).
    pub fn result(&self, content: &[u8]) -> Bytes {
        self.element("result", (&self.from, &self.owner), &[], content)
    }

    /// `<xdb type='KIND' to= from= ns= id= EXTRA>CONTENT</xdb>`, written in pieces, not
    /// with `format!`: every request and answer is (the formatting was a tenth of
    /// xdb-file's instructions per login, and as much of sm's storage requests).
    fn element(
        &self,
        kind: &str,
        (to, from): (&str, &str),
        extra: &[&str],
        content: &[u8],
    ) -> Bytes {
        let (to, from, ns, id) = (escape(to), escape(from), escape(&self.ns), escape(&self.id));
        // Empty pieces cost nothing; an array, not a `Vec`: no allocation.
        let mut head = [""; 20];
        head[..13].copy_from_slice(&[
            "<xdb xmlns='",
            NS_XDB,
            "' type='",
            kind,
            "' to='",
            &to,
            "' from='",
            &from,
            "' ns='",
            &ns,
            "' id='",
            &id,
            "'",
        ]);
        head[13..13 + extra.len()].copy_from_slice(extra);
        jrs_stream::xml::element_from_parts(&head, "xdb", content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let req = Request {
            op: Op::Append,
            owner: "alice@localhost".into(),
            ns: "msgoffline".into(),
            id: "9".into(),
            from: "sm-1".into(),
            max_items: Some(100),
            max_age: None,
            flush: Flush::Now,
            content: Bytes::from_static(b"<message to='alice@localhost'/>"),
        };
        let parsed = Request::parse(&Stanza::parse(Bytes::from(req.to_xml())).unwrap()).unwrap();
        assert_eq!(parsed, req);
        let later = Request {
            op: Op::Set,
            flush: Flush::Later,
            max_items: None,
            ..req.clone()
        };
        assert!(later.to_xml().contains(" flush='later'"));
        // Every attribute, escaped, and back.
        let all = Request {
            op: Op::ArchiveAppend,
            owner: "o'neil@localhost".into(),
            ns: "a&b".into(),
            id: "<1>".into(),
            max_items: Some(7),
            max_age: Some(86_400),
            ..later.clone()
        };
        let parsed = Request::parse(&Stanza::parse(all.to_bytes()).unwrap()).unwrap();
        assert_eq!(parsed, all);
        let answer = Stanza::parse(all.result(b"<x/>")).unwrap();
        assert_eq!(
            (answer.kind(), answer.to(), answer.from()),
            (Some("result"), Some("sm-1"), Some("o&apos;neil@localhost"))
        );
        assert_eq!(answer.attr("id").as_deref(), Some("<1>"));
        assert_eq!(answer.inner(), b"<x/>");
        assert!(req.durable_before_answer() && !later.durable_before_answer());
        let get = Request {
            op: Op::Get,
            ..req.clone()
        };
        assert!(!get.durable_before_answer());
        let parsed = Request::parse(&Stanza::parse(Bytes::from(later.to_xml())).unwrap()).unwrap();
        assert_eq!(parsed, later);
        let result = Stanza::parse(req.result(b"<x/>")).unwrap();
        assert_eq!(result.kind(), Some("result"));
        assert_eq!(result.to(), Some("sm-1"));
        assert_eq!(result.inner(), b"<x/>");
    }

    #[test]
    fn contents_round_trip() {
        let c = Contents {
            namespaces: vec!["a'b".into(), "jabber:iq:roster".into()],
            archives: vec!["urn:xmpp:mam:2".into()],
        };
        let xml = c.to_xml();
        assert_eq!(
            &xml[..],
            b"<ns name='a&apos;b'/><ns name='jabber:iq:roster'/><archive ns='urn:xmpp:mam:2'/>"
        );
        assert_eq!(Contents::parse(&xml).unwrap(), c);
        // Merged answers of several stores: any order, duplicates, other elements.
        let merged = b"<archive ns='urn:xmpp:mam:2'/><ns name='jabber:iq:roster'/><owner jid='x@y'/><ns name='a&apos;b'/><ns name='jabber:iq:roster'/>";
        assert_eq!(Contents::parse(merged).unwrap(), c);
        assert!(Contents::parse(b"").unwrap().is_empty());
    }

    #[test]
    fn refuses_incomplete_requests() {
        let s = Stanza::parse(Bytes::from_static(
            b"<xdb type='get' to='a@b' from='sm' id='1'/>",
        ))
        .unwrap();
        assert_eq!(
            Request::parse(&s).unwrap_err().condition,
            StanzaErrorCondition::BadRequest
        );
        let s = Stanza::parse(Bytes::from_static(
            b"<xdb type='frob' to='a@b' ns='x' id='1'/>",
        ))
        .unwrap();
        assert!(Request::parse(&s).is_err());
        // A deferred flush is for `set` and `archive-append` only, and has two spellings.
        for bad in [
            &b"<xdb type='append' to='a@b' ns='x' id='1' flush='later'/>"[..],
            b"<xdb type='set' to='a@b' ns='x' id='1' flush='soon'/>",
        ] {
            let s = Stanza::parse(Bytes::from_static(bad)).unwrap();
            assert_eq!(
                Request::parse(&s).unwrap_err().condition,
                StanzaErrorCondition::BadRequest
            );
        }
    }
}
