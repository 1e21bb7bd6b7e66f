//! A Unix stream socket for a router link, registered with the runtime for what it
//! reads only.
//!
//! Why by hand: tokio's `UnixStream` registers every socket for readability and
//! writability, edge-triggered, and Linux signals a Unix stream socket writable each time
//! its peer reads from it (`unix_write_space`), whether or not the writer waits: so every
//! packet that crossed a link woke the process that wrote it a second time, for nothing
//! (TCP signals only a writer that found its buffer full). With one message in flight
//! that doubled the link's context switches and made Unix sockets no cheaper than TCP
//! (docs/benchmarks.md, "Unix sockets without the writer's wake-up"). Here the socket is
//! registered for readability alone; a write goes straight to the socket, and only one
//! that finds the buffer full registers a second descriptor of the socket (made with
//! the link, so that a process out of descriptors cannot lose its link over a full
//! buffer) for writability, until the next write that goes through.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

pub struct UnixLink {
    /// The socket, registered for readability only.
    socket: AsyncFd<UnixStream>,
    /// A duplicate of its descriptor: registered for writability (`blocked`) while a
    /// write waits for room in the socket's buffer, kept aside (`spare`) otherwise.
    blocked: Option<AsyncFd<OwnedFd>>,
    spare: Option<OwnedFd>,
}

impl UnixLink {
    /// Takes a connected socket (tokio's, from `connect` or `accept`). Needs a runtime.
    pub fn new(socket: tokio::net::UnixStream) -> io::Result<UnixLink> {
        let socket = socket.into_std()?;
        socket.set_nonblocking(true)?;
        // SAFETY: the `AsyncFd` owns the `UnixStream`, which owns its descriptor: it
        // stays open, and is the one `as_raw_fd` returns, for the `AsyncFd`'s whole life.
        let spare = socket.as_fd().try_clone_to_owned()?;
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?;
        Ok(UnixLink {
            socket,
            blocked: None,
            spare: Some(spare),
        })
    }

    /// Waits until the socket may take more (the duplicate descriptor registered for
    /// writability until a write goes through).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.blocked.is_none() {
            let dup = self.spare.take().expect("registered or spare");
            // SAFETY: as in `new`: the `AsyncFd` owns the duplicate descriptor.
            match unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) } {
                Ok(fd) => self.blocked = Some(fd),
                Err(e) => {
                    let (dup, cause) = e.into_parts();
                    self.spare = Some(dup);
                    return Poll::Ready(Err(cause));
                }
            }
        }
        let blocked = self.blocked.as_ref().expect("registered above");
        let mut guard = ready!(blocked.poll_write_ready(cx))?;
        // Ready or not, the write is tried again: clear it so that the next
        // `WouldBlock` waits for a new edge.
        guard.clear_ready();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for UnixLink {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.socket.poll_read_ready(cx))?;
            // Straight into the reader's spare capacity, as tokio's own sockets read: a
            // zeroed slice (`ReadBuf::initialize_unfilled`) would cost a memset of all of
            // it, 64 KiB on a router link, per read.
            // SAFETY: the memory is not read through the slice, only handed to read(2) as a
            // pointer and length, and read(2) writes at most that many bytes into it.
            let unfilled = unsafe { buf.unfilled_mut() };
            let len = unfilled.len();
            let fd = self.socket.get_ref().as_raw_fd();
            // SAFETY: `fd` is the socket's open descriptor; the buffer is valid for `len`.
            let read = unsafe { libc::read(fd, unfilled.as_mut_ptr().cast(), len) };
            let result = if read < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(read as usize)
            };
            match result {
                Ok(n) => {
                    if 0 < n && n < len {
                        // Less than asked for: the socket is drained, so the next read
                        // waits for the next edge instead of asking the kernel in vain.
                        guard.clear_ready();
                    }
                    // SAFETY: `read` filled these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for UnixLink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.socket.get_ref().write(data) {
                Ok(n) => {
                    // Room again: no more wake-ups for writability.
                    if let Some(blocked) = self.blocked.take() {
                        self.spare = Some(blocked.into_inner());
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.poll_room(cx))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// More than the socket buffers hold, both ways at once: writes that block wait for
    /// room and go on, reads see every byte in order, and shutdown ends the peer's read.
    #[tokio::test(flavor = "current_thread")]
    async fn carries_everything_through_full_buffers() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut a, mut b) = (UnixLink::new(a).unwrap(), UnixLink::new(b).unwrap());
        let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = vec![];
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = vec![];
        b.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "{} bytes of {}", got.len(), data.len());
        b.write_all(b"done").await.unwrap();
        b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
    }

    /// Small packets back and forth, one at a time (a lone message's pattern): every
    /// read that took less than asked waits for the next edge, and none is missed.
    #[tokio::test(flavor = "current_thread")]
    async fn wakes_for_every_packet_of_a_ping_pong() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut a, mut b) = (UnixLink::new(a).unwrap(), UnixLink::new(b).unwrap());
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = b.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                b.write_all(&buf[..n]).await.unwrap();
            }
        });
        let mut buf = [0u8; 16];
        for i in 0..2000u32 {
            a.write_all(&i.to_be_bytes()).await.unwrap();
            a.read_exact(&mut buf[..4]).await.unwrap();
            assert_eq!(buf[..4], i.to_be_bytes());
        }
        a.shutdown().await.unwrap();
        echo.await.unwrap();
    }
}
