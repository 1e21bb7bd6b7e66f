//! The router link's reader: storage answers go to the xdb client, link notices to the
//! component list and the user tasks, session packets and stanzas to the task of the
//! user they concern.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use jid::BareJid;
use tracing::{debug, info, warn};

use jrs_component::{ComponentReader, Outbox};
use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::host::registry::Event;
use crate::host::session::{self, Park, SessionRef};
use crate::host::task::dispatch;
use crate::host::{inbound, local, shortcut, Ctx};

/// Serves one router link until it drops.
pub async fn serve(
    ctx: Arc<Ctx>,
    mut reader: ComponentReader,
    outbox: Outbox,
) -> anyhow::Result<()> {
    ctx.set_link(outbox);
    // The router tells again what is bound when we subscribe to its notices.
    ctx.components.clear();
    // Sessions held over a previous link wait for their c2s to restore them (it does
    // once its own link is back and ours is bound; docs/sm.md). Queued before anything
    // read on this link.
    ctx.users.broadcast(|| Event::LinkLost);
    // What sessions hibernating in the last run held (host/hibernation.rs).
    if !ctx
        .hibernated
        .recovering
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        let give_back: crate::host::hibernation::GiveBack =
            |ctx, user, record| dispatch(ctx, user, Event::HibernatedBefore(record));
        tokio::spawn(crate::host::hibernation::recover(ctx.clone(), give_back));
    }
    loop {
        let stanza = reader.next().await?;
        crate::metrics::M.packets.by(stanza.name()).inc();
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
            "notice" => notice(&ctx, &stanza),
            "session" => session(&ctx, stanza),
            "message" | "presence" | "iq" => inbound::addressed(&ctx, stanza),
            "fanout" => fanout(&ctx, &stanza),
            other => debug!("ignoring <{other}> from the router"),
        }
    }
}

fn notice(ctx: &Arc<Ctx>, stanza: &Stanza) {
    let Some(name) = stanza.attr("name") else {
        return;
    };
    let host = stanza.attr("host").unwrap_or_default();
    let normal = stanza.attr("route").as_deref() == Some("normal");
    match stanza.attr("event").as_deref() {
        Some("bound") if normal => {
            debug!(component = %name, %host, "link notice: bound");
            ctx.components.bound(&name, &host)
        }
        Some("unbound") if normal => {
            debug!(component = %name, %host, "link notice: unbound");
            ctx.components.unbound(&name, &host)
        }
        Some("disconnected") => {
            debug!(component = %name, "link notice: disconnected");
            ctx.components.disconnected(&name);
            ctx.users.broadcast(|| Event::C2sGone(name.clone()));
        }
        _ => return,
    }
    local::confirm(ctx);
}

