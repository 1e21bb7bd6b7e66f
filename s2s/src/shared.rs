//! State shared by every connection of this s2s process: configuration, TLS, DNS, the
//! dialback secret, the router link and the outgoing connection per remote domain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use jrs_component::Outbox;
use jrs_stream::{Stanza, StanzaErrorCondition};
use tracing::info;

use crate::config::S2sConfig;
use crate::negotiation;
use crate::resolve::Resolver;
use crate::tls::Tls;

/// Bytes asked of a server connection per read.
const READ_SIZE: usize = 16 * 1024;

pub struct Shared {
    pub config: S2sConfig,
    /// Certificates and TLS settings for new streams (replaced on SIGHUP).
    tls: std::sync::RwLock<Arc<Tls>>,
    /// The rules of incoming streams.
    pub incoming: negotiation::incoming::Settings,
    pub resolver: Resolver,
    pub secret: String,
    router: Mutex<Option<Outbox>>,
    /// Stanzas from remote servers that arrived while the router link was down, for
    /// when it is back (see `to_router`).
    held: Mutex<Held>,
    /// Remote domain -> (generation, the task's command channel); see
    /// `outgoing::hand`.
    pub outgoing: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Cmd>)>>,
    next: AtomicU64,
    /// Set on SIGTERM: every stream gets `<system-shutdown/>` and closes.
    shutdown: watch::Sender<bool>,
    /// Streams (both directions) still open.
    streams: Arc<AtomicUsize>,
}

/// Stanzas held for the router link, bounded in bytes.
#[derive(Default)]
struct Held {
    stanzas: std::collections::VecDeque<Bytes>,
    bytes: usize,
}

/// At most this many bytes of stanzas from remote servers wait for the router link.
const HELD_MAX_BYTES: usize = 4 << 20;

