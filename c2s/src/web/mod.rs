//! The web edge of c2s: HTTP listeners (`<listen mode="http|https">`) serving the
//! RFC 7395 WebSocket endpoint `/xmpp-websocket`, BOSH (XEP-0206) at `/http-bind` and
//! XEP-0156 discovery (`/.well-known/host-meta`, `/.well-known/host-meta.json`). A web
//! client gets exactly what a TCP client gets above the transport (`websocket`, `bosh`,
//! `framing`).

mod bosh;
mod framing;
mod host_meta;
mod websocket;

use std::convert::Infallible;
use std::net::SocketAddr;
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
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::{WebConfig, WebListener};
use crate::shared::Shared;

/// How long a new HTTP connection may take to send its request head (or finish TLS).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

pub const WEBSOCKET_PATH: &str = "/xmpp-websocket";
pub const BOSH_PATH: &str = "/http-bind";

/// Binds every web listener; each accepted connection is served on its own task.
pub async fn start(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let web = &shared.config.web;
    let tls = if web.listen.iter().any(|l| l.tls) {
        Some(tokio_rustls::TlsAcceptor::from(shared.tls.web.clone()))
    } else {
        None
    };
    let sessions = Arc::new(bosh::Sessions::default());
    let connections = Arc::new(Connections::default());
    for l in &web.listen {
        let listener = TcpListener::bind((l.address.as_str(), l.port))
            .await
            .with_context(|| format!("listening on [{}]:{}", l.address, l.port))?;
        info!(addr = %listener.local_addr()?, https = l.tls, "listening for web clients");
        let (shared, tls, l) = (shared.clone(), tls.clone().filter(|_| l.tls), l.clone());
        let sessions = sessions.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(admitted) = connections.admit(peer.ip(), shared.config.web.max_connections_per_address) else {
                    debug!(%peer, "too many connections from this address: refused");
                    if tls.is_none() {
                        let _ = tcp.try_write(BUSY);
                    }
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let span = info_span!("web", %peer);
                let admitted = Arc::new(admitted);
                let serve = connection(shared.clone(), sessions.clone(), admitted, tcp, peer, tls.clone(), l.clone());
                tokio::spawn(serve.instrument(span));
            }
        });
    }
    Ok(())
}

