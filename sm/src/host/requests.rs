//! IQ requests sm itself sends from a served domain (a client's capabilities, say),
//! waiting for their answers: the answer comes back to the domain, where `host::server`
//! (or, from one of the user's own clients, `host::iq_routing`) hands it here by its id.
//! `Ctx::ask` sends a request and waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

use jrs_stream::Stanza;

#[derive(Default)]
pub struct Requests {
    next: AtomicU64,
    waiting: Mutex<HashMap<String, oneshot::Sender<Stanza>>>,
}

impl Requests {
    /// A fresh request id, and where its answer will arrive.
    pub fn register(&self) -> (String, oneshot::Receiver<Stanza>) {
        let id = format!("sm-q{}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("requests lock")
            .insert(id.clone(), tx);
        (id, rx)
    }

    /// Stops waiting for request `id` (it timed out).
    pub fn forget(&self, id: &str) {
        self.waiting.lock().expect("requests lock").remove(id);
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
