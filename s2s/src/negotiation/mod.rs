//! The rules of server-to-server streams as state machines without I/O (the drivers are
//! `incoming.rs` and `outgoing.rs`), each tested without a socket.

pub mod incoming;
pub mod outgoing;
