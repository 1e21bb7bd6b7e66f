//! Cuts an XMPP byte stream into frames: the stream header, whole top-level stanzas, and the
//! stream close.
//!
//! Written by hand on purpose: the XML crates either build a tree (minidom, xso: unbounded
//! depth aborts the process), have no depth or size limit (rxml), or buffer a whole token
//! before returning it (quick-xml's async reader: one huge start tag is held whole). This
//! scanner only tracks markup boundaries, quotes and depth, so it can refuse a stanza the
//! moment it crosses a limit, resumes across reads, and costs a few word-sized steps per
//! tag (`scan::find_any`) and a `memchr` per run of character data.
//! Well-formedness of a complete stanza is checked afterwards by [`crate::validate`], which
//! uses quick-xml.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::errors::{StreamError, StreamErrorCondition};
use crate::scan::find_any;
use crate::Limits;

/// One unit cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The opening `<stream:stream ...>` tag, with any XML declaration before it.
    StreamOpen(Bytes),
    /// One complete top-level element (a stanza or a stream-level element), leading
    /// whitespace removed.
    Element(Bytes),
    /// `</stream:stream>`: the peer closed its stream.
    StreamClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Character data (or whitespace between stanzas).
    Text,
    /// Just read `<`; the next byte decides what follows.
    Lt,
    /// Inside a start tag; `quote` is the open quote character, if any.
    StartTag { quote: u8 },
    /// Inside an end tag.
    EndTag,
    /// Read `<!`, matched `matched` bytes of `[CDATA[` so far.
    Bang { matched: u8 },
    /// Inside a CDATA section; `brackets` counts consecutive `]` just read.
    CData { brackets: u8 },
    /// Inside the XML declaration `<?xml ...?>` (only allowed before the stream header).
    Declaration { question: bool },
}

const CDATA_OPEN: &[u8] = b"[CDATA[";

/// The kind of a frame found by [`Framer::next_range`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    StreamOpen,
    Element,
    StreamClose,
}

/// What a completed scan step produced.
enum Done {
    Header,
    Element,
    Close,
}

