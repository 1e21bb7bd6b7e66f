//! BOSH (XEP-0124, XEP-0206): a client stream carried by HTTP requests. A BOSH session
//! is the session-outlives-connection case in its purest form: each request may come
//! on a new connection. Like a WebSocket client, a session is an in-process pipe whose
//! other end c2s serves as a client stream (`conn::serve_transport`); here the bytes
//! the client sends arrive in `<body/>` wrappers, in `rid` order, and what c2s writes
//! waits for the next request (or a held one) to carry it.
//!
//! Limits: `hold` 1 (a newer request sends the held one back empty) and `requests` 2,
//! or for a polling session (the client asked for `hold='0'` or `wait='0'`) `hold` 0
//! and `requests` 1; a client with more requests out than `requests`, or sending empty
//! requests faster than `polling` (1 s) allows, ends its session with
//! `policy-violation` (XEP-0124 11, 12); `wait` at most 60 s, 60 s without a request
//! or an answer ends the session, 64 KiB of output waiting for a request (then c2s
//! waits, as for a TCP client that does not read), sessions counted per client address
//! with the HTTP connections (`max-connections-per-address`), a request body at most
//! the stanza limit plus 16 KiB, read within 10 s.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
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

/// Requests held at once (`hold`) in a session that is not a polling one; a client may
/// have one more out (`requests`).
const HOLD: usize = 1;
const MAX_WAIT: u64 = 60;
/// Without a request (or an answer, which the client follows with its next request)
/// this long, the session ends.
const INACTIVITY: Duration = Duration::from_secs(60);
/// The shortest interval between empty requests (`polling`, XEP-0124 11 and 12).
const POLLING: Duration = Duration::from_secs(1);
/// Rids are below 2^53 (XEP-0124 14.1).
const MAX_RID: u64 = (1 << 53) - 1;
/// What c2s wrote that no answer carried yet, at most: beyond, the session's pipe
/// fills and c2s waits, as for a TCP client that does not read.
const OUT_BYTES: usize = 64 * 1024;
/// Answers kept for rids sent again.
const ANSWERS_KEPT: usize = 3;
/// The pump's read buffer (what c2s writes for the client; an element may span reads):
/// small, as c2s's reads of its TCP clients, for it is kept by every idle session.
const PUMP_READ: usize = 1024;

/// Every BOSH session of this c2s process, by sid.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

struct Session {
    sid: String,
    wait: Duration,
    /// Requests held at once: [`HOLD`], none in a polling session.
    hold: usize,
    /// Requests the client may have out at once (XEP-0124 `requests`): `hold` + 1.
    requests: usize,
    state: Mutex<State>,
    writer: tokio::sync::Mutex<WriteHalf<DuplexStream>>,
    /// `out` has room again (the pump waits for it).
    drained: Notify,
    /// `next_rid` moved on, or the session ended: requests waiting for their turn look
    /// again.
    advanced: Notify,
    /// The session counts for its client's address while it lives.
    _admitted: Admitted,
}

#[derive(Default)]
struct State {
    /// The rid the session expects next (everything before it was taken in).
    next_rid: u64,
    /// The highest rid received: only its request may be held.
    highest: u64,
    /// Payloads received and not taken in yet, by rid: the next one until its request
    /// passes it to c2s, the ones that came ahead of their turn.
    early: ByRid<Vec<u8>>,
    /// Messages c2s wrote that no response has carried yet, and their size.
    out: Vec<String>,
    out_bytes: usize,
    /// Requests waiting for something to carry, by rid.
    held: VecDeque<(u64, oneshot::Sender<Reply>)>,
    /// The session ended: c2s ended the stream (after `out` is delivered, the session
    /// terminates), or the client, a limit or the inactivity timeout ended it.
    ended: bool,
    /// What requests still out get once the session ended (else a terminate body).
    closing: Option<Reply>,
    /// The last request, or the last answer.
    last_activity: Option<Instant>,
    /// The answers given to the last few rids, for a client that sends one again.
    answered: VecDeque<(u64, Reply)>,
    /// Requests received and not answered yet, by rid.
    unanswered: ByRid<Out>,
    /// The last new request, when it was empty and no answer to it carried anything
    /// (yet): its rid and arrival (polling sessions, XEP-0124 12).
    last_empty: Option<(u64, Instant)>,
}

