//! Acknowledged links (docs/protocol.md, "Acknowledged links"): what the router and the
//! project's components both need to count and acknowledge what crosses a link, in the
//! manner of XEP-0198 but counted in bytes of the stream, so that a sender never has to
//! know where one element of a write ends and the next begins.
//!
//! - The component asks for it in its `<handshake acks='1'>`; the router agrees with
//!   `<handshake acks='1'/>`. A plain XEP-0114 component never sees any of it.
//! - Each side acknowledges `<a xmlns='urn:jabberd-rs:router:0' h='N'/>`: it has handled
//!   the first N bytes of the other side's stream (counted from the stream's first byte).
//!   Acks ride along with the next write, or go alone after [`ACK_DELAY`] or once
//!   [`ACK_BYTES`] are owed.
//! - The sender keeps each packet until an ack covers its last byte; when the link drops,
//!   what was not acknowledged is delivered again (the router holds it for the route, the
//!   component sends it first on its next link).
//! - A component that reconnects names its last link (`previd`, the router's stream id)
//!   and how much of it it handled (`h`); the router answers how much it handled of that
//!   link (`h` on its `<handshake/>`), so neither re-sends what the other already has.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long an ack may wait for a write to ride along with.
pub const ACK_DELAY: Duration = Duration::from_millis(10);

/// Owed past this many bytes, an ack is sent at once.
pub const ACK_BYTES: u64 = 64 * 1024;

/// On a busy link an ack rides along at most this often, unless this many bytes are owed:
/// one ack for many packets instead of one per packet (each costs both ends thousands of
/// instructions, docs/benchmarks.md "The cost of acknowledged links"). A lone packet's
/// ack still rides the very next write: the last one went long ago.
const RIDE_GAP: Duration = Duration::from_millis(2);
const RIDE_BYTES: u64 = 4096;

/// Set to `off` (in the environment of the project's components) to connect without
/// acknowledgements, as a plain XEP-0114 component does: for comparison runs.
pub const ENV_SWITCH: &str = "JABBERD_LINK_ACKS";

/// Whether this process asks for acknowledged links (unless [`ENV_SWITCH`] is `off`).
pub fn wanted() -> bool {
    !matches!(
        std::env::var(ENV_SWITCH).as_deref(),
        Ok("off" | "0" | "false" | "no")
    )
}

/// Appends the ack for `h` bytes handled to `buf`, without allocating: one rides with
/// nearly every write on a busy link, and every byte of it is framed again at the other
/// end (docs/benchmarks.md, "The cost of acknowledged links").
pub fn write_ack(buf: &mut Vec<u8>, h: u64) {
    buf.extend_from_slice(ACK_SHORT.as_bytes());
    buf.extend_from_slice(itoa::Buffer::new().format(h).as_bytes());
    buf.extend_from_slice(ACK_TAIL.as_bytes());
}

/// How acks are written (`<a/>` in the stream's default namespace: receivers look at the
/// name only), and how earlier versions wrote them (still read).
const ACK_SHORT: &str = "<a h='";
const ACK_LONG: &str = "<a xmlns='urn:jabberd-rs:router:0' h='";
const ACK_TAIL: &str = "'/>";

