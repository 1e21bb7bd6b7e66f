//! Where what a user's task produced goes once a batch of events is handled: to the
//! router, but for stanzas to users of a domain this instance alone serves, which go to
//! their users' tasks (`host::local`). Apart from `kernel`, which defines the `User`,
//! since it leads back into the user tasks (`host::inbound`).

use bytes::Bytes;

use crate::host::inbound;
use crate::host::kernel::User;
use crate::host::local;
use crate::host::out::Output;

impl User {
    /// Sends everything produced so far.
    pub fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let ctx = &self.ctx;
        let mut here = vec![];
        let packets: Vec<Bytes> = self
            .out
            .take()
            .into_iter()
            .filter_map(|o| match o {
                Output::Route(bytes) => match local::takes(ctx, &bytes) {
                    Some(stanza) => {
                        here.push(stanza);
                        None
                    }
                    None => Some(bytes),
                },
                Output::RouteStanza(stanza) if local::takes_parsed(ctx, &stanza) => {
                    here.push(stanza);
                    None
                }
                deliver => Some(deliver.into_bytes(&ctx.me)),
            })
            .collect();
        if !packets.is_empty() {
            ctx.send_all(packets);
        }
        for stanza in here {
            crate::metrics::M.local.inc();
            inbound::addressed(ctx, stanza);
        }
    }
}