/// A few values by rid (at most `requests` and the rids sent again), in rid order: a
/// `Vec` (a `BTreeMap` keeps a 400-byte node for every session, even empty).
struct ByRid<V>(Vec<(u64, V)>);

impl<V> Default for ByRid<V> {
    fn default() -> Self {
        ByRid(Vec::new())
    }
}

impl<V> ByRid<V> {
    fn find(&self, rid: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&rid, |(r, _)| *r)
    }

    fn contains(&self, rid: u64) -> bool {
        self.find(rid).is_ok()
    }

    fn get_mut(&mut self, rid: u64) -> Option<&mut V> {
        let i = self.find(rid).ok()?;
        Some(&mut self.0[i].1)
    }

    /// The value for `rid`, made with `make` if there is none.
    fn get_or_insert_with(&mut self, rid: u64, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(rid) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (rid, make()));
                i
            }
        };
        &mut self.0[i].1
    }

    fn remove(&mut self, rid: u64) -> Option<V> {
        let i = self.find(rid).ok()?;
        Some(self.0.remove(i).1)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn last(&self) -> Option<&(u64, V)> {
        self.0.last()
    }
}

/// A request received and not answered yet.
struct Out {
    /// The HTTP requests that carry it (one sent again while the first is still out
    /// counts once).
    copies: usize,
    arrived: Instant,
}

impl Session {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a request to an existing session carries, read from its body.
struct Request {
    rid: u64,
    /// For c2s: the payloads, or the stream header of a restart, with the stream's end
    /// for a terminate; a space for an empty request (it still tells c2s the client
    /// is there: its idle timer).
    payload: Vec<u8>,
    terminate: bool,
    restart: bool,
    /// No payloads, no restart, no terminate: a poll.
    empty: bool,
}

impl Request {
    fn read(b: &Stanza<&[u8]>, rid: u64) -> Request {
        let terminate = b.attr("type").as_deref() == Some("terminate");
        let restart = b.attr("xmpp:restart").as_deref() == Some("true");
        let inner = b.inner();
        let empty = !terminate && !restart && inner.iter().all(u8::is_ascii_whitespace);
        let mut payload = jrs_sx::framing::bosh_to_stream(
            terminate,
            restart,
            &b.attr("to").unwrap_or_default(),
            inner,
        );
        if payload.is_empty() {
            payload.push(b' ');
        }
        Request {
            rid,
            payload,
            terminate,
            restart,
            empty,
        }
    }
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
    // What the body asks for, read before anything waits (the body is not kept).
    let asked = {
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
            None => match Creation::read(&b) {
                Some(creation) => Ok((creation, rid)),
                None => return Reply::terminate("improper-addressing"),
            },
            Some(sid) => Err((sid, Request::read(&b, rid))),
        }
    };
    match asked {
        Ok((creation, rid)) => match admit() {
            Some(admitted) => create(shared, sessions, creation, rid, peer, secure, admitted).await,
            None => Reply::terminate("policy-violation"),
        },
        Err((sid, request)) => {
            let session = sessions.map.lock().expect("bosh lock").get(&sid).cloned();
            match session {
                Some(s) => s.request(sessions, request).await,
                None => Reply::terminate("item-not-found"),
            }
        }
    }
}

/// What a session request asks for.
struct Creation {
    to: String,
    lang: String,
    wait: u64,
    hold: Option<u64>,
}

impl Creation {
    /// `None` without a `to`.
    fn read(b: &Stanza<&[u8]>) -> Option<Creation> {
        Some(Creation {
            to: b.attr("to")?,
            lang: b.attr("xml:lang").unwrap_or_else(|| "en".into()),
            wait: b
                .attr("wait")
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(MAX_WAIT)
                .min(MAX_WAIT),
            hold: b.attr("hold").and_then(|h| h.parse::<u64>().ok()),
        })
    }
}

