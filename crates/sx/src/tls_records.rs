//! A TLS 1.3 server connection after its handshake: the record layer (RFC 8446 section
//! 5) over the TCP stream, on the keys rustls negotiated, holding no buffer while idle.
//!
//! Why not rustls's `ServerConnection` for the connection's whole life: it keeps about
//! 7 KiB per connection however idle the connection is (a 4 KiB receive buffer that
//! rustls 0.23 sizes even when empty, the handshake's last state, its queues), more than
//! half of what an idle client costs the server (docs/benchmarks.md, issue 14, "TLS
//! records after the handshake"). rustls's unbuffered API would let us own the buffers
//! but has no keying-material exporter, which `tls-exporter` channel binding needs;
//! kernel TLS, what rustls's key extraction is made for, is missing on many kernels. No
//! crate runs the record layer in user space on extracted keys, so the framing, the
//! nonces, the inner content type and the few messages that may follow a handshake are
//! here (RFC 8446 5.2-5.3, 6); the AEAD itself is aws-lc-rs's, rustls's own provider.
//! Not rustls's `MessageEncrypter`s: its AES-GCM ones check that sequence numbers start
//! at 0 with the key, and ours continue from the handshake's (after its session
//! tickets).
//!
//! What it cannot do: follow a key update (RFC 8446 4.6.3). rustls 0.23 hands over keys,
//! not the secrets they derive from (its `KernelConnection`, which can, exists only for
//! the unbuffered API). A client that updates its keys gets an `internal_error` alert and
//! reconnects (with XEP-0198 its session resumes); a connection that has sent as many
//! records under one key as its suite allows (2^24 for AES-GCM, where rustls would
//! update the key) is closed the same way, with close_notify.
//! `<tls record-layer='rustls'/>` in c2s.xml keeps rustls for the whole connection.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::pki_types::CertificateDer;
use rustls::{AlertDescription, ConnectionTrafficSecrets, ContentType};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::info;
use zeroize::Zeroizing;

use crate::record_paced::RECORD_HEADER;

/// RFC 8446 5.2: a TLSCiphertext's longest fragment, and 5.1: a plaintext's.
const MAX_CIPHERTEXT: usize = (1 << 14) + 256;
const MAX_PLAINTEXT: usize = 1 << 14;
const READ_SIZE: usize = 4096;
/// Encrypted bytes queued for the socket beyond which writes wait for it.
const WRITE_QUEUE_LIMIT: usize = 64 * 1024;
/// Empty records in a row a peer may send (as rustls, which allows 32).
const MAX_EMPTY_IN_ROW: u8 = 32;
/// The handshake message type of a KeyUpdate (RFC 8446 4).
const KEY_UPDATE: u8 = 24;

/// What the handshake established that the stream above asks about later.
#[derive(Default)]
pub struct Handshaken {
    /// The name the client asked for (SNI), lowercase.
    pub server_name: Option<Box<str>>,
    /// RFC 9266 `tls-exporter` channel binding data, taken before the keys.
    pub exporter: Option<[u8; 32]>,
    pub peer_certificates: Vec<CertificateDer<'static>>,
}

/// The key of one direction and the sequence number of its next record.
struct RecordKey {
    alg: &'static aead::Algorithm,
    /// The key's bytes (the first `alg.key_len()`), wiped when dropped.
    secret: Zeroizing<[u8; 32]>,
    iv: [u8; NONCE_LEN],
    seq: u64,
    /// The key set up for use (aws-lc's AES-GCM state: about 570 bytes), dropped while
    /// the connection idles and set up again for its next record (about 170 ns).
    ready: Option<LessSafeKey>,
}

