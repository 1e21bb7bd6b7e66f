//! The HTTP(S) side: PUT of a signed slot, streamed to `data.part` and renamed to
//! `data` after fsync; GET and HEAD (with `Range`) of completed files; OPTIONS for CORS.
//! It checks URLs with the secret only: nothing is shared with the XMPP side but that.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use crate::config::ConnectionLimits;
use crate::range::{self, Range};
use crate::sign::{inline_type, is_slot_id, Signer, Slot};
use crate::store::{Store, DATA, META, PART};

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Write buffer of an upload (and read chunk of a download).
const CHUNK: usize = 256 * 1024;
/// What a connection over the limits gets (plain HTTP only; over TLS it is just closed).
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\
    Retry-After: 10\r\nConnection: close\r\n\r\n";

pub struct Http {
    pub signer: Signer,
    pub store: Arc<Store>,
    /// Headers must arrive within this; a connection (or an upload's body) with no byte
    /// moving either way for this long is closed.
    pub timeout: Duration,
    pub limits: ConnectionLimits,
}

/// The connections open, in all and per client address.
#[derive(Default)]
struct Connections {
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; counted until dropped.
struct Admitted {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    /// Admits a connection from `ip` within `limits`, or says which limit it is over.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &ConnectionLimits,
    ) -> Result<Admitted, &'static str> {
        let mut open = self.open.lock().expect("connections lock");
        if open.0 >= limits.max {
            return Err("too many connections");
        }
        let mine = open.1.entry(ip).or_default();
        if limits.per_address > 0 && *mine >= limits.per_address {
            return Err("too many connections from this address");
        }
        *mine += 1;
        open.0 += 1;
        Ok(Admitted {
            connections: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().expect("connections lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// Serves connections on `listener` for ever (TLS first when `tls` is given). The accept
/// loop never waits: a connection over the limits is answered 503 (or, over TLS, closed).
pub async fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, http: Arc<Http>) {
    let connections = Arc::new(Connections::default());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match connections.admit(peer.ip(), &http.limits) {
            Ok(a) => a,
            Err(why) => {
                debug!(%peer, why, "connection refused");
                if tls.is_none() {
                    let _ = tcp.try_write(BUSY);
                }
                continue;
            }
        };
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let timeout = http.timeout;
            let busy = Arc::new(AtomicUsize::new(0));
            let handlers = busy.clone();
            let service = service_fn(move |req| {
                let http = http.clone();
                let busy = Busy::new(&handlers);
                async move {
                    let _busy = busy;
                    Ok::<_, Infallible>(http.handle(req).await)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeout);
            let result = match tls {
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let io = IdleIo::new(stream, timeout, busy);
                        builder.serve_connection(TokioIo::new(io), service).await
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                None => {
                    let io = IdleIo::new(tcp, timeout, busy);
                    builder.serve_connection(TokioIo::new(io), service).await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Counts a running request handler of a connection until dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::Relaxed);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection that fails with `TimedOut` when a read or write has waited `idle` with
/// no byte moving either way, unless a request handler is running (an upload's handler
/// times its body itself). This closes connections idle between requests as well as
/// downloads whose reader stopped reading.
struct IdleIo<T> {
    inner: T,
    idle: Duration,
    busy: Arc<AtomicUsize>,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, idle: Duration, busy: Arc<AtomicUsize>) -> IdleIo<T> {
        let last = Instant::now();
        IdleIo {
            inner,
            idle,
            busy,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + idle)),
        }
    }

    fn progress(&mut self) {
        self.last = Instant::now();
    }

    /// For an operation that is pending: an error once the connection idled too long.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        loop {
            let deadline = self.last + self.idle;
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            ready!(self.timer.as_mut().poll(cx));
            if self.busy.load(Ordering::Relaxed) == 0 {
                return Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection idled too long",
                ));
            }
            self.last = Instant::now();
        }
    }

    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        self.check(cx).map(Err)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.progress();
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.progress();
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                self.progress();
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => self.pending(cx),
        }
    }
}

/// Whether an upload that has received `received` bytes after `elapsed` is slower than
/// `min_rate` bytes per second (0: no minimum) allows: after a grace of `grace`, it must
/// have received `min_rate` × (elapsed − grace) bytes.
pub fn too_slow(received: u64, elapsed: Duration, grace: Duration, min_rate: u64) -> bool {
    min_rate > 0
        && elapsed > grace
        && (received as f64) < min_rate as f64 * (elapsed - grace).as_secs_f64()
}

