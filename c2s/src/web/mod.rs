//! The web edge of c2s: HTTP listeners (`<listen mode="http|https">`) serving the
//! RFC 7395 WebSocket endpoint `/xmpp-websocket`, BOSH (XEP-0206) at `/http-bind` and
//! XEP-0156 discovery (`/.well-known/host-meta`, `/.well-known/host-meta.json`). A web
//! client gets exactly what a TCP client gets above the transport (`websocket`, `bosh`,
//! `framing`).

mod bosh;
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
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::{WebConfig, WebListener};
use crate::shared::Shared;

/// How long a new HTTP connection may take to send its request head (or finish TLS).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

pub const WEBSOCKET_PATH: &str = "/xmpp-websocket";
/// Bytes the pipe between a web transport and its client stream holds before a writer
/// waits.
const PIPE_BYTES: usize = 64 * 1024;
/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
pub const BOSH_PATH: &str = "/http-bind";

/// Binds every web listener; each accepted connection is served on its own task.
pub async fn start(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let web = &shared.config.web;
    let sessions = Arc::new(bosh::Sessions::default());
    let connections = Arc::new(Connections::default());
    // Clients behind trusted proxies, by the address the proxy forwards.
    let forwarded = Arc::new(Connections::default());
    for l in &web.listen {
        let listener = jrs_component::transport::bind_shared(&l.address, l.port)
            .await
            .with_context(|| format!("listening on [{}]:{}", l.address, l.port))?;
        info!(addr = %listener.local_addr()?, https = l.tls, "listening for web clients");
        let (shared, l) = (shared.clone(), l.clone());
        let sessions = sessions.clone();
        let connections = connections.clone();
        let forwarded = forwarded.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = jrs_component::transport::accepting_stopped() => break,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Behind a trusted proxy every client shares its address: they are counted
                // by the address it forwards, when they upgrade or open a BOSH session.
                let limit = if shared.config.web.trusted_proxies.contains(&peer.ip()) {
                    usize::MAX
                } else {
                    shared.config.web.max_connections_per_address
                };
                let Some(admitted) = connections.admit(peer.ip(), limit) else {
                    debug!(%peer, "too many connections from this address: refused");
                    if !l.tls {
                        let _ = tcp.try_write(BUSY);
                    }
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let span = info_span!("web", %peer);
                let admitted = Arc::new(admitted);
                let edge = Edge {
                    shared: shared.clone(),
                    sessions: sessions.clone(),
                    connections: connections.clone(),
                    forwarded: forwarded.clone(),
                };
                // The certificates as now loaded (SIGHUP reloads them).
                let tls = l
                    .tls
                    .then(|| tokio_rustls::TlsAcceptor::from(shared.tls().web));
                let serve = connection(Arc::new(edge), admitted, tcp, peer, tls, l.clone());
                tokio::spawn(serve.instrument(span));
            }
        });
    }
    Ok(())
}

/// What every request of the web listeners shares.
struct Edge {
    shared: Arc<Shared>,
    sessions: Arc<bosh::Sessions>,
    /// Connections (and BOSH sessions) of direct clients, by their address.
    connections: Arc<Connections>,
    /// WebSockets and BOSH sessions of clients behind trusted proxies, counted by the
    /// address the proxy forwards (direct clients are counted by their connections).
    forwarded: Arc<Connections>,
}

impl Edge {
    /// Counts one more connection or BOSH session for a client that came through a
    /// trusted proxy (direct clients are counted by their TCP connection); `None` past
    /// the limit.
    fn admit_forwarded(
        &self,
        client: SocketAddr,
        tcp_peer: SocketAddr,
    ) -> Result<Option<Admitted>, ()> {
        let web = &self.shared.config.web;
        if !web.trusted_proxies.contains(&tcp_peer.ip()) {
            return Ok(None);
        }
        match self
            .forwarded
            .admit(client.ip(), web.max_connections_per_address)
        {
            Some(a) => Ok(Some(a)),
            None => Err(()),
        }
    }
}