impl RecordKey {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Option<RecordKey> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return None,
        };
        let mut secret = Zeroizing::new([0u8; 32]);
        secret
            .get_mut(..key.as_ref().len())?
            .copy_from_slice(key.as_ref());
        // Checked once here, so that setting it up again cannot fail.
        let ready = LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).ok()?);
        Some(RecordKey {
            alg,
            secret,
            iv: iv.as_ref().try_into().ok()?,
            seq,
            ready: Some(ready),
        })
    }

    fn key(&mut self) -> &LessSafeKey {
        let (alg, secret) = (self.alg, &self.secret);
        self.ready.get_or_insert_with(|| {
            let key = UnboundKey::new(alg, &secret[..alg.key_len()]);
            LessSafeKey::new(key.expect("a key of its algorithm's length, checked in new"))
        })
    }

    /// Lets the set-up key go until the next record.
    fn rest(&mut self) {
        self.ready = None;
    }

    /// RFC 8446 5.3: the sequence number, padded to the IV's length, XORed with it.
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(nonce)
    }
}

pub struct Tls13Stream {
    tcp: TcpStream,
    rx: RecordKey,
    tx: RecordKey,
    /// Records sent after which the connection must end (the suite's limit).
    tx_limit: u64,
    /// Bytes read from the socket: `plain` is decrypted application data not yet read
    /// (in place, where its record was), `input[raw..]` records not yet decrypted. Empty,
    /// with no allocation, whenever both are.
    input: Vec<u8>,
    plain: Range<usize>,
    raw: usize,
    /// Empty application-data records in a row (rustls allows a few, then stops).
    empty_in_row: u8,
    /// Encrypted records not yet taken by the socket, from `output[written..]`.
    output: Vec<u8>,
    written: usize,
    /// The peer sent close_notify.
    peer_closed: bool,
    /// Why the connection can carry nothing more (an alert sent or received).
    failed: Option<(io::ErrorKind, String)>,
    close_sent: bool,
    handshaken: Handshaken,
}

