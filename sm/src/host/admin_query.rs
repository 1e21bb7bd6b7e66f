//! What sm's administration requests (host/admin.rs) ask a user task: plain data, so
//! that the registry's events can carry it without depending on the request side.

use tokio::sync::mpsc;

/// What a user task is asked.
#[derive(Debug)]
pub enum Query {
    /// Describe your sessions (of domain `host`, or all when None).
    Sessions {
        host: Option<String>,
        reply: mpsc::UnboundedSender<Vec<SessionInfo>>,
    },
    /// End the sessions of this user (one resource, or all).
    Kick {
        resource: Option<String>,
        reply: mpsc::UnboundedSender<usize>,
    },
    /// Deliver `body` (and `subject`) from `host` to your available sessions.
    Announce {
        host: String,
        subject: Option<String>,
        body: String,
        reply: mpsc::UnboundedSender<usize>,
    },
}

/// One session, as `sessions` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub jid: String,
    pub c2s: String,
    /// `live`, or `hibernating` (XEP-0198: held here for its client to resume).
    pub state: &'static str,
    pub available: bool,
    pub priority: i32,
}
