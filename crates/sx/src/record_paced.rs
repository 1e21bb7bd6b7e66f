//! The TCP stream under a TLS handshake, handed to rustls one record at a time, so that
//! when the handshake ends rustls has read nothing past its last record.
//!
//! Why: after a TLS 1.3 handshake c2s takes the keys out of rustls and runs the records
//! itself ([`crate::tls_records`]); whatever rustls had already read past the client's
//! `Finished` (a client may send its stream header right behind it) would be lost with
//! rustls's buffers. tokio-rustls reads for as long as rustls wants data, so each read
//! here ends at a record's end and the one after it returns `Pending` once (waking
//! itself at once): tokio-rustls then checks whether the handshake is over before it
//! reads on. That leans on how tokio-rustls 0.26 drives a handshake (one `read_tls` per
//! read, the handshake's state checked after a `Pending`); tls_records.rs's tests send
//! data in the same segment as the Finished of a full, a resumed and a retried
//! (HelloRetryRequest) handshake, and fail if that changes. After the handshake, [`RecordPaced::stop_pacing`] makes it a plain pass-
//! through (what it had read is served first) for the connections rustls keeps (TLS 1.2).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TLS record's header: content type, legacy version, length.
pub const RECORD_HEADER: usize = 5;
const READ_SIZE: usize = 4096;

pub struct RecordPaced {
    tcp: TcpStream,
    /// Bytes read from the socket; `buf[pos..]` not passed on yet.
    buf: Vec<u8>,
    pos: usize,
    /// Where the bytes passed on stand, while pacing; `None`: a plain pass-through.
    pacing: Option<Boundaries>,
}

/// Where the bytes passed on stand in the record stream.
#[derive(Default)]
struct Boundaries {
    /// Inside a header (`header_have` of its bytes seen), or inside a record's body
    /// (`body_left` > 0).
    header: [u8; RECORD_HEADER],
    header_have: usize,
    body_left: usize,
    /// A record just ended: the next read returns `Pending` once.
    pause: bool,
}

impl Boundaries {
    /// How many of `bytes` may go out in one read without crossing a record's end;
    /// notes what they were.
    fn pass(&mut self, bytes: &[u8]) -> usize {
        if self.body_left > 0 {
            let n = bytes.len().min(self.body_left);
            self.body_left -= n;
            self.pause = self.body_left == 0;
            return n;
        }
        let n = bytes.len().min(RECORD_HEADER - self.header_have);
        self.header[self.header_have..self.header_have + n].copy_from_slice(&bytes[..n]);
        self.header_have += n;
        if self.header_have == RECORD_HEADER {
            self.header_have = 0;
            self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
            self.pause = self.body_left == 0;
        }
        n
    }
}

impl RecordPaced {
    /// `pacing`: pass records one at a time (for a handshake whose keys will be taken).
    pub fn new(tcp: TcpStream, pacing: bool) -> RecordPaced {
        RecordPaced {
            tcp,
            buf: Vec::new(),
            pos: 0,
            pacing: pacing.then(Boundaries::default),
        }
    }

    /// Passes bytes through as they come from now on.
    pub fn stop_pacing(&mut self) {
        self.pacing = None;
    }

    /// The socket and what was read from it but not passed on (the start of the first
    /// record after the handshake, if the peer sent it already).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        let mut rest = self.buf;
        rest.drain(..self.pos);
        (self.tcp, rest)
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether bytes read from the socket wait to be passed on.
    pub fn has_buffered(&self) -> bool {
        self.pos < self.buf.len()
    }
}

impl AsyncRead for RecordPaced {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.buf.len() {
            if !this.buf.is_empty() {
                this.buf = Vec::new();
                this.pos = 0;
            }
            if this.pacing.is_none() {
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
        }
        if let Some(pacing) = this.pacing.as_mut().filter(|p| p.pause) {
            pacing.pause = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if this.pos == this.buf.len() {
            this.buf.reserve(READ_SIZE);
            let mut read = ReadBuf::uninit(this.buf.spare_capacity_mut());
            std::task::ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
            unsafe { this.buf.set_len(n) };
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let end = this.buf.len().min(this.pos + out.remaining());
        let n = match &mut this.pacing {
            Some(pacing) => pacing.pass(&this.buf[this.pos..end]),
            None => end - this.pos,
        };
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RecordPaced {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Three records (the last empty) and the start of a fourth, sent at once, come out
    /// one record per read, never crossing a record's end.
    #[tokio::test]
    async fn reads_end_at_record_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut bytes = vec![22, 3, 3, 0, 3, 1, 2, 3];
        bytes.extend([23, 3, 3, 0, 2, 4, 5]);
        bytes.extend([23, 3, 3, 0, 0]);
        bytes.extend([23, 3, 3]);
        client.write_all(&bytes).await.unwrap();
        let mut paced = RecordPaced::new(tcp, true);
        let mut got = Vec::new();
        let mut reads = Vec::new();
        while got.len() < bytes.len() {
            let mut b = [0u8; 64];
            let n = paced.read(&mut b).await.unwrap();
            got.extend_from_slice(&b[..n]);
            reads.push(got.len());
        }
        assert_eq!(got, bytes);
        // Every read stops at a record boundary (5+3, 5+2, 5+0) or a header's bytes.
        assert!(reads.contains(&8) && reads.contains(&15) && reads.contains(&20));
        paced.stop_pacing();
        client.write_all(&[0, 1, 9]).await.unwrap();
        let mut b = [0u8; 3];
        paced.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [0, 1, 9]);
    }
}