/// The media type of a Content-Type (before any `;`), lower-cased.
fn media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A plain-text error response.
fn error(status: StatusCode, why: &str) -> Response<Body> {
    let mut r = Response::new(full(format!(
        "{} {}: {why}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The slot, tag and name of a request path `.../SLOT/TAG/NAME` (any prefix, so the
/// service can sit under a reverse proxy's path).
struct Target {
    slot: String,
    tag: String,
    name: String,
}

fn target(path: &str) -> Result<Target, (StatusCode, &'static str)> {
    let mut parts = path.rsplitn(4, '/');
    let (Some(name), Some(tag), Some(slot)) = (parts.next(), parts.next(), parts.next()) else {
        return Err((StatusCode::NOT_FOUND, "no such file"));
    };
    if !is_slot_id(slot) {
        return Err((StatusCode::NOT_FOUND, "no such file"));
    }
    let name = percent_decode_str(name)
        .decode_utf8()
        .map_err(|_| (StatusCode::BAD_REQUEST, "the file name is not UTF-8"))?;
    Ok(Target {
        slot: slot.to_owned(),
        tag: tag.to_owned(),
        name: name.into_owned(),
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Http {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let mut resp = match *req.method() {
            Method::OPTIONS => {
                let mut r = Response::new(empty());
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            Method::GET | Method::HEAD => self.get(&req).await,
            Method::PUT => self.put(req).await,
            _ => {
                let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "use GET, HEAD or PUT");
                r.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
                );
                r
            }
        };
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Content-Type, Range"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Content-Length, Content-Range, Accept-Ranges"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        resp
    }

    async fn get(&self, req: &Request<Incoming>) -> Response<Body> {
        let t = match target(req.uri().path()) {
            Ok(t) => t,
            Err((status, why)) => return error(status, why),
        };
        if !self.signer.check_get_tag(&t.slot, &t.name, &t.tag) {
            debug!(slot = %t.slot, "GET with a bad signature");
            return error(StatusCode::FORBIDDEN, "bad signature");
        }
        let dir = self.store.dir(&t.slot);
        let Ok(mut file) = tokio::fs::File::open(dir.join(DATA)).await else {
            return error(StatusCode::NOT_FOUND, "no such file");
        };
        let (Ok(md), Ok(meta)) = (
            file.metadata().await,
            tokio::fs::read_to_string(dir.join(META)).await,
        ) else {
            return error(StatusCode::NOT_FOUND, "no such file");
        };
        let modified = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if self.store.expired(modified, SystemTime::now()) {
            return error(StatusCode::NOT_FOUND, "the file expired");
        }
        let content_type = meta.lines().next().unwrap_or("application/octet-stream");
        let len = md.len();
        let range_header = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok());
        let (status, start, count) = match range::parse(range_header, len) {
            Range::Full => (StatusCode::OK, 0, len),
            Range::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
            Range::Unsatisfiable => {
                let mut r = error(StatusCode::RANGE_NOT_SATISFIABLE, "range outside the file");
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
        };
        let body = if req.method() == Method::HEAD {
            empty()
        } else {
            if start > 0 {
                if let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await {
                    warn!(slot = %t.slot, error = %e, "seek failed");
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file");
                }
            }
            let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), CHUNK);
            StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync()
        };
        debug!(slot = %t.slot, start, count, "GET");
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        let value = |s: &str| HeaderValue::from_str(s).ok();
        if let Some(v) = value(content_type) {
            h.insert(header::CONTENT_TYPE, v);
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if status == StatusCode::PARTIAL_CONTENT {
            if let Some(v) = value(&format!(
                "bytes {start}-{}/{len}",
                start + count.saturating_sub(1)
            )) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        let disposition = if inline_type(content_type) {
            "inline"
        } else {
            "attachment"
        };
        if let Some(v) = value(&format!(
            "{disposition}; filename*=UTF-8''{}",
            utf8_percent_encode(&t.name, NON_ALPHANUMERIC)
        )) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; sandbox"),
        );
        r
    }

    async fn put(&self, req: Request<Incoming>) -> Response<Body> {
        let t = match target(req.uri().path()) {
            Ok(t) => t,
            Err((status, why)) => return error(status, why),
        };
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| {
                Some((
                    k.to_owned(),
                    percent_decode_str(v).decode_utf8().ok()?.into_owned(),
                ))
            })
            .collect();
        let field = |k: &str| query.get(k).map(String::as_str);
        let (Some(size), Some(ct), Some(expires), Some(sig)) = (
            field("size").and_then(|s| s.parse::<u64>().ok()),
            field("type"),
            field("expires").and_then(|s| s.parse::<u64>().ok()),
            field("sig"),
        ) else {
            return error(
                StatusCode::FORBIDDEN,
                "not an upload URL (size, type, expires and sig are needed)",
            );
        };
        let slot = Slot {
            id: t.slot.clone(),
            name: t.name.clone(),
            size,
            content_type: ct.to_owned(),
            expires,
        };
        if !self.signer.check_put_sig(&slot, sig)
            || !self.signer.check_get_tag(&t.slot, &t.name, &t.tag)
        {
            warn!(slot = %t.slot, "PUT with a bad signature");
            return error(StatusCode::FORBIDDEN, "bad signature");
        }
        if now_unix() > expires {
            info!(slot = %t.slot, "PUT after the slot expired");
            return error(StatusCode::FORBIDDEN, "the upload slot expired");
        }
        let length = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match length {
            None => {
                return error(
                    StatusCode::LENGTH_REQUIRED,
                    &format!("Content-Length: {size} is required"),
                )
            }
            Some(l) if l > size => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("this slot is for {size} bytes"),
                )
            }
            Some(l) if l != size => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("this slot is for {size} bytes, not {l}"),
                )
            }
            Some(_) => {}
        }
        // The file is served with the signed type whatever the PUT says: a missing
        // Content-Type is fine, and a slot requested without a type takes any; otherwise
        // the media types (before any `;`) must match.
        let type_ok = slot.content_type.is_empty()
            || match req.headers().get(header::CONTENT_TYPE) {
                None => true,
                Some(v) => v
                    .to_str()
                    .is_ok_and(|v| media_type(v) == media_type(&slot.content_type)),
            };
        if !type_ok {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("this slot is for Content-Type: {}", slot.content_type),
            );
        }
        let Some(_running) = self.store.begin_upload(&t.slot) else {
            return error(StatusCode::CONFLICT, "an upload to this slot is running");
        };
        let dir = self.store.dir(&t.slot);
        if tokio::fs::try_exists(dir.join(DATA)).await.unwrap_or(true) {
            return error(StatusCode::CONFLICT, "this slot was used already");
        }
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            warn!(slot = %t.slot, error = %e, "cannot make the slot's directory");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file");
        }
        let part = dir.join(PART);
        let file = match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part)
            .await
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return error(StatusCode::CONFLICT, "an upload to this slot is running")
            }
            Err(e) => {
                warn!(slot = %t.slot, error = %e, "cannot create the file");
                return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file");
            }
        };
        let mut guard = PartGuard(Some(part.clone()));
        // A PUT that finished between our check and our create_new.
        if tokio::fs::try_exists(dir.join(DATA)).await.unwrap_or(true) {
            return error(StatusCode::CONFLICT, "this slot was used already");
        }
        info!(slot = %t.slot, size, content_type = %content_type_or_any(&slot), "upload starting");
        match self.receive(req.into_body(), file, size).await {
            Ok(()) => {}
            Err((status, why)) => {
                info!(slot = %t.slot, %why, "upload failed");
                return error(status, &why);
            }
        }
        let content_type = match slot.content_type.as_str() {
            "" => "application/octet-stream",
            ct => ct,
        };
        if let Err(e) = finish(&self.store.root, &dir, content_type).await {
            warn!(slot = %t.slot, error = %e, "cannot complete the file");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file");
        }
        guard.0 = None;
        self.store.completed(&t.slot, size);
        info!(slot = %t.slot, size, "upload complete");
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::CREATED;
        r
    }

    /// Streams the body to `file` (exactly `size` bytes) and fsyncs it.
    async fn receive(
        &self,
        mut body: Incoming,
        file: tokio::fs::File,
        size: u64,
    ) -> Result<(), (StatusCode, String)> {
        let internal = |e: std::io::Error| {
            warn!(error = %e, "write failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot store the file".to_owned(),
            )
        };
        let mut out = tokio::io::BufWriter::with_capacity(CHUNK, file);
        let mut written = 0u64;
        let started = Instant::now();
        let too_long = || {
            Err((
                StatusCode::REQUEST_TIMEOUT,
                "the upload took too long".to_owned(),
            ))
        };
        loop {
            let left = self.limits.max_duration.saturating_sub(started.elapsed());
            if left.is_zero() {
                return too_long();
            }
            let wait = self.timeout.min(left);
            let frame = match tokio::time::timeout(wait, body.frame()).await {
                Err(_) if wait < self.timeout => return too_long(),
                Err(_) => {
                    return Err((StatusCode::REQUEST_TIMEOUT, "the upload stalled".to_owned()))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err((StatusCode::BAD_REQUEST, format!("the upload broke: {e}")))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                written += data.len() as u64;
                if written > size {
                    return Err((
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("this slot is for {size} bytes"),
                    ));
                }
                out.write_all(&data).await.map_err(internal)?;
            }
            if written < size
                && too_slow(
                    written,
                    started.elapsed(),
                    self.timeout,
                    self.limits.min_rate,
                )
            {
                return Err((
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the upload is too slow (at least {} bytes a second)",
                        self.limits.min_rate
                    ),
                ));
            }
        }
        if written != size {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("{written} bytes received of {size}"),
            ));
        }
        out.flush().await.map_err(internal)?;
        out.into_inner().sync_all().await.map_err(internal)?;
        Ok(())
    }
}