/// Incremental, resumable stanza framer with limits. Feed it the connection's read buffer
/// after every read; it returns frames as they complete and splits them off the buffer.
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    state: State,
    /// 0 before the stream header, 1 at stream level, 2+ inside a stanza.
    depth: u32,
    /// Bytes of the buffer already scanned.
    scan: usize,
    /// Where the frame being scanned starts in the buffer (first byte that is not
    /// inter-stanza whitespace).
    start: usize,
    /// Whether anything but whitespace has been seen (an XML declaration must come first).
    started: bool,
    /// Where the tag being scanned starts (its `<`).
    tag_start: usize,
    /// Names of the open elements (the stream's included), back to back, with where each
    /// ends: an end tag must name the innermost one, or the stream is not well-formed.
    names: Vec<u8>,
    name_ends: Vec<usize>,
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        Framer {
            limits,
            state: State::Text,
            depth: 0,
            scan: 0,
            start: 0,
            started: false,
            tag_start: 0,
            names: Vec::new(),
            name_ends: Vec::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Starts over for a new stream on the same connection (after STARTTLS or SASL).
    pub fn reset(&mut self) {
        *self = Framer::new(self.limits);
    }

    /// Whether the stream header has been read.
    pub fn stream_open(&self) -> bool {
        self.depth >= 1
    }

    /// Scans newly read bytes. Returns the next complete frame, `Ok(None)` when more bytes
    /// are needed, or the stream error to send when the input breaks a rule. The frame is
    /// split off `buf`.
    pub fn next_frame(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, StreamError> {
        let found = self.next_range(buf);
        let next = match found {
            Ok(Some((kind, range))) => {
                let mut frame = buf.split_to(range.end);
                let frame = frame.split_off(range.start).freeze();
                self.scan -= range.end;
                self.start -= range.end;
                self.tag_start = self.tag_start.saturating_sub(range.end);
                Some(match kind {
                    FrameKind::StreamOpen => Frame::StreamOpen(frame),
                    FrameKind::Element => Frame::Element(frame),
                    FrameKind::StreamClose => Frame::StreamClose,
                })
            }
            Ok(None) => {
                self.compact(buf);
                None
            }
            Err(e) => return Err(e),
        };
        Ok(next)
    }

    /// Finds the next complete frame in `buf` without removing it: its kind and where it
    /// lies in `buf`. Call [`Framer::compact`] once the frames found so far are handled
    /// (before reading more into `buf`) to drop them. Lets a reader handle every stanza of
    /// one read without splitting the buffer per stanza.
    pub fn next_range(
        &mut self,
        buf: &[u8],
    ) -> Result<Option<(FrameKind, Range<usize>)>, StreamError> {
        match self.scan_until_done(buf)? {
            Some(done) => {
                let range = self.start..self.scan;
                // The last step may have crossed the limit and ended the frame at once
                // (one tag read whole from the buffer).
                if range.len() > self.limits.max_stanza_bytes {
                    return Err(too_large(self.limits));
                }
                self.start = self.scan;
                let kind = match done {
                    Done::Header => FrameKind::StreamOpen,
                    Done::Element => FrameKind::Element,
                    Done::Close => FrameKind::StreamClose,
                };
                Ok(Some((kind, range)))
            }
            None => {
                if self.in_frame() && self.scan - self.start > self.limits.max_stanza_bytes {
                    return Err(too_large(self.limits));
                }
                Ok(None)
            }
        }
    }

    /// Drops from `buf` every frame returned by [`Framer::next_range`] and any whitespace
    /// after them, keeping only the frame being scanned.
    pub fn compact(&mut self, buf: &mut BytesMut) {
        let keep_from = if self.in_frame() {
            self.start
        } else {
            self.scan
        };
        bytes::Buf::advance(buf, keep_from);
        self.scan -= keep_from;
        self.start = self.start.saturating_sub(keep_from);
        self.tag_start = self.tag_start.saturating_sub(keep_from);
    }

    /// Remembers the name of an element just opened (`tag` is what follows its `<`).
    fn open_element(&mut self, tag: &[u8]) {
        let end = tag
            .iter()
            .position(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'/'))
            .unwrap_or(tag.len());
        self.names.extend_from_slice(&tag[..end]);
        self.name_ends.push(self.names.len());
    }

    /// Checks an end tag (`tag` is what follows its `</`) against the innermost open
    /// element.
    fn close_element(&mut self, tag: &[u8]) -> Result<(), StreamError> {
        let name = tag.trim_ascii_end();
        let Some(end) = self.name_ends.pop() else {
            return Err(not_well_formed("end tag without a start tag"));
        };
        let begin = self.name_ends.last().copied().unwrap_or(0);
        if &self.names[begin..end] != name {
            return Err(StreamError::new(
                StreamErrorCondition::NotWellFormed,
                format!(
                    "</{}> closes <{}>",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(&self.names[begin..end])
                ),
            ));
        }
        self.names.truncate(begin);
        Ok(())
    }

    /// Whether the scanner is inside a frame (as opposed to whitespace between frames).
    fn in_frame(&self) -> bool {
        !(matches!(self.state, State::Text) && self.depth <= 1)
    }

    fn scan_until_done(&mut self, buf: &[u8]) -> Result<Option<Done>, StreamError> {
        while self.scan < buf.len() {
            // The cheap test first: it is false for nearly every step.
            if self.scan - self.start > self.limits.max_stanza_bytes && self.in_frame() {
                return Err(too_large(self.limits));
            }
            match self.state {
                State::Text if self.depth >= 2 => {
                    // Character data inside a stanza: jump to the next tag (most often
                    // the very next byte, between two tags).
                    if buf[self.scan] == b'<' {
                        self.tag_start = self.scan;
                        self.scan += 1;
                        self.state = State::Lt;
                        continue;
                    }
                    match memchr::memchr(b'<', &buf[self.scan..]) {
                        Some(i) => {
                            self.tag_start = self.scan + i;
                            self.scan += i + 1;
                            self.state = State::Lt;
                        }
                        None => self.scan = buf.len(),
                    }
                }
                State::Text => {
                    // Between frames: only whitespace may appear here.
                    let b = buf[self.scan];
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {
                            self.scan += 1;
                            self.start = self.scan;
                        }
                        b'<' => {
                            self.start = self.scan;
                            self.tag_start = self.scan;
                            self.scan += 1;
                            self.state = State::Lt;
                        }
                        _ => {
                            return Err(StreamError::new(
                                StreamErrorCondition::NotWellFormed,
                                "text outside of any stanza",
                            ))
                        }
                    }
                }
                State::Lt => {
                    let b = buf[self.scan];
                    self.scan += 1;
                    self.state = match b {
                        b'/' => State::EndTag,
                        b'!' if self.depth >= 2 => State::Bang { matched: 0 },
                        b'!' => return Err(restricted("comments and DTDs are not allowed")),
                        b'?' if !self.started && self.depth == 0 => {
                            State::Declaration { question: false }
                        }
                        b'?' => return Err(restricted("processing instructions are not allowed")),
                        _ => State::StartTag { quote: 0 },
                    };
                    self.started = true;
                    if self.state == State::EndTag && self.depth == 0 {
                        return Err(not_well_formed("end tag before the stream header"));
                    }
                }
                State::StartTag { quote } => {
                    // Quoted values are skipped whole (a `>` may stand in them).
                    let mut quote = quote;
                    let mut at = self.scan;
                    let end = loop {
                        if quote != 0 {
                            match find_any(&buf[at..], [quote]) {
                                Some(i) => {
                                    at += i + 1;
                                    quote = 0;
                                }
                                None => break None,
                            }
                        }
                        match find_any(&buf[at..], [b'>', b'"', b'\'']) {
                            Some(i) if buf[at + i] == b'>' => break Some(at + i),
                            Some(i) => {
                                quote = buf[at + i];
                                at += i + 1;
                            }
                            None => break None,
                        }
                    };
                    let Some(i) = end else {
                        self.scan = buf.len();
                        self.state = State::StartTag { quote };
                        continue;
                    };
                    self.scan = i + 1;
                    // The limit before anything else, as if checked at every byte.
                    if self.scan - self.start > self.limits.max_stanza_bytes {
                        return Err(too_large(self.limits));
                    }
                    let empty = buf[self.scan - 2] == b'/';
                    self.state = State::Text;
                    if empty {
                        if self.depth == 0 {
                            return Err(not_well_formed("the stream header closes itself"));
                        }
                        if self.depth == 1 {
                            return Ok(Some(Done::Element));
                        }
                        if self.depth > self.limits.max_depth {
                            return Err(too_deep(self.limits));
                        }
                    } else {
                        self.open_element(&buf[self.tag_start + 1..self.scan - 1]);
                        self.depth += 1;
                        if self.depth == 1 {
                            return Ok(Some(Done::Header));
                        }
                        if self.depth - 1 > self.limits.max_depth {
                            return Err(too_deep(self.limits));
                        }
                    }
                }
                State::EndTag => match find_any(&buf[self.scan..], [b'>']) {
                    Some(i) => {
                        self.scan += i + 1;
                        self.state = State::Text;
                        self.close_element(&buf[self.tag_start + 2..self.scan - 1])?;
                        self.depth -= 1;
                        match self.depth {
                            0 => return Ok(Some(Done::Close)),
                            1 => return Ok(Some(Done::Element)),
                            _ => {}
                        }
                    }
                    None => self.scan = buf.len(),
                },
                State::Bang { matched } => {
                    let b = buf[self.scan];
                    self.scan += 1;
                    if b != CDATA_OPEN[matched as usize] {
                        return Err(restricted("comments and DTDs are not allowed"));
                    }
                    self.state = if matched as usize + 1 == CDATA_OPEN.len() {
                        State::CData { brackets: 0 }
                    } else {
                        State::Bang {
                            matched: matched + 1,
                        }
                    };
                }
                State::CData { brackets } => {
                    let b = buf[self.scan];
                    self.scan += 1;
                    self.state = match b {
                        b']' => State::CData {
                            brackets: (brackets + 1).min(2),
                        },
                        b'>' if brackets == 2 => State::Text,
                        _ => State::CData { brackets: 0 },
                    };
                }
                State::Declaration { question } => {
                    let b = buf[self.scan];
                    self.scan += 1;
                    self.state = match b {
                        b'>' if question => State::Text,
                        b'?' => State::Declaration { question: true },
                        _ => State::Declaration { question: false },
                    };
                    if self.state == State::Text && !buf[self.start..].starts_with(b"<?xml") {
                        return Err(restricted("processing instructions are not allowed"));
                    }
                }
            }
        }
        Ok(None)
    }
}