/// Counts one open stream for as long as it lives.
pub struct StreamCount(Arc<AtomicUsize>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The TLS settings for a new stream.
    pub fn tls(&self) -> Arc<Tls> {
        self.tls.read().expect("tls lock").clone()
    }

    /// Reads the local domains' certificates again (SIGHUP): new streams, both ways, get
    /// them; open ones keep theirs. Remote certificates are still checked against the
    /// CAs read at start. On an error the old certificates stay.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        let tls = Arc::new(Tls::load(&self.config)?);
        *self.tls.write().expect("tls lock") = tls;
        Ok(())
    }

    pub fn new(config: S2sConfig, tls: Tls, resolver: Resolver, secret: String) -> Shared {
        let tls = Arc::new(tls);
        let verifier = tls.clone();
        Shared {
            incoming: negotiation::incoming::Settings {
                hosts: config.hosts.iter().map(|h| h.name.clone()).collect(),
                require_encryption: config.require_encryption,
                sasl_external: config.sasl_external,
                dialback: config.dialback,
                secret: secret.clone(),
                verify: Box::new(move |certs, domain| verifier.verifies(certs, domain)),
            },
            config,
            tls: std::sync::RwLock::new(tls),
            resolver,
            secret,
            router: Mutex::new(None),
            held: Mutex::new(Held::default()),
            outgoing: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
            streams: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A receiver that sees `true` once the process is stopping.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Whether the process is stopping (SIGTERM).
    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Counts a stream until the returned guard is dropped.
    pub fn stream_opened(&self) -> StreamCount {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamCount(self.streams.clone())
    }

    /// SIGTERM: every stream gets `<system-shutdown/>` and closes (stanzas waiting for an
    /// outgoing stream are bounced); waits at most `limit` for them.
    pub async fn shut_down(&self, limit: Duration) {
        self.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + limit;
        while self.streams.load(Ordering::Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    streams = self.streams.load(Ordering::Relaxed),
                    "stop timeout: streams still open"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!("every stream closed");
    }

    /// What a server connection is allowed; reads wait at most `idle`.
    pub fn connection_settings(&self, idle: Duration) -> jrs_sx::connection::Settings {
        jrs_sx::connection::Settings {
            limits: self.config.limits,
            read_size: READ_SIZE,
            idle,
            rate_bytes: self.config.rate_bytes,
            traffic: Some(&crate::metrics::M.traffic),
        }
    }

    /// The rules of outgoing streams.
    pub fn outgoing_settings(&self) -> negotiation::outgoing::Settings<'_> {
        negotiation::outgoing::Settings {
            require_encryption: self.config.require_encryption,
            sasl_external: self.config.sasl_external,
            dialback: self.config.dialback,
            accept_unverified: self.config.accept_unverified,
            verify: &self.incoming.verify,
        }
    }

    /// The router link is up (`Some`) or down. When it comes back, what was held for
    /// it goes first, in order.
    pub fn set_router(&self, outbox: Option<Outbox>) {
        let mut router = self.router.lock().expect("router lock");
        if let Some(outbox) = &outbox {
            let held = std::mem::take(&mut *self.held.lock().expect("held lock"));
            if !held.stanzas.is_empty() {
                info!(
                    stanzas = held.stanzas.len(),
                    "router link back: passing on what remote servers sent meanwhile"
                );
            }
            for stanza in held.stanzas {
                outbox.send(stanza);
            }
        }
        *router = outbox;
    }

    /// Passes a stanza to the router. While the link is down it is held for its return
    /// (a remote server cannot be answered on the stream it sent on: server streams go
    /// one way); false only when the hold is full, and then the caller must bounce it
    /// through the outgoing stream.
    pub fn to_router(&self, bytes: impl Into<Bytes>) -> bool {
        let bytes = bytes.into();
        let router = self.router.lock().expect("router lock");
        if let Some(outbox) = &*router {
            if outbox.send(bytes.clone()) {
                return true;
            }
        }
        let mut held = self.held.lock().expect("held lock");
        if held.bytes + bytes.len() > HELD_MAX_BYTES {
            return false;
        }
        held.bytes += bytes.len();
        held.stanzas.push_back(bytes);
        true
    }

    /// Resolves once everything passed to the router before the call is acknowledged by
    /// it (docs/protocol.md, "Acknowledged links"): what XEP-0198 lets us tell a remote
    /// server. Waits while the link is down (what is held goes first when it is back)
    /// and asks again on the next link if this one drops.
    pub async fn router_acknowledged(&self) {
        loop {
            let outbox = {
                let router = self.router.lock().expect("router lock");
                let held = !self.held.lock().expect("held lock").stanzas.is_empty();
                router.clone().filter(|_| !held)
            };
            if let Some(outbox) = outbox {
                if outbox.acknowledged().await {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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

    /// Forgets the outgoing connection `generation` for `remote` (it is ending).
    pub fn forget_outgoing(&self, remote: &str, generation: u64) {
        let mut map = self.outgoing.lock().expect("outgoing lock");
        if map.get(remote).is_some_and(|(g, _)| *g == generation) {
            map.remove(remote);
        }
    }
}

/// What the router link and incoming streams ask of an outgoing connection.
pub enum Cmd {
    /// A stanza from `local` to deliver.
    Send {
        local: String,
        stanza: Stanza,
        since: Instant,
    },
    /// A `db:verify` for an incoming stream from this remote to `local`.
    Verify {
        local: String,
        id: String,
        key: String,
        reply: oneshot::Sender<bool>,
    },
}

impl Cmd {
    pub fn local(&self) -> &str {
        match self {
            Cmd::Send { local, .. } | Cmd::Verify { local, .. } => local,
        }
    }

    /// Gives up on this command: bounce the stanza, or answer the verification "invalid".
    pub fn fail(self, shared: &Shared, condition: StanzaErrorCondition, text: &str) {
        match self {
            Cmd::Send { stanza, .. } => shared.bounce(&stanza, condition, text),
            Cmd::Verify { reply, .. } => {
                let _ = reply.send(false);
            }
        }
    }
}
