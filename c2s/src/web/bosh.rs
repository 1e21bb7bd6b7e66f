//! BOSH (XEP-0124, XEP-0206): a client stream carried by HTTP requests. A BOSH session
//! is the session-outlives-connection case in its purest form: each request may come
//! on a new connection. Like a WebSocket client, a session is an in-process pipe whose
//! other end c2s serves as a client stream (`conn::serve_transport`); here the bytes
//! the client sends arrive in `<body/>` wrappers, in `rid` order, and what c2s writes
//! waits for the next request (or a held one) to carry it.
//!
//! Limits: `hold` 1 (a newer request sends the held one back empty, so `requests` 2
//! are never exceeded), `wait` at most 60 s, 60 s without a request or an answer ends
//! the session, 64 KiB of output waiting for a request (then c2s waits, as for a TCP
//! client that does not read), sessions counted per client address with the HTTP
//! connections (`max-connections-per-address`), a request body at most the stanza
//! limit plus 16 KiB, read within 10 s.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, Notify};
use tracing::{debug, info, Instrument};

use jrs_stream::xml::escape;
use jrs_stream::Stanza;
use jrs_sx::framing::{Outgoing as ToClient, Splitter};
use jrs_sx::Transport;

use super::{Admitted, PIPE_BYTES};
use crate::conn;
use crate::shared::Shared;

pub const NS_HTTPBIND: &str = "http://jabber.org/protocol/httpbind";
const NS_XBOSH: &str = "urn:xmpp:xbosh";
const NS_STREAMS: &str = "http://etherx.jabber.org/streams";

/// Requests a session may have waiting at once (XEP-0124 `requests`): `hold` + 1. A
/// newer request sends the held one back (empty), so a client never holds more.
const REQUESTS: usize = 2;
const HOLD: usize = 1;
const MAX_WAIT: u64 = 60;
/// Without a request (or an answer, which the client follows with its next request)
/// this long, the session ends.
const INACTIVITY: Duration = Duration::from_secs(60);
/// How many rids ahead of the next expected one a request may be (the window).
const WINDOW: u64 = REQUESTS as u64;
/// Rids are below 2^53 (XEP-0124 14.1).
const MAX_RID: u64 = (1 << 53) - 1;
/// What c2s wrote that no answer carried yet, at most: beyond, the session's pipe
/// fills and c2s waits, as for a TCP client that does not read.
const OUT_BYTES: usize = 64 * 1024;

/// Every BOSH session of this c2s process, by sid.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

struct Session {
    sid: String,
    wait: Duration,
    state: Mutex<State>,
    writer: tokio::sync::Mutex<WriteHalf<DuplexStream>>,
    /// `out` has room again (the pump waits for it).
    drained: Notify,
    /// The session counts for its client's address while it lives.
    _admitted: Admitted,
}

#[derive(Default)]
struct State {
    /// The rid the session expects next (everything before it was taken in).
    next_rid: u64,
    /// Request payloads that came ahead of their turn, by rid.
    early: BTreeMap<u64, Vec<u8>>,
    /// Messages c2s wrote that no response has carried yet, and their size.
    out: Vec<String>,
    out_bytes: usize,
    /// Requests waiting for something to carry, oldest first.
    held: VecDeque<(u64, oneshot::Sender<Reply>)>,
    /// c2s ended the stream (after `out` is delivered, the session terminates).
    ended: bool,
    /// The last request, or the last answer.
    last_activity: Option<Instant>,
    /// The answers given to the last few rids, for a client that sends one again.
    answered: VecDeque<(u64, Reply)>,
}

/// What the session makes of a request.
enum Taken {
    /// These bytes (possibly none) go to c2s; the request waits for an answer.
    Payload(Vec<u8>),
    /// A rid still held, sent again (the client lost the connection it came on): the
    /// new request takes its place.
    Again,
}

