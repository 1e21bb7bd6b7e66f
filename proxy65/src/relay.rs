//! The SOCKS5 side: connections wait, keyed by their DST.ADDR, until the initiator's
//! activation pairs the two with that key; then bytes are relayed both ways, within the
//! user's bandwidth, until either side closes or the stream idles.

use std::collections::HashMap;
use std::net::IpAddr;
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
    /// Connections at once in the handshake or waiting for activation.
    pub max_waiting: usize,
    /// Of those, from one client address.
    pub per_address: usize,
    /// Streams relayed at once (two connections each).
    pub max_streams: usize,
    /// The SOCKS5 handshake must be done within this.
    pub handshake: Duration,
    pub idle: Duration,
    /// A connection not activated within this (after its handshake) is closed.
    pub pending: Duration,
}

/// A connection's place among the waiting ones (in all and for its address), held from
/// its accept until its activation or close.
struct WaitSlot {
    _permit: OwnedSemaphorePermit,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let mut m = self.per_address.lock().expect("address lock");
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

struct Waiting {
    id: u64,
    /// `None` while its SUCCEEDED reply is being written (the place is reserved).
    stream: Option<TcpStream>,
    _slot: WaitSlot,
}

struct User {
    streams: usize,
    bucket: Arc<Bucket>,
}

pub struct Relay {
    limits: RelayLimits,
    waiting: Mutex<HashMap<String, Vec<Waiting>>>,
    users: Mutex<HashMap<String, User>>,
    waiting_slots: Arc<Semaphore>,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    streams: Arc<Semaphore>,
    next_id: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Activation {
    Started,
    /// Not both sides connected with that address.
    NotFound,
    /// The user relays as many streams as allowed.
    TooMany,
    /// The proxy relays as many streams as it may.
    Busy,
}

impl Relay {
    pub fn new(limits: RelayLimits) -> Arc<Relay> {
        Arc::new(Relay {
            waiting_slots: Arc::new(Semaphore::new(limits.max_waiting)),
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            limits,
            waiting: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            per_address: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
        })
    }

