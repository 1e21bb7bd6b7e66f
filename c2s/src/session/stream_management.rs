//! XEP-0198 Stream Management on one session, without I/O: the counts both ways (they
//! wrap at 2^32), the queue of stanzas the client has not acknowledged, and when to ask
//! it for an acknowledgement. The relay (`session/mod.rs`) writes what this decides.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use crate::protocol::Item;

/// When the server asks the client for an acknowledgement.
#[derive(Debug, Clone, Copy)]
pub struct AckPolicy {
    /// After this many stanzas sent since the last request.
    pub every: u32,
    /// Or when the oldest unacknowledged stanza is this old.
    pub after: Duration,
}

/// How long the answer to a client's `<r/>` may wait for a stanza to ride with. Under
/// load a stanza for the client comes sooner, and the `<a/>` then costs no write of
/// its own; when idle the client waits this long for it.
pub const ANSWER_DELAY: Duration = Duration::from_millis(5);

/// The client acknowledged more than was sent (XEP-0198 `handled-count-too-high`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooHigh {
    pub h: u32,
    pub sent: u32,
}

pub struct StreamManagement {
    /// The resumption token (`<enabled id>`), when resumption was asked for and allowed.
    pub token: Option<String>,
    /// Stanzas received from the client: the `h` we report.
    received: u32,
    /// The client's last `h`: stanzas of ours it has acknowledged.
    acked: u32,
    /// Sent and not acknowledged, oldest first: the first is number `acked + 1`.
    unacked: VecDeque<(Item, Instant)>,
    /// Stanzas sent since our last `<r/>`.
    since_request: u32,
    /// Our `<r/>` is unanswered.
    requested: bool,
    /// The client's `<r/>` is unanswered since then.
    asked_since: Option<Instant>,
    policy: AckPolicy,
}

impl StreamManagement {
    pub fn new(token: Option<String>, policy: AckPolicy) -> StreamManagement {
        StreamManagement {
            token,
            received: 0,
            acked: 0,
            unacked: VecDeque::new(),
            since_request: 0,
            requested: false,
            asked_since: None,
            policy,
        }
    }

    /// A resumed session: the counts it had, and what the client did not acknowledge
    /// before (`items`, the first numbered `acked + 1`, of which the first `sent` were
    /// sent). `h` is what the client says it received. Returns the items to send again
    /// (the unacknowledged rest) and how many of the acknowledged ones came from
    /// offline storage.
    pub fn resume(
        token: String,
        policy: AckPolicy,
        received: u32,
        acked: u32,
        sent: u32,
        items: Vec<Item>,
        h: u32,
    ) -> (StreamManagement, Vec<Item>, usize) {
        let mut items: VecDeque<Item> = items.into();
        // Acknowledged meanwhile: the client's h counts past `acked`. Only the first
        // `sent` items ever went out; a count beyond them is taken as "all of those"
        // (the client cannot have more, and what it never got must not be dropped).
        let done = (h.wrapping_sub(acked) as usize)
            .min(sent as usize)
            .min(items.len());
        let offline = items.drain(..done).filter(|i| i.offline).count();
        let sm = StreamManagement {
            token: Some(token),
            received,
            acked: acked.wrapping_add(done as u32),
            unacked: VecDeque::new(),
            since_request: 0,
            requested: false,
            asked_since: None,
            policy,
        };
        (sm, items.into(), offline)
    }

    /// The client's `<r/>`: the answer goes out with the next write, or when due.
    pub fn asked(&mut self, now: Instant) {
        self.asked_since.get_or_insert(now);
    }

    /// When an unanswered `<r/>` must be answered by itself.
    pub fn answer_due(&self) -> Option<Instant> {
        self.asked_since.map(|at| at + ANSWER_DELAY)
    }

    /// The `h` to write now, when the client asked for it (then it is answered).
    pub fn take_answer(&mut self) -> Option<u32> {
        self.asked_since.take().map(|_| self.received)
    }

    /// A stanza from the client was handled.
    pub fn received(&mut self) {
        self.received = self.received.wrapping_add(1);
    }

    /// The `h` to report: stanzas handled from the client.
    pub fn h(&self) -> u32 {
        self.received
    }

    /// The client's last acknowledged count.
    pub fn acked(&self) -> u32 {
        self.acked
    }

    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// A stanza was written to the client. True when an `<r/>` should follow.
    pub fn sent(&mut self, item: Item, now: Instant) -> bool {
        self.unacked.push_back((item, now));
        self.since_request = self.since_request.saturating_add(1);
        self.should_request(now)
    }

    /// Whether to ask for an acknowledgement now: enough stanzas since the last ask, or
    /// the oldest waiting too long; never two asks outstanding.
    pub fn should_request(&self, now: Instant) -> bool {
        if self.requested || self.unacked.is_empty() {
            return false;
        }
        self.since_request >= self.policy.every
            || self
                .unacked
                .front()
                .is_some_and(|(_, at)| now.duration_since(*at) >= self.policy.after)
    }

    /// When [`should_request`](Self::should_request) turns true without more stanzas.
    pub fn request_due(&self) -> Option<Instant> {
        if self.requested {
            return None;
        }
        self.unacked.front().map(|(_, at)| *at + self.policy.after)
    }

    /// Our `<r/>` was written.
    pub fn requested(&mut self) {
        self.requested = true;
        self.since_request = 0;
    }

