//! Code shared by the benchmark programs (`bench`, `loadgen`, `archivebench`).

pub mod client;
pub mod procstat;
