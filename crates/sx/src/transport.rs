//! The byte stream under an XMPP stream: plain TCP (which STARTTLS upgrades in place) or
//! TLS in either role, or a pipe to a web transport (WebSocket), behind one
//! `AsyncRead + AsyncWrite` type.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::record_paced::RecordPaced;
use crate::tls_records::Tls13Stream;

pub enum Transport {
    Plain(TcpStream),
    /// TLS where the peer connected to us (clients, incoming servers), run by rustls.
    TlsServer(Box<tokio_rustls::server::TlsStream<RecordPaced>>),
    /// TLS 1.3 where the peer connected to us, its records run by us after a handshake
    /// run by rustls (c2s's `<tls record-layer='compact'/>`).
    Tls13Server(Box<Tls13Stream>),
    /// TLS where we connected (outgoing servers).
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// One end of an in-process pipe whose other end a web transport serves (c2s's
    /// WebSocket endpoint translates RFC 7395 framing to and from the stream's).
    Web(tokio::io::DuplexStream),
    /// Nothing: what is left in place while the TCP stream is moved into TLS.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream moved into TLS")
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(
            self,
            Transport::TlsServer(_) | Transport::Tls13Server(_) | Transport::TlsClient(_)
        )
    }

    /// The name a TLS client asked for (SNI), lowercase.
    pub fn server_name(&self) -> Option<String> {
        match self {
            Transport::TlsServer(s) => s.get_ref().1.server_name().map(str::to_ascii_lowercase),
            Transport::Tls13Server(s) => s.handshaken().server_name.as_deref().map(Into::into),
            _ => None,
        }
    }

    fn tls_common(&self) -> Option<&rustls::CommonState> {
        match self {
            Transport::TlsServer(s) => Some(s.get_ref().1),
            Transport::TlsClient(s) => Some(s.get_ref().1),
            _ => None,
        }
    }

    /// The RFC 9266 `tls-exporter` channel binding data, if the stream is TLS 1.3 (the
    /// only version it is defined for, RFC 9266 section 3).
    pub fn exporter(&self) -> Option<Vec<u8>> {
        let tls = match self {
            Transport::TlsServer(tls) => tls,
            Transport::Tls13Server(s) => return s.handshaken().exporter.map(|e| e.to_vec()),
            _ => return None,
        };
        let conn = tls.get_ref().1;
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return None;
        }
        conn.export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None)
            .ok()
    }

    /// The certificate chain the peer presented, if any.
    pub fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        if let Transport::Tls13Server(s) = self {
            return s.handshaken().peer_certificates.clone();
        }
        self.tls_common()
            .and_then(|c| c.peer_certificates())
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Waits until a read would find something (bytes on the socket, or plaintext TLS
    /// already decrypted), so that an idle connection can wait without a read buffer.
    /// Returns at once where it cannot tell (the web pipe: read with a buffer there).
    /// Cancel-safe; may wake without data (the next read then waits).
    pub async fn readable(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(tcp) => tcp.readable().await,
            Transport::TlsServer(tls) => {
                let (paced, conn) = tls.get_mut();
                if paced.has_buffered() {
                    return Ok(());
                }
                tls_readable(paced.tcp(), conn).await
            }
            Transport::Tls13Server(s) => s.readable().await,
            Transport::TlsClient(tls) => {
                let (tcp, conn) = tls.get_mut();
                tls_readable(tcp, conn).await
            }
            Transport::Web(_) | Transport::Detached => Ok(()),
        }
    }

    /// Takes the TCP stream out (for a STARTTLS upgrade), leaving `Detached`.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Transport::Detached) {
            Transport::Plain(tcp) => Some(tcp),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// [`Transport::readable`] for TLS: at once if rustls holds decrypted bytes (records it
/// had read are decrypted first), the peer's close or an error (left for the read to
/// report); otherwise when the socket has bytes.
async fn tls_readable<D>(
    tcp: &TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
) -> io::Result<()> {
    let ready = match conn.process_new_packets() {
        Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
        Err(_) => true,
    };
    if ready {
        return Ok(());
    }
    tcp.readable().await
}

/// Runs `$e` with `$s` pinned to whichever stream the transport holds.
macro_rules! each {
    ($self:ident, $s:ident => $e:expr, $detached:expr) => {
        match $self.get_mut() {
            Transport::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Transport::TlsServer($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Transport::Tls13Server($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Transport::TlsClient($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Transport::Web($s) => {
                let $s = Pin::new($s);
                $e
            }
            Transport::Detached => $detached,
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf), Poll::Ready(Err(detached())))
    }
}

impl AsyncWrite for Transport {
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