/// One HTTP connection (after TLS for https): requests until it closes or upgrades.
async fn connection(
    edge: Arc<Edge>,
    admitted: Arc<Admitted>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: WebListener,
) {
    let service = {
        let listener = listener.clone();
        service_fn(move |req: Request<Incoming>| {
            let (edge, listener) = (edge.clone(), listener.clone());
            // The connection counts for its address until an upgraded WebSocket ends too.
            let admitted = admitted.clone();
            let client = client_address(&edge.shared.config.web, peer, req.headers());
            async move {
                let tcp = TcpPeer {
                    addr: peer,
                    admitted,
                };
                Ok::<_, Infallible>(handle(&edge, tcp, req, client, &listener).await)
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

/// The TCP connection a request came on: its peer (perhaps a proxy) and its place in
/// the count of its address.
struct TcpPeer {
    addr: SocketAddr,
    admitted: Arc<Admitted>,
}

/// One request; `peer` is the client's address (`client_address`).
async fn handle(
    edge: &Arc<Edge>,
    tcp: TcpPeer,
    req: Request<Incoming>,
    peer: SocketAddr,
    listener: &WebListener,
) -> Response<Full<Bytes>> {
    let shared = &edge.shared;
    let web = &shared.config.web;
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, WEBSOCKET_PATH) => {
            let forwarded = match edge.admit_forwarded(peer, tcp.addr) {
                Ok(f) => f,
                Err(()) => {
                    return plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many connections\n".into(),
                    )
                }
            };
            upgrade(
                shared.clone(),
                (tcp.admitted, forwarded),
                req,
                peer,
                listener,
            )
        }
        (&Method::POST | &Method::OPTIONS, BOSH_PATH) => {
            bosh_request(edge, tcp.addr, req, peer, listener).await
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
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            r
        }
        (_, WEBSOCKET_PATH | BOSH_PATH | host_meta::XRD_PATH | host_meta::JSON_PATH) => plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        ),
        _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// The RFC 6455 handshake with the `xmpp` subprotocol (RFC 7395 3.1), then the client
/// is served on the upgraded connection.
fn upgrade(
    shared: Arc<Shared>,
    admitted: (Arc<Admitted>, Option<Admitted>),
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
        return plain(
            StatusCode::UPGRADE_REQUIRED,
            "a WebSocket upgrade is required\n".into(),
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        let mut r = plain(
            StatusCode::BAD_REQUEST,
            "WebSocket version 13 is required\n".into(),
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return plain(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key is missing\n".into(),
        );
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
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("xmpp"),
    );
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    r
}

/// A BOSH request (or its CORS preflight): the body, at most the stanza limit plus
/// 16 KiB, to `bosh::request`; CORS headers for the pages `allowed-origins` lets in.
async fn bosh_request(
    edge: &Arc<Edge>,
    tcp_peer: SocketAddr,
    req: Request<Incoming>,
    peer: SocketAddr,
    listener: &WebListener,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let (shared, sessions) = (&edge.shared, &edge.sessions);
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
        let body = http_body_util::Limited::new(req.into_body(), limit).collect();
        let body = match tokio::time::timeout(BODY_TIMEOUT, body).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large\n".into(),
                )
            }
            Err(_) => {
                return plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body too slow\n".into(),
                )
            }
        };
        let secure = listener.tls || listener.secure;
        // A new session counts for its client's address, as a connection does.
        let admit = || {
            let web = &shared.config.web;
            let counted = if web.trusted_proxies.contains(&tcp_peer.ip()) {
                &edge.forwarded
            } else {
                &edge.connections
            };
            counted.admit(peer.ip(), web.max_connections_per_address)
        };
        let reply = bosh::request(shared, sessions, &body, peer, secure, admit).await;
        let mut r = plain(
            StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK),
            reply.body,
        );
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
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

/// The answer to a connection over the per-address limit (plain HTTP only).
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Live HTTP connections per address.
#[derive(Default)]
pub(super) struct Connections {
    per_address: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One admitted connection: counted until dropped.
pub(super) struct Admitted {
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
        let mut map = self
            .connections
            .per_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // From the right: the entries our proxies added, then the client's. An entry that
    // does not read as an address ends the walk (what is left of it is the client's
    // own claim): the peer stands.
    for entry in entries.iter().rev() {
        let Some(ip) = forwarded_ip(entry) else {
            return peer;
        };
        if !web.trusted_proxies.contains(&ip) {
            return SocketAddr::new(ip, peer.port());
        }
    }
    peer
}

/// An address as proxies write it in `X-Forwarded-For`: `IP`, `IP:PORT`, `[IPv6]` or
/// `[IPv6]:PORT`.
fn forwarded_ip(entry: &str) -> Option<std::net::IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Ok(sa) = entry.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// `allowed-origins`: none configured lets every origin in (non-browser clients send
/// none); else the `Origin` must be one of them.
fn origin_allowed(web: &WebConfig, origin: Option<&str>) -> bool {
    match origin {
        _ if web.allowed_origins.is_empty() => true,
        Some(o) => web
            .allowed_origins
            .iter()
            .any(|a| a.eq_ignore_ascii_case(o)),
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
        headers.insert(
            "x-forwarded-for",
            "198.51.100.1, 203.0.113.7, 10.0.0.2".parse().unwrap(),
        );
        let proxy: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let other: SocketAddr = "192.0.2.9:4000".parse().unwrap();
        // The client is the last address the trusted proxies did not add.
        assert_eq!(
            client_address(&web, proxy, &headers).ip().to_string(),
            "203.0.113.7"
        );
        // From anyone else the header means nothing.
        assert_eq!(client_address(&web, other, &headers), other);
        assert_eq!(client_address(&web, proxy, &hyper::HeaderMap::new()), proxy);
        // Proxies that add ports; an entry that does not read stops the walk.
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.7:5555, [2001:db8::1]:443".parse().unwrap(),
        );
        assert_eq!(
            client_address(&web, proxy, &headers).ip().to_string(),
            "2001:db8::1"
        );
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "198.51.100.1, junk, 10.0.0.2".parse().unwrap(),
        );
        assert_eq!(client_address(&web, proxy, &headers), proxy);
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