/// A session request (XEP-0124 7.1, XEP-0206 4): a new stream, answered with the
/// session's parameters and the stream's first features.
async fn create(
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
    asked: Creation,
    rid: u64,
    peer: SocketAddr,
    secure: bool,
    admitted: Admitted,
) -> Reply {
    if rid == MAX_RID {
        return Reply::terminate("bad-request");
    }
    let wait = asked.wait;
    // XEP-0124 12: a client that asks for `hold='0'` or `wait='0'` polls; `hold` is at
    // most the client's (7.2).
    let hold = if asked.hold == Some(0) || wait == 0 {
        0
    } else {
        HOLD
    };
    let requests = hold + 1;
    let sid: String = {
        let mut rng = rand::rng();
        (0..16)
            .map(|_| format!("{:x}", rng.random_range(0..16u8)))
            .collect()
    };
    let (stream_end, bridge_end) = tokio::io::duplex(PIPE_BYTES);
    let (reader, writer) = tokio::io::split(bridge_end);
    let now = Instant::now();
    let session = Arc::new(Session {
        sid: sid.clone(),
        wait: Duration::from_secs(wait),
        hold,
        requests,
        state: Mutex::new(State {
            next_rid: rid + 1,
            highest: rid,
            last_activity: Some(now),
            ..State::default()
        }),
        writer: tokio::sync::Mutex::new(writer),
        drained: Notify::new(),
        advanced: Notify::new(),
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
    let header = format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAMS}' \
         to='{}' version='1.0' xml:lang='{}'>",
        escape(&asked.to),
        escape(&asked.lang)
    );
    if session.write(header.as_bytes()).await.is_err() {
        return Reply::terminate("remote-connection-failed");
    }
    let attrs = format!(
        " sid='{sid}' wait='{wait}' hold='{hold}' requests='{requests}' inactivity='{}' \
         polling='{}' ver='1.11' from='{}' xmlns:xmpp='{NS_XBOSH}' xmpp:version='1.0' \
         xmlns:stream='{NS_STREAMS}' xmpp:restartlogic='true'",
        INACTIVITY.as_secs(),
        POLLING.as_secs(),
        escape(&asked.to)
    );
    // The answer carries the stream's features (the first element after the header).
    session.respond(rid, attrs, true).await
}

/// A request received and not answered yet: counted in `State::unanswered` while it
/// lives (its answer is written after).
struct Unanswered<'a> {
    session: &'a Session,
    rid: u64,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let mut st = self.session.state();
        if let Some(out) = st.unanswered.get_mut(self.rid) {
            out.copies -= 1;
            if out.copies == 0 {
                st.unanswered.remove(self.rid);
            }
        }
    }
}

