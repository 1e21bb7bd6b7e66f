//! The SOCKS5 side: connections wait, keyed by their DST.ADDR, until the initiator's
//! activation pairs the two with that key; then bytes are relayed both ways, within the
//! user's bandwidth, until either side closes or the stream idles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::socks;

/// Relay buffer per direction.
const BUFFER: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// Bytes per second per user (0: none).
    pub bandwidth: u64,
    pub streams_per_user: usize,
    pub max_connections: usize,
    pub idle: Duration,
    pub pending: Duration,
}

struct Waiting {
    id: u64,
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

struct User {
    streams: usize,
    bucket: Arc<Bucket>,
}

pub struct Relay {
    limits: RelayLimits,
    waiting: Mutex<HashMap<String, Vec<Waiting>>>,
    users: Mutex<HashMap<String, User>>,
    connections: Arc<Semaphore>,
    next_id: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Activation {
    Started,
    /// Not both sides connected with that address.
    NotFound,
    /// The user relays as many streams as allowed.
    TooMany,
}

impl Relay {
    pub fn new(limits: RelayLimits) -> Arc<Relay> {
        Arc::new(Relay {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            waiting: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Accepts SOCKS5 connections for ever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                debug!(%peer, "too many connections; refused");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(self.clone().connection(tcp, peer, permit));
        }
    }

    async fn connection(
        self: Arc<Self>,
        mut tcp: TcpStream,
        peer: std::net::SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let addr = match tokio::time::timeout(self.limits.pending, socks::handshake(&mut tcp)).await
        {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                debug!(%peer, "SOCKS5 handshake failed: {e:#}");
                return;
            }
            Err(_) => {
                debug!(%peer, "SOCKS5 handshake timed out");
                return;
            }
        };
        let full = self
            .waiting
            .lock()
            .expect("waiting lock")
            .get(&addr)
            .is_some_and(|w| w.len() >= 2);
        if full {
            let _ = tcp
                .write_all(&socks::reply(socks::NOT_ALLOWED, &addr))
                .await;
            debug!(%peer, "a third connection for one stream refused");
            return;
        }
        if tcp
            .write_all(&socks::reply(socks::SUCCEEDED, &addr))
            .await
            .is_err()
        {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut waiting = self.waiting.lock().expect("waiting lock");
            let entry = waiting.entry(addr.clone()).or_default();
            if entry.len() >= 2 {
                return;
            }
            entry.push(Waiting {
                id,
                stream: tcp,
                _permit: permit,
            });
        }
        debug!(%peer, stream = &addr[..8], "waiting for activation");
        // Not activated in time: closed.
        let relay = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(relay.limits.pending).await;
            let mut waiting = relay.waiting.lock().expect("waiting lock");
            if let Some(entry) = waiting.get_mut(&addr) {
                entry.retain(|w| w.id != id);
                if entry.is_empty() {
                    waiting.remove(&addr);
                }
            }
        });
    }

    /// The initiator `user` (a bare JID) activates the stream with address `addr`.
    pub fn activate(self: &Arc<Self>, addr: &str, user: &str) -> Activation {
        let rate = {
            let mut users = self.users.lock().expect("users lock");
            if users
                .get(user)
                .is_some_and(|u| u.streams >= self.limits.streams_per_user)
            {
                return Activation::TooMany;
            }
            let pair = {
                let mut waiting = self.waiting.lock().expect("waiting lock");
                match waiting.get(addr) {
                    Some(w) if w.len() == 2 => waiting.remove(addr),
                    _ => None,
                }
            };
            let Some(mut pair) = pair else {
                return Activation::NotFound;
            };
            let u = users.entry(user.to_owned()).or_insert_with(|| User {
                streams: 0,
                bucket: Arc::new(Bucket::new(self.limits.bandwidth)),
            });
            u.streams += 1;
            let b = pair.pop().expect("two");
            let a = pair.pop().expect("two");
            let relay = self.clone();
            let bucket = u.bucket.clone();
            let rate = bucket.rate;
            let (addr, user) = (addr.to_owned(), user.to_owned());
            tokio::spawn(async move {
                let started = Instant::now();
                let (ab, ba) = pipe(a.stream, b.stream, &bucket, relay.limits.idle).await;
                info!(stream = &addr[..8], %user, bytes = ab + ba, secs = started.elapsed().as_secs_f64(), "stream closed");
                let mut users = relay.users.lock().expect("users lock");
                if let Some(u) = users.get_mut(&user) {
                    u.streams -= 1;
                    if u.streams == 0 {
                        users.remove(&user);
                    }
                }
                drop((a._permit, b._permit));
            });
            rate
        };
        debug!(stream = &addr[..8], user, rate, "activated");
        Activation::Started
    }

