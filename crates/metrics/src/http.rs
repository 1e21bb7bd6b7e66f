//! The `/metrics` listener: HTTP/1.1, `GET` (or `HEAD`) `/metrics` only (any other path
//! 404, any other method 405), request heads of 16 KiB at most and read within 10 s,
//! request bodies never read, a few connections at a time.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::MetricsConfig;

/// How long a connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open (keep-alive included).
const CONNECTION_LIMIT: Duration = Duration::from_secs(120);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// Bytes of request head read at most (hyper's smallest buffer is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;

pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Registers the process metrics (once) and starts serving `/metrics` where `config`
/// says. Fails when the address cannot be bound. Returns the bound address.
pub async fn serve(config: &MetricsConfig) -> anyhow::Result<std::net::SocketAddr> {
    static PROCESS: AtomicBool = AtomicBool::new(false);
    if !PROCESS.swap(true, Ordering::Relaxed) {
        crate::register_collector(Box::new(crate::process::ProcessCollector));
    }
    let listener = TcpListener::bind((config.address.as_str(), config.port))
        .await
        .with_context(|| format!("metrics: listening on [{}]:{}", config.address, config.port))?;
    let addr = listener.local_addr()?;
    info!(%addr, "serving metrics on /metrics");
    tokio::spawn(accept(listener));
    Ok(addr)
}

async fn accept(listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: too many connections; closed");
            continue;
        };
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES);
            let conn = builder.serve_connection(TokioIo::new(tcp), service_fn(handle));
            match tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics: connection ended"),
                Err(_) => debug!(%peer, "metrics: connection open too long; closed"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(answer(req.method(), req.uri().path(), req.headers()))
}

/// The answer to a request (its body is never read).
pub fn answer(method: &Method, path: &str, headers: &hyper::HeaderMap) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    // Prometheus asks for OpenMetrics first when it may; anyone else gets the classic
    // text format.
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = crate::encode(openmetrics);
    let mut r = Response::new(Full::new(if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(body)
    }));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if openmetrics {
            OPENMETRICS_TEXT
        } else {
            PROMETHEUS_TEXT
        }),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics() {
        let none = hyper::HeaderMap::new();
        assert_eq!(
            answer(&Method::GET, "/", &none).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(&Method::GET, "/metricsx", &none).status(),
            StatusCode::NOT_FOUND
        );
        let post = answer(&Method::POST, "/metrics", &none);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        let get = answer(&Method::GET, "/metrics", &none);
        assert_eq!(get.status(), StatusCode::OK);
        assert_eq!(get.headers()[header::CONTENT_TYPE], PROMETHEUS_TEXT);
        let mut om = hyper::HeaderMap::new();
        om.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        );
        let get = answer(&Method::GET, "/metrics", &om);
        assert_eq!(get.headers()[header::CONTENT_TYPE], OPENMETRICS_TEXT);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let counter = crate::counter("jabberd_test_things", "Things.");
        counter.inc();
        let addr = serve(&MetricsConfig {
            address: "127.0.0.1".into(),
            port: free_port(),
        })
        .await
        .unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("jabberd_test_things_total 1\n"), "{out}");
        assert!(out.contains("process_resident_memory_bytes "), "{out}");
        // A head past the limit is refused, not buffered.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let big = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let _ = s.write_all(big.as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(!out.contains("200 OK"), "{out}");
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