impl Session {
    async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.lock().await.write_all(bytes).await
    }

    async fn request(&self, sessions: &Arc<Sessions>, mut request: Request) -> Reply {
        let rid = request.rid;
        let _unanswered = match self.admit(&mut request) {
            Ok(()) => Unanswered { session: self, rid },
            Err(Refused::Answered(reply)) => return reply,
            Err(Refused::End(condition)) => {
                debug!(
                    sid = self.sid,
                    rid, condition, "BOSH request refused: session ended"
                );
                let reply = Reply::terminate(condition);
                self.end(sessions, reply.clone()).await;
                return reply;
            }
        };
        if let Err(reply) = self.take_in(rid).await {
            return reply;
        }
        if request.terminate {
            // XEP-0124 13: the client's own end; requests still out come back empty.
            self.end(sessions, Reply::empty()).await;
            return Reply::body(" type='terminate'", "");
        }
        self.respond(rid, String::new(), request.restart).await
    }

    /// Lets a request in: a new one (its payload kept for its turn), or one sent again
    /// while the first is still out (XEP-0124 14.3: it takes the first one's place). A
    /// rid answered before gets the same answer; one outside the window, or a client
    /// overactive, ends the session.
    fn admit(&self, request: &mut Request) -> Result<(), Refused> {
        let mut st = self.state();
        let now = Instant::now();
        st.last_activity = Some(now);
        let rid = request.rid;
        let again = if rid < st.next_rid {
            if st.held.iter().any(|(r, _)| *r == rid) {
                true
            } else if let Some((_, reply)) = st.answered.iter().find(|(r, _)| *r == rid) {
                return Err(Refused::Answered(reply.clone()));
            } else if st.unanswered.contains(rid) {
                true
            } else {
                return Err(Refused::End("item-not-found"));
            }
        } else if rid >= st.next_rid + self.requests as u64 {
            // XEP-0124 14.2: the window is `requests` rids from the next expected one.
            return Err(Refused::End("item-not-found"));
        } else {
            st.early.contains(rid)
        };
        if !again {
            if self.overactive(&st, request, now) {
                info!(
                    sid = self.sid,
                    rid,
                    out = st.unanswered.len(),
                    "BOSH client overactive: session ended (policy-violation)"
                );
                return Err(Refused::End("policy-violation"));
            }
            st.last_empty = request.empty.then_some((rid, now));
            st.highest = st.highest.max(rid);
            let payload = std::mem::take(&mut request.payload);
            *st.early.get_or_insert_with(rid, Vec::new) = payload;
        }
        st.unanswered
            .get_or_insert_with(rid, || Out {
                copies: 0,
                arrived: now,
            })
            .copies += 1;
        Ok(())
    }

    /// XEP-0124 11 (Overactivity) and 12 (Polling Sessions), for a new request (not a
    /// rid sent again) while `st.unanswered` are out.
    fn overactive(&self, st: &State, request: &Request, now: Instant) -> bool {
        let out = st.unanswered.len() + 1;
        // 11: no more than `requests` at once, one more if it terminates the session.
        // (Or pauses it: no `maxpause` is offered, so a `pause` has no such room.)
        if out > self.requests + usize::from(request.terminate) {
            return true;
        }
        let within = |a: Instant, b: Instant| a.max(b).duration_since(a.min(b)) < POLLING;
        if self.hold == 0 {
            // 12: two empty requests in a row within `polling`, the answer to the first
            // carrying nothing.
            return request.empty && st.last_empty.is_some_and(|(_, t)| within(t, now));
        }
        // 11: `requests` requests out and none answered, the last one empty, the last
        // two within `polling`. Two requests out at once may arrive in either order:
        // "the last" is taken as this one only when it is also the last in the
        // client's order (the highest rid), so that no client is ended for requests
        // the network reordered.
        if !request.empty || out != self.requests {
            return false;
        }
        st.unanswered
            .last()
            .is_some_and(|(rid, o)| *rid < request.rid && within(o.arrived, now))
    }

    /// Waits for the request's turn (the requests before it taken in), then passes
    /// what is now in rid order to c2s. `Err`: the answer (the session ended, or
    /// c2s's end of the pipe is gone).
    async fn take_in(&self, rid: u64) -> Result<(), Reply> {
        loop {
            let advanced = self.advanced.notified();
            {
                let st = self.state();
                if st.next_rid > rid {
                    return Ok(());
                }
                if st.ended {
                    return Err(closing(&st));
                }
                if st.next_rid == rid {
                    break;
                }
            }
            advanced.await;
        }
        // Under the writer's lock, so that payloads reach c2s in the order taken.
        let mut writer = self.writer.lock().await;
        let ready = {
            let mut st = self.state();
            let mut ready = vec![];
            loop {
                let next = st.next_rid;
                let Some(p) = st.early.remove(next) else {
                    break;
                };
                ready.extend_from_slice(&p);
                st.next_rid += 1;
            }
            ready
        };
        self.advanced.notify_waiters();
        if !ready.is_empty() && writer.write_all(&ready).await.is_err() {
            return Err(Reply::terminate("remote-connection-failed"));
        }
        Ok(())
    }

    /// Waits until there is something to send (with `first`, until the features
    /// came), `wait` at most, or until a newer request takes this one's place.
    async fn respond(&self, rid: u64, attrs: String, first: bool) -> Reply {
        let (tx, mut rx) = oneshot::channel();
        {
            let mut st = self.state();
            // Sent again while held (the client lost the connection it came on): the new
            // request takes the held one's place.
            if let Some(i) = st.held.iter().position(|(r, _)| *r == rid) {
                let (_, old) = st.held.remove(i).expect("found");
                let _ = old.send(Reply::empty());
            }
            let at = st.held.partition_point(|(r, _)| *r < rid);
            st.held.insert(at, (rid, tx));
            if deliver(&mut st) {
                self.drained.notify_one();
            }
            // `hold` held at most, and only the newest request (the client has a newer
            // one out: this one's answer must not wait, the client reads answers in rid
            // order): the others go back now, empty. A polling session holds none, but
            // for the features of a new stream.
            let hold = if first { self.hold.max(1) } else { self.hold };
            while let Some((r, _)) = st.held.front() {
                if st.held.len() <= hold && *r >= st.highest {
                    break;
                }
                let (r, old) = st.held.pop_front().expect("held");
                let reply = Reply::empty();
                remember(&mut st, r, &reply);
                let _ = old.send(reply);
            }
        }
        let wait = if first {
            Duration::from_secs(10)
        } else {
            self.wait
        };
        let reply = match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Reply::empty(),
            Err(_) => {
                rx.close();
                match rx.try_recv() {
                    // Answered as the time ran out.
                    Ok(reply) => reply,
                    Err(_) => {
                        let mut st = self.state();
                        st.held.retain(|(r, tx)| !(*r == rid && tx.is_closed()));
                        st.last_activity = Some(Instant::now());
                        let reply = Reply::empty();
                        remember(&mut st, rid, &reply);
                        reply
                    }
                }
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
    /// requests still out get `reply`.
    async fn end(&self, sessions: &Arc<Sessions>, reply: Reply) {
        sessions.map.lock().expect("bosh lock").remove(&self.sid);
        {
            let mut st = self.state();
            st.ended = true;
            for (_, tx) in st.held.drain(..) {
                let _ = tx.send(reply.clone());
            }
            st.closing = Some(reply);
        }
        self.advanced.notify_waiters();
        self.drained.notify_one();
        // After what was taken in: c2s reads it before the end.
        let _ = self.writer.lock().await.shutdown().await;
    }
}

/// What a request gets from a session that ended.
fn closing(st: &State) -> Reply {
    st.closing
        .clone()
        .unwrap_or_else(|| Reply::terminate("item-not-found"))
}

/// Answers the held request with the lowest rid with everything queued, if anything
/// is. True if the queue was emptied.
fn deliver(st: &mut State) -> bool {
    if st.out.is_empty() && !st.ended {
        return false;
    }
    let Some((rid, tx)) = st.held.pop_front() else {
        return false;
    };
    let content: String = st.out.drain(..).collect();
    st.out_bytes = 0;
    let reply = match &st.closing {
        Some(reply) if st.ended => reply.clone(),
        _ if st.ended => {
            // XEP-0206 6: `remote-stream-error` only when the stream ended with an
            // error, which the body carries.
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
        }
        _ => Reply::body("", &content),
    };
    if !content.is_empty() && st.last_empty.is_some_and(|(r, _)| r == rid) {
        st.last_empty = None;
    }
    st.last_activity = Some(Instant::now());
    remember(st, rid, &reply);
    let _ = tx.send(reply);
    true
}

fn remember(st: &mut State, rid: u64, reply: &Reply) {
    st.answered.push_back((rid, reply.clone()));
    while st.answered.len() > ANSWERS_KEPT {
        st.answered.pop_front();
    }
}

/// Moves what c2s writes into the session's queue, answering a held request; reads
/// no more while the queue is full.
async fn pump(session: Arc<Session>, sessions: Arc<Sessions>, mut reader: ReadHalf<DuplexStream>) {
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; PUMP_READ];
    loop {
        loop {
            let full = {
                let st = session.state();
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
        let mut st = session.state();
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
            session.advanced.notify_waiters();
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
            let st = session.state();
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
