//! Failed logins per address, shared by every stream of the process: past the limit an
//! address gets `temporary-auth-failure` until its window passes.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