/// Writes `meta`, then renames the part to `data` and makes both durable, with the slot's
/// directory itself (fsync of the spool `root` that holds it).
async fn finish(root: &Path, dir: &Path, content_type: &str) -> std::io::Result<()> {
    let root = root.to_path_buf();
    let dir = dir.to_path_buf();
    let content_type = content_type.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut meta = std::fs::File::create(dir.join(META))?;
        meta.write_all(format!("{content_type}\n").as_bytes())?;
        meta.sync_all()?;
        std::fs::rename(dir.join(PART), dir.join(DATA))?;
        std::fs::File::open(&dir)?.sync_all()?;
        std::fs::File::open(&root)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}

fn content_type_or_any(slot: &Slot) -> &str {
    match slot.content_type.as_str() {
        "" => "any",
        ct => ct,
    }
}

/// Removes an upload's part (and its directory, if empty) unless disarmed.
struct PartGuard(Option<PathBuf>);

impl Drop for PartGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(&p);
            if let Some(dir) = p.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpSocket, TcpStream};

    const SECRET: &[u8] = b"0123456789abcdef0123";

    struct Server {
        port: u16,
        store: Arc<Store>,
        _tmp: tempfile::TempDir,
    }

    async fn server(limits: ConnectionLimits) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::new(
            tmp.path().to_path_buf(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
        let http = Arc::new(Http {
            signer: Signer::new(SECRET),
            store: store.clone(),
            timeout: Duration::from_millis(300),
            limits,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve(listener, None, http));
        Server {
            port,
            store,
            _tmp: tmp,
        }
    }

    fn slot(size: u64, content_type: &str) -> Slot {
        Slot {
            id: crate::sign::new_slot_id(),
            name: "f.bin".into(),
            size,
            content_type: content_type.into(),
            expires: now_unix() + 60,
        }
    }

    /// `(put, get)` request targets of a slot.
    fn targets(slot: &Slot) -> (String, String) {
        let (put, get) = Signer::new(SECRET).urls("http://h", slot);
        (put[8..].to_owned(), get[8..].to_owned())
    }

    async fn connect_from(ip: &str, port: u16) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(([127, 0, 0, 1], port).into()).await.unwrap()
    }

    /// Sends `head` (and `body`), returns all the server sends until it closes.
    async fn exchange(port: u16, head: &str, body: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut got = vec![];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn put(port: u16, slot: &Slot, content_type: Option<&str>, body: &[u8]) -> String {
        let ct = content_type.map_or(String::new(), |c| format!("Content-Type: {c}\r\n"));
        let head = format!(
            "PUT {} HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: {}\r\n{ct}\r\n",
            targets(slot).0,
            body.len()
        );
        exchange(port, &head, body).await
    }

    async fn get(port: u16, slot: &Slot) -> String {
        let head = format!(
            "GET {} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            targets(slot).1
        );
        exchange(port, &head, b"").await
    }

    #[test]
    fn pace() {
        let s = Duration::from_secs;
        assert!(!too_slow(0, s(5), s(5), 1000));
        assert!(too_slow(999, s(6), s(5), 1000));
        assert!(!too_slow(1000, s(6), s(5), 1000));
        assert!(!too_slow(0, s(600), s(5), 0));
    }

    #[tokio::test]
    async fn content_types() {
        let srv = server(ConnectionLimits::default()).await;
        let png = slot(4, "image/png");
        let r = put(
            srv.port,
            &png,
            Some("Image/PNG; charset=binary"),
            b"\x89PNG",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 201"), "{r}");
        let r = get(srv.port, &png).await;
        assert!(r.contains("content-type: image/png\r\n"), "{r}");
        // No Content-Type: fine.
        let r = put(srv.port, &slot(4, "image/png"), None, b"\x89PNG").await;
        assert!(r.starts_with("HTTP/1.1 201"), "{r}");
        // Another type: refused.
        let r = put(srv.port, &slot(4, "image/png"), Some("text/html"), b"<b/>").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        // A slot asked for without a type takes any and is served as octet-stream.
        let any = slot(4, "");
        let r = put(srv.port, &any, Some("text/html"), b"<b/>").await;
        assert!(r.starts_with("HTTP/1.1 201"), "{r}");
        let r = get(srv.port, &any).await;
        assert!(
            r.contains("content-type: application/octet-stream\r\n"),
            "{r}"
        );
        assert!(r.contains("attachment"), "{r}");
        // Completed uploads count as disk use.
        assert_eq!(srv.store.used(), 12);
    }

    #[tokio::test]
    async fn connection_limits_refuse_without_blocking() {
        let srv = server(ConnectionLimits {
            max: 3,
            per_address: 2,
            ..ConnectionLimits::default()
        })
        .await;
        let a1 = connect_from("127.0.0.1", srv.port).await;
        let _a2 = connect_from("127.0.0.1", srv.port).await;
        let _b1 = connect_from("127.0.0.2", srv.port).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A third from one address, and a fourth in all: 503 at once.
        for ip in ["127.0.0.1", "127.0.0.3"] {
            let mut s = connect_from(ip, srv.port).await;
            let mut got = vec![];
            tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got))
                .await
                .expect("refused at once")
                .unwrap();
            assert!(got.starts_with(b"HTTP/1.1 503"), "{ip}: {got:?}");
        }
        drop(a1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = exchange(
            srv.port,
            "OPTIONS / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            b"",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let srv = server(ConnectionLimits::default()).await;
        let mut s = TcpStream::connect(("127.0.0.1", srv.port)).await.unwrap();
        // A keep-alive connection after its request: closed after the timeout.
        s.write_all(b"OPTIONS / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut got = vec![];
        tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got))
            .await
            .expect("closed")
            .unwrap();
        assert!(got.starts_with(b"HTTP/1.1 204"));
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn a_download_nobody_reads_is_closed() {
        let srv = server(ConnectionLimits {
            per_address: 1,
            ..ConnectionLimits::default()
        })
        .await;
        let big = slot(32 * 1024 * 1024, "application/octet-stream");
        let dir = srv.store.dir(&big.id);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(META), "application/octet-stream\n").unwrap();
        std::fs::write(dir.join(DATA), vec![7u8; big.size as usize]).unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket
            .connect(([127, 0, 0, 1], srv.port).into())
            .await
            .unwrap();
        let head = format!("GET {} HTTP/1.1\r\nHost: h\r\n\r\n", targets(&big).1);
        s.write_all(head.as_bytes()).await.unwrap();
        // While it is open, the address has no connection left.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = exchange(srv.port, "OPTIONS / HTTP/1.1\r\nHost: h\r\n\r\n", b"").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        // Never read: closed after the timeout, and the address may connect again.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let r = exchange(
            srv.port,
            "OPTIONS / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            b"",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
        let mut got = vec![];
        let _ = s.read_to_end(&mut got).await;
        assert!(got.len() < big.size as usize);
    }

    /// PUTs `size` bytes, 100 every 50 ms; returns the answer and when it came.
    async fn trickle(port: u16, slot: &Slot) -> (String, Duration) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let head = format!(
            "PUT {} HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
            targets(slot).0,
            slot.size
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let mut got = vec![0u8; 1024];
        loop {
            assert!(started.elapsed() < Duration::from_secs(5), "never cut");
            let _ = s.write_all(&[1u8; 100]).await;
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(50), s.read(&mut got)).await
            {
                return (
                    String::from_utf8_lossy(&got[..n]).into_owned(),
                    started.elapsed(),
                );
            }
        }
    }

    #[tokio::test]
    async fn slow_uploads_are_cut() {
        // 10 KB/s after the 300 ms grace; this one sends 2 KB/s.
        let srv = server(ConnectionLimits {
            min_rate: 10_000,
            ..ConnectionLimits::default()
        })
        .await;
        let s = slot(100_000, "");
        let (r, took) = trickle(srv.port, &s).await;
        assert!(
            r.starts_with("HTTP/1.1 408") && r.contains("too slow"),
            "{r}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(!srv.store.dir(&s.id).exists());
        // Fast enough but over max-duration.
        let srv = server(ConnectionLimits {
            min_rate: 0,
            max_duration: Duration::from_secs(1),
            ..ConnectionLimits::default()
        })
        .await;
        let (r, took) = trickle(srv.port, &slot(100_000, "")).await;
        assert!(
            r.starts_with("HTTP/1.1 408") && r.contains("too long"),
            "{r}"
        );
        assert!(took >= Duration::from_millis(900), "{took:?}");
    }
}
