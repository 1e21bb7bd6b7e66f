//! `stream`: the framer (crates/stream/src/framer.rs) over a byte stream cut into reads
//! of any size, through both of its interfaces, then what every edge does with the
//! frames: the stream header read (`StreamHeader::parse`), each element checked
//! (`validate_stanza`) and its head read (`Stanza::parse`).

use jrs_stream::validate::validate_stanza;
use jrs_stream::{Frame, Limits, Stanza, StreamHeader};

use crate::support::{choice, frames, frames_by_range};

/// The first byte picks the read size (1 to 64 bytes, or all at once) and the limits
/// (small ones, so that the fuzzer reaches them, or the defaults).
pub fn run(data: &[u8]) {
    let (c, input) = choice(data);
    let chunk = match c & 0x3f {
        0 => input.len(),
        n => n as usize,
    };
    let limits = if c & 0x40 == 0 {
        Limits {
            max_stanza_bytes: 512,
            max_depth: 8,
        }
    } else {
        Limits::default()
    };
    let (by_frame, error) = frames(limits, input, chunk);
    // Both interfaces cut the same frames and stop at the same point.
    let (by_range, range_error) = frames_by_range(limits, input, chunk);
    assert_eq!(by_frame, by_range, "next_frame and next_range disagree");
    assert_eq!(
        error.as_ref().map(|e| e.condition),
        range_error.as_ref().map(|e| e.condition)
    );
    if let Some(e) = &error {
        let _ = e.to_xml();
    }
    check_frames(limits, by_frame);
}

/// What the edges do with frames: the header read, each element checked and its head
/// read.
pub fn check_frames(limits: Limits, frames: Vec<Frame>) {
    for frame in frames {
        match frame {
            Frame::StreamOpen(bytes) => {
                for ns in [None, Some("jabber:client"), Some("jabber:server")] {
                    if let Ok(h) = StreamHeader::parse(&bytes, ns) {
                        let _ = (h.to, h.from, h.id, h.version, h.lang);
                    }
                }
            }
            Frame::Element(bytes) => {
                assert!(bytes.len() <= limits.max_stanza_bytes, "over the limit");
                let valid = validate_stanza(&bytes).is_ok();
                match Stanza::parse(bytes.clone()) {
                    Ok(s) => crate::targets::stanza::exercise(&s, valid),
                    // A well-formed element always has a readable head.
                    Err(e) => assert!(!valid, "validated but unreadable: {e}"),
                }
            }
            Frame::StreamClose => {}
        }
    }
}
