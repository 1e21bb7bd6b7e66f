//! A framed reader: bytes from any async stream in, [`Frame`]s out, limits enforced as the
//! bytes arrive.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use std::ops::Range;

use jrs_stream::{Frame, FrameKind, Framer, Limits, StreamError};

/// Bytes asked of the socket per read. Large enough to batch many small stanzas per
/// system call, small enough that the framer sees an oversize stanza early.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke a stream rule; send this error and close.
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// The peer closed the connection without closing its stream.
    #[error("connection closed")]
    Closed,
}

pub struct FramedReader<R> {
    io: R,
    buf: BytesMut,
    framer: Framer,
    read_size: usize,
    /// Bytes of the stream dropped from the front of `buf` so far.
    dropped: u64,
    /// Where in the stream the last frame returned ends (see [`FramedReader::position`]).
    last_end: u64,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    pub fn new(io: R, limits: Limits) -> Self {
        FramedReader::with_read_size(io, limits, READ_CHUNK)
    }

    /// A reader asking the stream for `read_size` bytes at a time: small for the many
    /// mostly idle client connections (memory per connection), large for router links
    /// (system calls per stanza). The buffer still grows to hold a whole stanza.
    pub fn with_read_size(io: R, limits: Limits, read_size: usize) -> Self {
        FramedReader {
            io,
            buf: BytesMut::new(),
            framer: Framer::new(limits),
            read_size,
            dropped: 0,
            last_end: 0,
        }
    }

    /// The next frame; reads from the stream only when no complete frame is buffered.
    pub async fn next_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            let before = self.buf.len();
            let frame = self.framer.next_frame(&mut self.buf)?;
            self.dropped += (before - self.buf.len()) as u64;
            if let Some(frame) = frame {
                // The frame was split off up to its end.
                self.last_end = self.dropped;
                return Ok(frame);
            }
            self.buf.reserve(self.read_size);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// Finds the next complete frame in the buffer without removing it (see
    /// [`Framer::next_range`]); the range indexes [`FramedReader::buffer`].
    pub fn next_range(&mut self) -> Result<Option<(FrameKind, Range<usize>)>, StreamError> {
        let found = self.framer.next_range(&self.buf)?;
        if let Some((_, range)) = &found {
            self.last_end = self.dropped + range.end as u64;
        }
        Ok(found)
    }

    /// How many bytes of the stream precede the end of the last frame returned: what an
    /// acknowledgement of everything read so far counts (docs/protocol.md, "Acknowledged
    /// links"). Whitespace after that frame is counted with the next one.
    pub fn position(&self) -> u64 {
        self.last_end
    }

    /// The stream position of byte `index` of [`FramedReader::buffer`] (for a frame's
    /// range end: how much of the stream precedes the end of that frame).
    pub fn position_of(&self, index: usize) -> u64 {
        self.dropped + index as u64
    }

    /// Drops handled frames from the front of the buffer, counting them.
    fn compact(&mut self) {
        let before = self.buf.len();
        self.framer.compact(&mut self.buf);
        self.dropped += (before - self.buf.len()) as u64;
    }

    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the frames found so far and reads more bytes.
    pub async fn fill(&mut self) -> Result<(), ReadError> {
        self.compact();
        self.buf.reserve(self.read_size);
        if self.io.read_buf(&mut self.buf).await? == 0 {
            return Err(ReadError::Closed);
        }
        Ok(())
    }

    /// Frees the read buffer if it holds nothing: a connection that then waits for
    /// readability before its next read holds no buffer while idle (memory per idle
    /// client). Returns whether it was empty.
    pub fn release_if_empty(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        if self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
        true
    }

    /// Bytes the read buffer holds room for (what an idle connection costs).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether a complete frame may already be buffered (no read needed to make progress).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    pub fn get_ref(&self) -> &R {
        &self.io
    }

    /// Starts reading a new stream on the same connection (after SASL success): bytes
    /// already buffered belong to the new stream and are kept.
    pub fn restart(&mut self) {
        self.compact();
        self.framer.reset();
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }

    pub fn into_inner(self) -> R {
        self.io
    }
}
