//! How a stream ends.

use std::fmt;

use jrs_stream::{StreamError, StreamErrorCondition};

#[derive(Debug)]
pub enum Close {
    /// Send this stream error (after our header, if not sent yet) and close.
    Error(StreamError),
    /// The peer closed its stream (or we end ours cleanly): send our close tag.
    Closed,
    /// The connection is gone, or we give up on it, for this reason: nothing to send.
    Gone(String),
}

impl From<StreamError> for Close {
    fn from(e: StreamError) -> Close {
        Close::Error(e)
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Close::Error(e) => write!(f, "stream error: {e}"),
            Close::Closed => f.write_str("stream closed"),
            Close::Gone(why) => f.write_str(why),
        }
    }
}

pub fn stream_error(condition: StreamErrorCondition, text: impl Into<String>) -> Close {
    Close::Error(StreamError::new(condition, text))
}
