//! The bodies of the fuzz targets (docs/fuzzing.md): one function per target, taking
//! arbitrary bytes, calling the real parsers with them. `fuzz/fuzz_targets/*.rs` hands
//! them to libFuzzer (`cargo +nightly fuzz run NAME`); `tests/replay.rs` runs each over
//! its saved corpus (`fuzz/corpus/NAME`) and crash regressions (`fuzz/regressions/NAME`)
//! on stable, in `cargo test --workspace`.
//!
//! A target must not panic, whatever the input: a panic is a bug in the parser (or a
//! property a target asserts that does not hold), to fix with the input kept as a
//! regression.

pub mod support;
pub mod targets;

// The parsers of the executables, compiled here from their own sources: c2s, s2s and
// xdb-file are binaries, which a library cannot depend on. The files sit at this
// crate's root under the names they have in their own crate, since they refer to each
// other as `crate::NAME`; when one of them starts using another module of its crate,
// that module is added here too. Their unit tests run in their own crates (`test =
// false` in Cargo.toml), and what they have that the targets do not use is no dead code
// there.
#[allow(dead_code, unused_imports)]
#[path = "../../../c2s/src/channel_binding.rs"]
mod channel_binding;
#[allow(dead_code, unused_imports)]
#[path = "../../../c2s/src/config.rs"]
mod config;
#[allow(dead_code, unused_imports)]
#[path = "../../../s2s/src/dialback.rs"]
mod dialback;
#[allow(dead_code, unused_imports)]
#[path = "../../../s2s/src/config.rs"]
mod s2s_config;
#[allow(dead_code, unused_imports)]
#[path = "../../../s2s/src/xml.rs"]
mod s2s_xml;
#[allow(dead_code, unused_imports)]
#[path = "../../../c2s/src/sasl.rs"]
mod sasl;
#[allow(dead_code, unused_imports)]
#[path = "../../../c2s/src/scram.rs"]
mod scram;
#[allow(dead_code, unused_imports)]
#[path = "../../../storage/src"]
mod xdb_file {
    pub mod archive;
    pub mod config;
    pub mod spool;
    pub mod sync;
}
use xdb_file::{archive, spool, sync};

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its file in `fuzz/fuzz_targets` and of its corpus
/// and regression directories).
pub const TARGETS: &[(&str, Target)] = &[
    ("stream", targets::stream::run),
    ("stanza", targets::stanza::run),
    ("sasl", targets::sasl::run),
    ("dialback", targets::dialback::run),
    ("config", targets::config::run),
    ("xdb", targets::xdb::run),
    ("mam", targets::xdb::mam),
    ("spool", targets::disk::spool),
    ("archive", targets::disk::archive),
    ("websocket", targets::web::websocket),
    ("bosh", targets::web::bosh),
    ("component", targets::component::run),
];
