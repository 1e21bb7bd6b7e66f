//! Whether an account exists: it does when storage holds its credentials record
//! (`urn:jabberd-rs:auth:0`). Answers are cached, bounded and for a limited time, since
//! accounts are created and removed by other processes (c2s registration, jabberctl).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use jrs_auth::NS_AUTH;
use jrs_xdb::XdbError;

use crate::host::store::Store;

pub struct Accounts {
    cache: Mutex<LruCache<String, (bool, Instant)>>,
    ttl: Duration,
}

impl Accounts {
    pub fn new(entries: usize, ttl: Duration) -> Accounts {
        Accounts {
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(entries.max(1)).expect("max(1)"),
            )),
            ttl,
        }
    }

    /// Whether `bare` (a normalised bare JID) has an account.
    pub async fn exists(&self, store: &Store, bare: &str) -> Result<bool, XdbError> {
        if let Some(&(known, at)) = self.cache.lock().expect("accounts lock").get(bare) {
            if at.elapsed() < self.ttl {
                return Ok(known);
            }
        }
        let record = store.get(bare, NS_AUTH).await?;
        let exists = !record.iter().all(u8::is_ascii_whitespace);
        self.remember(bare, exists);
        Ok(exists)
    }

    /// Records what we learnt otherwise (a login proves the account, a removal ends it).
    pub fn remember(&self, bare: &str, exists: bool) {
        self.cache
            .lock()
            .expect("accounts lock")
            .put(bare.to_owned(), (exists, Instant::now()));
    }
}
