//! Per-connection byte rate limit and per-address authentication failure limit.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: `rate` bytes per second sustained, bursts of four seconds' worth.
pub struct ByteRate {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl ByteRate {
    pub fn new(rate: u32) -> ByteRate {
        ByteRate {
            rate: rate as f64,
            tokens: rate as f64 * 4.0,
            last: Instant::now(),
        }
    }

    /// Takes `bytes`; returns how long to pause reading so the rate holds.
    pub fn take(&mut self, bytes: usize) -> Option<Duration> {
        let now = Instant::now();
        let burst = self.rate * 4.0;
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(burst);
        self.last = now;
        self.tokens -= bytes as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Failed logins per address within a sliding window.
pub struct AuthFailures {
    max: u32,
    window: Duration,
    by_addr: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

/// Addresses remembered at most; the oldest are forgotten first.
const MAX_ADDRESSES: usize = 100_000;

impl AuthFailures {
    pub fn new(max: u32, window: Duration) -> AuthFailures {
        AuthFailures {
            max,
            window,
            by_addr: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `addr` may try to authenticate now.
    pub fn allowed(&self, addr: IpAddr) -> bool {
        let mut map = self.by_addr.lock().expect("auth failures lock");
        let now = Instant::now();
        match map.get_mut(&addr) {
            Some(times) => {
                while times
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > self.window)
                {
                    times.pop_front();
                }
                (times.len() as u32) < self.max
            }
            None => true,
        }
    }

    pub fn record(&self, addr: IpAddr) {
        let mut map = self.by_addr.lock().expect("auth failures lock");
        if map.len() >= MAX_ADDRESSES {
            let now = Instant::now();
            map.retain(|_, t| {
                t.back()
                    .is_some_and(|last| now.duration_since(*last) <= self.window)
            });
        }
        map.entry(addr).or_default().push_back(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_bursts_then_paces() {
        let mut r = ByteRate::new(1000);
        assert!(r.take(3000).is_none());
        let pause = r.take(2000).unwrap();
        assert!(
            pause > Duration::from_millis(900) && pause < Duration::from_millis(1100),
            "{pause:?}"
        );
    }

    #[test]
    fn failures_block_after_the_maximum() {
        let f = AuthFailures::new(2, Duration::from_secs(60));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(f.allowed(a));
        f.record(a);
        f.record(a);
        assert!(!f.allowed(a));
        assert!(f.allowed("127.0.0.2".parse().unwrap()));
    }
}
