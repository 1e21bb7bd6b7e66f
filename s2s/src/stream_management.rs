//! XEP-0198 on our outgoing streams, without resumption: once authenticated we
//! `<enable/>` stream management where the remote offers it, keep every stanza written
//! since until the remote acknowledges it (`<a h/>`, asked for with `<r/>`), and when the
//! stream is lost put what it did not acknowledge back at the front of the queues, for
//! the next stream. A remote server that dies after reading our stanzas and before
//! passing them on then loses nothing: they go again (the remote may see one twice if it
//! died after passing it on and before acknowledging it).
//!
//! Sans I/O: the driver (`outgoing.rs`) writes what [`Acks::take_output`] returns.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use jrs_stream::{Stanza, StreamErrorCondition};
use jrs_sx::features::NS_SM;
use jrs_sx::{stream_error, Close};
use tracing::{debug, info, warn};

/// An unanswered `<r/>` is asked again after this long, and the stream given up after
/// twice this long (a remote that takes stanzas and never acknowledges them).
const ASK_AGAIN: Duration = Duration::from_secs(30);

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum State {
    /// Not offered, or refused.
    #[default]
    Off,
    /// Offered; `<enable/>` goes with the first stanzas.
    Offered,
    /// `<enable/>` sent: counting (the remote counts from it), answer awaited.
    Enabling,
    On,
}

/// A stanza written and not acknowledged: for the queue of local domain `local`.
pub struct Unacked<T> {
    pub local: String,
    pub item: T,
}

/// The acknowledgement state of one outgoing stream; `T` is what the driver keeps of
/// a stanza (it gets it back if the stream is lost).
pub struct Acks<T> {
    state: State,
    unacked: VecDeque<Unacked<T>>,
    /// The remote's last `h`.
    acked: u64,
    /// When our unanswered `<r/>` went.
    asked: Option<Instant>,
    /// The remote asked (`<r/>`): we owe `<a h='0'/>` (we read no stanzas here).
    owe: bool,
    /// The remote acknowledged something on this stream.
    progressed: bool,
}

impl<T> Acks<T> {
    pub fn new(offered: bool) -> Acks<T> {
        Acks {
            state: if offered { State::Offered } else { State::Off },
            unacked: VecDeque::new(),
            acked: 0,
            asked: None,
            owe: false,
            progressed: false,
        }
    }

    /// Whether stanzas written now are kept until acknowledged.
    fn counting(&self) -> bool {
        matches!(self.state, State::Enabling | State::On)
    }

    /// What to write before the stanzas of an authenticated domain: `<enable/>` the first
    /// time.
    pub fn before_stanzas(&mut self) -> Option<String> {
        (self.state == State::Offered).then(|| {
            self.state = State::Enabling;
            debug!("enabling XEP-0198 on the outgoing stream");
            format!("<enable xmlns='{NS_SM}'/>")
        })
    }

    /// A stanza was written.
    pub fn written(&mut self, local: &str, item: T) {
        if self.counting() {
            self.unacked.push_back(Unacked {
                local: local.to_owned(),
                item,
            });
        }
    }

    /// What to write now: our owed `<a/>`, and `<r/>` while something is unacknowledged
    /// and no question is open.
    pub fn take_output(&mut self) -> Option<String> {
        let mut out = String::new();
        if std::mem::take(&mut self.owe) {
            out.push_str(&format!("<a xmlns='{NS_SM}' h='0'/>"));
        }
        let stale = self.asked.is_some_and(|t| t.elapsed() >= ASK_AGAIN);
        if self.counting() && !self.unacked.is_empty() && (self.asked.is_none() || stale) {
            self.asked = Some(Instant::now());
            out.push_str(&format!("<r xmlns='{NS_SM}'/>"));
        }
        (!out.is_empty()).then_some(out)
    }

    /// Whether nothing waits for an acknowledgement (the stream may close for idleness).
    pub fn settled(&self) -> bool {
        self.unacked.is_empty()
    }

    /// Whether the remote acknowledged anything on this stream.
    pub fn progressed(&self) -> bool {
        self.progressed
    }

    /// Whether our question has gone unanswered so long that the stream is useless.
    pub fn stalled(&self) -> bool {
        self.asked.is_some_and(|t| t.elapsed() >= 2 * ASK_AGAIN)
    }

    /// An element in the XEP-0198 namespace from the remote: `Ok(false)` for anything
    /// else (not ours to handle); an error closes the stream.
    pub fn element(&mut self, e: &Stanza) -> Result<bool, Close> {
        if e.xmlns() != Some(NS_SM) {
            return Ok(false);
        }
        match e.name() {
            "enabled" if self.state == State::Enabling => {
                info!("XEP-0198 enabled on the outgoing stream");
                self.state = State::On;
            }
            "failed" if self.state == State::Enabling => {
                info!("the remote refused XEP-0198: stanzas go unacknowledged");
                self.state = State::Off;
                self.unacked.clear();
                self.asked = None;
            }
            "a" => {
                let h = e.attr("h").and_then(|h| h.parse::<u32>().ok());
                self.acknowledged(h)?;
            }
            "r" => self.owe = true,
            other => debug!(name = other, "ignoring a stream management element"),
        }
        Ok(true)
    }

