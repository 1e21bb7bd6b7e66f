//! The HTTP(S) side: PUT of a signed slot, streamed to `data.part` and renamed to
//! `data` after fsync; GET and HEAD (with `Range`) of completed files; OPTIONS for CORS.
//! It checks URLs with the secret only: nothing is shared with the XMPP side but that.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::range::{self, Range};
use crate::sign::{inline_type, is_slot_id, normalize_content_type, Signer, Slot};
use crate::store::{Store, DATA, META, PART};

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;
/// Write buffer of an upload (and read chunk of a download).
const CHUNK: usize = 256 * 1024;

pub struct Http {
    pub signer: Signer,
    pub store: Arc<Store>,
    /// Headers, and each read of an upload's body, must arrive within this.
    pub timeout: Duration,
}

/// Serves connections on `listener` for ever (TLS first when `tls` is given).
pub async fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, http: Arc<Http>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let timeout = http.timeout;
            let service = service_fn(move |req| {
                let http = http.clone();
                async move { Ok::<_, Infallible>(http.handle(req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeout);
            let result = match tls {
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
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
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
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
        let sent_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(normalize_content_type);
        let type_ok = match &sent_type {
            Some(s) => *s == slot.content_type,
            None => slot.content_type == "application/octet-stream",
        };
        if !type_ok {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("this slot is for Content-Type: {}", slot.content_type),
            );
        }
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
        info!(slot = %t.slot, size, content_type = %slot.content_type, "upload starting");
        match self.receive(req.into_body(), file, size).await {
            Ok(()) => {}
            Err((status, why)) => {
                info!(slot = %t.slot, %why, "upload failed");
                return error(status, &why);
            }
        }
        if let Err(e) = finish(&dir, &slot.content_type).await {
            warn!(slot = %t.slot, error = %e, "cannot complete the file");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file");
        }
        guard.0 = None;
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
        loop {
            let frame = match tokio::time::timeout(self.timeout, body.frame()).await {
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

/// Writes `meta`, then renames the part to `data` and makes both durable.
async fn finish(dir: &Path, content_type: &str) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    let content_type = content_type.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut meta = std::fs::File::create(dir.join(META))?;
        meta.write_all(format!("{content_type}\n").as_bytes())?;
        meta.sync_all()?;
        std::fs::rename(dir.join(PART), dir.join(DATA))?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
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