    #[cfg(test)]
    fn waiting_count(&self) -> usize {
        self.waiting.lock().unwrap().values().map(Vec::len).sum()
    }
}

/// Relays both ways until both directions ended; returns the bytes each way.
async fn pipe(a: TcpStream, b: TcpStream, bucket: &Bucket, idle: Duration) -> (u64, u64) {
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let activity = Activity {
        start,
        last: &last,
        idle,
    };
    tokio::join!(
        copy(ar, bw, bucket, &activity),
        copy(br, aw, bucket, &activity)
    )
}

/// When the stream last moved, shared by both directions.
struct Activity<'a> {
    start: Instant,
    last: &'a AtomicU64,
    idle: Duration,
}

impl Activity<'_> {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

async fn copy(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    bucket: &Bucket,
    activity: &Activity<'_>,
) -> u64 {
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = match tokio::time::timeout(activity.idle, from.read(&mut buf)).await {
            Err(_) if activity.idle_for() >= activity.idle => break,
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
        };
        activity.touch();
        let wait = bucket.take(n as u64);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        match tokio::time::timeout(activity.idle, to.write_all(&buf[..n])).await {
            Ok(Ok(())) => total += n as u64,
            _ => break,
        }
        activity.touch();
    }
    let _ = to.shutdown().await;
    total
}

/// A token bucket of `rate` bytes per second holding at most one second's worth; a
/// take beyond what it holds is a debt the caller waits off.
pub struct Bucket {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(rate: u64) -> Bucket {
        Bucket {
            rate,
            state: Mutex::new((rate as f64, Instant::now())),
        }
    }

    /// Takes `n` bytes; returns how long to wait before sending them.
    pub fn take(&self, n: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate as f64;
        let mut s = self.state.lock().expect("bucket lock");
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * rate;
        s.0 = (s.0 + refill).min(rate) - n as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces() {
        let b = Bucket::new(1000);
        assert_eq!(b.take(1000), Duration::ZERO);
        let w = b.take(500);
        assert!(
            w > Duration::from_millis(400) && w <= Duration::from_millis(500),
            "{w:?}"
        );
        assert_eq!(Bucket::new(0).take(u64::MAX), Duration::ZERO);
    }

    async fn socks_connect(port: u16, addr: &str) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&[5, 1, 0]).await.unwrap();
        let mut m = [0u8; 2];
        s.read_exact(&mut m).await.unwrap();
        assert_eq!(m, [5, 0]);
        let mut req = vec![5, 1, 0, 3, addr.len() as u8];
        req.extend_from_slice(addr.as_bytes());
        req.extend_from_slice(&[0, 0]);
        s.write_all(&req).await.unwrap();
        let mut r = vec![0u8; 47];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(r, socks::reply(socks::SUCCEEDED, addr));
        s
    }

    #[tokio::test]
    async fn pairs_relays_and_limits() {
        let relay = Relay::new(RelayLimits {
            bandwidth: 0,
            streams_per_user: 1,
            max_connections: 10,
            idle: Duration::from_secs(5),
            pending: Duration::from_secs(5),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(relay.clone().serve(listener));
        let addr = "0123456789abcdef0123456789abcdef01234567";
        let mut target = socks_connect(port, addr).await;
        assert_eq!(relay.activate(addr, "a@localhost"), Activation::NotFound);
        let mut initiator = socks_connect(port, addr).await;
        while relay.waiting_count() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(relay.activate(addr, "a@localhost"), Activation::Started);
        // One stream per user here.
        let other = "1123456789abcdef0123456789abcdef01234567";
        let _t2 = socks_connect(port, other).await;
        let _i2 = socks_connect(port, other).await;
        while relay.waiting_count() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(relay.activate(other, "a@localhost"), Activation::TooMany);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        initiator.write_all(&data).await.unwrap();
        initiator.shutdown().await.unwrap();
        let mut got = vec![];
        target.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        drop(target);
        // The first stream ended: the user may start another.
        let mut tries = 0;
        while relay.activate(other, "a@localhost") == Activation::TooMany {
            tries += 1;
            assert!(tries < 200);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
