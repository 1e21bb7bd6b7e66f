//! The bench client's BOSH transport (XEP-0124, XEP-0206): a minimal HTTP/1.1 client
//! (keep-alive connections, `POST` with `Content-Length`, at most two requests at once
//! as c2s's `requests='2'` allows) bridged to an in-process pipe, so that
//! [`crate::client::Client`] reads and writes stream bytes over it as over TCP.
//!
//! A kept-alive connection with no request on it is closed after [`SPARE_IDLE`], as a
//! browser's pool closes idle connections (and c2s closes them after 10 s): an idle
//! session keeps one connection, the one its empty request is held on. (Keeping the
//! second one too, 10 000 sessions were 20 000 sockets in the load generator and as
//! many in c2s: the open files limit of both, 20 000 on the bench machine.)
//!
//! The client's stream goes through the client side of `jrs_sx::framing`: its first
//! stream header becomes the session request, each later one a restart request
//! (`xmpp:restart='true'`), the elements it writes the payload of the next request,
//! `</stream:stream>` a `type='terminate'` request. The answers' payloads, in `rid`
//! order, become the server's stream (a stream header is put before the answer to the
//! session request, and into the stream when a restart is sent). Whenever no request is out, an empty one is
//! sent, which c2s holds until it has something to say or `wait` passes: the polling
//! of an idle BOSH client.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use jrs_component::transport::BoxIo;
use jrs_stream::Stanza;
use jrs_sx::framing::{Outgoing, Role, Splitter};

/// The path c2s serves BOSH on.
pub const PATH: &str = "/http-bind";
const NS_HTTPBIND: &str = "http://jabber.org/protocol/httpbind";
const NS_XBOSH: &str = "urn:xmpp:xbosh";
const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
/// The `wait` asked for: how long c2s may hold an empty request.
const WAIT: u64 = 60;
/// Requests out at once (c2s answers `requests='2'`).
const REQUESTS: usize = 2;
/// A kept-alive connection with no request on it this long is closed.
const SPARE_IDLE: Duration = Duration::from_secs(1);

