//! Time as sm writes it: XEP-0082 UTC timestamps (delays, archives) from the system
//! clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    now_micros() / 1_000_000
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDThh:mm:ssZ` (XEP-0082 DateTime, UTC) for seconds since the epoch.
pub fn stamp(unix: u64) -> String {
    utc(unix as i64 * 1_000_000)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The same with microseconds (`...:ss.uuuuuuZ`), for archive stamps that keep the
/// messages of one second apart in order.
pub fn stamp_micros(micros: u64) -> String {
    utc(micros as i64)
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn utc(micros: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_stamps() {
        assert_eq!(stamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(stamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(stamp(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(stamp(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(
            stamp_micros(1_700_000_000_000_042),
            "2023-11-14T22:13:20.000042Z"
        );
    }
}
