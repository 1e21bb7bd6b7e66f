//! One XMPP stream over one transport, as c2s and s2s both use it: framed reading with
//! the stream limits, the idle timeout and the byte rate; writing; STARTTLS in place;
//! restarts; and the close handshake.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use jrs_component::{FramedReader, ReadError};
use jrs_stream::validate::validate_stanza;
use jrs_stream::{Frame, Limits, Stanza, StreamErrorCondition};

use crate::close::{stream_error, Close};
use crate::rate::ByteRate;
use crate::tls;
use crate::transport::Transport;

/// How long a closing stream waits for its last write, then for the peer to close.
const CLOSE_WRITE_LIMIT: Duration = Duration::from_secs(2);
const CLOSE_DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// What a connection is allowed: framing limits, silence, bytes per second.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub limits: Limits,
    /// Bytes asked of the transport per read: small for many mostly idle clients (memory
    /// per connection), larger for servers (system calls per stanza).
    pub read_size: usize,
    /// A read waits at most this long.
    pub idle: Duration,
    /// Bytes per second the peer may send (sustained; bursts of four seconds' worth).
    pub rate_bytes: u32,
    /// Where the bytes read and written are counted (docs/metrics.md).
    pub traffic: Option<&'static jrs_metrics::Traffic>,
}

