//! Asking the storage component from a component: send a request, await its answer.
//!
//! The component's reader loop hands every `<xdb/>` answer to [`XdbClient::answer`];
//! callers await [`XdbClient::request`]. A request unanswered after the timeout is sent
//! again once when it is idempotent (everything but `append`), so a storage restart
//! (requests written to the dead process are lost with it) costs a delay, not an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use jrs_component::Outbox;
use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::{archive, Op, Refusal, Request};

/// Why a storage request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XdbError {
    #[error("storage refused: {}: {}", .0.condition.name(), .0.text)]
    Refused(Refusal),
    #[error("storage did not answer in time")]
    Timeout,
    #[error("the router link is down")]
    LinkDown,
}

type Answer = Result<Bytes, Refusal>;

/// A request sent and not yet answered (see [`XdbClient::finish`]).
#[derive(Debug)]
pub struct Sent {
    request: Request,
    rx: oneshot::Receiver<Answer>,
}

pub struct XdbClient {
    /// Our component name: the `from` of requests, where answers come back.
    me: String,
    outbox: Mutex<Option<Outbox>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    /// Starts every request id: unique to this process run, so that an answer to a
    /// request of an earlier run (delivered late after a crash and restart) never
    /// matches one of ours.
    id_prefix: String,
    timeout: Duration,
}

/// `x` + this process's id and start time (hex) + `-`.
fn run_prefix() -> String {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("x{:x}.{:x}-", std::process::id(), started)
}

impl XdbClient {
    pub fn new(me: impl Into<String>, timeout: Duration) -> XdbClient {
        XdbClient {
            me: me.into(),
            outbox: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            id_prefix: run_prefix(),
            timeout,
        }
    }

    /// Sets the link requests go out on (after every reconnect).
    pub fn set_outbox(&self, outbox: Outbox) {
        *self.outbox.lock().expect("xdb lock") = Some(outbox);
    }

    pub async fn get(&self, owner: &str, ns: &str) -> Result<Bytes, XdbError> {
        self.request(Op::Get, owner, ns, Bytes::new(), None).await
    }

    pub async fn set(
        &self,
        owner: &str,
        ns: &str,
        content: impl Into<Bytes>,
    ) -> Result<(), XdbError> {
        self.request(Op::Set, owner, ns, content.into(), None)
            .await
            .map(drop)
    }

    /// A `set` that storage may put on disk up to a second after answering
    /// ([`crate::Flush::Later`]): only for data whose loss in a crash harms nobody.
    pub async fn set_later(
        &self,
        owner: &str,
        ns: &str,
        content: impl Into<Bytes>,
    ) -> Result<(), XdbError> {
        let mut request = self.make(Op::Set, owner, ns, content.into());
        request.flush = crate::Flush::Later;
        self.finish(self.send(request)?).await.map(drop)
    }

    pub async fn delete(&self, owner: &str, ns: &str) -> Result<(), XdbError> {
        self.request(Op::Delete, owner, ns, Bytes::new(), None)
            .await
            .map(drop)
    }

    pub async fn append(
        &self,
        owner: &str,
        ns: &str,
        items: impl Into<Bytes>,
        max_items: Option<usize>,
    ) -> Result<(), XdbError> {
        self.request(Op::Append, owner, ns, items.into(), max_items)
            .await
            .map(drop)
    }

    pub async fn take(&self, owner: &str, ns: &str) -> Result<Bytes, XdbError> {
        self.request(Op::Take, owner, ns, Bytes::new(), None).await
    }

    /// Sends an `archive-append` now and returns it, to be awaited with
    /// [`XdbClient::finish`] later: the archive writer need not wait before going on,
    /// and requests still reach storage in the order they were made.
    pub fn archive_append(
        &self,
        owner: &str,
        ns: &str,
        items: &[archive::Item],
        retention: archive::Retention,
    ) -> Result<Sent, XdbError> {
        let mut request = self.make(
            Op::ArchiveAppend,
            owner,
            ns,
            archive::items_to_xml(items).into(),
        );
        request.max_items = retention.max_items.map(|n| n as usize);
        request.max_age = retention.max_age;
        self.send(request)
    }

    /// Sends an `archive-append` for a whole domain now (items naming their owners, see
    /// [`archive::BatchWriter`]); its answer lists the owners whose items failed.
    /// `flush`: whether storage answers before the items are on disk.
    pub fn archive_append_batch(
        &self,
        domain: &str,
        ns: &str,
        items: Bytes,
        retention: archive::Retention,
        flush: crate::Flush,
    ) -> Result<Sent, XdbError> {
        let mut request = self.make(Op::ArchiveAppend, domain, ns, items);
        request.max_items = retention.max_items.map(|n| n as usize);
        request.max_age = retention.max_age;
        request.flush = flush;
        self.send(request)
    }