/// Starts a BOSH client for c2s's web listener on loopback `port` and returns the
/// client's end of the stream pipe. The first HTTP connection is opened here.
pub async fn connect(port: u16) -> anyhow::Result<BoxIo> {
    let first = Http::connect(port).await?;
    let (client_end, bridge_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(bridge(port, first, bridge_end));
    Ok(Box::new(client_end))
}

/// One keep-alive HTTP/1.1 connection.
struct Http {
    tcp: TcpStream,
    port: u16,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(port: u16) -> anyhow::Result<Http> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        Ok(Http {
            tcp,
            port,
            buf: Vec::new(),
        })
    }

    /// POSTs `body` to [`PATH`] and returns the response body (200 only).
    async fn post(&mut self, body: &str) -> anyhow::Result<String> {
        let request = format!(
            "POST {PATH} HTTP/1.1\r\nHost: localhost:{}\r\nContent-Type: text/xml; charset=utf-8\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        );
        self.tcp.write_all(request.as_bytes()).await?;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(&self.buf)? {
                let status = response.code.unwrap_or(0);
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .context("a BOSH response without Content-Length")?;
                while self.buf.len() < head + length {
                    self.fill().await?;
                }
                let body = String::from_utf8(self.buf[head..head + length].to_vec())?;
                self.buf.drain(..head + length);
                if status != 200 {
                    bail!("HTTP {status}: {body}");
                }
                return Ok(body);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.tcp.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the HTTP connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// What one request was for, to know what its answer starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The session request or a restart: the answer starts a new server stream.
    Opens,
    Payload,
    Terminate,
}

/// Runs the session until the client's pipe closes, the session ends or an HTTP
/// request fails.
async fn bridge(port: u16, first: Http, pipe: DuplexStream) {
    let (mut pipe_in, mut pipe_out) = tokio::io::split(pipe);
    let mut splitter = Splitter::new(Role::Client);
    // Kept-alive connections with no request on them, and since when.
    let mut idle = vec![(first, Instant::now())];
    let mut out: JoinSet<(u64, Kind, Option<Http>, anyhow::Result<String>)> = JoinSet::new();
    let mut rid: u64 = rand::random::<u32>() as u64;
    let mut deliver_next = rid;
    let mut answers: BTreeMap<u64, (Kind, String)> = BTreeMap::new();
    let mut sid: Option<String> = None;
    // What the client wrote that no request carried yet.
    let mut open = false;
    let mut close = false;
    let mut terminated = false;
    let mut payload = String::new();
    let mut pipe_open = true;
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        // Send what can be sent: the session request alone (the rest needs its sid),
        // then restarts, payloads, the terminate; else one empty request when none is out.
        while out.len() < REQUESTS
            && pipe_open
            && !terminated
            && (sid.is_some() || (open && out.is_empty()))
        {
            let (kind, body) = match &sid {
                None => (
                    Kind::Opens,
                    format!(
                        "<body xmlns='{NS_HTTPBIND}' xmlns:xmpp='{NS_XBOSH}' rid='{rid}' to='localhost' \
                         xml:lang='en' wait='{WAIT}' hold='1' ver='1.11' xmpp:version='1.0' \
                         content='text/xml; charset=utf-8'/>"
                    ),
                ),
                Some(s) if open => (
                    Kind::Opens,
                    format!(
                        "<body xmlns='{NS_HTTPBIND}' xmlns:xmpp='{NS_XBOSH}' rid='{rid}' sid='{s}' \
                         to='localhost' xml:lang='en' xmpp:restart='true'/>"
                    ),
                ),
                Some(s) if !payload.is_empty() || close || out.is_empty() => {
                    let kind = if close { Kind::Terminate } else { Kind::Payload };
                    let t = if close { " type='terminate'" } else { "" };
                    let body = format!(
                        "<body xmlns='{NS_HTTPBIND}' rid='{rid}' sid='{s}'{t}>{}</body>",
                        std::mem::take(&mut payload)
                    );
                    (kind, body)
                }
                Some(_) => break,
            };
            match kind {
                Kind::Opens => {
                    open = false;
                    // The new server stream starts here, whichever answer carries its
                    // features: the two requests out may reach c2s in either order, and
                    // the held one may come back with them (the client sends nothing
                    // before restarting that the server answers).
                    if sid.is_some() {
                        let header = header(sid.as_deref().unwrap_or_default());
                        if pipe_out.write_all(header.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
                Kind::Terminate => terminated = true,
                Kind::Payload => {}
            }
            let this = rid;
            rid += 1;
            let http = idle.pop().map(|(h, _)| h);
            out.spawn(async move {
                let mut http = match http {
                    Some(h) => h,
                    None => match Http::connect(port).await {
                        Ok(h) => h,
                        Err(e) => return (this, kind, None, Err(e)),
                    },
                };
                let mut answer = http.post(&body).await;
                if answer.is_err() {
                    // The connection broke (the server may close a kept-alive one): the
                    // same rid again on a new connection, as XEP-0124 14 lets a client.
                    match Http::connect(port).await {
                        Ok(h) => {
                            http = h;
                            answer = http.post(&body).await;
                        }
                        Err(e) => return (this, kind, None, Err(e)),
                    }
                }
                if std::env::var_os("BENCH_BOSH_DEBUG").is_some() {
                    eprintln!("BOSH {this} >> {body}\n     << {answer:?}");
                }
                (this, kind, Some(http), answer)
            });
            if sid.is_none() || kind == Kind::Terminate {
                break;
            }
        }
        let spare_since = idle.iter().map(|(_, since)| *since).min();
        tokio::select! {
            // The connections idle for SPARE_IDLE are closed.
            _ = tokio::time::sleep_until(spare_since.unwrap_or_else(Instant::now) + SPARE_IDLE),
                if spare_since.is_some() => {
                idle.retain(|(_, since)| since.elapsed() < SPARE_IDLE);
            }
            read = pipe_in.read(&mut buf), if pipe_open && !close && !terminated => {
                match read {
                    Ok(0) | Err(_) => {
                        // The client went without closing its stream: the session is
                        // left to c2s's inactivity timeout, as a vanished browser's.
                        pipe_open = false;
                        if out.is_empty() {
                            return;
                        }
                        continue;
                    }
                    Ok(n) => splitter.push(&buf[..n]),
                }
                while let Some(m) = splitter.next() {
                    match m {
                        Outgoing::Message(m) if m.starts_with("<open ") => open = true,
                        Outgoing::Message(m) => payload.push_str(&m),
                        Outgoing::Close => close = true,
                    }
                }
            }
            Some(done) = out.join_next(), if !out.is_empty() => {
                let Ok((this, kind, http, answer)) = done else { return };
                let answer = match answer {
                    Ok(a) => a,
                    Err(e) => {
                        // (Once the client is gone, as the bench stops the server, not
                        // worth a line.)
                        if pipe_open {
                            eprintln!("BOSH request {this} failed: {e:#}");
                        }
                        return;
                    }
                };
                if let Some(http) = http {
                    idle.push((http, Instant::now()));
                }
                answers.insert(this, (kind, answer));
                while let Some((_, answer)) = answers.remove(&deliver_next) {
                    deliver_next += 1;
                    let Ok(b) = Stanza::parse_slice(answer.as_bytes()) else { return };
                    let mut stream = Vec::new();
                    let created = sid.is_none();
                    if let Some(s) = b.attr("sid").filter(|_| created) {
                        // The session request's answer: the first server stream.
                        stream.extend_from_slice(header(&s).as_bytes());
                        sid = Some(s);
                    }
                    stream.extend_from_slice(b.inner());
                    let ended = b.attr("type").as_deref() == Some("terminate");
                    if ended {
                        stream.extend_from_slice(b"</stream:stream>");
                    }
                    if pipe_open && pipe_out.write_all(&stream).await.is_err() {
                        pipe_open = false;
                    }
                    if ended || sid.is_none() {
                        let _ = pipe_out.shutdown().await;
                        return;
                    }
                }
                if !pipe_open && out.is_empty() {
                    return;
                }
            }
        }
    }
}

/// The server's stream header as the client's reader expects it.
fn header(sid: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAMS}' \
         from='localhost' id='{sid}' version='1.0'>"
    )
}