impl Tls13Stream {
    /// Whether [`Tls13Stream::take_over`] can have `conn`: TLS 1.3, its handshake done,
    /// nothing of it left to read or write.
    pub fn can_take_over(conn: &mut rustls::ServerConnection) -> bool {
        matches!(
            conn.negotiated_cipher_suite(),
            Some(rustls::SupportedCipherSuite::Tls13(_))
        ) && !conn.is_handshaking()
            && !conn.wants_write()
            && conn
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() == 0 && !s.peer_has_closed())
    }

    /// Takes over a connection [`Tls13Stream::can_take_over`] accepted, from a
    /// configuration with `enable_secret_extraction` (`read`: bytes of later records
    /// already read from `tcp`).
    pub fn take_over(
        tcp: TcpStream,
        read: Vec<u8>,
        conn: rustls::ServerConnection,
    ) -> Result<Tls13Stream, String> {
        let Some(rustls::SupportedCipherSuite::Tls13(suite)) = conn.negotiated_cipher_suite()
        else {
            return Err("not a TLS 1.3 connection".into());
        };
        let handshaken = Handshaken {
            server_name: conn.server_name().map(|n| n.to_ascii_lowercase().into()),
            exporter: conn
                .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
                .ok(),
            peer_certificates: conn
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
        };
        // The deprecation: this call cannot carry key updates over (module comment).
        #[allow(deprecated)]
        let secrets = match conn.dangerous_extract_secrets() {
            Ok(s) => s,
            Err(e) => return Err(format!("TLS keys not handed over: {e}")),
        };
        let (Some(tx), Some(rx)) = (RecordKey::new(secrets.tx), RecordKey::new(secrets.rx)) else {
            return Err("TLS keys of an unknown kind".into());
        };
        Ok(Tls13Stream {
            tcp,
            rx,
            tx,
            // One record kept back for the alert that ends the connection there.
            tx_limit: suite.common.confidentiality_limit.saturating_sub(1),
            raw: 0,
            plain: 0..0,
            empty_in_row: 0,
            input: read,
            output: Vec::new(),
            written: 0,
            peer_closed: false,
            failed: None,
            close_sent: false,
            handshaken,
        })
    }

    pub fn handshaken(&self) -> &Handshaken {
        &self.handshaken
    }

    /// Waits until a read would find something: plaintext, a whole record, the peer's
    /// close, an error; or bytes on the socket. Waiting, the connection keeps only its
    /// keys' bytes: their set-up state goes until the next record.
    pub async fn readable(&mut self) -> io::Result<()> {
        // (Records still queued for the socket are ciphertext already.)
        self.rx.rest();
        self.tx.rest();
        if !self.plain.is_empty()
            || self
                .record_len()
                .is_some_and(|n| self.input.len() - self.raw >= n)
            || self.peer_closed
            || self.failed.is_some()
        {
            return Ok(());
        }
        self.tcp.readable().await
    }

    /// The whole length of the record at `raw`, once its header is there.
    fn record_len(&self) -> Option<usize> {
        let h = self.input.get(self.raw..self.raw + RECORD_HEADER)?;
        Some(RECORD_HEADER + u16::from_be_bytes([h[3], h[4]]) as usize)
    }

    fn failed_error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, why)| io::Error::new(*kind, why.clone()))
    }

    /// Ends the connection for `why`, queueing a fatal alert for the peer (the read that
    /// fails sends it as far as the socket takes it).
    fn fail(&mut self, alert: AlertDescription, why: String) -> io::Error {
        if self.failed.is_none() && !self.close_sent {
            // RFC 8446 6: alerts are encrypted like any record; level 2 is fatal.
            let _ = self.seal(ContentType::Alert, &[2, u8::from(alert)]);
            self.close_sent = true;
        }
        self.failed = Some((io::ErrorKind::InvalidData, why.clone()));
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// Decrypts the record at `raw` if it is all there. `Ok(false)`: more bytes needed.
    fn open_record(&mut self) -> io::Result<bool> {
        // RFC 8446 6.1: whatever comes after close_notify is ignored.
        if self.peer_closed {
            return Ok(false);
        }
        let Some(len) = self.record_len() else {
            return Ok(false);
        };
        if len - RECORD_HEADER > MAX_CIPHERTEXT {
            return Err(self.fail(
                AlertDescription::RecordOverflow,
                format!("a TLS record of {} bytes", len - RECORD_HEADER),
            ));
        }
        if self.input.len() - self.raw < len {
            return Ok(false);
        }
        let start = self.raw;
        self.raw += len;
        // RFC 8446 5: after the handshake every record is protected and says it carries
        // application data (the real type is inside).
        if self.input[start] != u8::from(ContentType::ApplicationData) {
            return Err(self.fail(
                AlertDescription::UnexpectedMessage,
                format!("an unprotected TLS record of type {}", self.input[start]),
            ));
        }
        let header: [u8; RECORD_HEADER] = self.input[start..start + RECORD_HEADER]
            .try_into()
            .expect("a header's length");
        let nonce = self.rx.next_nonce();
        let sealed = &mut self.input[start + RECORD_HEADER..start + len];
        let Ok(opened) = self
            .rx
            .key()
            .open_in_place(nonce, Aad::from(header), sealed)
        else {
            return Err(self.fail(
                AlertDescription::BadRecordMac,
                "a TLS record that does not decrypt".into(),
            ));
        };
        // RFC 8446 5.4: the content type is the last byte that is not zero (padding).
        let Some(body_len) = opened.iter().rposition(|&b| b != 0) else {
            return Err(self.fail(
                AlertDescription::UnexpectedMessage,
                "a TLS record without a content type".into(),
            ));
        };
        let typ = ContentType::from(opened[body_len]);
        let body = &opened[..body_len];
        let first = body.first().copied();
        let alert = (body_len == 2).then(|| (body[0], body[1]));
        if body_len > MAX_PLAINTEXT {
            return Err(self.fail(
                AlertDescription::RecordOverflow,
                format!("a TLS record with {body_len} bytes of plaintext"),
            ));
        }
        match typ {
            // The plaintext stays where the record was, at the start of its payload.
            ContentType::ApplicationData => {
                self.plain = start + RECORD_HEADER..start + RECORD_HEADER + body_len;
                self.empty_in_row = if body_len == 0 {
                    self.empty_in_row + 1
                } else {
                    0
                };
                if self.empty_in_row > MAX_EMPTY_IN_ROW {
                    return Err(self.fail(
                        AlertDescription::UnexpectedMessage,
                        "too many empty TLS records in a row".into(),
                    ));
                }
            }
            ContentType::Alert => match alert {
                // RFC 8446 6: levels are 1 (warning) and 2 (fatal).
                Some((level, _)) if level != 1 && level != 2 => {
                    return Err(self.fail(
                        AlertDescription::IllegalParameter,
                        format!("a TLS alert of level {level}"),
                    ))
                }
                Some((_, 0)) => self.peer_closed = true,
                // 6.1: user_canceled announces a close_notify; nothing to do yet.
                Some((1, 90)) => {}
                Some((_, desc)) => {
                    let why = format!(
                        "the peer sent the TLS alert {:?}",
                        AlertDescription::from(desc)
                    );
                    self.close_sent = true;
                    self.failed = Some((io::ErrorKind::ConnectionAborted, why.clone()));
                    return Err(io::Error::new(io::ErrorKind::ConnectionAborted, why));
                }
                None => {
                    return Err(self.fail(
                        AlertDescription::DecodeError,
                        "a malformed TLS alert".into(),
                    ))
                }
            },
            ContentType::Handshake if first == Some(KEY_UPDATE) => {
                // Logged where operators look (the reason of a dropped connection is only
                // in the debug log): if it is common, `record-layer='rustls'` is the cure.
                info!("a client updated its TLS keys; closing its connection (c2s's TLS record layer cannot follow key updates, docs/c2s.md)");
                return Err(self.fail(
                    AlertDescription::InternalError,
                    "the client updated its TLS keys, which this connection cannot follow \
                     (it should reconnect; <tls record-layer='rustls'/> keeps rustls)"
                        .into(),
                ));
            }
            other => {
                return Err(self.fail(
                    AlertDescription::UnexpectedMessage,
                    format!("a TLS {other:?} message after the handshake"),
                ))
            }
        }
        Ok(true)
    }

    /// Reads from the socket behind what is there. `Ok(0)`: the socket's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Nothing before `raw` is needed any more (all plaintext was read): keep only
        // the undecrypted rest.
        self.release_if_drained();
        if self.raw > 0 {
            self.input.drain(..self.raw);
            self.raw = 0;
            self.plain = 0..0;
        }
        // With nothing buffered, wait for bytes before reserving a buffer: an idle
        // client's read waits here for hours.
        if self.input.is_empty() {
            ready!(self.tcp.poll_read_ready(cx))?;
        }
        let want = match self.record_len() {
            Some(len) => len - self.input.len(),
            None => READ_SIZE,
        };
        self.input.reserve(want.max(READ_SIZE));
        let len = self.input.len();
        let mut read = ReadBuf::uninit(self.input.spare_capacity_mut());
        // (`poll_read`, not `try_read`: it also takes a short read as "drained", so the
        // next wait is for new bytes.)
        match Pin::new(&mut self.tcp).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
                unsafe { self.input.set_len(len + n) };
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // The readiness was stale: the buffer goes back while the read waits.
            Poll::Pending => {
                if self.input.is_empty() {
                    self.input = Vec::new();
                }
                Poll::Pending
            }
        }
    }

    /// Frees the read buffer once everything in it was given out.
    fn release_if_drained(&mut self) {
        if self.plain.is_empty() && self.raw == self.input.len() {
            self.input = Vec::new();
            self.raw = 0;
            self.plain = 0..0;
        }
    }

    /// Encrypts application data (at most one record's worth) as one record behind
    /// the queue; at the keys' limit, ends the connection instead.
    fn seal_data(&mut self, data: &[u8]) -> io::Result<()> {
        if self.tx.seq >= self.tx_limit {
            let why = "the TLS keys reached their limit of records (the client reconnects; \
                       rustls would have updated them)";
            info!("{why}");
            let _ = self.seal(
                ContentType::Alert,
                &[1, u8::from(AlertDescription::CloseNotify)],
            );
            self.close_sent = true;
            self.failed = Some((io::ErrorKind::Other, why.into()));
            return Err(io::Error::other(why));
        }
        self.seal(ContentType::ApplicationData, data)
    }

    /// Encrypts `data` (at most one record's worth) as one record of type `typ` behind
    /// the queue.
    fn seal(&mut self, typ: ContentType, data: &[u8]) -> io::Result<()> {
        // RFC 8446 5.2: the outer header says application data, the real type follows
        // the data inside the encryption, the header is the additional data.
        let len = data.len() + 1 + self.tx.alg.tag_len();
        let header = [
            u8::from(ContentType::ApplicationData),
            3,
            3,
            (len >> 8) as u8,
            len as u8,
        ];
        let mut sealed = Vec::with_capacity(RECORD_HEADER + len);
        sealed.extend_from_slice(&header);
        sealed.extend_from_slice(data);
        sealed.push(u8::from(typ));
        let nonce = self.tx.next_nonce();
        let tag = self
            .tx
            .key()
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut sealed[RECORD_HEADER..])
            .map_err(|_| io::Error::other("TLS encryption failed"))?;
        sealed.extend_from_slice(tag.as_ref());
        if self.written == self.output.len() {
            self.output = sealed;
            self.written = 0;
        } else {
            if self.written >= WRITE_QUEUE_LIMIT {
                self.output.drain(..self.written);
                self.written = 0;
            }
            self.output.extend_from_slice(&sealed);
        }
        Ok(())
    }

    /// Writes queued records until done or the socket is full.
    fn poll_write_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.output.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.output[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.output = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Tls13Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.input[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                this.release_if_drained();
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.failed_error() {
                return Poll::Ready(Err(e));
            }
            match this.open_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // The alert `fail` queued goes out as far as the socket takes it.
                    let _ = this.poll_write_output(cx);
                    return Poll::Ready(Err(e));
                }
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                // RFC 8446 6.1: a peer that stops without close_notify may have been
                // cut off; say so, as rustls does.
                let why = if this.input.is_empty() {
                    "the peer closed the connection without a TLS close_notify"
                } else {
                    "the connection ended inside a TLS record"
                };
                this.failed = Some((io::ErrorKind::UnexpectedEof, why.into()));
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, why)));
            }
        }
    }
}

