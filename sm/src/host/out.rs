//! What handlers produce, collected instead of written to a socket (in the spirit of
//! rustls's `Output`): the user's task sends it to the router after each batch of
//! events, and unit tests read it.

use bytes::Bytes;
use jrs_stream::Stanza;

use crate::host::session::{self, SessionRef};

#[derive(Debug, Clone)]
pub enum Output {
    /// A stanza for one of the user's sessions (a `session` packet to its c2s);
    /// `offline`: from offline storage, to be confirmed.
    Deliver {
        to: SessionRef,
        stanza: Bytes,
        offline: bool,
    },
    /// A packet for the router: a stanza for someone else, or a session control packet.
    Route(Bytes),
    /// [`Output::Route`] of a stanza already parsed (one passed on as it came): local
    /// delivery reads its recipient without parsing it again.
    RouteStanza(Stanza),
}

#[derive(Debug, Default)]
pub struct Out {
    items: Vec<Output>,
}

impl Out {
    pub fn push(&mut self, item: Output) {
        self.items.push(item);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn take(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.items)
    }
}

impl Output {
    /// The bytes for the router link (`me`: sm's component name).
    pub fn into_bytes(self, me: &str) -> Bytes {
        match self {
            Output::Deliver {
                to,
                stanza,
                offline: false,
            } => session::packet(me, "stanza", &to, &stanza),
            Output::Deliver { to, stanza, .. } => session::offline_stanza(me, &to, &stanza),
            Output::Route(bytes) => bytes,
            Output::RouteStanza(stanza) => stanza.into_bytes(),
        }
    }
}