fn too_large(limits: Limits) -> StreamError {
    StreamError::new(
        StreamErrorCondition::PolicyViolation,
        format!(
            "stanza larger than the limit of {} bytes",
            limits.max_stanza_bytes
        ),
    )
}

fn too_deep(limits: Limits) -> StreamError {
    StreamError::new(
        StreamErrorCondition::PolicyViolation,
        format!(
            "elements nested deeper than the limit of {}",
            limits.max_depth
        ),
    )
}

fn restricted(text: &str) -> StreamError {
    StreamError::new(StreamErrorCondition::RestrictedXml, text)
}

fn not_well_formed(text: &str) -> StreamError {
    StreamError::new(StreamErrorCondition::NotWellFormed, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &[u8] = b"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='c'>";

    fn frames(input: &[u8], chunk: usize, limits: Limits) -> Result<Vec<Frame>, StreamError> {
        let mut f = Framer::new(limits);
        let mut buf = BytesMut::new();
        let mut out = vec![];
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(frame) = f.next_frame(&mut buf)? {
                out.push(frame);
            }
        }
        Ok(out)
    }

    /// The same as `frames`, through `next_range` and `compact`.
    fn frames_by_range(input: &[u8], chunk: usize) -> Vec<Frame> {
        let mut f = Framer::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut out = vec![];
        for piece in input.chunks(chunk) {
            f.compact(&mut buf);
            buf.extend_from_slice(piece);
            while let Some((kind, range)) = f.next_range(&buf).unwrap() {
                let bytes = Bytes::copy_from_slice(&buf[range]);
                out.push(match kind {
                    FrameKind::StreamOpen => Frame::StreamOpen(bytes),
                    FrameKind::Element => Frame::Element(bytes),
                    FrameKind::StreamClose => Frame::StreamClose,
                });
            }
        }
        out
    }

    #[test]
    fn cuts_stanzas_in_any_chunking() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b" \n<message to='a'><body a='>'>x &amp; <![CDATA[</body>]]></body></message> <presence/><iq type=\"get\"><q xmlns='x'/></iq></stream:stream>");
        for chunk in [1, 2, 3, 7, 64, 10_000] {
            let out = frames(&input, chunk, Limits::default()).unwrap();
            assert_eq!(out.len(), 5, "chunk {chunk}: {out:?}");
            assert!(
                matches!(&out[0], Frame::StreamOpen(b) if b.starts_with(b"<?xml") || b.starts_with(b"<stream"))
            );
            assert_eq!(
                out[1],
                Frame::Element(Bytes::from_static(
                    b"<message to='a'><body a='>'>x &amp; <![CDATA[</body>]]></body></message>"
                ))
            );
            assert_eq!(out[2], Frame::Element(Bytes::from_static(b"<presence/>")));
            assert_eq!(
                out[3],
                Frame::Element(Bytes::from_static(b"<iq type=\"get\"><q xmlns='x'/></iq>"))
            );
            assert_eq!(out[4], Frame::StreamClose);
            let by_range = frames_by_range(&input, chunk);
            assert_eq!(by_range[1..], out[1..], "chunk {chunk}");
        }
    }

    #[test]
    fn enforces_size_before_the_stanza_ends() {
        let limits = Limits {
            max_stanza_bytes: 100,
            max_depth: 10,
        };
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"<message>");
        input.extend(std::iter::repeat_n(b'a', 1000));
        let e = frames(&input, 10, limits).unwrap_err();
        assert_eq!(e.condition, StreamErrorCondition::PolicyViolation);
        // One huge start tag counts too.
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"<message a='");
        input.extend(std::iter::repeat_n(b'a', 1000));
        assert!(frames(&input, 10, limits).is_err());
        // So does a last tag that crosses the limit and ends the stanza in one read
        // (found by fuzzing, docs/fuzzing.md).
        for tail in [&b"<a></a"[..], b"<a"] {
            let mut input = HEADER.to_vec();
            input.extend_from_slice(tail);
            input.extend(std::iter::repeat_n(b' ', 200));
            input.extend_from_slice(if tail == b"<a" { b"/>" } else { b">" });
            let e = frames(&input, input.len(), limits).unwrap_err();
            assert_eq!(e.condition, StreamErrorCondition::PolicyViolation);
        }
        let limits = Limits {
            max_stanza_bytes: 50,
            max_depth: 10,
        };
        assert!(
            frames(HEADER, HEADER.len(), limits).is_err(),
            "the header too"
        );
    }

    #[test]
    fn enforces_depth() {
        let limits = Limits {
            max_stanza_bytes: 1 << 20,
            max_depth: 5,
        };
        let mut input = HEADER.to_vec();
        input.extend_from_slice(&b"<a>".repeat(5));
        input.extend_from_slice(&b"</a>".repeat(5));
        assert_eq!(frames(&input, 4, limits).unwrap().len(), 2);
        let mut input = HEADER.to_vec();
        input.extend_from_slice(&b"<a>".repeat(100_000));
        let e = frames(&input, 4096, limits).unwrap_err();
        assert_eq!(e.condition, StreamErrorCondition::PolicyViolation);
    }

    #[test]
    fn refuses_dtd_comments_pis_and_text() {
        for bad in [
            &b"<!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream>"[..],
            b"<stream:stream><!-- hi --><message/>",
            b"<stream:stream><?pi x?>",
            b"<stream:stream><m><!ENTITY x></m>",
            b"<stream:stream>hello",
            b"<stream:stream/>",
        ] {
            assert!(
                frames(bad, 3, Limits::default()).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn refuses_a_mismatched_end_tag_at_once() {
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"<message><body>x</message>");
        let e = frames(&input, 5, Limits::default()).unwrap_err();
        assert_eq!(e.condition, StreamErrorCondition::NotWellFormed);
        assert!(e.text.contains("</message> closes <body>"), "{}", e.text);
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"<a/></stream:wrong>");
        assert!(frames(&input, 3, Limits::default()).is_err());
        let mut input = HEADER.to_vec();
        input.extend_from_slice(b"<a ></a ><b\n></b\n></stream:stream >");
        assert_eq!(frames(&input, 2, Limits::default()).unwrap().len(), 4);
    }

    #[test]
    fn drops_whitespace_keepalives() {
        let mut f = Framer::new(Limits::default());
        let mut buf = BytesMut::from(HEADER);
        assert!(matches!(
            f.next_frame(&mut buf).unwrap(),
            Some(Frame::StreamOpen(_))
        ));
        for _ in 0..1000 {
            buf.extend_from_slice(b"  \n");
            assert!(f.next_frame(&mut buf).unwrap().is_none());
        }
        assert!(buf.is_empty());
    }
}
