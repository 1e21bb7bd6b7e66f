//! State shared by every connection of this s2s process: configuration, TLS, DNS, the
//! dialback secret, the router link and the outgoing connection per remote domain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{info_span, Instrument};

use jrs_component::Outbox;
use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::config::S2sConfig;
use crate::outgoing::{self, Cmd};
use crate::resolve::Resolver;
use crate::tls::Tls;

pub struct Shared {
    pub config: S2sConfig,
    pub tls: Tls,
    pub resolver: Resolver,
    pub secret: String,
    router: Mutex<Option<Outbox>>,
    /// Remote domain -> (generation, the task's command channel).
    outgoing: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Cmd>)>>,
    next: AtomicU64,
}

impl Shared {
    pub fn new(config: S2sConfig, tls: Tls, resolver: Resolver, secret: String) -> Shared {
        Shared {
            config,
            tls,
            resolver,
            secret,
            router: Mutex::new(None),
            outgoing: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    pub fn set_router(&self, outbox: Option<Outbox>) {
        *self.router.lock().expect("router lock") = outbox;
    }

    /// Sends bytes into the router; false while the link is down.
    pub fn to_router(&self, bytes: impl Into<Bytes>) -> bool {
        match &*self.router.lock().expect("router lock") {
            Some(outbox) => outbox.send(bytes),
            None => false,
        }
    }

    /// Bounces a stanza from a local sender back to it (never an error or a result).
    pub fn bounce(&self, stanza: &Stanza, condition: StanzaErrorCondition, text: &str) {
        if let Some(reply) = stanza.error_reply(condition, text) {
            self.to_router(reply);
        }
    }

    /// A number unique in this process (stream ids, generations).
    pub fn unique(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands `cmd` to the outgoing connection for `remote`, starting one if there is none
    /// (or the one there is has just ended).
    pub fn outgoing(self: &Arc<Self>, remote: &str, cmd: Cmd) {
        let mut cmd = cmd;
        for _ in 0..2 {
            let tx = {
                let mut map = self.outgoing.lock().expect("outgoing lock");
                match map.get(remote) {
                    Some((_, tx)) if !tx.is_closed() => tx.clone(),
                    _ => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        let generation = self.unique();
                        map.insert(remote.to_owned(), (generation, tx.clone()));
                        let span = info_span!("out", remote = %remote, id = tracing::field::Empty);
                        tokio::spawn(
                            outgoing::run(self.clone(), remote.to_owned(), generation, rx)
                                .instrument(span),
                        );
                        tx
                    }
                }
            };
            match tx.send(cmd) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => cmd = back,
            }
        }
        cmd.fail(
            self,
            StanzaErrorCondition::InternalServerError,
            "no outgoing connection",
        );
    }

    /// Forgets the outgoing connection `generation` for `remote` (it is ending).
    pub fn forget_outgoing(&self, remote: &str, generation: u64) {
        let mut map = self.outgoing.lock().expect("outgoing lock");
        if map.get(remote).is_some_and(|(g, _)| *g == generation) {
            map.remove(remote);
        }
    }

    /// Asks the authoritative server of `remote` whether `key` is valid for the stream
    /// `id` that `remote` opened to our `local` domain (the `db:verify` round trip).
    pub fn verify(
        self: &Arc<Self>,
        local: &str,
        remote: &str,
        id: &str,
        key: &str,
    ) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        self.outgoing(
            remote,
            Cmd::Verify {
                local: local.to_owned(),
                id: id.to_owned(),
                key: key.to_owned(),
                reply: tx,
            },
        );
        rx
    }
}
