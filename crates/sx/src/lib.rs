//! The stream layer of the processes that talk XMPP to the outside (c2s, s2s), in the
//! spirit of jabberd2's `sx` library: one implementation of what every such stream needs,
//! so that the processes differ only in their negotiations and what they do with stanzas.
//!
//! - [`transport::Transport`]: the byte stream (TCP, TLS in either role; the web
//!   transports come later) behind one `AsyncRead + AsyncWrite` type.
//! - [`tls`]: TLS handshakes with a time limit; [`tls_records`]: a TLS 1.3 server
//!   connection's records after its handshake, without rustls's per-connection buffers
//!   (the handshake read one record at a time through [`record_paced`]).
//! - [`connection::Connection`]: framed reading with the stream limits, the idle timeout
//!   and the byte rate; writing; STARTTLS in place; stream restarts; the close handshake.
//! - [`close::Close`]: how a stream ends (a typed stream error, a clean close, a lost
//!   connection).
//! - [`features`]: stream features built from what each layer offers, and read back from
//!   a peer's `<stream:features/>`.
//! - [`rate::ByteRate`]: the per-connection byte rate limit.
//! - [`listener`]: listeners bound at start, one task per accepted connection.
//! - [`caps`]: entity capabilities hashes (XEP-0115), the server's in its features.
//! - [`framing`]: RFC 7395 framing (XMPP over WebSocket) translated to and from stream
//!   bytes, for the server (c2s) and for a client (the bench).

pub mod caps;
pub mod close;
pub mod connection;
pub mod features;
pub mod framing;
pub mod listener;
pub mod rate;
pub mod record_paced;
pub mod tls;
pub mod tls_records;
pub mod transport;

pub use close::{stream_error, Close};
pub use connection::Connection;
pub use features::{Feature, Offered};
pub use transport::Transport;
