//! A server-to-server byte stream: plain TCP that STARTTLS upgrades in place, or TLS in
//! either role.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum S2sStream {
    Plain(TcpStream),
    /// We connected (outgoing).
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// The remote connected (incoming).
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Nothing: left in place while the TCP stream is moved into TLS.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream moved into TLS")
}

impl S2sStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, S2sStream::Client(_) | S2sStream::Server(_))
    }

    /// The certificate chain the remote presented, if any.
    pub fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        let certs = match self {
            S2sStream::Client(s) => s.get_ref().1.peer_certificates(),
            S2sStream::Server(s) => s.get_ref().1.peer_certificates(),
            _ => None,
        };
        certs
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Takes the TCP stream out (for a STARTTLS upgrade).
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, S2sStream::Detached) {
            S2sStream::Plain(tcp) => Some(tcp),
            other => {
                *self = other;
                None
            }
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr, $detached:expr) => {
        match $self.get_mut() {
            S2sStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            S2sStream::Client($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            S2sStream::Server($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            S2sStream::Detached => $detached,
        }
    };
}

impl AsyncRead for S2sStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf), Poll::Ready(Err(detached())))
    }
}

impl AsyncWrite for S2sStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf), Poll::Ready(Err(detached())))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx), Poll::Ready(Err(detached())))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx), Poll::Ready(Ok(())))
    }
}
