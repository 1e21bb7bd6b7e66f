//! One server-to-server connection as both directions use it: framed reading with the
//! limits, idle timeout and byte rate; writing; STARTTLS; closing with a stream error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use jrs_component::{FramedReader, ReadError};
use jrs_stream::{Frame, Limits, StreamError, StreamErrorCondition};

use crate::stream::S2sStream;

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// How a stream ends.
#[derive(Debug)]
pub enum Close {
    /// Send this stream error and close.
    Error(StreamError),
    /// The remote closed its stream: close ours.
    Closed,
    /// The connection is gone (or we give up on it) for this reason.
    Gone(String),
}

impl From<StreamError> for Close {
    fn from(e: StreamError) -> Close {
        Close::Error(e)
    }
}

pub fn stream_error(condition: StreamErrorCondition, text: impl Into<String>) -> Close {
    Close::Error(StreamError::new(condition, text))
}

/// A token bucket: `rate` bytes per second sustained, bursts of four seconds' worth.
struct ByteRate {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl ByteRate {
    fn new(rate: u32) -> ByteRate {
        ByteRate {
            rate: rate.max(1) as f64,
            tokens: rate as f64 * 4.0,
            last: Instant::now(),
        }
    }

    fn take(&mut self, bytes: usize) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate * 4.0);
        self.last = now;
        self.tokens -= bytes as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

pub struct Link {
    reader: FramedReader<S2sStream>,
    limits: Limits,
    idle: Duration,
    rate: ByteRate,
    /// Reading pauses until then (the byte rate); kept here so that a cancelled read
    /// loses nothing.
    pause_until: Option<tokio::time::Instant>,
    pub last_activity: Instant,
    /// Whether our stream header was written (a stream error needs one first).
    pub header_sent: bool,
}

impl Link {
    pub fn new(stream: S2sStream, limits: Limits, idle: Duration, rate: u32) -> Link {
        Link {
            reader: FramedReader::with_read_size(stream, limits, READ_SIZE),
            limits,
            idle,
            rate: ByteRate::new(rate),
            pause_until: None,
            last_activity: Instant::now(),
            header_sent: false,
        }
    }

    pub fn stream(&self) -> &S2sStream {
        self.reader.get_ref()
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<(), Close> {
        let io = self.reader.get_mut();
        io.write_all(data)
            .await
            .map_err(|e| Close::Gone(format!("write failed: {e}")))?;
        io.flush()
            .await
            .map_err(|e| Close::Gone(format!("write failed: {e}")))?;
        self.last_activity = Instant::now();
        Ok(())
    }

    /// The next frame, waiting at most the idle timeout. Cancel-safe.
    pub async fn next_frame(&mut self) -> Result<Frame, Close> {
        self.next_frame_within(self.idle).await
    }

    pub async fn next_frame_within(&mut self, limit: Duration) -> Result<Frame, Close> {
        if let Some(until) = self.pause_until {
            tokio::time::sleep_until(until).await;
            self.pause_until = None;
        }
        let frame = match tokio::time::timeout(limit, self.reader.next_frame()).await {
            Err(_) => {
                return Err(stream_error(
                    StreamErrorCondition::ConnectionTimeout,
                    "no traffic for too long",
                ))
            }
            Ok(Ok(frame)) => frame,
            Ok(Err(ReadError::Stream(e))) => return Err(e.into()),
            Ok(Err(ReadError::Closed)) => return Err(Close::Gone("connection closed".into())),
            Ok(Err(ReadError::Io(e))) => return Err(Close::Gone(format!("read failed: {e}"))),
        };
        self.last_activity = Instant::now();
        if let Frame::Element(bytes) = &frame {
            if let Some(pause) = self.rate.take(bytes.len()) {
                self.pause_until = Some(tokio::time::Instant::now() + pause);
            }
        }
        Ok(frame)
    }

    /// The next element (not a header); a stream close ends the stream.
    pub async fn next_element(&mut self) -> Result<Bytes, Close> {
        match self.next_frame().await? {
            Frame::Element(b) => Ok(b),
            Frame::StreamClose => Err(Close::Closed),
            Frame::StreamOpen(_) => Err(stream_error(
                StreamErrorCondition::NotWellFormed,
                "a second stream header",
            )),
        }
    }

    /// Whether the remote sent bytes we have not read yet (not allowed before TLS starts).
    pub fn has_buffered(&self) -> bool {
        self.reader.has_buffered()
    }

    /// A new stream on the same connection (after SASL success).
    pub fn restart(&mut self) {
        self.reader.restart();
        self.header_sent = false;
    }

    fn take_plain(&mut self) -> Option<tokio::net::TcpStream> {
        let limits = self.limits;
        let old = std::mem::replace(
            &mut self.reader,
            FramedReader::new(S2sStream::Detached, limits),
        );
        old.into_inner().take_plain()
    }

    /// Upgrades to TLS as the server (after we sent `<proceed/>`).
    pub async fn accept_tls(&mut self, config: Arc<rustls::ServerConfig>) -> Result<(), Close> {
        let tcp = self
            .take_plain()
            .ok_or_else(|| Close::Gone("not a plain stream".into()))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(Close::Gone(format!("TLS handshake failed: {e}"))),
            Err(_) => return Err(Close::Gone("TLS handshake timed out".into())),
        };
        self.reader =
            FramedReader::with_read_size(S2sStream::Server(Box::new(tls)), self.limits, READ_SIZE);
        self.header_sent = false;
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
        let stream = connect_tls(tcp, config, domain).await?;
        self.reader = FramedReader::with_read_size(stream, self.limits, READ_SIZE);
        self.header_sent = false;
        Ok(())
    }

    /// Ends the stream: the stream error (after a header if none was sent) or our close
    /// tag, then waits briefly for the remote to close so the error is not lost to a
    /// connection reset.
    pub async fn finish(mut self, close: &Close, header: impl FnOnce() -> String) {
        let last = match close {
            Close::Error(e) => {
                let mut s = String::new();
                if !self.header_sent {
                    s.push_str(&header());
                }
                s.push_str(&e.to_xml());
                Some(s)
            }
            Close::Closed => Some("</stream:stream>".to_owned()),
            Close::Gone(_) => None,
        };
        if let Some(last) = last {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = self.write(last.as_bytes()).await;
                let _ = self.reader.get_mut().shutdown().await;
            })
            .await;
            let io = self.reader.get_mut();
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        } else {
            debug!("connection dropped without closing the stream");
        }
    }
}

/// TLS as the client over `tcp`, SNI `domain`.
pub async fn connect_tls(
    tcp: tokio::net::TcpStream,
    config: Arc<rustls::ClientConfig>,
    domain: &str,
) -> Result<S2sStream, Close> {
    let name = ServerName::try_from(domain.to_owned())
        .map_err(|_| Close::Gone(format!("'{domain}' is not a valid TLS server name")))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(S2sStream::Client(Box::new(tls))),
        Ok(Err(e)) => Err(Close::Gone(format!("TLS handshake failed: {e}"))),
        Err(_) => Err(Close::Gone("TLS handshake timed out".into())),
    }
}
