//! Storage requests that concern every store of a host when namespaces are routed to
//! several stores (docs/protocol.md, "Storage routed by namespace"): `delete` with
//! `ns='*'` (account removal) and `list` (the users with data, or with `ns='*'` what one
//! owner has). The router sends the request to each store and gives the requester one
//! answer once every store answered: the first error, or the result (for `list`, the
//! elements of all of them, each once).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jrs_stream::Stanza;
use tracing::warn;

use crate::tree::ConnId;

/// How long a gathered request waits for its stores (requesters give up before).
const EXPIRY: Duration = Duration::from_secs(120);

#[derive(Default)]
pub struct Gathers {
    /// By (requester, request id), both as written.
    pending: HashMap<(String, String), Gather>,
}

struct Gather {
    /// The links of the stores the request was delivered to, each answering once.
    waiting: Vec<ConnId>,
    /// Copies held for stores in their grace period: answered by whichever link binds
    /// the route then (or bounced by the router).
    held: usize,
    error: Option<Bytes>,
    result: Option<Bytes>,
    /// `list`: every `<owner/>` element, once.
    owners: BTreeSet<String>,
    list: bool,
    started: Instant,
    /// The request, to answer it with an error if the stores never all answer.
    request: Bytes,
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
    /// A request sent to the stores on `links` and held for `held` more. False (and
    /// nothing remembered) when a request with the same requester and id is still
    /// being gathered: the caller refuses it.
    pub fn start<B: AsRef<[u8]>>(
        &mut self,
        request: &Stanza<B>,
        links: Vec<ConnId>,
        held: usize,
    ) -> bool {
        let key = (
            request.from().unwrap_or("").to_owned(),
            request.id().unwrap_or("").to_owned(),
        );
        if self.pending.contains_key(&key) {
            return false;
        }
        self.pending.insert(
            key,
            Gather {
                waiting: links,
                held,
                error: None,
                result: None,
                owners: BTreeSet::new(),
                list: request.kind() == Some("list"),
                started: Instant::now(),
                request: Bytes::copy_from_slice(request.as_slice()),
            },
        );
        true
    }

    /// An `xdb` answer that came on link `from` (`None`: made by the router, a bounce):
    /// `None` if it answers no gathered request (route it as it is); `Some(None)` if it
    /// was taken in (or ignored: a second answer of a store, or one from a link that was
    /// not asked) and others are awaited; `Some(Some(answer))`: the one answer for the
    /// requester, to route instead.
    pub fn answer<B: AsRef<[u8]>>(
        &mut self,
        answer: &Stanza<B>,
        from: Option<ConnId>,
    ) -> Option<Option<Bytes>> {
        if self.pending.is_empty() || !matches!(answer.kind(), Some("result" | "error")) {
            return None;
        }
        let key = (
            answer.to().unwrap_or("").to_owned(),
            answer.id().unwrap_or("").to_owned(),
        );
        let g = self.pending.get_mut(&key)?;
        match from.and_then(|c| g.waiting.iter().position(|w| *w == c)) {
            Some(i) => {
                g.waiting.swap_remove(i);
            }
            None if g.held > 0 => g.held -= 1,
            None => {
                warn!(id = %key.1, "storage answer from a link that was not asked, or a second one: ignored");
                return Some(None);
            }
        }
        let bytes = Bytes::copy_from_slice(answer.as_slice());
        if answer.kind() == Some("error") {
            g.error.get_or_insert(bytes);
        } else {
            if g.list {
                g.owners.extend(listed_elements(answer.inner()));
            }
            g.result.get_or_insert(bytes);
        }
        if !g.waiting.is_empty() || g.held > 0 {
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

    /// Forgets requests whose stores never all answered; returns them, for an error
    /// answer to their requesters.
    pub fn expire(&mut self, now: Instant) -> Vec<Bytes> {
        let expired: Vec<(String, String)> = self
            .pending
            .iter()
            .filter(|(_, g)| now.duration_since(g.started) >= EXPIRY)
            .map(|(k, _)| k.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|k| self.pending.remove(&k))
            .map(|g| g.request)
            .collect()
    }
}

/// The elements of a `list` answer, as written: `<owner .../>` (a domain's owners), or
/// `<ns .../>` and `<archive .../>` (what one owner has, `ns='*'`).
fn listed_elements(content: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(content);
    text.split_inclusive("/>")
        .map(str::trim)
        .filter(|e| {
            ["<owner ", "<ns ", "<archive "]
                .iter()
                .any(|p| e.starts_with(p))
        })
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
        assert!(g.start(&req, vec![1, 2], 0));
        assert!(
            !g.start(&req, vec![1, 2], 0),
            "the same requester and id again"
        );
        let a = stanza("<xdb type='result' to='admin' from='localhost' id='1'><owner jid='a@l'/><owner jid='b@l'/></xdb>");
        assert_eq!(g.answer(&a, Some(1)), Some(None));
        // A second answer of the same store, or one from a link not asked: ignored.
        assert_eq!(g.answer(&a, Some(1)), Some(None));
        assert_eq!(g.answer(&a, Some(9)), Some(None));
        let b = stanza("<xdb type='result' to='admin' from='localhost' id='1'><owner jid='b@l'/><owner jid='c@l'/></xdb>");
        let merged = g.answer(&b, Some(2)).unwrap().unwrap();
        assert_eq!(
            &merged[..],
            b"<xdb type='result' to='admin' from='localhost' id='1'><owner jid='a@l'/><owner jid='b@l'/><owner jid='c@l'/></xdb>"
        );
        // Not gathered (any more): routed as it is.
        assert_eq!(g.answer(&b, Some(2)), None);

        // What one owner has, from two stores.
        let req = stanza("<xdb type='list' ns='*' from='admin' to='a@l' id='2'/>");
        assert!(g.start(&req, vec![1, 2], 0));
        let a = stanza("<xdb type='result' to='admin' from='a@l' id='2'><ns name='x'/><archive ns='urn:xmpp:mam:2'/></xdb>");
        assert_eq!(g.answer(&a, Some(1)), Some(None));
        let b = stanza("<xdb type='result' to='admin' from='a@l' id='2'><ns name='urn:jabberd-rs:auth:0'/></xdb>");
        let merged = g.answer(&b, Some(2)).unwrap().unwrap();
        assert_eq!(
            &merged[..],
            b"<xdb type='result' to='admin' from='a@l' id='2'><archive ns='urn:xmpp:mam:2'/><ns name='urn:jabberd-rs:auth:0'/><ns name='x'/></xdb>"
        );
    }

    #[test]
    fn the_first_error_wins() {
        let mut g = Gathers::default();
        let req = stanza("<xdb type='delete' ns='*' from='sm' to='a@l' id='7'/>");
        assert!(concerns_every_store(&req));
        assert!(!concerns_every_store(&stanza(
            "<xdb type='delete' ns='x' from='sm' to='a@l' id='8'/>"
        )));
        // One store delivered, one held (answered later by a link or by a bounce).
        assert!(g.start(&req, vec![3], 1));
        let err = stanza("<xdb type='error' to='sm' from='a@l' id='7'><error/></xdb>");
        assert_eq!(g.answer(&err, None), Some(None));
        let ok = stanza("<xdb type='result' to='sm' from='a@l' id='7'/>");
        assert_eq!(g.answer(&ok, Some(3)), Some(Some(err.bytes().clone())));
        // Never answered: handed back on expiry.
        assert!(g.start(&req, vec![3], 0));
        assert!(g.expire(Instant::now()).is_empty());
        assert_eq!(g.expire(Instant::now() + EXPIRY).len(), 1);
    }
}
