//! The outbound queue of one link: routing threads push stanzas, the link's writer task
//! drains them in batches. The queue is bounded in bytes so one component that stops
//! reading cannot make the router grow without limit; past the bound the link is killed
//! and its packets are bounced.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

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

    /// Stops the writer at once and returns every packet not yet written.
    pub fn kill(&self) -> Vec<Bytes> {
        let mut inner = self.inner.lock().expect("outbox lock");
        inner.state = State::Killed;
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

    /// Waits for packets to write and copies the first ones (up to a batch) into `buf`.
    /// They stay queued until [`Outbox::commit`], so a link that dies mid-write still has
    /// them for re-routing. Returns how many were copied; `None` once the queue is drained
    /// and closing, or killed.
    async fn next_batch(&self, buf: &mut Vec<u8>) -> Option<usize> {
        loop {
            {
                let inner = self.inner.lock().expect("outbox lock");
                if inner.state == State::Killed {
                    return None;
                }
                if !inner.lens.is_empty() {
                    let (mut count, mut size) = (0, 0);
                    for &len in &inner.lens {
                        if count > 0 && size + len as usize > BATCH_BYTES {
                            break;
                        }
                        size += len as usize;
                        count += 1;
                    }
                    buf.extend_from_slice(&inner.data[..size]);
                    return Some(count);
                }
                if inner.state == State::Closing {
                    return None;
                }
            }
            self.wake.notified().await;
        }
    }

    /// Drops the first `count` packets: they were written.
    fn commit(&self, count: usize) {
        let mut inner = self.inner.lock().expect("outbox lock");
        if inner.state == State::Killed {
            return;
        }
        let size: usize = inner.lens.drain(..count).map(|l| l as usize).sum();
        bytes::Buf::advance(&mut inner.data, size);
        drop(inner);
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
                if inner.data.len() <= self.max_bytes || inner.state != State::Open {
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

/// Drains `outbox` into `io` until the outbox is closed (everything written) or killed,
/// or a write fails. Sends a single space after `keepalive` of silence. Gives the socket
/// back so the caller can write a final stream error.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    outbox: &Outbox,
    mut io: W,
    keepalive: Duration,
) -> W {
    let mut buf = Vec::with_capacity(BATCH_BYTES);
    loop {
        buf.clear();
        let count = match tokio::time::timeout(keepalive, outbox.next_batch(&mut buf)).await {
            Err(_) => {
                buf.push(b' ');
                0
            }
            Ok(Some(count)) => count,
            Ok(None) => return io,
        };
        let write = async {
            io.write_all(&buf).await?;
            io.flush().await
        };
        tokio::select! {
            r = write => match r {
                Ok(()) => {
                    crate::metrics::M.bytes_out.inc_by(buf.len() as u64);
                    outbox.commit(count)
                }
                Err(_) => return io,
            },
            _ = outbox.wait_killed() => return io,
        }
    }
}
