//! The router link's reader: storage answers go to the xdb client, stanzas for a room
//! (or one of its occupants) to the room's task, stanzas for the service to `service`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use jid::Jid;
use tracing::{debug, warn};

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
    if !ctx.directory_started.swap(true, Ordering::SeqCst) {
        // The room directory's log: the list of earlier versions migrated, this
        // instance's temporary rooms of its last run ended. Rooms themselves load when
        // a stanza reaches them. Tried until storage answers.
        let c = ctx.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            while let Err(e) = c.directory.start(&c.store).await {
                warn!("could not read the room directory (again in {wait:?}): {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
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
