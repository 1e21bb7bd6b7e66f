//! The router link: everything addressed to a domain no local component serves arrives
//! here (s2s holds the default route `*`) and goes to the outgoing connection for its
//! domain, after checks.

use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use jrs_component::{ComponentReader, Outbox};
use jrs_stream::StanzaErrorCondition;

use crate::shared::{Cmd, Shared};
use crate::xml::domain_of;

pub async fn serve(
    shared: Arc<Shared>,
    mut reader: ComponentReader,
    outbox: Outbox,
) -> anyhow::Result<()> {
    shared.set_router(Some(outbox));
    let result = loop {
        let stanza = match reader.next().await {
            Ok(s) => s,
            Err(e) => break Err(e),
        };
        if !matches!(stanza.name(), "message" | "presence" | "iq") {
            debug!(
                name = stanza.name(),
                "ignoring a packet that is not a stanza"
            );
            continue;
        }
        let Some(remote) = stanza.to().and_then(domain_of) else {
            shared.bounce(
                &stanza,
                StanzaErrorCondition::JidMalformed,
                "bad 'to' address",
            );
            continue;
        };
        let local = stanza.from().and_then(domain_of).unwrap_or_default();
        if !shared.config.serves(&local) {
            // A local component's own address, or a domain s2s was not told about.
            shared.bounce(
                &stanza,
                StanzaErrorCondition::RemoteServerNotFound,
                &format!("s2s does not speak for '{local}' (add it as a <host/> in s2s.xml)"),
            );
            continue;
        }
        if shared.config.serves(&remote) {
            // A local domain whose session manager is gone: never send it out.
            shared.bounce(
                &stanza,
                StanzaErrorCondition::ServiceUnavailable,
                &format!("'{remote}' is a local domain and is not available"),
            );
            continue;
        }
        crate::metrics::M.stanzas_out.by(stanza.name()).inc();
        crate::outgoing::hand(
            &shared,
            &remote,
            Cmd::Send {
                local,
                stanza,
                since: Instant::now(),
            },
        );
    };
    shared.set_router(None);
    result
}
