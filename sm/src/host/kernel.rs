//! What every part of sm shares: configuration, the router link, storage, the account
//! cache and the registry of user tasks.

use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use tracing::warn;

use jrs_component::Outbox;
use jrs_xdb::XdbClient;

use crate::accounts::Accounts;
use crate::config::SmConfig;
use crate::users::Registry;

pub struct Ctx {
    pub config: SmConfig,
    /// Our component name (`sm`, `sm-2`): the `from` of session packets.
    pub me: String,
    pub xdb: XdbClient,
    pub accounts: Accounts,
    pub users: Registry,
    /// When this process started (server uptime for XEP-0012).
    pub started: Instant,
    link: Mutex<Option<Outbox>>,
}

impl Ctx {
    pub fn new(config: SmConfig, me: String) -> Ctx {
        Ctx {
            xdb: XdbClient::new(me.clone(), config.xdb_timeout),
            accounts: Accounts::new(config.accounts_cache, config.accounts_ttl),
            users: Registry::default(),
            started: Instant::now(),
            link: Mutex::new(None),
            me,
            config,
        }
    }

    /// Uses a new router link (after every connect).
    pub fn set_link(&self, outbox: Outbox) {
        self.xdb.set_outbox(outbox.clone());
        *self.link.lock().expect("link lock") = Some(outbox);
    }

    /// Queues a packet for the router. Lost (and logged) while the link is down.
    pub fn send(&self, bytes: impl Into<Bytes>) {
        let sent = match &*self.link.lock().expect("link lock") {
            Some(outbox) => outbox.send(bytes),
            None => false,
        };
        if !sent {
            warn!("router link down: a packet was dropped");
        }
    }
}