    fn acknowledged(&mut self, h: Option<u32>) -> Result<(), Close> {
        self.asked = None;
        let Some(h) = h else {
            warn!("an <a/> without a valid 'h' ignored");
            return Ok(());
        };
        // Counted modulo 2^32 (XEP-0198 5): how far beyond the last `h` this one is.
        let done = u64::from(h.wrapping_sub(self.acked as u32)) as usize;
        if done > self.unacked.len() {
            // Lower than the last (a stale answer) looks like almost 2^32 more.
            if done > u32::MAX as usize / 2 {
                debug!(h, "an <a/> older than the last ignored");
                return Ok(());
            }
            return Err(stream_error(
                StreamErrorCondition::UndefinedCondition,
                format!(
                    "handled-count-too-high: h='{h}' but only {} stanzas were sent",
                    self.acked + self.unacked.len() as u64
                ),
            ));
        }
        if done > 0 {
            self.progressed = true;
        }
        self.unacked.drain(..done);
        self.acked += done as u64;
        Ok(())
    }

    /// The stream is lost: what it did not acknowledge, in order.
    pub fn lost(self) -> VecDeque<Unacked<T>> {
        if !self.unacked.is_empty() {
            info!(
                stanzas = self.unacked.len(),
                "outgoing stream lost with stanzas not acknowledged: sent again on the next"
            );
        }
        self.unacked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn el(xml: &str) -> Stanza {
        Stanza::parse(Bytes::from(xml.to_owned())).unwrap()
    }

    #[test]
    fn keeps_what_is_not_acknowledged_and_asks_once() {
        let mut a = Acks::new(true);
        a.written("here", 0);
        assert!(a.settled(), "not counted before <enable/>");
        assert_eq!(
            a.before_stanzas().as_deref(),
            Some("<enable xmlns='urn:xmpp:sm:3'/>")
        );
        assert!(a.before_stanzas().is_none(), "once");
        for i in 1..=3 {
            a.written("here", i);
        }
        assert_eq!(
            a.take_output().as_deref(),
            Some("<r xmlns='urn:xmpp:sm:3'/>")
        );
        assert!(a.take_output().is_none(), "one question at a time");
        assert!(a.element(&el("<enabled xmlns='urn:xmpp:sm:3'/>")).unwrap());
        assert!(!a.progressed());
        assert!(a.element(&el("<a xmlns='urn:xmpp:sm:3' h='2'/>")).unwrap());
        assert!(a.progressed());
        assert!(
            a.element(&el("<a xmlns='urn:xmpp:sm:3' h='1'/>")).unwrap(),
            "stale: ignored"
        );
        assert!(!a.settled());
        a.written("there", 4);
        assert_eq!(
            a.take_output().as_deref(),
            Some("<r xmlns='urn:xmpp:sm:3'/>")
        );
        assert!(a.element(&el("<r xmlns='urn:xmpp:sm:3'/>")).unwrap());
        assert_eq!(
            a.take_output().as_deref(),
            Some("<a xmlns='urn:xmpp:sm:3' h='0'/>")
        );
        let lost: Vec<(String, i32)> = a.lost().into_iter().map(|u| (u.local, u.item)).collect();
        assert_eq!(lost, [("here".into(), 3), ("there".into(), 4)]);
    }

    #[test]
    fn refused_or_not_offered_keeps_nothing() {
        let mut a = Acks::new(true);
        a.before_stanzas();
        a.written("here", 1);
        assert!(a.element(&el("<failed xmlns='urn:xmpp:sm:3'/>")).unwrap());
        assert!(a.settled() && a.take_output().is_none());
        let mut off = Acks::new(false);
        assert!(off.before_stanzas().is_none());
        off.written("here", 1);
        assert!(off.settled());
        assert!(!off
            .element(&el("<db:result xmlns:db='jabber:server:dialback'/>"))
            .unwrap());
    }

    #[test]
    fn an_ack_beyond_what_was_sent_ends_the_stream() {
        let mut a = Acks::new(true);
        a.before_stanzas();
        a.written("here", 1);
        assert!(a.element(&el("<a xmlns='urn:xmpp:sm:3' h='5'/>")).is_err());
        // Counted modulo 2^32: past the wrap, h starts again from 0.
        let mut w: Acks<i32> = Acks::new(true);
        w.before_stanzas();
        w.acked = u64::from(u32::MAX);
        w.written("here", 1);
        w.written("here", 2);
        assert!(w.element(&el("<a xmlns='urn:xmpp:sm:3' h='1'/>")).unwrap());
        assert!(w.settled());
    }
}
