//! `Range: bytes=...` (RFC 9110 14.2), one range only.

/// What to serve of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No usable Range header (absent, another unit, several ranges, bad syntax): the
    /// whole file, 200. RFC 9110 lets a server ignore such a header.
    Full,
    /// Bytes `start..=end`, 206.
    Part { start: u64, end: u64 },
    /// Well-formed but outside the file: 416.
    Unsatisfiable,
}

pub fn parse(header: Option<&str>, len: u64) -> Range {
    let Some(h) = header else {
        return Range::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Range::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Range::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.trim().is_empty(), b.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match num(b) {
            Some(0) => Range::Unsatisfiable,
            Some(n) if len > 0 => Range::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            Some(_) => Range::Unsatisfiable,
            None => Range::Full,
        },
        // bytes=A-
        (false, true) => match num(a) {
            Some(s) if s < len => Range::Part {
                start: s,
                end: len - 1,
            },
            Some(_) => Range::Unsatisfiable,
            None => Range::Full,
        },
        // bytes=A-B
        (false, false) => match (num(a), num(b)) {
            (Some(s), Some(e)) if s > e => Range::Full,
            (Some(s), Some(e)) if s < len => Range::Part {
                start: s,
                end: e.min(len - 1),
            },
            (Some(_), Some(_)) => Range::Unsatisfiable,
            _ => Range::Full,
        },
        (true, true) => Range::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse(None, 10), Range::Full);
        assert_eq!(
            parse(Some("bytes=0-4"), 10),
            Range::Part { start: 0, end: 4 }
        );
        assert_eq!(
            parse(Some("bytes=5-"), 10),
            Range::Part { start: 5, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=-3"), 10),
            Range::Part { start: 7, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=-30"), 10),
            Range::Part { start: 0, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=8-100"), 10),
            Range::Part { start: 8, end: 9 }
        );
        assert_eq!(parse(Some("bytes=10-"), 10), Range::Unsatisfiable);
        assert_eq!(parse(Some("bytes=10-20"), 10), Range::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 10), Range::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-"), 0), Range::Unsatisfiable);
        // Ignored: the whole file.
        assert_eq!(parse(Some("bytes=5-2"), 10), Range::Full);
        assert_eq!(parse(Some("bytes=0-1,3-4"), 10), Range::Full);
        assert_eq!(parse(Some("items=0-1"), 10), Range::Full);
        assert_eq!(parse(Some("bytes=a-b"), 10), Range::Full);
        assert_eq!(parse(Some("bytes=+1-2"), 10), Range::Full);
        assert_eq!(parse(Some("bytes=-"), 10), Range::Full);
    }
}
