//! What several targets need: feeding a framer, the checks the edges make, scratch
//! directories and the sectioned input of the file targets.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use jrs_stream::validate::validate_stanza;
use jrs_stream::{Frame, FrameKind, Framer, Limits, StreamError};

/// A stream header that opens any stream (the framer wants one before stanzas).
pub const HEADER: &[u8] =
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

/// Frames `input` fed in pieces of `chunk` bytes through [`Framer::next_frame`], as the
/// readers do: the frames, and the stream error that ended the stream, if any.
pub fn frames(limits: Limits, input: &[u8], chunk: usize) -> (Vec<Frame>, Option<StreamError>) {
    let mut framer = Framer::new(limits);
    let mut buf = BytesMut::new();
    let mut out = vec![];
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match framer.next_frame(&mut buf) {
                Ok(Some(frame)) => out.push(frame),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

/// The same through [`Framer::next_range`] and [`Framer::compact`] (the component
/// reader's way: every frame of one read before the buffer is compacted).
pub fn frames_by_range(
    limits: Limits,
    input: &[u8],
    chunk: usize,
) -> (Vec<Frame>, Option<StreamError>) {
    let mut framer = Framer::new(limits);
    let mut buf = BytesMut::new();
    let mut out = vec![];
    for piece in input.chunks(chunk.max(1)) {
        framer.compact(&mut buf);
        buf.extend_from_slice(piece);
        loop {
            match framer.next_range(&buf) {
                Ok(Some((kind, range))) => {
                    let bytes = Bytes::copy_from_slice(&buf[range]);
                    out.push(match kind {
                        FrameKind::StreamOpen => Frame::StreamOpen(bytes),
                        FrameKind::Element => Frame::Element(bytes),
                        FrameKind::StreamClose => Frame::StreamClose,
                    });
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

/// Whether an edge (c2s, s2s, the router for other components) would pass `element`
/// on: one element, within the default limits, well-formed and self-contained. Parsers
/// that trust the edges (sm's, minidom's) get only such input.
pub fn edge_checked(element: &[u8]) -> bool {
    let mut input = HEADER.to_vec();
    input.extend_from_slice(element);
    let (frames, error) = frames(Limits::default(), &input, input.len());
    error.is_none()
        && matches!(&frames[..], [Frame::StreamOpen(_), Frame::Element(e)] if e.len() == element.trim_ascii().len())
        && validate_stanza(element.trim_ascii()).is_ok()
}

/// A fresh, empty directory for this thread (on tmpfs when there is one); the same
/// path every call, so a fuzzing run does not fill the disk.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let thread = format!("{:?}", std::thread::current().id())
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>();
    let dir = base.join(format!("jrs-fuzz-{}-{thread}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// Splits `data` into named sections: a line `@@NAME` starts each, its body runs to the
/// newline before the next `@@` line (bytes before the first are ignored). Lets one
/// input hold several files and requests while staying a readable text file.
pub fn sections(data: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = vec![];
    let mut starts = vec![];
    if data.starts_with(b"@@") {
        starts.push(0);
    }
    starts.extend(memchr::memmem::find_iter(data, b"\n@@").map(|i| i + 1));
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(data.len(), |&next| next - 1);
        let section = &data[start + 2..end.max(start + 2)];
        let (name, body) = match memchr::memchr(b'\n', section) {
            Some(i) => (&section[..i], &section[i + 1..]),
            None => (section, &[][..]),
        };
        out.push((name, body));
    }
    out
}

/// The first byte of the input as a choice, and the rest.
pub fn choice(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&c, rest)) => (c, rest),
        None => (0, data),
    }
}
