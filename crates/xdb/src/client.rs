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

use crate::{Op, Refusal, Request};

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

pub struct XdbClient {
    /// Our component name: the `from` of requests, where answers come back.
    me: String,
    outbox: Mutex<Option<Outbox>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    timeout: Duration,
}

impl XdbClient {
    pub fn new(me: impl Into<String>, timeout: Duration) -> XdbClient {
        XdbClient {
            me: me.into(),
            outbox: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
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

    pub async fn request(
        &self,
        op: Op,
        owner: &str,
        ns: &str,
        content: Bytes,
        max_items: Option<usize>,
    ) -> Result<Bytes, XdbError> {
        let tries = if op == Op::Append { 1 } else { 2 };
        for _ in 0..tries {
            let id = format!("x{}", self.next_id.fetch_add(1, Ordering::Relaxed));
            let request = Request {
                op,
                owner: owner.to_owned(),
                ns: ns.to_owned(),
                id: id.clone(),
                from: self.me.clone(),
                max_items,
                content: content.clone(),
            };
            let (tx, rx) = oneshot::channel();
            self.pending
                .lock()
                .expect("xdb lock")
                .insert(id.clone(), tx);
            let sent = match &*self.outbox.lock().expect("xdb lock") {
                Some(outbox) => outbox.send(request.to_xml()),
                None => false,
            };
            if !sent {
                self.pending.lock().expect("xdb lock").remove(&id);
                return Err(XdbError::LinkDown);
            }
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(answer)) => return answer.map_err(XdbError::Refused),
                Ok(Err(_)) => return Err(XdbError::LinkDown),
                Err(_) => {
                    self.pending.lock().expect("xdb lock").remove(&id);
                }
            }
        }
        Err(XdbError::Timeout)
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