/// Why a request is not taken in.
enum Refused {
    /// A rid answered before: its answer again.
    Answered(Reply),
    /// The session ends with this condition.
    End(&'static str),
}

/// What a request is answered with.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    fn body(attrs: &str, content: &str) -> Reply {
        Reply {
            status: 200,
            body: format!("<body xmlns='{NS_HTTPBIND}'{attrs}>{content}</body>"),
        }
    }

    fn empty() -> Reply {
        Reply::body("", "")
    }

    pub fn terminate(condition: &str) -> Reply {
        Reply {
            status: if condition == "item-not-found" {
                404
            } else {
                200
            },
            body: format!("<body xmlns='{NS_HTTPBIND}' type='terminate' condition='{condition}'/>"),
        }
    }

    fn is_terminate(&self) -> bool {
        self.body.contains(" type='terminate'")
    }
}

/// Handles one request body; `secure`: the listener counts as encrypted; `admit`
/// counts a new session for the client's address (`None`: over the limit).
pub async fn request(
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
    body: &[u8],
    peer: SocketAddr,
    secure: bool,
    admit: impl FnOnce() -> Option<Admitted>,
) -> Reply {
    let Ok(b) = Stanza::parse_slice(body) else {
        return Reply::terminate("bad-request");
    };
    if b.name() != "body" || b.attr("xmlns").as_deref() != Some(NS_HTTPBIND) {
        return Reply::terminate("bad-request");
    }
    let Some(rid) = b
        .attr("rid")
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|r| *r <= MAX_RID)
    else {
        return Reply::terminate("bad-request");
    };
    match b.attr("sid") {
        None => match admit() {
            Some(admitted) => create(shared, sessions, &b, rid, peer, secure, admitted).await,
            None => Reply::terminate("policy-violation"),
        },
        Some(sid) => {
            let session = sessions.map.lock().expect("bosh lock").get(&sid).cloned();
            match session {
                Some(s) => s.request(sessions, &b, rid).await,
                None => Reply::terminate("item-not-found"),
            }
        }
    }
}

/// A session request (XEP-0124 7.1, XEP-0206 4): a new stream, answered with the
/// session's parameters and the stream's first features.
async fn create(
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
    b: &Stanza<&[u8]>,
    rid: u64,
    peer: SocketAddr,
    secure: bool,
    admitted: Admitted,
) -> Reply {
    let Some(to) = b.attr("to") else {
        return Reply::terminate("improper-addressing");
    };
    if rid == MAX_RID {
        return Reply::terminate("bad-request");
    }
    let wait = b
        .attr("wait")
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(MAX_WAIT)
        .min(MAX_WAIT);
    let sid: String = {
        let mut rng = rand::rng();
        (0..16)
            .map(|_| format!("{:x}", rng.random_range(0..16u8)))
            .collect()
    };
    let (stream_end, bridge_end) = tokio::io::duplex(PIPE_BYTES);
    let (reader, writer) = tokio::io::split(bridge_end);
    let session = Arc::new(Session {
        sid: sid.clone(),
        wait: Duration::from_secs(wait),
        state: Mutex::new(State {
            next_rid: rid + 1,
            last_activity: Some(Instant::now()),
            ..State::default()
        }),
        writer: tokio::sync::Mutex::new(writer),
        drained: Notify::new(),
        _admitted: admitted,
    });
    sessions
        .map
        .lock()
        .expect("bosh lock")
        .insert(sid.clone(), session.clone());
    info!(sid, "BOSH session");
    tokio::spawn(
        conn::serve_transport(shared.clone(), Transport::Web(stream_end), peer, secure)
            .in_current_span(),
    );
    tokio::spawn(pump(session.clone(), sessions.clone(), reader).in_current_span());
    tokio::spawn(watch_inactivity(session.clone(), sessions.clone()).in_current_span());
    let lang = b.attr("xml:lang").unwrap_or_else(|| "en".into());
    let header = format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAMS}' \
         to='{}' version='1.0' xml:lang='{}'>",
        escape(&to),
        escape(&lang)
    );
    if session.write(header.as_bytes()).await.is_err() {
        return Reply::terminate("remote-connection-failed");
    }
    let attrs = format!(
        " sid='{sid}' wait='{wait}' hold='{HOLD}' requests='{REQUESTS}' inactivity='{}' \
         polling='1' ver='1.11' from='{}' xmlns:xmpp='{NS_XBOSH}' xmpp:version='1.0' \
         xmlns:stream='{NS_STREAMS}' xmpp:restartlogic='true'",
        INACTIVITY.as_secs(),
        escape(&to)
    );
    // The answer carries the stream's features (the first element after the header).
    session.respond(rid, attrs, true).await
}

