//! The router link's reader: storage answers go to the xdb client, stanzas for a room
//! (or one of its occupants) to the room's task, stanzas for the service to `service`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use jid::Jid;
use tracing::{debug, info, warn};

use jrs_component::{ComponentReader, Outbox};
use jrs_stream::Stanza;

use crate::registry::dispatch;
use crate::{service, xml, Ctx};

/// Serves one router link until it drops.
pub async fn serve(
    ctx: Arc<Ctx>,
    mut reader: ComponentReader,
    outbox: Outbox,
) -> anyhow::Result<()> {
    ctx.set_link(outbox);
    if !ctx.index_loaded.swap(true, Ordering::SeqCst) {
        // The persistent rooms' list, for the directory; rooms themselves load when a
        // stanza reaches them.
        let c = ctx.clone();
        tokio::spawn(async move {
            match c.store.load_index(&c.config.service).await {
                Ok(index) => {
                    info!(rooms = index.len(), "persistent rooms listed");
                    // Rooms that changed before the list was read: store the merge.
                    if let Some(merged) = c.rooms.merge_index(index) {
                        if let Err(e) = c.store.save_index(&c.config.service, &merged).await {
                            warn!("could not store the room list: {e}");
                        }
                    }
                }
                Err(e) => {
                    warn!("could not read the list of persistent rooms: {e}");
                    c.index_loaded.store(false, Ordering::SeqCst);
                }
            }
        });
    }
    loop {
        let stanza = reader.next().await?;
        match stanza.name() {
            "xdb" => {
                let answered = ctx.store.xdb().is_some_and(|x| x.answer(&stanza));
                if !answered {
                    debug!(
                        id = stanza.id().unwrap_or(""),
                        "late storage answer ignored"
                    );
                }
            }
            "message" | "presence" | "iq" => normal(&ctx, stanza),
            other => debug!("ignoring <{other}> from the router"),
        }
    }
}

fn normal(ctx: &Arc<Ctx>, stanza: Stanza) {
    let refuse = |c, text: &str| {
        if let Some(r) = xml::error_reply(&stanza, c, text, "") {
            ctx.send(r.freeze());
        }
    };
    let to = match stanza.attr("to").map(|t| Jid::new(&t)) {
        Some(Ok(j)) => j,
        Some(Err(e)) => return refuse(xml::JID_MALFORMED, &format!("'to': {e}")),
        None => return,
    };
    if to.domain().as_str() != ctx.config.service {
        return refuse(xml::SERVICE_UNAVAILABLE, "not served here");
    }
    if stanza
        .attr("from")
        .and_then(|f| Jid::new(&f).ok())
        .is_none()
    {
        // Nobody to answer: the router stamps or checks every sender.
        debug!(to = %to, "stanza without a valid 'from' dropped");
        return;
    }
    if to.node().is_none() {
        if to.resource().is_none() {
            service::handle(ctx, &stanza);
        } else {
            refuse(xml::SERVICE_UNAVAILABLE, "");
        }
        return;
    }
    dispatch(ctx, to.to_bare(), stanza);
}