    pub async fn archive_query(
        &self,
        owner: &str,
        ns: &str,
        query: &archive::Query,
    ) -> Result<archive::Page, XdbError> {
        let request = self.make(Op::ArchiveQuery, owner, ns, query.to_xml().into());
        let answer = self.finish(self.send(request)?).await?;
        archive::Page::parse(&answer).map_err(XdbError::Refused)
    }

    pub async fn archive_trim(
        &self,
        owner: &str,
        ns: &str,
        retention: archive::Retention,
    ) -> Result<(), XdbError> {
        let mut request = self.make(Op::ArchiveTrim, owner, ns, Bytes::new());
        request.max_items = retention.max_items.map(|n| n as usize);
        request.max_age = retention.max_age;
        self.finish(self.send(request)?).await.map(drop)
    }

    pub async fn request(
        &self,
        op: Op,
        owner: &str,
        ns: &str,
        content: Bytes,
        max_items: Option<usize>,
    ) -> Result<Bytes, XdbError> {
        let mut request = self.make(op, owner, ns, content);
        request.max_items = max_items;
        self.finish(self.send(request)?).await
    }

    fn make(&self, op: Op, owner: &str, ns: &str, content: Bytes) -> Request {
        Request {
            op,
            owner: owner.to_owned(),
            ns: ns.to_owned(),
            id: String::new(),
            from: self.me.clone(),
            max_items: None,
            max_age: None,
            flush: crate::Flush::Now,
            content,
        }
    }

    /// Sends `request` under a fresh id.
    fn send(&self, mut request: Request) -> Result<Sent, XdbError> {
        request.id = format!(
            "{}{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("xdb lock")
            .insert(request.id.clone(), tx);
        let sent = match &*self.outbox.lock().expect("xdb lock") {
            Some(outbox) => outbox.send(request.to_bytes()),
            None => false,
        };
        if !sent {
            self.pending.lock().expect("xdb lock").remove(&request.id);
            return Err(XdbError::LinkDown);
        }
        Ok(Sent { request, rx })
    }

    /// Waits for the answer to a sent request. Unanswered after the timeout, it is sent
    /// once more when that is harmless: every operation but `append` (archive appends
    /// carry ids, so storage skips items it has already).
    pub async fn finish(&self, mut sent: Sent) -> Result<Bytes, XdbError> {
        let _waited = jrs_component::metrics::storage::wait(sent.request.op.name());
        let mut retry = sent.request.op != Op::Append;
        loop {
            match tokio::time::timeout(self.timeout, &mut sent.rx).await {
                Ok(Ok(answer)) => return answer.map_err(XdbError::Refused),
                Ok(Err(_)) => return Err(XdbError::LinkDown),
                Err(_) => {
                    self.pending
                        .lock()
                        .expect("xdb lock")
                        .remove(&sent.request.id);
                    if !retry {
                        return Err(XdbError::Timeout);
                    }
                    retry = false;
                    sent = self.send(sent.request)?;
                }
            }
        }
    }

    /// Hands an `<xdb/>` answer to the request waiting for it. Returns false if nobody
    /// waits (a late answer after a timeout).
    pub fn answer<B: AsRef<[u8]>>(&self, stanza: &Stanza<B>) -> bool {
        let Some(id) = stanza.id() else { return false };
        let Some(tx) = self.pending.lock().expect("xdb lock").remove(id) else {
            return false;
        };
        let answer = match stanza.kind() {
            Some("result") => Ok(Bytes::copy_from_slice(stanza.inner())),
            _ => {
                let condition = error_condition(stanza.inner())
                    .unwrap_or(StanzaErrorCondition::UndefinedCondition);
                Err(Refusal::new(
                    condition,
                    String::from_utf8_lossy(stanza.inner()).into_owned(),
                ))
            }
        };
        let _ = tx.send(answer);
        true
    }
}

/// The condition inside an `<error/>` child, from the raw content of an error answer.
fn error_condition(inner: &[u8]) -> Option<StanzaErrorCondition> {
    let text = std::str::from_utf8(inner).ok()?;
    let at = text.find("<error")?;
    let after = text[at..]
        .split_once('>')?
        .1
        .trim_start()
        .strip_prefix('<')?;
    let name = after
        .split(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .next()?;
    StanzaErrorCondition::parse(name)
}
