//! Logging of refusals when a user's queue is full. One client can cause thousands of
//! them in a second (a roster burst fans out into one event per contact); each is
//! answered `resource-constraint`, but the log gets one line when a burst starts and
//! one with the count when it ends, not a line per stanza.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jid::BareJid;
use tracing::warn;

/// How long a burst is counted before its total is logged.
const BURST: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Overload {
    /// Refusals counted per user in the current burst (after the first, logged one).
    bursts: Arc<Mutex<HashMap<BareJid, u64>>>,
}

impl Overload {
    /// Records one refused `what` (a stanza, a session start) for `user`.
    pub fn refused(&self, user: &BareJid, what: &str) {
        let mut bursts = self.bursts.lock().expect("overload lock");
        if let Some(count) = bursts.get_mut(user) {
            *count += 1;
            return;
        }
        bursts.insert(user.clone(), 0);
        warn!(user = %user, "user queue full: {what} refused (resource-constraint); further refusals are counted for {} s", BURST.as_secs());
        let (bursts, user) = (self.bursts.clone(), user.clone());
        tokio::spawn(async move {
            tokio::time::sleep(BURST).await;
            let more = bursts
                .lock()
                .expect("overload lock")
                .remove(&user)
                .unwrap_or(0);
            if more > 0 {
                warn!(user = %user, refused = more, "user queue full: {more} more stanzas refused in {} s", BURST.as_secs());
            }
        });
    }

    #[cfg(test)]
    pub fn counted(&self, user: &BareJid) -> Option<u64> {
        self.bursts
            .lock()
            .expect("overload lock")
            .get(user)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_counted_then_forgotten() {
        let o = Overload::default();
        let u = BareJid::new("a@b").unwrap();
        for _ in 0..1000 {
            o.refused(&u, "a stanza");
        }
        assert_eq!(o.counted(&u), Some(999));
        tokio::time::sleep(BURST + Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(
            o.counted(&u),
            None,
            "the burst ended: the next refusal is logged again"
        );
    }
}