/// The `h` of an ack spelled exactly as [`write_ack`] writes it (or as earlier versions
/// did), read without an XML parser (by hand: acks are most of the frames on a busy link,
/// and the parser costs thousands of instructions per element). Anything else, an ack
/// spelled otherwise included, is `None`: the caller parses it as usual.
pub fn quick_ack(frame: &[u8]) -> Option<u64> {
    let frame = frame.trim_ascii_start();
    let value = frame
        .strip_prefix(ACK_SHORT.as_bytes())
        .or_else(|| frame.strip_prefix(ACK_LONG.as_bytes()))?;
    let digits = value.strip_suffix(ACK_TAIL.as_bytes())?;
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// The `h` attribute of an `<a/>` (or `<handshake/>`) element.
pub fn parse_h(value: Option<&str>) -> Option<u64> {
    value?.parse().ok()
}

/// What a link owes the other side: how far its stream has been handled, how far that
/// was acknowledged, and when the ack must go. Only packets make an ack owed: acks
/// themselves (and whitespace) are counted in `h` but never acknowledged for their own
/// sake, or two idle ends would acknowledge each other's acks forever. The same rules
/// for the router's links and the components' (see the module's text).
#[derive(Debug, Default, Clone)]
pub struct Owed {
    /// Bytes of the peer's stream handled.
    pub handled: u64,
    /// The last `h` sent.
    pub acked: u64,
    /// Since when a packet handled waits for its ack (none: nothing owed).
    since: Option<Instant>,
    /// The link's reader found the ack due: it goes alone.
    forced: bool,
    /// When the last ack went.
    last_sent: Option<Instant>,
}

impl Owed {
    /// Records progress up to `position`, `packet` if it includes a packet; true when
    /// the ack became urgent (the writer must be woken to send it now).
    pub fn handled(&mut self, position: u64, packet: bool) -> bool {
        self.handled = self.handled.max(position);
        if packet && self.since.is_none() && self.handled > self.acked {
            self.since = Some(Instant::now());
        }
        self.is_urgent()
    }

    pub fn is_owed(&self) -> bool {
        self.since.is_some()
    }

    /// Whether so much is owed that the ack should not wait.
    pub fn is_urgent(&self) -> bool {
        self.is_owed() && self.handled - self.acked >= ACK_BYTES
    }

    /// When the ack must go alone if nothing to ride along with comes, unless that was
    /// asked for already.
    pub fn deadline(&self) -> Option<Instant> {
        self.since
            .filter(|_| !self.forced)
            .map(|since| since + ACK_DELAY)
    }

    /// The deadline passed: the ack goes alone. False when none is owed (nothing to do).
    pub fn force(&mut self) -> bool {
        self.forced = self.is_owed();
        self.forced
    }

    /// Whether the ack must be written even with nothing to ride along with.
    pub fn goes_alone(&self) -> bool {
        self.forced || self.is_urgent()
    }

    /// Appends the ack to write now to `buf`: with a batch (`riding`), or alone when it
    /// [goes alone](Owed::goes_alone). It counts as sent. False when none goes.
    pub fn take(&mut self, riding: bool, buf: &mut Vec<u8>) -> bool {
        if !self.is_owed() || !(riding || self.goes_alone()) {
            return false;
        }
        let now = Instant::now();
        let recent = self
            .last_sent
            .is_some_and(|t| now.saturating_duration_since(t) < RIDE_GAP);
        if recent && !self.goes_alone() && self.handled - self.acked < RIDE_BYTES {
            // Rides a later write (or goes alone by the deadline).
            return false;
        }
        self.last_sent = Some(now);
        self.since = None;
        self.forced = false;
        self.acked = self.handled;
        write_ack(buf, self.handled);
        true
    }
}

/// Packets written and not yet acknowledged, with where each ends in the stream.
#[derive(Debug, Default)]
pub struct Unacked {
    packets: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Unacked {
    /// Keeps a packet that ends at stream position `end`.
    pub fn push(&mut self, end: u64, packet: Bytes) {
        self.bytes += packet.len();
        self.packets.push_back((end, packet));
    }

    /// Drops every packet the peer acknowledged (it handled the first `h` bytes); how
    /// many.
    pub fn acknowledge(&mut self, h: u64) -> u64 {
        let mut n = 0;
        while let Some((end, _)) = self.packets.front() {
            if *end > h {
                break;
            }
            let (_, p) = self.packets.pop_front().expect("front exists");
            self.bytes -= p.len();
            n += 1;
        }
        n
    }

    /// Takes every packet, in order.
    pub fn take_all(&mut self) -> Vec<Bytes> {
        self.bytes = 0;
        self.packets.drain(..).map(|(_, p)| p).collect()
    }

    pub fn len(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The component side of acknowledged links, kept across reconnects: what one link did
/// not get acknowledged is sent first on the next.
#[derive(Default)]
pub struct LinkAcks {
    state: Mutex<LinkState>,
    /// Wakes the writer when an ack must go alone (asked for, or urgent).
    owed_changed: Notify,
}

#[derive(Default)]
struct LinkState {
    /// The router's stream id of the current (or last) link.
    link: Option<String>,
    /// The current link is acknowledged (the router agreed).
    active: bool,
    owed: Owed,
    /// Written on the current link, not yet acknowledged.
    unacked: Unacked,
    /// Not written on the last link (queued when it dropped), to send after `unacked`.
    unsent: Vec<Bytes>,
    /// What the next writer sends first.
    resend: Vec<Bytes>,
    /// Packets taken from the outboxes, ever (in order: the writers take them one link
    /// after another), and how many of them the router acknowledged (or were written on
    /// a link without acks). Packet n (from 1) is safe at the router once `retired >= n`.
    taken: u64,
    retired: u64,
    /// Who waits for packets up to a count to be acknowledged ([`Outbox::acknowledged`]).
    waiters: Vec<(u64, AckWaiter)>,
}

/// Told when everything queued before it is acknowledged.
pub type AckWaiter = tokio::sync::oneshot::Sender<()>;

impl LinkState {
    /// See [`LinkAcks::taken`].
    fn take(&mut self, fresh: u64, waiters: &mut Vec<(u64, AckWaiter)>) {
        let base = self.taken;
        self.taken += fresh;
        for (before, w) in waiters.drain(..) {
            self.waiters.push((base + before, w));
        }
    }

    /// `n` more packets are acknowledged: the waiters they complete are told.
    fn retire(&mut self, n: u64) {
        self.retired += n;
        let retired = self.retired;
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].0 <= retired {
                let (_, w) = self.waiters.swap_remove(i);
                let _ = w.send(());
            } else {
                i += 1;
            }
        }
    }
}

impl LinkAcks {
    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().expect("link acks lock")
    }

    /// The attributes of our `<handshake>`: asking for acks, and naming the last link
    /// with how much of it we handled.
    pub fn handshake_attributes(&self) -> String {
        let st = self.state();
        match &st.link {
            Some(id) if st.active => format!(
                " acks='1' previd='{}' h='{}'",
                jrs_stream::xml::escape(id),
                st.owed.handled
            ),
            _ => " acks='1'".to_owned(),
        }
    }

    /// A new link is up (the router's stream id; its `<handshake/>` said `acks='1'` or
    /// not, and how much of our last link it handled). What the last link did not get
    /// acknowledged, less what the router says it handled, is to be sent again first.
    pub fn link_started(&self, stream_id: &str, acknowledged: bool, router_handled: Option<u64>) {
        let mut st = self.state();
        if let Some(h) = router_handled {
            let n = st.unacked.acknowledge(h);
            st.retire(n);
        }
        // What an earlier attempt was to send first and did not (its binds failed), then
        // what the last link did not get acknowledged, then what it never wrote.
        let mut resend = std::mem::take(&mut st.resend);
        resend.extend(st.unacked.take_all());
        resend.append(&mut st.unsent);
        if !resend.is_empty() {
            tracing::info!(
                packets = resend.len(),
                "sending again what the last router link did not acknowledge"
            );
        }
        st.resend = resend;
        st.link = Some(stream_id.to_owned());
        st.active = acknowledged;
        st.owed = Owed::default();
    }

    /// Whether the current link is acknowledged (the router agreed).
    pub fn is_active(&self) -> bool {
        self.state().active
    }

    /// What to send first on the new link.
    pub fn take_resend(&self) -> Vec<Bytes> {
        std::mem::take(&mut self.state().resend)
    }

    /// Packets about to be written starting at stream position `start`, each with where
    /// it ends in the batch: kept until acknowledged. `fresh` of them (and `waiters`) were
    /// just taken from the outbox, as [`LinkAcks::taken`] says (one lock for both).
    pub fn written(
        &self,
        start: u64,
        packets: &mut Vec<(usize, Bytes)>,
        fresh: u64,
        waiters: &mut Vec<(u64, AckWaiter)>,
    ) {
        let mut st = self.state();
        let told = !waiters.is_empty();
        st.take(fresh, waiters);
        if told {
            // Some may be satisfied already (nothing before them unacknowledged).
            st.retire(0);
        }
        if !st.active {
            // Nothing is kept: as safe as it will ever be.
            let n = packets.len() as u64;
            packets.clear();
            st.retire(n);
            return;
        }
        for (end, p) in packets.drain(..) {
            st.unacked.push(start + end as u64, p);
        }
    }

    /// A writer took `fresh` more packets from its outbox, and the waiters among them
    /// (each after the packets taken before it, counted from this call's first): they
    /// are told once those are acknowledged.
    pub fn taken(&self, fresh: u64, waiters: &mut Vec<(u64, AckWaiter)>) {
        let mut st = self.state();
        st.take(fresh, waiters);
        st.retire(0);
    }

    /// Packets still queued when the link dropped.
    pub fn unsent(&self, packet: Bytes) {
        self.state().unsent.push(packet);
    }

    /// The router acknowledged the first `h` bytes of our stream.
    pub fn acknowledged(&self, h: u64) {
        let mut st = self.state();
        let n = st.unacked.acknowledge(h);
        st.retire(n);
    }

    /// Everything of the router's stream up to `position` is handled. The ack rides
    /// along with the next write; the reader, which waits for the router anyway, calls
    /// [`LinkAcks::ack_now`] if none came by the deadline this returns (so a lone
    /// message wakes no writer task just for its ack).
    ///
    /// Returns when the ack owed must go alone, if one is owed and not asked for yet
    /// (one lock for both: the reader asks for every packet).
    pub fn handled(&self, position: u64, packet: bool) -> Option<Instant> {
        let mut st = self.state();
        if !st.active {
            return None;
        }
        let urgent = st.owed.handled(position, packet);
        let deadline = st.owed.deadline();
        drop(st);
        if urgent {
            self.owed_changed.notify_one();
        }
        deadline
    }

    /// The ack owed is due: the writer sends it alone.
    pub fn ack_now(&self) {
        if self.state().owed.force() {
            self.owed_changed.notify_one();
        }
    }

    /// Appends the ack to write now to `buf`: with a batch (`riding`), or alone when it
    /// was asked for or so much is owed that it cannot wait. False when none goes.
    pub fn take_ack(&self, riding: bool, buf: &mut Vec<u8>) -> bool {
        self.state().owed.take(riding, buf)
    }

    /// Waits until an ack should go alone (see [`LinkAcks::ack_now`]).
    pub async fn ack_due(&self) {
        self.owed_changed.notified().await
    }

    /// Bytes kept for acknowledgement or re-sending (for tests and metrics).
    pub fn kept(&self) -> usize {
        let st = self.state();
        st.unacked.bytes()
            + st.unsent.iter().map(Bytes::len).sum::<usize>()
            + st.resend.iter().map(Bytes::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owed_ack_is_sent_once_and_urgent_past_the_bound() {
        let mut o = Owed::default();
        let take = |o: &mut Owed, riding| {
            let mut buf = vec![];
            o.take(riding, &mut buf)
                .then(|| String::from_utf8(buf).unwrap())
        };
        assert!(take(&mut o, true).is_none());
        assert!(!o.handled(40, false));
        assert!(
            take(&mut o, true).is_none(),
            "an ack alone is not acknowledged"
        );
        assert!(!o.handled(100, true));
        assert!(o.is_owed() && o.deadline().is_some());
        assert!(take(&mut o, false).is_none(), "alone only once due");
        assert!(o.force() && o.deadline().is_none() && o.goes_alone());
        assert!(!o.handled(150, true));
        assert_eq!(take(&mut o, false).as_deref(), Some("<a h='150'/>"));
        assert!(take(&mut o, true).is_none() && !o.force());
        assert!(!o.handled(120, true), "positions never go back");
        assert!(take(&mut o, true).is_none(), "nothing new");
        assert!(o.handled(150 + ACK_BYTES, true), "urgent");
        assert!(o.goes_alone());
        assert!(take(&mut o, false).is_some());
    }

    #[test]
    fn acknowledgement_drops_whole_packets_only() {
        let mut u = Unacked::default();
        u.push(10, Bytes::from_static(b"0123456789"));
        u.push(25, Bytes::from_static(b"abcdefghijklmno"));
        u.push(30, Bytes::from_static(b"vwxyz"));
        assert_eq!(u.bytes(), 30);
        u.acknowledge(24);
        assert_eq!(u.len(), 2, "a packet partly handled is kept");
        u.acknowledge(25);
        assert_eq!(u.len(), 1);
        assert_eq!(u.bytes(), 5);
        assert_eq!(u.take_all(), vec![Bytes::from_static(b"vwxyz")]);
        assert!(u.is_empty() && u.bytes() == 0);
    }

    #[test]
    fn a_new_link_sends_first_what_the_last_did_not_get_acknowledged() {
        let acks = LinkAcks::default();
        assert_eq!(acks.handshake_attributes(), " acks='1'");
        acks.link_started("one", true, None);
        let mut batch = vec![
            (10, Bytes::from_static(b"0123456789")),
            (15, Bytes::from_static(b"abcde")),
            (20, Bytes::from_static(b"fghij")),
        ];
        acks.written(100, &mut batch, 0, &mut vec![]);
        acks.handled(42, true);
        acks.unsent(Bytes::from_static(b"queued"));
        assert_eq!(
            acks.handshake_attributes(),
            " acks='1' previd='one' h='42'",
            "names the last link and how much of it was handled"
        );
        // The router says it handled our stream up to 112: the first packet only.
        acks.link_started("two", true, Some(112));
        assert_eq!(
            acks.take_resend(),
            vec![
                Bytes::from_static(b"abcde"),
                Bytes::from_static(b"fghij"),
                Bytes::from_static(b"queued")
            ]
        );
        assert_eq!(acks.kept(), 0);
        assert!(
            !acks.take_ack(true, &mut vec![]),
            "nothing owed on the new link yet"
        );
    }

    #[test]
    fn h_parses_numbers_only() {
        assert_eq!(parse_h(Some("42")), Some(42));
        assert_eq!(parse_h(Some("-1")), None);
        assert_eq!(parse_h(Some("x")), None);
        assert_eq!(parse_h(None), None);
    }

    #[test]
    fn on_a_busy_link_acks_ride_at_most_every_few_milliseconds() {
        let mut o = Owed::default();
        let mut buf = vec![];
        o.handled(100, true);
        assert!(o.take(true, &mut buf), "the first rides at once");
        o.handled(200, true);
        assert!(!o.take(true, &mut buf), "the next waits");
        assert!(o.deadline().is_some(), "but not past the deadline");
        o.handled(200 + RIDE_BYTES, true);
        assert!(o.take(true, &mut buf), "unless many bytes are owed");
        o.handled(300 + RIDE_BYTES, true);
        o.force();
        assert!(o.take(false, &mut buf), "or the reader found it due");
    }

    #[test]
    fn acks_read_quickly_as_written() {
        use crate::protocol::NS_ROUTER;
        for h in [0, 7, 1234567, u64::MAX / 10] {
            let mut buf = vec![];
            write_ack(&mut buf, h);
            let a = String::from_utf8(buf).unwrap();
            assert_eq!(a, format!("<a h='{h}'/>"));
            assert_eq!(quick_ack(a.as_bytes()), Some(h));
            assert_eq!(quick_ack(format!(" \n{a}").as_bytes()), Some(h));
            // As earlier versions wrote them.
            let long = format!("<a xmlns='{NS_ROUTER}' h='{h}'/>");
            assert_eq!(quick_ack(long.as_bytes()), Some(h));
        }
        for other in [
            "<a xmlns=\"urn:jabberd-rs:router:0\" h=\"5\"/>",
            "<a h=''/>",
            "<a h='-1'/>",
            "<a h='5' x='1'/>",
            "<message/>",
        ] {
            assert_eq!(quick_ack(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn waiters_are_told_once_what_came_before_them_is_acknowledged() {
        let acks = LinkAcks::default();
        acks.link_started("l1", true, None);
        let (first, mut first_done) = tokio::sync::oneshot::channel();
        let (second, mut second_done) = tokio::sync::oneshot::channel();
        // Two packets, a waiter, a third packet, a waiter.
        let packet = |s: &str| Bytes::from(s.to_owned());
        acks.written(
            0,
            &mut vec![(10, packet("a")), (20, packet("b")), (30, packet("c"))],
            3,
            &mut vec![(2, first), (3, second)],
        );
        acks.acknowledged(10);
        assert!(first_done.try_recv().is_err());
        acks.acknowledged(20);
        assert!(first_done.try_recv().is_ok());
        assert!(second_done.try_recv().is_err());
        // The link drops: the third packet goes on the next one, and its ack there counts.
        acks.link_started("l2", true, None);
        assert_eq!(acks.take_resend().len(), 1);
        acks.written(100, &mut vec![(10, packet("c"))], 0, &mut vec![]);
        assert!(second_done.try_recv().is_err());
        acks.acknowledged(110);
        assert!(second_done.try_recv().is_ok());
        // Nothing outstanding: told at once.
        let (third, mut third_done) = tokio::sync::oneshot::channel();
        acks.taken(0, &mut vec![(0, third)]);
        assert!(third_done.try_recv().is_ok());
    }
}