impl Session {
    async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.lock().await.write_all(bytes).await
    }

    async fn request(&self, sessions: &Arc<Sessions>, b: &Stanza<&[u8]>, rid: u64) -> Reply {
        let payload = match self.take_in(b, rid) {
            Ok(Taken::Payload(payload)) => payload,
            Ok(Taken::Again) => vec![],
            Err(Refused::Answered(reply)) => return reply,
            Err(Refused::End(condition)) => {
                self.end(sessions, Reply::terminate(condition)).await;
                return Reply::terminate(condition);
            }
        };
        if !payload.is_empty() && self.write(&payload).await.is_err() {
            return Reply::terminate("remote-connection-failed");
        }
        if b.attr("type").as_deref() == Some("terminate") {
            // XEP-0124 13: the client's own end; requests still held come back empty.
            self.end(sessions, Reply::empty()).await;
            return Reply::body(" type='terminate'", "");
        }
        let restart = b.attr("xmpp:restart").as_deref() == Some("true");
        self.respond(rid, String::new(), restart).await
    }

    /// Takes a request's payload in: what is now in `rid` order, for c2s.
    fn take_in(&self, b: &Stanza<&[u8]>, rid: u64) -> Result<Taken, Refused> {
        let mut st = self.state.lock().expect("bosh session lock");
        st.last_activity = Some(Instant::now());
        if rid < st.next_rid {
            // Sent again (the client lost the connection of the first): if it is still
            // held, the new request takes its place; if answered, the same answer.
            if let Some(i) = st.held.iter().position(|(r, _)| *r == rid) {
                let (_, old) = st.held.remove(i).expect("found");
                let _ = old.send(Reply::empty());
                return Ok(Taken::Again);
            }
            return Err(match st.answered.iter().find(|(r, _)| *r == rid) {
                Some((_, reply)) => Refused::Answered(reply.clone()),
                None => Refused::End("item-not-found"),
            });
        }
        if rid > st.next_rid + WINDOW {
            return Err(Refused::End("item-not-found"));
        }
        let mut payload = b.inner().to_vec();
        if b.attr("xmpp:restart").as_deref() == Some("true") {
            payload = format!(
                "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
                 xmlns:stream='{NS_STREAMS}' to='{}' version='1.0'>",
                escape(&b.attr("to").unwrap_or_default())
            )
            .into_bytes();
        }
        if b.attr("type").as_deref() == Some("terminate") {
            payload.extend_from_slice(b"</stream:stream>");
        }
        // An empty request still tells c2s the client is there (its idle timer).
        if payload.is_empty() {
            payload.push(b' ');
        }
        st.early.insert(rid, payload);
        let mut ready = vec![];
        loop {
            let next = st.next_rid;
            let Some(p) = st.early.remove(&next) else {
                break;
            };
            ready.extend_from_slice(&p);
            st.next_rid += 1;
        }
        Ok(Taken::Payload(ready))
    }

    /// Waits until there is something to send (with `first`, until the features
    /// came), `wait` at most, or until a newer request takes this one's place.
    async fn respond(&self, rid: u64, attrs: String, first: bool) -> Reply {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock().expect("bosh session lock");
            st.held.push_back((rid, tx));
            // One held request at most: the older ones go back now, empty.
            while st.held.len() > HOLD {
                let (r, old) = st.held.pop_front().expect("held");
                let reply = Reply::empty();
                remember(&mut st, r, &reply);
                let _ = old.send(reply);
            }
            if deliver(&mut st) {
                self.drained.notify_one();
            }
        }
        let wait = if first {
            Duration::from_secs(10)
        } else {
            self.wait
        };
        let reply = match tokio::time::timeout(wait, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Reply::empty(),
            Err(_) => {
                let mut st = self.state.lock().expect("bosh session lock");
                st.held.retain(|(r, _)| *r != rid);
                st.last_activity = Some(Instant::now());
                let reply = Reply::empty();
                remember(&mut st, rid, &reply);
                reply
            }
        };
        // The session creation answer: its attributes on the body that carries the
        // features; a stream that ended at once is answered as it ended.
        if attrs.is_empty() || reply.is_terminate() {
            return reply;
        }
        let content = reply
            .body
            .split_once('>')
            .map(|(_, rest)| rest.trim_end_matches("</body>").to_owned())
            .unwrap_or_default();
        Reply::body(&attrs, &content)
    }

    /// Ends the session (c2s sees its client go, as a dropped connection); the
    /// requests still held get `held`.
    async fn end(&self, sessions: &Arc<Sessions>, held: Reply) {
        sessions.map.lock().expect("bosh lock").remove(&self.sid);
        let _ = self.writer.lock().await.shutdown().await;
        let mut st = self.state.lock().expect("bosh session lock");
        st.ended = true;
        for (_, tx) in st.held.drain(..) {
            let _ = tx.send(held.clone());
        }
        self.drained.notify_one();
    }
}