impl AsyncWrite for Tls13Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(this
                .failed_error()
                .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into())));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.output.len() - this.written >= WRITE_QUEUE_LIMIT {
            ready!(this.poll_write_output(cx))?;
        }
        let n = data.len().min(MAX_PLAINTEXT);
        let sealed = this.seal_data(&data[..n]);
        // Sent now if the socket takes it (the close_notify too, at the keys' limit),
        // else by the flush that follows.
        if let Poll::Ready(Err(e)) = this.poll_write_output(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(sealed.map(|()| n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_output(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            // RFC 8446 6.1: close_notify (warning level) before closing our side.
            this.seal(
                ContentType::Alert,
                &[1, u8::from(AlertDescription::CloseNotify)],
            )?;
            this.close_sent = true;
        }
        ready!(this.poll_write_output(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::transport::Transport;

    pub(crate) struct Configs {
        pub server: Arc<rustls::ServerConfig>,
        pub client: rustls::ClientConfig,
    }

    /// A server configuration (handing keys over if `take_keys`), and a client that
    /// trusts it speaking `versions`.
    pub(crate) fn configs_with(
        take_keys: bool,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Configs {
        let cert = rcgen::generate_simple_self_signed(vec!["example.org".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let mut server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server.enable_secret_extraction = take_keys;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_no_client_auth();
        Configs {
            server: Arc::new(server),
            client,
        }
    }

    fn configs() -> Configs {
        configs_with(true, rustls::DEFAULT_VERSIONS)
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        (accepted.unwrap().0, connected.unwrap())
    }

    async fn tokio_pair(
        configs: Configs,
    ) -> (tokio_rustls::client::TlsStream<TcpStream>, Transport) {
        let (server_tcp, client_tcp) = tcp_pair().await;
        let name = rustls::pki_types::ServerName::try_from("example.org").unwrap();
        let (server, client) = tokio::join!(
            crate::tls::accept(server_tcp, configs.server.clone()),
            tokio_rustls::TlsConnector::from(Arc::new(configs.client)).connect(name, client_tcp),
        );
        (client.unwrap(), server.map_err(|_| "handshake").unwrap())
    }

    /// Data both ways (records of every size, several per read), the exporter and
    /// the name match the client's, the buffers go when drained, close_notify both ways.
    #[tokio::test]
    async fn carries_data_both_ways_and_closes_cleanly() {
        let (mut client, mut server) = tokio_pair(configs()).await;
        let Transport::Tls13Server(records) = &server else {
            panic!("TLS 1.3 was not taken over");
        };
        let theirs = client
            .get_ref()
            .1
            .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
            .unwrap();
        assert_eq!(records.handshaken().exporter, Some(theirs));
        assert_eq!(server.exporter(), Some(theirs.to_vec()));
        assert_eq!(server.server_name().as_deref(), Some("example.org"));
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..70_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let writer = tokio::spawn(async move {
            for chunk in up2.chunks(7_000) {
                client.write_all(chunk).await.unwrap();
            }
            client.flush().await.unwrap();
            let mut got = vec![0u8; down2.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, down2);
            client
        });
        let mut got = vec![0u8; up.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, up);
        server.write_all(&down).await.unwrap();
        server.flush().await.unwrap();
        let mut client = writer.await.unwrap();
        let Transport::Tls13Server(records) = &server else {
            unreachable!()
        };
        assert_eq!(records.input.capacity(), 0, "no read buffer once drained");
        assert_eq!(records.output.capacity(), 0, "no write buffer once sent");
        // Waiting idle, the keys' set-up state goes; the next records set it up again.
        // (The wait may end at once on a readiness left from the last read: allowed.)
        let _ = tokio::time::timeout(Duration::from_millis(20), server.readable()).await;
        let Transport::Tls13Server(records) = &server else {
            unreachable!()
        };
        assert!(records.rx.ready.is_none() && records.tx.ready.is_none());
        both_ways(&mut client, &mut server, b"back", b"again").await;
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
        server.shutdown().await.unwrap();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }

    /// A rustls client driven by hand over `tcp`, its handshake done, and the server's
    /// side.
    async fn manual_client(configs: &Configs) -> (rustls::ClientConnection, TcpStream, Transport) {
        let (server_tcp, mut tcp) = tcp_pair().await;
        let server = tokio::spawn(crate::tls::accept(server_tcp, configs.server.clone()));
        let name = rustls::pki_types::ServerName::try_from("example.org").unwrap();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(configs.client.clone()), name).unwrap();
        send(&mut conn, &mut tcp).await;
        while conn.is_handshaking() {
            receive(&mut conn, &mut tcp).await;
        }
        send(&mut conn, &mut tcp).await;
        let server = server.await.unwrap().map_err(|_| "handshake").unwrap();
        (conn, tcp, server)
    }

    /// Reads one segment into the client.
    async fn receive(conn: &mut rustls::ClientConnection, tcp: &mut TcpStream) {
        let mut buf = [0u8; 8192];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the server closed");
        let mut slice = &buf[..n];
        while !slice.is_empty() {
            conn.read_tls(&mut slice).unwrap();
            conn.process_new_packets().unwrap();
        }
    }

    /// Sends what the client has queued, in one write.
    async fn send(conn: &mut rustls::ClientConnection, tcp: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        tcp.write_all(&out).await.unwrap();
        out
    }

    /// The client's first bytes sent in the same segment as its Finished reach the
    /// stream (the handshake read stopped at the record's end): after a full handshake,
    /// a resumed one, and one the server made the client repeat (HelloRetryRequest).
    #[tokio::test]
    async fn data_right_behind_the_finished_message_is_kept() {
        use rustls::HandshakeKind::{Full, FullWithHelloRetryRequest, Resumed};
        let configs = configs();
        let client = Arc::new(configs.client.clone());
        finished_then_data(&configs.server, &client, Full).await;
        finished_then_data(&configs.server, &client, Resumed).await;
        // A server that takes only P-256 key shares makes the client (which offers
        // X25519 first) start again.
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::SECP256R1];
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(configs.server.cert_resolver.clone());
        server.enable_secret_extraction = true;
        let mut fresh = configs.client.clone();
        fresh.resumption = rustls::client::Resumption::disabled();
        let fresh = Arc::new(fresh);
        finished_then_data(&Arc::new(server), &fresh, FullWithHelloRetryRequest).await;
    }

    async fn finished_then_data(
        server: &Arc<rustls::ServerConfig>,
        client: &Arc<rustls::ClientConfig>,
        kind: rustls::HandshakeKind,
    ) {
        let (server_tcp, mut tcp) = tcp_pair().await;
        let server = tokio::spawn(crate::tls::accept(server_tcp, server.clone()));
        let name = rustls::pki_types::ServerName::try_from("example.org").unwrap();
        let mut conn = rustls::ClientConnection::new(client.clone(), name).unwrap();
        send(&mut conn, &mut tcp).await;
        while conn.is_handshaking() {
            receive(&mut conn, &mut tcp).await;
            if conn.is_handshaking() {
                send(&mut conn, &mut tcp).await;
            }
        }
        assert_eq!(conn.handshake_kind(), Some(kind));
        // Finished and the stream header leave together.
        conn.writer().write_all(b"<stream:stream>").unwrap();
        send(&mut conn, &mut tcp).await;
        let mut server = server.await.unwrap().map_err(|_| "handshake").unwrap();
        assert!(matches!(server, Transport::Tls13Server(_)));
        let mut got = [0u8; 15];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"<stream:stream>");
        // And the other way, through the client's own record layer (which also takes
        // the session tickets sent before).
        server.write_all(b"<features/>").await.unwrap();
        server.flush().await.unwrap();
        let mut plain = Vec::new();
        while plain.len() < 11 {
            receive(&mut conn, &mut tcp).await;
            let mut b = [0u8; 64];
            while let Ok(n) = conn.reader().read(&mut b) {
                if n == 0 {
                    break;
                }
                plain.extend_from_slice(&b[..n]);
            }
        }
        assert_eq!(&plain, b"<features/>");
    }

    /// Nothing after the client's close_notify is read; an empty write sends nothing.
    #[tokio::test]
    async fn nothing_is_read_after_close_notify() {
        let configs = configs();
        let (mut conn, mut tcp, mut server) = manual_client(&configs).await;
        conn.writer().write_all(b"before").unwrap();
        conn.send_close_notify();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        // A record made after the close (rustls will not make one: a copy of the first).
        let first_record = out[..5 + u16::from_be_bytes([out[3], out[4]]) as usize].to_vec();
        out.extend_from_slice(&first_record);
        tcp.write_all(&out).await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"before");
        assert_eq!(server.write(b"").await.unwrap(), 0);
    }

    /// Reads until the server's alert, which the client reports as its error.
    async fn alert_from(conn: &mut rustls::ClientConnection, tcp: &mut TcpStream) -> String {
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an alert");
            let mut slice = &buf[..n];
            while !slice.is_empty() {
                conn.read_tls(&mut slice).unwrap();
                if let Err(e) = conn.process_new_packets() {
                    return e.to_string();
                }
            }
        }
    }

    /// A record that does not decrypt ends the connection with bad_record_mac; a key
    /// update with internal_error, saying why.
    #[tokio::test]
    async fn a_forged_record_and_a_key_update_end_the_connection_with_an_alert() {
        let configs = configs();
        let (mut conn, mut tcp, mut server) = manual_client(&configs).await;
        conn.writer().write_all(b"hello").unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        let last = out.len() - 1;
        out[last] ^= 1;
        tcp.write_all(&out).await.unwrap();
        let mut b = [0u8; 16];
        let err = server.read(&mut b).await.unwrap_err();
        assert!(err.to_string().contains("does not decrypt"), "{err}");
        assert!(alert_from(&mut conn, &mut tcp)
            .await
            .contains("BadRecordMac"));

        let (mut conn, mut tcp, mut server) = manual_client(&configs).await;
        conn.refresh_traffic_keys().unwrap();
        conn.writer().write_all(b"hello").unwrap();
        send(&mut conn, &mut tcp).await;
        let err = server.read(&mut b).await.unwrap_err();
        assert!(err.to_string().contains("updated its TLS keys"), "{err}");
        assert!(alert_from(&mut conn, &mut tcp)
            .await
            .contains("InternalError"));
    }

    /// Records no key made, too short, too long or unprotected end the connection with
    /// an error saying which (and no panic).
    #[tokio::test]
    async fn malformed_records_are_refused() {
        let configs = configs();
        let cases: [(&[u8], &str); 6] = [
            (&[23, 3, 3, 0, 0], "does not decrypt"),
            (&[23, 3, 3, 0, 5, 1, 2, 3, 4, 5], "does not decrypt"),
            (&[23, 3, 3, 0x41, 0x01], "a TLS record of 16641 bytes"),
            (&[21, 3, 3, 0, 2, 1, 0], "unprotected TLS record of type 21"),
            (&[20, 3, 3, 0, 1, 1], "unprotected TLS record of type 20"),
            (&[99, 3, 3, 0, 1, 1], "unprotected TLS record of type 99"),
        ];
        for (bytes, expected) in cases {
            let (_conn, mut tcp, mut server) = manual_client(&configs).await;
            tcp.write_all(bytes).await.unwrap();
            let mut b = [0u8; 16];
            let err = server.read(&mut b).await.unwrap_err();
            assert!(err.to_string().contains(expected), "{bytes:?}: {err}");
            // It stays failed, and writes fail too.
            assert!(server.read(&mut b).await.is_err());
            assert!(server.write_all(b"x").await.is_err());
        }
    }

    /// TLS 1.2 stays with rustls, and works.
    #[tokio::test]
    async fn tls12_stays_with_rustls() {
        let (mut client, mut server) =
            tokio_pair(configs_with(true, &[&rustls::version::TLS12])).await;
        assert!(matches!(server, Transport::TlsServer(_)));
        both_ways(&mut client, &mut server, b"<stream:stream>", b"<features/>").await;
    }

    /// `up` from the client to the server, then `down` back.
    async fn both_ways(
        client: &mut tokio_rustls::client::TlsStream<TcpStream>,
        server: &mut Transport,
        up: &[u8],
        down: &[u8],
    ) {
        client.write_all(up).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; up.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, up);
        server.write_all(down).await.unwrap();
        server.flush().await.unwrap();
        let mut got = vec![0u8; down.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, down);
    }
}
