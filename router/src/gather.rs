//! Storage requests that concern every store of a host when namespaces are routed to
//! several stores (docs/protocol.md, "Storage routed by namespace"): `delete` with
//! `ns='*'` (account removal) and `list` (the users with data). The router sends the
//! request to each store and gives the requester one answer once every store answered:
//! the first error, or the result (for `list`, the owners of all of them, each once).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jrs_stream::Stanza;

/// How long a gathered request waits for its stores (requesters give up before).
const EXPIRY: Duration = Duration::from_secs(120);

#[derive(Default)]
pub struct Gathers {
    /// By (requester, request id), both as written.
    pending: HashMap<(String, String), Gather>,
}

struct Gather {
    remaining: usize,
    error: Option<Bytes>,
    result: Option<Bytes>,
    /// `list`: every `<owner/>` element, once.
    owners: BTreeSet<String>,
    list: bool,
    started: Instant,
}

/// Whether an `xdb` packet is a request every store of its host must answer.
pub fn concerns_every_store<B: AsRef<[u8]>>(stanza: &Stanza<B>) -> bool {
    match stanza.kind() {
        Some("list") => true,
        Some("delete") => stanza.attr("ns").as_deref() == Some("*"),
        _ => false,
    }
}

impl Gathers {
    /// A request sent to `stores` stores.
    pub fn start<B: AsRef<[u8]>>(&mut self, request: &Stanza<B>, stores: usize) {
        let key = (
            request.from().unwrap_or("").to_owned(),
            request.id().unwrap_or("").to_owned(),
        );
        self.pending.insert(
            key,
            Gather {
                remaining: stores,
                error: None,
                result: None,
                owners: BTreeSet::new(),
                list: request.kind() == Some("list"),
                started: Instant::now(),
            },
        );
    }

    /// An `xdb` answer: `None` if it answers no gathered request (route it as it is);
    /// `Some(None)` if it was taken in and others are awaited; `Some(Some(answer))`: the
    /// one answer for the requester, to route instead.
    pub fn answer<B: AsRef<[u8]>>(&mut self, answer: &Stanza<B>) -> Option<Option<Bytes>> {
        if !matches!(answer.kind(), Some("result" | "error")) || self.pending.is_empty() {
            return None;
        }
        let key = (
            answer.to().unwrap_or("").to_owned(),
            answer.id().unwrap_or("").to_owned(),
        );
        let g = self.pending.get_mut(&key)?;
        g.remaining = g.remaining.saturating_sub(1);
        let bytes = Bytes::copy_from_slice(answer.as_slice());
        if answer.kind() == Some("error") {
            g.error.get_or_insert(bytes);
        } else {
            if g.list {
                g.owners.extend(owner_elements(answer.inner()));
            }
            g.result.get_or_insert(bytes);
        }
        if g.remaining > 0 {
            return Some(None);
        }
        let g = self.pending.remove(&key)?;
        Some(match (g.error, g.result) {
            (Some(error), _) => Some(error),
            (None, Some(result)) if g.list => {
                let content: String = g.owners.into_iter().collect();
                Some(with_content(&result, content.as_bytes()))
            }
            (None, result) => result,
        })
    }

    /// Forgets requests whose stores never all answered.
    pub fn expire(&mut self, now: Instant) {
        self.pending.retain(|_, g| now.duration_since(g.started) < EXPIRY);
    }
}

/// The `<owner .../>` elements of a `list` answer, as written.
fn owner_elements(content: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(content);
    text.split_inclusive("/>")
        .map(str::trim)
        .filter(|e| e.starts_with("<owner"))
        .map(str::to_owned)
        .collect()
}

/// The element `packet` with `content` instead of its own.
fn with_content(packet: &Bytes, content: &[u8]) -> Bytes {
    let Ok(s) = Stanza::parse(packet.clone()) else {
        return packet.clone();
    };
    let bytes = s.as_slice();
    let head = if s.is_empty_element() {
        // `<xdb ... />` without its `/>`.
        let end = bytes.len() - 2;
        std::str::from_utf8(&bytes[..end]).unwrap_or("").trim_end()
    } else {
        let end = s.inner().as_ptr() as usize - bytes.as_ptr() as usize - 1;
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    };
    jrs_stream::xml::element(head, s.name(), content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(s: &str) -> Stanza {
        Stanza::parse(Bytes::from(s.to_owned())).unwrap()
    }

    #[test]
    fn one_answer_when_every_store_answered() {
        let mut g = Gathers::default();
        let req = stanza("<xdb type='list' from='admin' to='localhost' id='1'/>");
        assert!(concerns_every_store(&req));
        g.start(&req, 2);
        let a = stanza("<xdb type='result' to='admin' from='localhost' id='1'><owner jid='a@l'/><owner jid='b@l'/></xdb>");
        assert_eq!(g.answer(&a), Some(None));
        let b = stanza("<xdb type='result' to='admin' from='localhost' id='1'><owner jid='b@l'/><owner jid='c@l'/></xdb>");
        let merged = g.answer(&b).unwrap().unwrap();
        assert_eq!(
            &merged[..],
            b"<xdb type='result' to='admin' from='localhost' id='1'><owner jid='a@l'/><owner jid='b@l'/><owner jid='c@l'/></xdb>"
        );
        // Not gathered (any more): routed as it is.
        assert_eq!(g.answer(&b), None);
    }

    #[test]
    fn the_first_error_wins() {
        let mut g = Gathers::default();
        let req = stanza("<xdb type='delete' ns='*' from='sm' to='a@l' id='7'/>");
        assert!(concerns_every_store(&req));
        assert!(!concerns_every_store(&stanza("<xdb type='delete' ns='x' from='sm' to='a@l' id='8'/>")));
        g.start(&req, 2);
        let err = stanza("<xdb type='error' to='sm' from='a@l' id='7'><error/></xdb>");
        assert_eq!(g.answer(&err), Some(None));
        let ok = stanza("<xdb type='result' to='sm' from='a@l' id='7'/>");
        assert_eq!(g.answer(&ok), Some(Some(err.bytes().clone())));
    }
}