    /// The client's `<a h/>`: drops what it acknowledged. Returns how many of those
    /// came from offline storage.
    pub fn ack(&mut self, h: u32) -> Result<usize, TooHigh> {
        let newly = h.wrapping_sub(self.acked);
        if newly as usize > self.unacked.len() {
            return Err(TooHigh {
                h,
                sent: self.acked.wrapping_add(self.unacked.len() as u32),
            });
        }
        self.requested = false;
        self.acked = h;
        let offline = self
            .unacked
            .drain(..newly as usize)
            .filter(|(i, _)| i.offline)
            .count();
        Ok(offline)
    }

    /// What the client has not acknowledged, oldest first (for hibernation or for
    /// returning to sm when the session ends).
    pub fn take_unacked(&mut self) -> Vec<Item> {
        self.unacked.drain(..).map(|(i, _)| i).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn policy() -> AckPolicy {
        AckPolicy {
            every: 3,
            after: Duration::from_secs(30),
        }
    }

    fn item(n: u32) -> Item {
        Item::new(Bytes::from(format!("<message id='{n}'/>")))
    }

    #[test]
    fn an_answer_waits_for_the_next_write_and_counts_until_then() {
        let now = Instant::now();
        let mut sm = StreamManagement::new(None, policy());
        assert_eq!(sm.answer_due(), None);
        assert_eq!(sm.take_answer(), None, "nothing asked, nothing owed");
        sm.received();
        sm.asked(now);
        sm.asked(now + Duration::from_millis(3));
        assert_eq!(
            sm.answer_due(),
            Some(now + ANSWER_DELAY),
            "due from the first ask"
        );
        sm.received();
        assert_eq!(sm.take_answer(), Some(2), "the count when written");
        assert_eq!(sm.take_answer(), None, "answered once");
        assert_eq!(sm.answer_due(), None);
    }

    #[test]
    fn counts_and_acks() {
        let now = Instant::now();
        let mut sm = StreamManagement::new(None, policy());
        sm.received();
        sm.received();
        assert_eq!(sm.h(), 2);
        assert!(!sm.sent(item(1), now));
        assert!(!sm.sent(item(2), now));
        assert!(sm.sent(item(3), now), "an ask after `every` stanzas");
        sm.requested();
        assert!(!sm.sent(item(4), now), "never two asks outstanding");
        assert_eq!(sm.ack(2), Ok(0));
        assert_eq!(sm.unacked(), 2);
        assert_eq!(sm.ack(5), Err(TooHigh { h: 5, sent: 4 }));
        assert_eq!(sm.ack(4), Ok(0));
        assert_eq!(sm.unacked(), 0);
        assert_eq!(sm.ack(4), Ok(0), "a repeated ack changes nothing");
    }

    #[test]
    fn counts_wrap_at_two_to_the_32() {
        let now = Instant::now();
        let (mut sm, again, _) = StreamManagement::resume(
            "t".into(),
            policy(),
            u32::MAX,
            u32::MAX - 1,
            2,
            vec![item(1), item(2)],
            u32::MAX - 1,
        );
        assert_eq!(again.len(), 2);
        sm.received();
        assert_eq!(sm.h(), 0, "h wraps");
        for i in again {
            sm.sent(i, now);
        }
        sm.sent(item(3), now);
        // Numbers MAX, 0, 1: acknowledging up to 1 takes all three.
        assert_eq!(sm.ack(1), Ok(0));
        assert_eq!(sm.unacked(), 0);
        assert_eq!(sm.acked(), 1);
    }

    #[test]
    fn resume_drops_what_the_client_has() {
        let mut offline = item(1);
        offline.offline = true;
        let (sm, again, confirmed) = StreamManagement::resume(
            "t".into(),
            policy(),
            7,
            10,
            3,
            vec![offline, item(2), item(3)],
            11,
        );
        assert_eq!(confirmed, 1, "the offline message the client had");
        assert_eq!(again, vec![item(2), item(3)]);
        assert_eq!((sm.h(), sm.acked()), (7, 11));
        // An h beyond what was sent counts as everything.
        let (_, again, _) =
            StreamManagement::resume("t".into(), policy(), 0, 10, 1, vec![item(1)], 50);
        assert!(again.is_empty());
    }

    #[test]
    fn a_count_beyond_what_was_sent_keeps_what_was_not() {
        // Three waiting, one of them sent before the connection dropped: a client that
        // claims all three still gets the two it was never sent.
        let (_, again, _) = StreamManagement::resume(
            "t".into(),
            policy(),
            0,
            10,
            1,
            vec![item(1), item(2), item(3)],
            13,
        );
        assert_eq!(again.len(), 2);
        assert_eq!(&again[0].bytes[..], b"<message id='2'/>");
    }

    #[test]
    fn asks_when_the_oldest_waits_too_long() {
        let t0 = Instant::now();
        let mut sm = StreamManagement::new(None, policy());
        assert!(!sm.sent(item(1), t0));
        assert_eq!(sm.request_due(), Some(t0 + Duration::from_secs(30)));
        assert!(sm.should_request(t0 + Duration::from_secs(31)));
        sm.requested();
        assert_eq!(sm.request_due(), None);
    }

    #[test]
    fn offline_messages_are_confirmed_by_acks() {
        let now = Instant::now();
        let mut sm = StreamManagement::new(None, policy());
        let mut o = item(1);
        o.offline = true;
        sm.sent(o.clone(), now);
        sm.sent(o, now);
        sm.sent(item(3), now);
        assert_eq!(sm.ack(1), Ok(1));
        assert_eq!(sm.take_unacked().len(), 2);
    }
}