/// Answers the oldest held request with everything queued, if anything is. True if
/// the queue was emptied.
fn deliver(st: &mut State) -> bool {
    if st.out.is_empty() && !st.ended {
        return false;
    }
    let Some((rid, tx)) = st.held.pop_front() else {
        return false;
    };
    let content: String = st.out.drain(..).collect();
    st.out_bytes = 0;
    let reply = if st.ended {
        // XEP-0206 6: `remote-stream-error` only when the stream ended with an error,
        // which the body carries.
        let condition = if content.contains("<stream:error") {
            " condition='remote-stream-error'"
        } else {
            ""
        };
        Reply {
            status: 200,
            body: format!(
                "<body xmlns='{NS_HTTPBIND}' type='terminate'{condition} \
                 xmlns:stream='{NS_STREAMS}'>{content}</body>"
            ),
        }
    } else {
        Reply::body("", &content)
    };
    st.last_activity = Some(Instant::now());
    remember(st, rid, &reply);
    let _ = tx.send(reply);
    true
}

fn remember(st: &mut State, rid: u64, reply: &Reply) {
    st.answered.push_back((rid, reply.clone()));
    while st.answered.len() > REQUESTS + 1 {
        st.answered.pop_front();
    }
}

/// Moves what c2s writes into the session's queue, answering a held request; reads
/// no more while the queue is full.
async fn pump(session: Arc<Session>, sessions: Arc<Sessions>, mut reader: ReadHalf<DuplexStream>) {
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        loop {
            let full = {
                let st = session.state.lock().expect("bosh session lock");
                st.out_bytes >= OUT_BYTES && !st.ended
            };
            if !full {
                break;
            }
            session.drained.notified().await;
        }
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let mut st = session.state.lock().expect("bosh session lock");
        if n == 0 {
            st.ended = true;
        } else {
            splitter.push(&buf[..n]);
            while let Some(m) = splitter.next() {
                match m {
                    // The stream header has no place in BOSH: the session request's
                    // answer stands for it.
                    ToClient::Message(text) if text.starts_with("<open ") => {}
                    ToClient::Message(text) => {
                        st.out_bytes += text.len();
                        st.out.push(text);
                    }
                    ToClient::Close => st.ended = true,
                }
            }
        }
        deliver(&mut st);
        if st.ended {
            drop(st);
            sessions.map.lock().expect("bosh lock").remove(&session.sid);
            debug!(sid = session.sid, "BOSH session ended");
            return;
        }
    }
}

/// Ends a session its client stopped polling for `INACTIVITY`.
async fn watch_inactivity(session: Arc<Session>, sessions: Arc<Sessions>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let idle = {
            let st = session.state.lock().expect("bosh session lock");
            if st.ended {
                return;
            }
            st.held.is_empty() && st.last_activity.is_some_and(|t| t.elapsed() > INACTIVITY)
        };
        if idle {
            debug!(sid = session.sid, "BOSH session inactive: ended");
            session
                .end(&sessions, Reply::terminate("item-not-found"))
                .await;
            return;
        }
    }
}
