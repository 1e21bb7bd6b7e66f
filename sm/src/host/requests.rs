//! IQ requests sm itself sends from a served domain (a client's capabilities, say),
//! waiting for their answers: the answer comes back to the domain, where `host::server`
//! (or, from one of the user's own clients, `host::iq_routing`) hands it here by its id.
//! `Ctx::ask` sends a request and waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use jid::Jid;
use tokio::sync::oneshot;

use jrs_stream::Stanza;

/// A request waiting: whom it went to (only it may answer), and where the answer goes.
type Waiting = (Option<Jid>, oneshot::Sender<Stanza>);

#[derive(Default)]
pub struct Requests {
    next: AtomicU64,
    /// By id.
    waiting: Mutex<HashMap<String, Waiting>>,
}

impl Requests {
    /// A fresh request id for a request to `to`, and where its answer will arrive.
    pub fn register(&self, to: &str) -> (String, oneshot::Receiver<Stanza>) {
        let id = format!("sm-q{}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("requests lock")
            .insert(id.clone(), (Jid::new(to).ok(), tx));
        (id, rx)
    }

    /// Stops waiting for request `id` (it timed out).
    pub fn forget(&self, id: &str) {
        self.waiting.lock().expect("requests lock").remove(id);
    }

    /// Hands an IQ answer to the request waiting for it, if it comes from whom the
    /// request went to (ids are guessable; a forged answer is not taken). False if no
    /// request takes it.
    pub fn answered(&self, stanza: &Stanza) -> bool {
        let Some(id) = stanza.attr("id") else {
            return false;
        };
        let from = stanza.attr("from").and_then(|f| Jid::new(&f).ok());
        let mut waiting = self.waiting.lock().expect("requests lock");
        match waiting.get(&id) {
            Some((to, _)) if to.is_some() && *to == from => {}
            _ => return false,
        }
        let (_, tx) = waiting.remove(&id).expect("found above");
        let _ = tx.send(stanza.clone());
        true
    }
}
