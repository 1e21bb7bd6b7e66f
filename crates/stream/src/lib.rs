//! Stream framing, limits and validation shared by every process that parses XML.
//!
//! The pieces, in the order bytes meet them:
//! - [`framer::Framer`] cuts a byte stream into the stream header, top-level stanzas and the
//!   stream close, enforcing the byte and depth limits *before* anything builds a tree.
//! - [`validate::validate_stanza`] checks one complete stanza for well-formedness and the
//!   restrictions of RFC 6120 section 11 (no comments, PIs, DTDs, undeclared entities).
//! - [`stanza::Stanza`] reads only the top-level element's name and addressing attributes,
//!   so routers can forward the received bytes without re-serialising them.
//! - [`jids`] parses addresses, remembering the ones seen lately.
//! - [`errors`] builds stream errors and stanza error replies (bounces).
//! - [`header`] reads and writes stream headers.

pub mod addr;
pub mod children;
pub mod errors;
pub mod framer;
pub mod header;
pub mod jids;
pub mod limits;
pub mod scan;
pub mod stanza;
pub mod tag;
pub mod validate;
pub mod xml;

pub use errors::{StanzaErrorCondition, StreamError, StreamErrorCondition};
pub use framer::{Frame, FrameKind, Framer};
pub use header::StreamHeader;
pub use limits::Limits;
pub use stanza::{Stanza, StanzaError};

/// Namespace of XEP-0114 component streams.
pub const NS_COMPONENT_ACCEPT: &str = "jabber:component:accept";
/// Namespace of the stream element itself.
pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
/// Namespace of stream error conditions.
pub const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// Namespace of stanza error conditions.
pub const NS_STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
