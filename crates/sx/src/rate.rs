//! The byte rate a peer may send at.

use std::time::{Duration, Instant};

/// A token bucket: `rate` bytes per second sustained, bursts of four seconds' worth.
pub struct ByteRate {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl ByteRate {
    pub fn new(rate: u32) -> ByteRate {
        let rate = rate.max(1) as f64;
        ByteRate {
            rate,
            tokens: rate * 4.0,
            last: Instant::now(),
        }
    }

    /// Takes `bytes`; returns how long to pause reading so the rate holds.
    pub fn take(&mut self, bytes: usize) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate * 4.0);
        self.last = now;
        self.tokens -= bytes as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
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
}