pub struct Connection {
    reader: FramedReader<Transport>,
    settings: Settings,
    rate: ByteRate,
    /// Reading pauses until then (the byte rate); kept here so that a cancelled read
    /// loses nothing.
    pause_until: Option<tokio::time::Instant>,
    last_read: Instant,
    last_write: Instant,
    /// Whether our stream header was written (a stream error needs one first).
    header_sent: bool,
    /// A read's time limit: one timer for the connection's life, pushed back at each
    /// read (moving a pending deadline later is a store; a `timeout` per read put an
    /// entry into the timer wheel and took it out again for every stanza, 5% of c2s's
    /// instructions per lone message).
    read_limit: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Connection {
    pub fn new(transport: Transport, settings: Settings) -> Connection {
        let now = Instant::now();
        Connection {
            reader: FramedReader::with_read_size(transport, settings.limits, settings.read_size),
            rate: ByteRate::new(settings.rate_bytes),
            settings,
            pause_until: None,
            last_read: now,
            last_write: now,
            header_sent: false,
            read_limit: Box::pin(tokio::time::sleep(settings.idle)),
        }
    }

    pub fn transport(&self) -> &Transport {
        self.reader.get_ref()
    }

    pub fn last_write(&self) -> Instant {
        self.last_write
    }

    /// When the connection last carried anything, either way.
    pub fn last_activity(&self) -> Instant {
        self.last_read.max(self.last_write)
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<(), Close> {
        let io = self.reader.get_mut();
        io.write_all(data)
            .await
            .map_err(|e| Close::Gone(format!("write failed: {e}")))?;
        io.flush()
            .await
            .map_err(|e| Close::Gone(format!("write failed: {e}")))?;
        if let Some(t) = self.settings.traffic {
            t.bytes_out.inc_by(data.len() as u64);
        }
        self.last_write = Instant::now();
        Ok(())
    }

    /// Writes our stream header (after which a stream error needs no header of its own).
    pub async fn write_header(&mut self, header: &str) -> Result<(), Close> {
        self.write(header.as_bytes()).await?;
        self.header_sent = true;
        Ok(())
    }

    /// The next frame, waiting at most the idle timeout. Cancel-safe.
    pub async fn next_frame(&mut self) -> Result<Frame, Close> {
        self.next_frame_within(self.settings.idle).await
    }

    /// The next frame, waiting at most `limit`. Cancel-safe.
    pub async fn next_frame_within(&mut self, limit: Duration) -> Result<Frame, Close> {
        if let Some(until) = self.pause_until {
            tokio::time::sleep_until(until).await;
            self.pause_until = None;
        }
        self.read_limit
            .as_mut()
            .reset(tokio::time::Instant::now() + limit);
        let read = tokio::select! {
            biased;
            read = read_frame(&mut self.reader) => read,
            _ = self.read_limit.as_mut() => {
                return Err(stream_error(
                    StreamErrorCondition::ConnectionTimeout,
                    "no traffic for too long",
                ))
            }
        };
        let frame = match read {
            Ok(frame) => frame,
            Err(ReadError::Stream(e)) => return Err(e.into()),
            Err(ReadError::Closed) => return Err(Close::Gone("connection closed".into())),
            Err(ReadError::Io(e)) => return Err(Close::Gone(format!("read failed: {e}"))),
        };
        self.last_read = Instant::now();
        if let (Some(t), Frame::Element(b) | Frame::StreamOpen(b)) = (self.settings.traffic, &frame)
        {
            t.bytes_in.inc_by(b.len() as u64);
        }
        if let Frame::Element(bytes) = &frame {
            if let Some(pause) = self.rate.take(bytes.len()) {
                self.pause_until = Some(tokio::time::Instant::now() + pause);
            }
        }
        Ok(frame)
    }

    /// The next element (not a header); the peer's stream close ends the stream.
    pub async fn next_element(&mut self) -> Result<Bytes, Close> {
        element(self.next_frame().await?)
    }

    /// The next element, checked to be well-formed and self-contained, with its
    /// addressing read.
    pub async fn next_stanza(&mut self) -> Result<Stanza, Close> {
        let bytes = self.next_element().await?;
        validate_stanza(&bytes)?;
        parse(bytes)
    }

    /// Whether the peer sent bytes we have not read yet (not allowed before TLS starts).
    pub fn has_buffered(&self) -> bool {
        self.reader.has_buffered()
    }

    /// A new stream on the same connection (after TLS or SASL): bytes already read
    /// belong to it; our header must be sent again.
    pub fn restart(&mut self) {
        self.reader.restart();
        self.header_sent = false;
    }

    fn take_plain(&mut self) -> Option<tokio::net::TcpStream> {
        let old = std::mem::replace(
            &mut self.reader,
            FramedReader::new(Transport::Detached, self.settings.limits),
        );
        old.into_inner().take_plain()
    }

    fn replace_transport(&mut self, transport: Transport) {
        self.reader =
            FramedReader::with_read_size(transport, self.settings.limits, self.settings.read_size);
        self.header_sent = false;
    }

    /// Upgrades to TLS as the server (after we sent `<proceed/>`).
    pub async fn accept_tls(&mut self, config: Arc<rustls::ServerConfig>) -> Result<(), Close> {
        let tcp = self
            .take_plain()
            .ok_or_else(|| Close::Gone("not a plain stream".into()))?;
        let transport = tls::accept(tcp, config).await?;
        self.replace_transport(transport);
        Ok(())
    }

    /// Upgrades to TLS as the client, with SNI `domain` (after `<proceed/>`).
    pub async fn connect_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        domain: &str,
    ) -> Result<(), Close> {
        let tcp = self
            .take_plain()
            .ok_or_else(|| Close::Gone("not a plain stream".into()))?;
        let transport = tls::connect(tcp, config, domain).await?;
        self.replace_transport(transport);
        Ok(())
    }

    /// Ends the stream: the stream error (after `header()` if ours was not sent) or our
    /// close tag, then waits briefly for the peer to close. Closing a socket with unread
    /// input resets the connection, and the reset can destroy the stream error before the
    /// peer reads it: what is left is read first.
    pub async fn finish(mut self, close: &Close, header: impl FnOnce() -> String) {
        let last = match close {
            Close::Error(e) => {
                let mut s = String::new();
                if !self.header_sent {
                    s.push_str(&header());
                }
                s.push_str(&e.to_xml());
                s
            }
            Close::Closed => "</stream:stream>".to_owned(),
            Close::Gone(why) => {
                debug!(reason = %why, "connection dropped without closing the stream");
                return;
            }
        };
        let _ = tokio::time::timeout(CLOSE_WRITE_LIMIT, async {
            let _ = self.write(last.as_bytes()).await;
            let _ = self.reader.get_mut().shutdown().await;
        })
        .await;
        let io = self.reader.get_mut();
        let _ = tokio::time::timeout(CLOSE_DRAIN_LIMIT, async {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// The element of a frame: a stream header in the middle of a stream is an error, the
/// peer's close ends the stream.
pub fn element(frame: Frame) -> Result<Bytes, Close> {
    match frame {
        Frame::Element(b) => Ok(b),
        Frame::StreamClose => Err(Close::Closed),
        Frame::StreamOpen(_) => Err(stream_error(
            StreamErrorCondition::NotWellFormed,
            "a second stream header",
        )),
    }
}

/// Reads an element's name and addressing; the framer already found it complete.
pub fn parse(bytes: Bytes) -> Result<Stanza, Close> {
    Stanza::parse(bytes)
        .map_err(|e| stream_error(StreamErrorCondition::NotWellFormed, e.to_string()))
}

/// The next frame. With nothing buffered it first waits, without a buffer, for the
/// transport to have something: most clients are idle most of the time, and a buffer
/// reserved for a read that waits hours would cost each of them a kilobyte.
async fn read_frame(reader: &mut FramedReader<Transport>) -> Result<Frame, ReadError> {
    if reader.release_if_empty() {
        reader.get_mut().readable().await?;
    }
    reader.next_frame().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use jrs_stream::Limits;
    use tokio::net::{TcpListener, TcpStream};

    fn settings() -> Settings {
        Settings {
            limits: Limits::default(),
            read_size: 1024,
            idle: Duration::from_secs(5),
            rate_bytes: 1_000_000,
            traffic: None,
        }
    }

    /// A TLS client and the server's side of it, as c2s's `Connection`; `take_keys`: the
    /// records after the handshake run by `tls_records` (c2s's default).
    async fn tls_pair(take_keys: bool) -> (tokio_rustls::client::TlsStream<TcpStream>, Connection) {
        let configs = crate::tls_records::tests::configs_with(take_keys, rustls::DEFAULT_VERSIONS);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        let name = rustls::pki_types::ServerName::try_from("example.org").unwrap();
        let (server, client) = tokio::join!(
            tls::accept(accepted.unwrap().0, configs.server),
            tokio_rustls::TlsConnector::from(Arc::new(configs.client))
                .connect(name, connected.unwrap()),
        );
        let server = server.map_err(|_| "handshake").unwrap();
        assert_eq!(matches!(server, Transport::Tls13Server(_)), take_keys);
        let conn = Connection::new(server, settings());
        (client.unwrap(), conn)
    }

    /// An idle TLS stream waits without a read buffer (nor does a plain one), and loses
    /// nothing: a frame split over records and writes arrives whole, also after a wait
    /// that was given up (a cancelled read).
    #[tokio::test]
    async fn an_idle_tls_stream_holds_no_read_buffer_and_loses_nothing() {
        for take_keys in [false, true] {
            idle_tls_stream(take_keys).await;
        }
    }

    async fn idle_tls_stream(take_keys: bool) {
        let (mut client, mut conn) = tls_pair(take_keys).await;
        client
            .write_all(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>")
            .await
            .unwrap();
        client.flush().await.unwrap();
        assert!(matches!(
            conn.next_frame().await.unwrap(),
            Frame::StreamOpen(_)
        ));
        // Nothing comes: the read waits, and is given up, without a buffer.
        let waited = conn.next_frame_within(Duration::from_secs(5));
        assert!(tokio::time::timeout(Duration::from_millis(50), waited)
            .await
            .is_err());
        assert_eq!(conn.reader.buffer_capacity(), 0);
        // The read's own limit (the connection's one timer, pushed back at each read).
        match conn.next_frame_within(Duration::from_millis(30)).await {
            Err(Close::Error(e)) => {
                assert_eq!(e.condition, StreamErrorCondition::ConnectionTimeout)
            }
            other => panic!("not a timeout: {other:?}"),
        }
        // Half an element, then the rest in a later record.
        client
            .write_all(b"<message id='1'><body>hel")
            .await
            .unwrap();
        client.flush().await.unwrap();
        let next = tokio::spawn(async move {
            let frame = conn.next_frame().await.unwrap();
            (frame, conn)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"lo</body></message>").await.unwrap();
        client.write_all(b"<message id='2'/>").await.unwrap();
        client.flush().await.unwrap();
        let (frame, mut conn) = next.await.unwrap();
        let Frame::Element(first) = frame else {
            panic!("not an element")
        };
        assert_eq!(&first[..], b"<message id='1'><body>hello</body></message>");
        let Frame::Element(second) = conn.next_frame().await.unwrap() else {
            panic!("not an element")
        };
        assert_eq!(&second[..], b"<message id='2'/>");
        // The peer's close is seen while waiting idle.
        client.shutdown().await.unwrap();
        assert!(matches!(conn.next_frame().await, Err(Close::Gone(_))));
    }
}
