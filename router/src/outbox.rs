//! The outbound queue of one link: routing threads push stanzas, the link's writer task
//! drains them in batches. The queue is bounded in bytes so one component that stops
//! reading cannot make the router grow without limit; past the bound the link is killed
//! and its packets are bounced.
//!
//! On an acknowledged link (docs/protocol.md, "Acknowledged links") written packets stay
//! queued, ahead of the unwritten ones, until the component acknowledges them; the
//! writer also carries the router's own acks for what it read from the component.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jrs_component::ack::Owed;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a push was refused; the packet is handed back for bouncing.
#[derive(Debug)]
pub enum PushError {
    /// The link is closing or gone.
    Closed(Bytes),
    /// The queue is over its bound: the link is stuck and is being killed.
    Overflow(Bytes),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Write what is queued, then close the socket.
    Closing,
    /// Stop writing at once; the queue is taken by the link's cleanup.
    Killed,
}

/// Queued packets, stored back to back (one copy in, no per-packet allocation or
/// reference count), with their lengths so they can be taken apart again when a link dies.
struct Inner {
    data: BytesMut,
    lens: VecDeque<u32>,
    state: State,
    /// Set on an acknowledged link.
    acks: Option<Acks>,
}

/// The acknowledgement state of an acknowledged link.
#[derive(Default)]
struct Acks {
    /// Packets at the front of the queue already written, kept until acknowledged.
    written: usize,
    /// Their bytes at the front of `data`.
    written_bytes: usize,
    /// The highest `h` the component sent (an ack may overtake the commit of what it
    /// covers when the writer runs on another thread).
    acked: u64,
    /// Where each written packet ends in our stream.
    ends: VecDeque<u64>,
    /// What the router owes the component.
    owed: Owed,
}

impl Inner {
    /// Packets at the front of the queue already written (kept until acknowledged),
    /// and their bytes.
    fn written(&self) -> (usize, usize) {
        match &self.acks {
            Some(a) => (a.written, a.written_bytes),
            None => (0, 0),
        }
    }
}

pub struct Outbox {
    inner: Mutex<Inner>,
    /// Wakes the writer when packets arrive or the state changes.
    wake: Notify,
    /// Wakes a writer blocked in a write when the link is killed.
    killed: Notify,
    /// Wakes the link's reader waiting for the queue to drain (back-pressure).
    drained: Notify,
    max_bytes: usize,
}

/// How much the writer copies into one write call.
const BATCH_BYTES: usize = 64 * 1024;

/// The outbox locked for several pushes in a row; wakes the writer once when dropped.
pub struct Pusher<'a> {
    inner: MutexGuard<'a, Inner>,
    outbox: &'a Outbox,
    pushed: bool,
}

impl Pusher<'_> {
    /// Queues a packet. Errors get twice the bound: when a stuck link is cut off, its
    /// whole queue comes back to the senders as bounces at once, and that burst must not
    /// cut off a healthy sender too. A sender that does not read its errors at all is
    /// still cut off, at twice the bound.
    pub fn push(&mut self, packet: &[u8], is_error: bool) -> Result<(), PushError> {
        if self.inner.state != State::Open {
            return Err(PushError::Closed(Bytes::copy_from_slice(packet)));
        }
        let max = if is_error {
            self.outbox.max_bytes.saturating_mul(2)
        } else {
            self.outbox.max_bytes
        };
        if self.inner.data.len() + packet.len() > max {
            return Err(PushError::Overflow(Bytes::copy_from_slice(packet)));
        }
        self.inner.data.extend_from_slice(packet);
        self.inner.lens.push_back(packet.len() as u32);
        self.pushed = true;
        Ok(())
    }
}