    /// A place for a new connection from `ip`, if the limits allow.
    fn wait_slot(&self, ip: IpAddr) -> Result<WaitSlot, &'static str> {
        let mut m = self.per_address.lock().expect("address lock");
        let n = m.entry(ip).or_default();
        if *n >= self.limits.per_address {
            return Err("too many connections from this address");
        }
        let Ok(permit) = self.waiting_slots.clone().try_acquire_owned() else {
            if *n == 0 {
                m.remove(&ip);
            }
            return Err("too many connections waiting");
        };
        *n += 1;
        Ok(WaitSlot {
            _permit: permit,
            per_address: self.per_address.clone(),
            ip,
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
            let slot = match self.wait_slot(peer.ip()) {
                Ok(s) => s,
                Err(why) => {
                    debug!(%peer, why, "refused");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(self.clone().connection(tcp, peer, slot));
        }
    }

    async fn connection(
        self: Arc<Self>,
        mut tcp: TcpStream,
        peer: std::net::SocketAddr,
        slot: WaitSlot,
    ) {
        let addr =
            match tokio::time::timeout(self.limits.handshake, socks::handshake(&mut tcp)).await {
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The place is taken under the lock before SUCCEEDED is sent: a third
        // connection for the stream is refused, never told SUCCEEDED.
        let placed = {
            let mut waiting = self.waiting.lock().expect("waiting lock");
            let entry = waiting.entry(addr.clone()).or_default();
            if entry.len() >= 2 {
                false
            } else {
                entry.push(Waiting {
                    id,
                    stream: None,
                    _slot: slot,
                });
                true
            }
        };
        if !placed {
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
            self.forget(&addr, id);
            return;
        }
        {
            let mut waiting = self.waiting.lock().expect("waiting lock");
            if let Some(w) = waiting
                .get_mut(&addr)
                .and_then(|e| e.iter_mut().find(|w| w.id == id))
            {
                w.stream = Some(tcp);
            }
        }
        debug!(%peer, stream = &addr[..8], "waiting for activation");
        // Not activated in time: closed.
        tokio::time::sleep(self.limits.pending).await;
        self.forget(&addr, id);
    }

    /// Drops the waiting connection `id` of the stream `addr`, if it still waits.
    fn forget(&self, addr: &str, id: u64) {
        let mut waiting = self.waiting.lock().expect("waiting lock");
        if let Some(entry) = waiting.get_mut(addr) {
            entry.retain(|w| w.id != id);
            if entry.is_empty() {
                waiting.remove(addr);
            }
        }
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
            let (pair, permit) = {
                let mut waiting = self.waiting.lock().expect("waiting lock");
                match waiting.get(addr) {
                    Some(w) if w.len() == 2 && w.iter().all(|w| w.stream.is_some()) => {
                        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
                            return Activation::Busy;
                        };
                        (waiting.remove(addr), permit)
                    }
                    _ => return Activation::NotFound,
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
            // Their waiting places are given back here; the stream holds `permit`.
            let b = pair.pop().and_then(|w| w.stream).expect("two");
            let a = pair.pop().and_then(|w| w.stream).expect("two");
            let relay = self.clone();
            let bucket = u.bucket.clone();
            let rate = bucket.rate;
            let (addr, user) = (addr.to_owned(), user.to_owned());
            tokio::spawn(async move {
                let started = Instant::now();
                let active = jrs_metrics::GaugeGuard::new(&crate::STREAMS.active);
                let (ab, ba) = pipe(a, b, &bucket, relay.limits.idle).await;
                drop(active);
                crate::STREAMS.relayed(ab + ba);
                info!(stream = &addr[..8], %user, bytes = ab + ba, secs = started.elapsed().as_secs_f64(), "stream closed");
                let mut users = relay.users.lock().expect("users lock");
                if let Some(u) = users.get_mut(&user) {
                    u.streams -= 1;
                    if u.streams == 0 {
                        users.remove(&user);
                    }
                }
                drop(permit);
            });
            rate
        };
        debug!(stream = &addr[..8], user, rate, "activated");
        Activation::Started
    }

    #[cfg(test)]
    fn waiting_count(&self) -> usize {
        self.waiting
            .lock()
            .unwrap()
            .values()
            .flatten()
            .filter(|w| w.stream.is_some())
            .count()
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
        // Waiting for the bandwidth is activity: touched while it lasts, so that the
        // other direction is not closed as idle meanwhile.
        let mut wait = bucket.take(n as u64);
        let step = (activity.idle / 2).max(Duration::from_millis(1));
        while !wait.is_zero() {
            let s = wait.min(step);
            tokio::time::sleep(s).await;
            activity.touch();
            wait -= s;
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

    fn limits() -> RelayLimits {
        RelayLimits {
            bandwidth: 0,
            streams_per_user: 10,
            max_waiting: 10,
            per_address: 10,
            max_streams: 10,
            handshake: Duration::from_secs(5),
            idle: Duration::from_secs(5),
            pending: Duration::from_secs(5),
        }
    }

    async fn start(limits: RelayLimits) -> (Arc<Relay>, u16) {
        let relay = Relay::new(limits);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(relay.clone().serve(listener));
        (relay, port)
    }

    async fn connect_from(ip: &str, port: u16) -> TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(([127, 0, 0, 1], port).into()).await.unwrap()
    }

    /// Whether the proxy closes `s` within `within` (without sending anything).
    async fn closed(s: &mut TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(within, s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// The SOCKS5 handshake; returns the connection and the reply code.
    async fn socks_try(port: u16, addr: &str) -> (TcpStream, u8) {
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
        let code = r[1];
        (s, code)
    }

    async fn wait_for(relay: &Relay, n: usize) {
        while relay.waiting_count() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn third_connection_is_refused_not_told_succeeded() {
        let (relay, port) = start(limits()).await;
        let addr = "2123456789abcdef0123456789abcdef01234567";
        let mut target = socks_connect(port, addr).await;
        let mut initiator = socks_connect(port, addr).await;
        let (mut third, code) = socks_try(port, addr).await;
        assert_eq!(code, socks::NOT_ALLOWED);
        assert!(closed(&mut third, Duration::from_secs(2)).await);
        wait_for(&relay, 2).await;
        assert_eq!(relay.activate(addr, "a@localhost"), Activation::Started);
        initiator.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        target.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn waiting_connections_are_limited() {
        let (relay, port) = start(RelayLimits {
            per_address: 2,
            max_waiting: 3,
            max_streams: 1,
            handshake: Duration::from_millis(300),
            ..limits()
        })
        .await;
        // Per address: two from 127.0.0.1, the third closed at once.
        let mut a1 = connect_from("127.0.0.1", port).await;
        let _a2 = connect_from("127.0.0.1", port).await;
        let mut a3 = connect_from("127.0.0.1", port).await;
        assert!(closed(&mut a3, Duration::from_millis(200)).await);
        // In all: three waiting, the fourth closed at once.
        let _b1 = connect_from("127.0.0.2", port).await;
        let mut c1 = connect_from("127.0.0.3", port).await;
        assert!(closed(&mut c1, Duration::from_millis(200)).await);
        // Silent connections are closed after the handshake timeout, freeing places.
        assert!(closed(&mut a1, Duration::from_secs(2)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Relaying streams have a limit of their own, and free their waiting places.
        let one = "3123456789abcdef0123456789abcdef01234567";
        let two = "4123456789abcdef0123456789abcdef01234567";
        let _s1 = socks_connect(port, one).await;
        let _s2 = socks_connect(port, one).await;
        wait_for(&relay, 2).await;
        assert_eq!(relay.activate(one, "a@localhost"), Activation::Started);
        let _s3 = socks_connect(port, two).await;
        let _s4 = socks_connect(port, two).await;
        wait_for(&relay, 2).await;
        assert_eq!(relay.activate(two, "b@localhost"), Activation::Busy);
    }

    #[tokio::test]
    async fn a_throttled_direction_keeps_the_other_open() {
        // 10 KB/s: 40 KB take three seconds, ten times the idle time.
        let (relay, port) = start(RelayLimits {
            bandwidth: 10_000,
            idle: Duration::from_millis(300),
            ..limits()
        })
        .await;
        let addr = "5123456789abcdef0123456789abcdef01234567";
        let mut target = socks_connect(port, addr).await;
        let mut initiator = socks_connect(port, addr).await;
        wait_for(&relay, 2).await;
        assert_eq!(relay.activate(addr, "a@localhost"), Activation::Started);
        let data = vec![9u8; 40_000];
        initiator.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        target.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data);
        // The quiet direction is still open.
        target.write_all(b"thanks").await.unwrap();
        let mut reply = [0u8; 6];
        initiator.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"thanks");
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
        let (relay, port) = start(RelayLimits {
            streams_per_user: 1,
            ..limits()
        })
        .await;
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