fn session(ctx: &Arc<Ctx>, packet: Stanza) {
    let kind = packet.kind().unwrap_or("").to_owned();
    crate::metrics::M.sessions.by(&kind).inc();
    if kind == "error" {
        // The router could not deliver a session packet of ours; the c2s notice (or the
        // client's end) settles the session.
        debug!(to = packet.from().unwrap_or(""), "session packet bounced");
        return;
    }
    let c2s = packet.attr("from").unwrap_or_default();
    let sid = packet.attr("sid").unwrap_or_default();
    if kind == "resume" {
        // A new connection names the session by its token; its user (`to`) routed it here.
        return resume(ctx, &packet, c2s, sid);
    }
    let jid = packet
        .attr("jid")
        .and_then(|j| jrs_stream::jids::parse_full(&j).ok());
    let Some(jid) = jid.filter(|_| !c2s.is_empty() && !sid.is_empty()) else {
        warn!(from = %c2s, "session packet without a valid 'jid', 'sid' or 'from' ignored");
        return;
    };
    let r = SessionRef { c2s, sid, jid };
    if !ctx.config.serves(r.jid.domain().as_str()) {
        warn!(jid = %r.jid, "session for a domain this sm does not serve");
        ctx.send(session::refuse_start(
            &ctx.me,
            &r,
            StanzaErrorCondition::ItemNotFound,
            "this session manager does not serve that domain",
        ));
        return;
    }
    // `into_bare` on a copy cuts the string; `to_bare` formats it again (every packet).
    let user = r.jid.clone().into_bare();
    let count = |name: &str| packet.attr(name).and_then(|v| v.parse::<u64>().ok());
    let event = match kind.as_str() {
        "start" => Event::Start(r),
        "end" => Event::End(r, jrs_component::session::decode(&packet)),
        "resumable" => match packet.attr("token").filter(|t| !t.is_empty()) {
            Some(token) => Event::Resumable(r, token),
            None => return,
        },
        "hibernate" => Event::Hibernate(r),
        "restore" => Event::Restore(r, jrs_component::session::SessionState::decode(&packet)),
        "park" => Event::Park(
            r,
            Park {
                received: count("h").unwrap_or(0) as u32,
                acked: count("acked").unwrap_or(0) as u32,
                sent: count("sent").unwrap_or(0) as u32,
                timeout: packet
                    .attr("timeout")
                    .and_then(|t| t.parse::<f64>().ok())
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .map_or(Duration::from_secs(300), Duration::from_secs_f64),
                max: count("max").unwrap_or(500) as usize,
                items: jrs_component::session::decode(&packet),
            },
        ),
        "delivered" => Event::Delivered(r, count("count").unwrap_or(0) as usize),
        "stanza" => {
            let inner = trim(packet.inner());
            match Stanza::parse(Bytes::copy_from_slice(inner)) {
                Ok(s) if matches!(s.name(), "message" | "presence" | "iq") => Event::Stanza(r, s),
                _ => {
                    warn!(jid = %r.jid, "session stanza without one message, presence or iq ignored");
                    return;
                }
            }
        }
        "started" => return,
        other => {
            warn!(jid = %r.jid, "unknown session packet type '{other}' ignored");
            return;
        }
    };
    dispatch(ctx, &user, event);
}

/// `resume`: the user is the bare JID in `to` (and `jid`).
fn resume(ctx: &Arc<Ctx>, packet: &Stanza, c2s: String, sid: String) {
    let user = packet.attr("to").and_then(|j| BareJid::new(&j).ok());
    let token = packet.attr("previd").unwrap_or_default();
    let (Some(user), false, false) = (user, c2s.is_empty(), sid.is_empty()) else {
        warn!(from = %c2s, "resume without a valid 'to', 'sid' or 'from' ignored");
        return;
    };
    if !ctx.config.serves(user.domain().as_str()) {
        ctx.send(session::refuse_resume(&ctx.me, &c2s, &sid, user.as_str()));
        return;
    }
    dispatch(ctx, &user, Event::Resume { c2s, sid, token });
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// A room's broadcast for several users of this instance: straight to the live sessions
/// that may take it (`host::shortcut`), to each other recipient's task as a `normal`
/// packet addressed to it.
fn fanout(ctx: &Arc<Ctx>, packet: &Stanza) {
    let f = match jrs_component::fanout::parse(packet.inner()) {
        Ok(f) => f,
        Err(e) => {
            warn!(from = packet.from().unwrap_or(""), error = %e, "malformed fan-out packet ignored");
            return;
        }
    };
    for r in shortcut::deliver(ctx, &f) {
        let copy = jrs_component::fanout::addressed(&f.stanza, r.to);
        match Stanza::parse(copy) {
            Ok(stanza) => inbound::addressed(ctx, stanza),
            Err(e) => warn!(to = r.to, "fan-out copy unreadable: {e}"),
        }
    }
}

/// Logs what this instance serves.
pub fn describe(ctx: &Ctx) {
    info!(name = %ctx.me, hosts = ?ctx.config.hosts, modules = ?ctx.modules.names(), "sm starting");
}
