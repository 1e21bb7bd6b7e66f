//! IQ requests sm itself sends from a served domain (a client's capabilities, say),
//! and the wait for their answers: the answer comes back to the domain, where
//! `host::server` hands it here by its id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use jrs_stream::xml::escape;
use jrs_stream::Stanza;

use crate::host::kernel::Ctx;

#[derive(Default)]
pub struct Requests {
    next: AtomicU64,
    waiting: Mutex<HashMap<String, oneshot::Sender<Stanza>>>,
}

impl Requests {
    /// Sends `<iq type=kind from=from to=to>payload</iq>` and waits up to `wait` for the
    /// answer (a result or an error stanza); `None` if none came in time.
    pub async fn ask(
        ctx: &Arc<Ctx>,
        kind: &str,
        from: &str,
        to: &str,
        payload: &str,
        wait: Duration,
    ) -> Option<Stanza> {
        let me = &ctx.requests;
        let id = format!("sm-q{}", me.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        me.waiting.lock().expect("requests lock").insert(id.clone(), tx);
        ctx.send(format!(
            "<iq type='{kind}' id='{id}' from='{}' to='{}'>{payload}</iq>",
            escape(from),
            escape(to)
        ));
        let answer = tokio::time::timeout(wait, rx).await;
        me.waiting.lock().expect("requests lock").remove(&id);
        answer.ok()?.ok()
    }

    /// Hands an IQ answer to the request waiting for it. False if none is.
    pub fn answered(&self, stanza: &Stanza) -> bool {
        let Some(id) = stanza.attr("id") else {
            return false;
        };
        let waiter = self.waiting.lock().expect("requests lock").remove(&id);
        match waiter {
            Some(tx) => {
                let _ = tx.send(stanza.clone());
                true
            }
            None => false,
        }
    }
}