impl Drop for Pusher<'_> {
    fn drop(&mut self) {
        if self.pushed {
            self.outbox.wake.notify_one();
        }
    }
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner {
                data: BytesMut::new(),
                lens: VecDeque::new(),
                state: State::Open,
                acks: None,
            }),
            wake: Notify::new(),
            killed: Notify::new(),
            drained: Notify::new(),
            max_bytes,
        }
    }

    /// Locks the outbox for a run of pushes.
    pub fn pusher(&self) -> Pusher<'_> {
        Pusher {
            inner: self.inner.lock().expect("outbox lock"),
            outbox: self,
            pushed: false,
        }
    }

    pub fn push(&self, packet: &[u8]) -> Result<(), PushError> {
        self.pusher().push(packet, false)
    }

    /// From now on written packets are kept until the component acknowledges them.
    pub fn enable_acks(&self) {
        self.inner.lock().expect("outbox lock").acks = Some(Acks::default());
    }

    /// The component acknowledged the first `h` bytes of our stream: drops the packets
    /// they cover.
    pub fn acknowledged(&self, h: u64) {
        let mut inner = self.inner.lock().expect("outbox lock");
        let dropped = drop_acknowledged(&mut inner, h);
        drop(inner);
        if dropped {
            self.drained.notify_waiters();
        }
    }

    /// The link's reader handled the component's stream up to `position` (with a
    /// packet in it: `packet`; acks alone are not acknowledged): the router owes an ack, which rides along with the next write to the component; if none
    /// comes by [`Outbox::ack_deadline`], the reader (waiting for the component anyway)
    /// calls [`Outbox::ack_now`]. No writer is woken just for an ack.
    pub fn handled(&self, position: u64, packet: bool) {
        let mut inner = self.inner.lock().expect("outbox lock");
        let Some(acks) = inner.acks.as_mut() else {
            return;
        };
        let urgent = acks.owed.handled(position, packet);
        drop(inner);
        if urgent {
            self.wake.notify_one();
        }
    }

    /// When the ack owed must go alone, if one is owed and not asked for yet.
    pub fn ack_deadline(&self) -> Option<Instant> {
        let inner = self.inner.lock().expect("outbox lock");
        inner.acks.as_ref().and_then(|a| a.owed.deadline())
    }

    /// The ack owed is due: the writer sends it alone.
    pub fn ack_now(&self) {
        let mut inner = self.inner.lock().expect("outbox lock");
        let forced = inner.acks.as_mut().is_some_and(|a| a.owed.force());
        drop(inner);
        if forced {
            self.wake.notify_one();
        }
    }

    /// Bytes queued and not yet written (for the metrics).
    pub fn queued_bytes(&self) -> usize {
        self.inner.lock().expect("outbox lock").data.len()
    }

    /// Queues the last bytes of the stream (a stream error or close tag): they are
    /// written after everything queued, then the socket is closed.
    pub fn close_with(&self, last: &[u8]) {
        let mut inner = self.inner.lock().expect("outbox lock");
        if inner.state == State::Open {
            inner.data.extend_from_slice(last);
            inner.lens.push_back(last.len() as u32);
            inner.state = State::Closing;
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Stops the writer at once and returns every packet not yet written (on an
    /// acknowledged link: not yet acknowledged).
    pub fn kill(&self) -> Vec<Bytes> {
        let mut inner = self.inner.lock().expect("outbox lock");
        inner.state = State::Killed;
        if let Some(acks) = inner.acks.as_mut() {
            *acks = Acks::default();
        }
        let mut data = std::mem::take(&mut inner.data).freeze();
        let rest = inner
            .lens
            .drain(..)
            .map(|len| data.split_to(len as usize))
            .collect();
        drop(inner);
        self.killed.notify_waiters();
        self.drained.notify_waiters();
        self.wake.notify_one();
        rest
    }

    /// Waits for packets to write and copies the first ones (up to a batch) into `buf`,
    /// then the ack the router owes, if any. The packets stay queued until
    /// [`Outbox::commit`], so a link that dies mid-write still has them for re-routing.
    /// Returns how many packets were copied (0 for an ack alone); `None` once the queue
    /// is drained and closing, or killed.
    async fn next_batch(&self, buf: &mut Vec<u8>) -> Option<usize> {
        loop {
            {
                let mut inner = self.inner.lock().expect("outbox lock");
                if inner.state == State::Killed {
                    return None;
                }
                let (skip, skip_bytes) = inner.written();
                if inner.lens.len() > skip {
                    let (mut count, mut size) = (0, 0);
                    for &len in inner.lens.iter().skip(skip) {
                        if count > 0 && size + len as usize > BATCH_BYTES {
                            break;
                        }
                        size += len as usize;
                        count += 1;
                    }
                    buf.extend_from_slice(&inner.data[skip_bytes..skip_bytes + size]);
                    take_ack(&mut inner, buf);
                    return Some(count);
                }
                if inner.state == State::Closing {
                    return None;
                }
                if inner.acks.as_mut().is_some_and(|a| a.owed.take(false, buf)) {
                    return Some(0);
                }
            }
            self.wake.notified().await;
        }
    }

    /// The first `count` unwritten packets were written, starting at stream position
    /// `start`: dropped, or on an acknowledged link kept until acknowledged.
    fn commit(&self, count: usize, start: u64) {
        let mut inner = self.inner.lock().expect("outbox lock");
        if inner.state == State::Killed {
            return;
        }
        let Inner {
            data, lens, acks, ..
        } = &mut *inner;
        match acks.as_mut() {
            None => {
                let size: usize = lens.drain(..count).map(|l| l as usize).sum();
                bytes::Buf::advance(data, size);
            }
            Some(acks) => {
                let mut end = start;
                for &len in lens.iter().skip(acks.written).take(count) {
                    end += u64::from(len);
                    acks.ends.push_back(end);
                    acks.written_bytes += len as usize;
                }
                acks.written += count;
                let h = acks.acked;
                drop_acknowledged(&mut inner, h);
            }
        }
        drop(inner);
        // Written packets leave the bound's count (see `wait_drained`).
        self.drained.notify_waiters();
    }

    /// Back-pressure: waits while more than the bound is queued for this link. The link's
    /// reader calls it before reading more, so a component that sends faster than it
    /// reads its own replies (bounces, results) is slowed down instead of cut off.
    pub async fn wait_drained(&self) {
        loop {
            let drained = self.drained.notified();
            {
                let inner = self.inner.lock().expect("outbox lock");
                // Only what is not written yet: written packets waiting for an ack leave
                // when the component's ack is read, by the very reader waiting here.
                let unwritten = inner.data.len() - inner.written().1;
                if unwritten <= self.max_bytes || inner.state != State::Open {
                    return;
                }
            }
            drained.await;
        }
    }

    async fn wait_killed(&self) {
        loop {
            let notified = self.killed.notified();
            if self.inner.lock().expect("outbox lock").state == State::Killed {
                return;
            }
            notified.await;
        }
    }
}

/// Drops the written packets the component acknowledged (it handled the first `h` bytes
/// of our stream); true if any went.
fn drop_acknowledged(inner: &mut Inner, h: u64) -> bool {
    let Inner {
        data, lens, acks, ..
    } = inner;
    let Some(acks) = acks.as_mut() else {
        return false;
    };
    acks.acked = acks.acked.max(h);
    let mut size = 0;
    while acks.ends.front().is_some_and(|&end| end <= h) {
        acks.ends.pop_front();
        size += lens.pop_front().expect("a written packet") as usize;
        acks.written -= 1;
    }
    acks.written_bytes -= size;
    bytes::Buf::advance(data, size);
    size > 0
}

/// Appends the ack the router owes, if any, to a batch about to be written.
fn take_ack(inner: &mut Inner, buf: &mut Vec<u8>) {
    if let Some(a) = inner.acks.as_mut() {
        a.owed.take(true, buf);
    }
}

/// Drains `outbox` into `io` until the outbox is closed (everything written) or killed,
/// or a write fails. Sends a single space after `keepalive` of silence. Gives the socket
/// back so the caller can write a final stream error.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    outbox: &Outbox,
    mut io: W,
    keepalive: Duration,
) -> W {
    let mut buf = Vec::with_capacity(BATCH_BYTES);
    // Bytes of our stream written so far: where the packets of the next batch start.
    let mut position = 0u64;
    // One timer for the link's life, pushed back after every write: a `timeout` per
    // batch put an entry into the timer wheel and took it out again for every lone
    // packet, while moving a pending deadline later is a single store.
    let mut silence = Box::pin(tokio::time::sleep(keepalive));
    loop {
        buf.clear();
        silence
            .as_mut()
            .reset(tokio::time::Instant::now() + keepalive);
        let count = tokio::select! {
            biased;
            batch = outbox.next_batch(&mut buf) => match batch {
                Some(count) => count,
                None => return io,
            },
            _ = silence.as_mut() => {
                buf.push(b' ');
                0
            }
        };
        let write = async {
            io.write_all(&buf).await?;
            io.flush().await
        };
        // The write first: the kill is looked at only while a write waits (no random
        // draw, no waiter registered, for a write that goes at once).
        tokio::select! {
            biased;
            r = write => match r {
                Ok(()) => {
                    crate::metrics::M.bytes_out.inc_by(buf.len() as u64);
                    outbox.commit(count, position);
                    position += buf.len() as u64;
                }
                Err(_) => return io,
            },
            _ = outbox.wait_killed() => return io,
        }
    }
}
