//! The module host: sm's core, which feature modules (`crate::modules`) plug into.
//!
//! - `kernel`: the `Module` trait, the loaded `Modules`, the shared `Ctx` and the `User`
//!   a handler works on (with its output collector `out`);
//! - `task` (the user's task: the session protocol, the chains, the fallbacks),
//!   `ending` (ending a session; what its client never got), `handover` (XEP-0198:
//!   sessions held while their client is away), `hibernation` (their queues kept in
//!   storage too; `hibernated`: what it keeps),
//!   `hooks` (running a chain), `iq_routing` (the IQ table), `server` (stanzas to the
//!   domain itself), `inbound` (where a stanza for a user or domain goes), `flush` and
//!   `local` (where a task's output goes: the router, or the recipient's task when this
//!   instance alone serves its domain);
//! - `iq` (IQ requests and replies as modules see them),
//! - `requests` (IQs sm sends from a domain, and their answers), `shared` (state
//!   modules share across users);
//! - `shortcut` (room broadcasts straight to live sessions, past the user tasks) and
//!   `broadcasts` (its table),
//! - `session`, `packet`, `state`, `out`, `store`, `registry`, `accounts`,
//!   `components`, `overload`: the pieces they are made of.
//!
//! docs/sm.md, "Writing a module", shows how a module is written.

pub mod accounts;
pub mod admin;
pub mod admin_answer;
pub mod admin_query;
pub mod broadcasts;
pub mod components;
pub mod ending;
pub mod flush;
pub mod handover;
pub mod hibernated;
pub mod hibernation;
pub mod hooks;
pub mod inbound;
pub mod iq;
pub mod iq_routing;
pub mod kernel;
pub mod local;
pub mod out;
pub mod overload;
pub mod packet;
pub mod registry;
pub mod requests;
pub mod server;
pub mod session;
pub mod shared;
pub mod shortcut;
pub mod state;
pub mod store;
pub mod task;

pub use self::iq::{storage_error, Iq, IqKind, Reply, Scope};
pub use self::kernel::{
    Change, Ctx, Declaration, Disco, Flow, Hook, Identity, Module, Modules, SessionState, Stanzas,
    Stored, User,
};
pub use self::packet::Packet;
pub use self::session::{Session, SessionKey};
