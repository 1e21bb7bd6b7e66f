//! Code shared by the benchmark programs (`bench`, `loadgen`, `archivebench`).

pub mod bosh;
pub mod caps;
pub mod client;
pub mod muc;
pub mod pep;
pub mod procstat;
pub mod pump;
pub mod websocket;
