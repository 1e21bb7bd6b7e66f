//! The outbound queue of one link: routing threads push stanzas, the link's writer task
//! drains them in batches. The queue is bounded in bytes so one component that stops
//! reading cannot make the router grow without limit; past the bound the link is killed
//! and its packets are bounced.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
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

struct Inner {
    queue: VecDeque<Bytes>,
    bytes: usize,
    state: State,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    /// Wakes the writer when packets arrive or the state changes.
    wake: Notify,
    /// Wakes a writer blocked in a write when the link is killed.
    killed: Notify,
    max_bytes: usize,
}

/// How much the writer copies into one write call.
const BATCH_BYTES: usize = 64 * 1024;

impl Outbox {
    pub fn new(max_bytes: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                bytes: 0,
                state: State::Open,
            }),
            wake: Notify::new(),
            killed: Notify::new(),
            max_bytes,
        }
    }

    pub fn push(&self, packet: Bytes) -> Result<(), PushError> {
        self.push_within(packet, self.max_bytes)
    }

    /// Queues an error reply. Errors get twice the bound: when a stuck link is cut off,
    /// its whole queue comes back to the senders as bounces at once, and that burst must
    /// not cut off a healthy sender too. A sender that does not read its errors at all is
    /// still cut off, at twice the bound.
    pub fn push_error(&self, packet: Bytes) -> Result<(), PushError> {
        self.push_within(packet, self.max_bytes.saturating_mul(2))
    }

    fn push_within(&self, packet: Bytes, max_bytes: usize) -> Result<(), PushError> {
        let mut inner = self.inner.lock().expect("outbox lock");
        if inner.state != State::Open {
            return Err(PushError::Closed(packet));
        }
        if inner.bytes + packet.len() > max_bytes {
            return Err(PushError::Overflow(packet));
        }
        inner.bytes += packet.len();
        inner.queue.push_back(packet);
        drop(inner);
        self.wake.notify_one();
        Ok(())
    }

    /// Queues the last bytes of the stream (a stream error or close tag): they are
    /// written after everything queued, then the socket is closed.
    pub fn close_with(&self, last: Bytes) {
        let mut inner = self.inner.lock().expect("outbox lock");
        if inner.state == State::Open {
            inner.bytes += last.len();
            inner.queue.push_back(last);
            inner.state = State::Closing;
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Stops the writer at once and returns every packet not yet handed to it.
    pub fn kill(&self) -> Vec<Bytes> {
        let mut inner = self.inner.lock().expect("outbox lock");
        inner.state = State::Killed;
        inner.bytes = 0;
        let rest = inner.queue.drain(..).collect();
        drop(inner);
        self.killed.notify_waiters();
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
                if !inner.queue.is_empty() {
                    let mut count = 0;
                    for p in &inner.queue {
                        if count > 0 && buf.len() + p.len() > BATCH_BYTES {
                            break;
                        }
                        buf.extend_from_slice(p);
                        count += 1;
                    }
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
        for _ in 0..count {
            if let Some(p) = inner.queue.pop_front() {
                inner.bytes -= p.len();
            }
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
pub async fn run_writer<W: AsyncWrite + Unpin>(outbox: &Outbox, mut io: W, keepalive: Duration) -> W {
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
                Ok(()) => outbox.commit(count),
                Err(_) => return io,
            },
            _ = outbox.wait_killed() => return io,
        }
    }
}