/// One HTTP connection (after TLS for https): requests until it closes or upgrades.
async fn connection(
    shared: Arc<Shared>,
    sessions: Arc<bosh::Sessions>,
    admitted: Arc<Admitted>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: WebListener,
) {
    let service = {
        let shared = shared.clone();
        let listener = listener.clone();
        service_fn(move |req: Request<Incoming>| {
            let (shared, listener, sessions) = (shared.clone(), listener.clone(), sessions.clone());
            // The connection counts for its address until an upgraded WebSocket ends too.
            let admitted = admitted.clone();
            let peer = client_address(&shared.config.web, peer, req.headers());
            async move {
                Ok::<_, Infallible>(handle(shared, sessions, admitted, req, peer, &listener).await)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(64 * 1024);
    let result = match tls {
        Some(acceptor) => match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => {
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await
            }
            Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
            Err(_) => return debug!("TLS handshake timed out"),
        },
        None => {
            builder
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP connection ended");
    }
}

async fn handle(
    shared: Arc<Shared>,
    sessions: Arc<bosh::Sessions>,
    admitted: Arc<Admitted>,
    req: Request<Incoming>,
    peer: SocketAddr,
    listener: &WebListener,
) -> Response<Full<Bytes>> {
    let web = &shared.config.web;
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, WEBSOCKET_PATH) => upgrade(shared.clone(), admitted, req, peer, listener),
        (&Method::POST | &Method::OPTIONS, BOSH_PATH) => {
            bosh_request(&shared, &sessions, req, peer, listener).await
        }
        (&Method::GET | &Method::HEAD, host_meta::XRD_PATH | host_meta::JSON_PATH) => {
            let base = web.base_url.clone().unwrap_or_else(|| {
                let host = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("localhost");
                format!("{}://{host}", if listener.tls { "https" } else { "http" })
            });
            let (body, kind) = if path == host_meta::JSON_PATH {
                (host_meta::json(&base), "application/json")
            } else {
                (host_meta::xrd(&base), "application/xrd+xml")
            };
            let mut r = plain(StatusCode::OK, body);
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
            // XEP-0156 3.2: web clients of other origins read it.
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
            r
        }
        (_, WEBSOCKET_PATH | BOSH_PATH | host_meta::XRD_PATH | host_meta::JSON_PATH) => {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// The RFC 6455 handshake with the `xmpp` subprotocol (RFC 7395 3.1), then the client
/// is served on the upgraded connection.
fn upgrade(
    shared: Arc<Shared>,
    admitted: Arc<Admitted>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    listener: &WebListener,
) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return plain(StatusCode::UPGRADE_REQUIRED, "a WebSocket upgrade is required\n".into());
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).and_then(|v| v.to_str().ok()) != Some("13") {
        let mut r = plain(StatusCode::BAD_REQUEST, "WebSocket version 13 is required\n".into());
        r.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return plain(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing\n".into());
    };
    if !has_token(header::SEC_WEBSOCKET_PROTOCOL, "xmpp") {
        return plain(
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol 'xmpp' is required (RFC 7395)\n".into(),
        );
    }
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if !origin_allowed(&shared.config.web, origin) {
        debug!(origin, "WebSocket from an origin not allowed");
        return plain(StatusCode::FORBIDDEN, "origin not allowed\n".into());
    }
    let secure = listener.tls || listener.secure;
    let limit = shared.config.limits.max_stanza_bytes;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(
        async move {
            let _admitted = admitted;
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = TokioIo::new(upgraded);
                    let ws = WebSocketStream::from_raw_socket(
                        io,
                        Role::Server,
                        Some(websocket::config(limit)),
                    )
                    .await;
                    debug!("WebSocket client");
                    websocket::serve(shared, ws, peer, secure).await;
                }
                Err(e) => debug!(error = %e, "WebSocket upgrade failed"),
            }
        }
        .in_current_span(),
    );
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("xmpp"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    r
}

/// A BOSH request (or its CORS preflight): the body, at most the stanza limit plus
/// 16 KiB, to `bosh::request`; CORS headers for the pages `allowed-origins` lets in.
async fn bosh_request(
    shared: &Arc<Shared>,
    sessions: &Arc<bosh::Sessions>,
    req: Request<Incoming>,
    peer: SocketAddr,
    listener: &WebListener,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    if !origin_allowed(&shared.config.web, origin.as_deref()) {
        return plain(StatusCode::FORBIDDEN, "origin not allowed\n".into());
    }
    let mut r = if req.method() == Method::OPTIONS {
        plain(StatusCode::OK, String::new())
    } else {
        let limit = shared.config.limits.max_stanza_bytes + 16 * 1024;
        let body = match http_body_util::Limited::new(req.into_body(), limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n".into()),
        };
        let secure = listener.tls || listener.secure;
        let reply = bosh::request(shared, sessions, &body, peer, secure).await;
        let mut r = plain(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK), reply.body);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/xml; charset=utf-8"),
        );
        r
    };
    let h = r.headers_mut();
    let allow = origin
        .and_then(|o| HeaderValue::from_str(&o).ok())
        .unwrap_or(HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("Content-Type"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    r
}

/// The answer to a connection over the per-address limit (plain HTTP only).
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Live HTTP connections per address.
#[derive(Default)]
struct Connections {
    per_address: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One admitted connection: counted until dropped.
struct Admitted {
    connections: Arc<Connections>,
    ip: std::net::IpAddr,
}

impl Connections {
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<Admitted> {
        let mut map = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Admitted {
            connections: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut map = self.connections.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the last
/// address in `X-Forwarded-For` that is not one of the trusted proxies (the list grows
/// by one address per proxy, the client's first).
fn client_address(web: &WebConfig, peer: SocketAddr, headers: &hyper::HeaderMap) -> SocketAddr {
    if !web.trusted_proxies.contains(&peer.ip()) {
        return peer;
    }
    let forwarded: Vec<std::net::IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    match forwarded.iter().rev().find(|a| !web.trusted_proxies.contains(a)) {
        Some(ip) => SocketAddr::new(*ip, peer.port()),
        None => peer,
    }
}

/// `allowed-origins`: none configured lets every origin in (non-browser clients send
/// none); else the `Origin` must be one of them.
fn origin_allowed(web: &WebConfig, origin: Option<&str>) -> bool {
    match origin {
        _ if web.allowed_origins.is_empty() => true,
        Some(o) => web.allowed_origins.iter().any(|a| a.eq_ignore_ascii_case(o)),
        None => true,
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_addresses_only_from_trusted_proxies() {
        let web = WebConfig {
            trusted_proxies: vec!["127.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
            ..WebConfig::default()
        };
        let mut headers = hyper::HeaderMap::new();
        headers.insert("x-forwarded-for", "198.51.100.1, 203.0.113.7, 10.0.0.2".parse().unwrap());
        let proxy: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let other: SocketAddr = "192.0.2.9:4000".parse().unwrap();
        // The client is the last address the trusted proxies did not add.
        assert_eq!(client_address(&web, proxy, &headers).ip().to_string(), "203.0.113.7");
        // From anyone else the header means nothing.
        assert_eq!(client_address(&web, other, &headers), other);
        assert_eq!(client_address(&web, proxy, &hyper::HeaderMap::new()), proxy);
    }

    #[test]
    fn connections_per_address_are_counted_until_dropped() {
        let c = Arc::new(Connections::default());
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let a = c.admit(ip, 2).unwrap();
        let b = c.admit(ip, 2).unwrap();
        assert!(c.admit(ip, 2).is_none());
        assert!(c.admit("192.0.2.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(c.admit(ip, 2).is_some());
        drop(b);
    }
}
