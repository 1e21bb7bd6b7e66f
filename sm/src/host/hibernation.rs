//! Hibernating sessions written through to storage (XEP-0198 on sm's side, see
//! `handover`): what waits for a client that may resume lives in sm's memory for minutes,
//! so an sm that dies (SIGKILL, a crash) must not take it along. Each parked session's
//! queue is kept in storage too, and the sm that starts next gives what a session of its
//! previous run held to the user's other sessions, offline storage or back to the
//! senders, as if that session's wait had ended (`ending::undelivered`). The sessions
//! themselves do not come back: their clients' resumptions fail and they log in again,
//! finding their messages offline.
//!
//! Stored per user under [`NS_HIBERNATED`]: `<queued token='T' jid='FULL'>stanza</queued>`
//! items, appended as stanzas are queued and rewritten when a session leaves the
//! queue (resumed or ended). Per domain, an index of the users with a record, one per sm
//! instance (`NS_HIBERNATED:sm-2`, owner the domain), read when the instance starts.
//! Only what a session's end would not drop is kept: messages (not errors) and IQ
//! requests; presence and IQ answers go as RFC 6121 says.
//!
//! A stanza is written once it is queued, after the router link acknowledged it: an sm
//! killed in that moment loses it, as it would lose any stanza between its link and
//! its tasks.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jid::{BareJid, FullJid};
use tracing::{debug, error, info, warn};

use jrs_stream::Stanza;

use crate::host::ending::undelivered;
use crate::host::kernel::{Ctx, User};
use crate::host::registry::Event;
use crate::host::session::{Link, Queued};
use crate::xml::{escape, Element, NS_CLIENT};

pub const NS_HIBERNATED: &str = "urn:jabberd-rs:hibernated:0";

/// What a user's task has written of its hibernating sessions.
#[derive(Debug, Default)]
pub struct Written {
    /// The user has a record in storage (written in this run, or found from the last).
    stored: bool,
    /// Items queued since the last write, to append.
    appends: Vec<u8>,
    /// A session left the queue: the record is rewritten from what is held now.
    rewrite: bool,
}

impl Written {
    /// A stanza queued for parked session `token` (`full`): appended after the event.
    pub fn queued(&mut self, token: &str, full: &str, item: &Queued) {
        if !self.rewrite && worth_keeping(item) {
            push_item(&mut self.appends, token, full, &item.bytes);
        }
    }

    /// A session parked, resumed or ended: the record is written again.
    pub fn changed(&mut self) {
        self.rewrite = true;
        self.appends.clear();
    }
}

/// Whether the end of a session would do anything with `item`: messages (not errors)
/// and IQ requests; offline messages are in storage already.
fn worth_keeping(item: &Queued) -> bool {
    if item.offline {
        return false;
    }
    let Ok(s) = Stanza::parse(item.bytes.clone()) else {
        return false;
    };
    match s.name() {
        "message" => s.kind() != Some("error"),
        "iq" => matches!(s.kind(), Some("get" | "set")),
        _ => false,
    }
}

fn push_item(out: &mut Vec<u8>, token: &str, full: &str, stanza: &[u8]) {
    out.extend_from_slice(
        format!("<queued token='{}' jid='{}'>", escape(token), escape(full)).as_bytes(),
    );
    out.extend_from_slice(stanza);
    out.extend_from_slice(b"</queued>");
}

/// What the user's parked sessions hold now, as their record.
fn record(u: &User) -> Vec<u8> {
    let mut out = vec![];
    for s in &u.sessions {
        let (Link::Held(held), Some(token)) = (&s.link, &s.resume_token) else {
            continue;
        };
        if held.parked.is_none() {
            continue;
        }
        for item in held.items.iter().filter(|i| worth_keeping(i)) {
            push_item(&mut out, token, &s.full, &item.bytes);
        }
    }
    out
}

/// Writes what changed in the user's record during the event (nothing for a user who
/// never hibernated).
pub async fn sync(u: &mut User) {
    if u.hibernation.rewrite {
        u.hibernation.rewrite = false;
        let data = record(u);
        if data.is_empty() {
            if u.hibernation.stored {
                if let Err(e) = u.ctx.store.delete(&u.bare, NS_HIBERNATED).await {
                    error!("removing the hibernated sessions' record failed: {e}");
                }
                u.hibernation.stored = false;
            }
            return;
        }
        if !listed(u).await {
            return;
        }
        match u.ctx.store.set(&u.bare, NS_HIBERNATED, data).await {
            Ok(()) => u.hibernation.stored = true,
            Err(e) => error!("writing the hibernated sessions' record failed: {e}"),
        }
    } else if !u.hibernation.appends.is_empty() {
        let data = std::mem::take(&mut u.hibernation.appends);
        if !listed(u).await {
            return;
        }
        match u.ctx.store.append(&u.bare, NS_HIBERNATED, data, None).await {
            Ok(()) => u.hibernation.stored = true,
            Err(e) => error!("writing to the hibernated sessions' record failed: {e}"),
        }
    }
}

/// Makes sure the domain's index names the user before its record is written.
async fn listed(u: &User) -> bool {
    let ctx = &u.ctx;
    match ctx.hibernated.list(ctx, &u.jid).await {
        Ok(()) => true,
        Err(e) => {
            error!("listing the user among those with hibernated sessions failed: {e}");
            false
        }
    }
}

/// The users with a record, per sm instance and domain; each listed once per run.
#[derive(Default)]
pub struct Index {
    /// [`recover`] was started (by the first router link).
    pub recovering: std::sync::atomic::AtomicBool,
    /// Users listed in storage by this run (or kept from the last one). A lock held
    /// across storage writes: the index rewritten at start-up must not overtake an append.
    listed: tokio::sync::Mutex<HashSet<BareJid>>,
}

fn index_ns(me: &str) -> String {
    format!("{NS_HIBERNATED}:{me}")
}

impl Index {
    async fn list(&self, ctx: &Ctx, user: &BareJid) -> Result<(), jrs_xdb::XdbError> {
        let mut listed = self.listed.lock().await;
        if listed.contains(user) {
            return Ok(());
        }
        let item = format!("<user jid='{}'/>", escape(user.as_str()));
        ctx.store
            .append(user.domain().as_str(), &index_ns(&ctx.me), item, None)
            .await?;
        listed.insert(user.clone());
        Ok(())
    }
}

/// At start-up (once the first router link is up): the users whose sessions hibernated
/// in this instance's last run get their stored queues back
/// ([`Event::HibernatedBefore`]); the index keeps only them and those listed since.
/// Retried until storage answers (it may connect after sm).
pub async fn recover(ctx: Arc<Ctx>) {
    let since = std::time::Instant::now();
    for host in ctx.config.hosts.clone() {
        let mut wait = Duration::from_millis(100);
        while let Err(e) = recover_host(&ctx, &host).await {
            if since.elapsed() > Duration::from_secs(10) {
                warn!(%host, "hibernated sessions of the last run not read yet: {e}");
            } else {
                debug!(%host, "hibernated sessions of the last run not read yet: {e}");
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}

async fn recover_host(ctx: &Arc<Ctx>, host: &str) -> Result<(), jrs_xdb::XdbError> {
    let ns = index_ns(&ctx.me);
    let index = ctx.store.get(host, &ns).await?;
    let mut users: Vec<BareJid> = vec![];
    if let Ok(items) = Element::parse_fragment(&index, NS_CLIENT) {
        for item in items {
            let user = item.attr("jid").and_then(|j| BareJid::new(j).ok());
            if let Some(user) = user.filter(|u| !users.contains(u)) {
                users.push(user);
            }
        }
    }
    let mut kept = vec![];
    for user in users {
        let record = ctx.store.get(user.as_str(), NS_HIBERNATED).await?;
        if !record.iter().all(u8::is_ascii_whitespace) {
            crate::host::task::dispatch(ctx, &user, Event::HibernatedBefore(record));
            kept.push(user);
        }
    }
    if !kept.is_empty() {
        info!(%host, users = kept.len(), "stored queues of sessions hibernating in the last run: given back");
    }
    // Those whose records were found, and those this run listed meanwhile.
    let mut listed = ctx.hibernated.listed.lock().await;
    listed.extend(kept.into_iter().filter(|u| u.domain().as_str() == host));
    let index: String = listed
        .iter()
        .filter(|u| u.domain().as_str() == host)
        .map(|u| format!("<user jid='{}'/>", escape(u.as_str())))
        .collect();
    if index.is_empty() {
        ctx.store.delete(host, &ns).await
    } else {
        ctx.store.set(host, &ns, index).await
    }
}

/// [`Event::HibernatedBefore`]: the stored queues of sessions that hibernated in an
/// earlier run of sm (`record`, read at start-up). Their sessions are gone: what they
/// held is undelivered, and the record is rewritten with what is held now.
pub async fn given_back(u: &mut User, record: Bytes) {
    let live: HashSet<String> = u
        .sessions
        .iter()
        .filter_map(|s| s.resume_token.clone())
        .collect();
    let items = match Element::parse_fragment(&record, NS_CLIENT) {
        Ok(items) => items,
        Err(e) => {
            error!("the hibernated sessions' record is unreadable, left as it is: {e}");
            return;
        }
    };
    // In order, per session (each run of one session's items goes together).
    let mut runs: Vec<(FullJid, Vec<Queued>)> = vec![];
    for q in items.iter().filter(|q| q.local_name() == "queued") {
        if q.attr("token").is_some_and(|t| live.contains(t)) {
            continue;
        }
        let (Some(full), Some(stanza)) = (
            q.attr("jid").and_then(|j| FullJid::new(j).ok()),
            q.elements().next(),
        ) else {
            continue;
        };
        let item = Queued::new(Bytes::from(stanza.to_stanza()));
        match runs.last_mut() {
            Some((jid, run)) if *jid == full => run.push(item),
            _ => runs.push((full, vec![item])),
        }
    }
    let count: usize = runs.iter().map(|(_, r)| r.len()).sum();
    info!(
        count,
        "stanzas held by sessions of the last run: undelivered"
    );
    for (full, run) in runs {
        undelivered(u, &full, None, run).await;
    }
    u.hibernation.stored = true;
    u.hibernation.changed();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::NS_HIBERNATED;
    use crate::host::registry::Event;
    use crate::host::session::{Park, Queued};
    use crate::host::task::handle;
    use crate::modules::offline::NS_OFFLINE;
    use crate::modules::testing::*;

    fn chat(to: &str, body: &str) -> String {
        format!("<message to='{to}' from='bob@localhost/b' type='chat' id='{body}'><body>{body}</body></message>")
    }

    /// A stanza from the network, handled as the user's task handles an event.
    async fn arrives(u: &mut crate::host::User, xml: &str) {
        let stanza = jrs_stream::Stanza::parse(Bytes::from(xml.to_owned())).unwrap();
        let to = stanza.attr("to").map(|t| jid::Jid::new(&t).unwrap());
        handle(
            u,
            Event::Inbound(crate::host::Packet::new(stanza, to, None)),
        )
        .await;
    }

    async fn stored(ctx: &crate::host::Ctx, owner: &str, ns: &str) -> String {
        String::from_utf8_lossy(&ctx.store.get(owner, ns).await.unwrap()).into_owned()
    }

    /// alice/phone resumable with token `t`, parked with `items` from c2s.
    async fn parked(u: &mut crate::host::User, items: &[&str]) {
        online(u, "phone", 0).await;
        let r = reference(u, "phone");
        handle(u, Event::Resumable(r.clone(), "t".into())).await;
        handle(u, Event::Hibernate(r.clone())).await;
        let park = Park {
            received: 1,
            acked: 0,
            sent: 0,
            timeout: Duration::from_secs(300),
            max: 100,
            items: items
                .iter()
                .map(|s| Queued::new(Bytes::from(s.to_string())))
                .collect(),
        };
        handle(u, Event::Park(r, park)).await;
        take(u);
    }

    #[tokio::test]
    async fn a_parked_queue_is_written_through_and_removed_on_resume() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        parked(&mut u, &[&chat("alice@localhost/phone", "unacked")]).await;
        arrives(&mut u, &chat("alice@localhost/phone", "later")).await;
        // Presence and IQ answers would be dropped at the session's end: not kept.
        arrives(
            &mut u,
            "<presence from='bob@localhost/b' to='alice@localhost/phone'/>",
        )
        .await;
        let record = stored(&ctx, "alice@localhost", NS_HIBERNATED).await;
        let (unacked, later) = (
            record.find("unacked").expect(&record),
            record.find("later").expect(&record),
        );
        assert!(unacked < later, "in order: {record}");
        assert!(record.contains("token='t'") && record.contains("jid='alice@localhost/phone'"));
        assert!(!record.contains("presence"), "{record}");
        let index = stored(&ctx, "localhost", &format!("{NS_HIBERNATED}:sm")).await;
        assert_eq!(index, "<user jid='alice@localhost'/>");
        handle(
            &mut u,
            Event::Resume {
                c2s: "c2s".into(),
                sid: "s2".into(),
                token: "t".into(),
            },
        )
        .await;
        assert_eq!(stored(&ctx, "alice@localhost", NS_HIBERNATED).await, "");
    }

    #[tokio::test]
    async fn a_new_run_gives_what_was_held_to_offline_storage() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        parked(&mut u, &[&chat("alice@localhost/phone", "unacked")]).await;
        arrives(&mut u, &chat("alice@localhost", "to-bare")).await;
        let record = ctx
            .store
            .get("alice@localhost", NS_HIBERNATED)
            .await
            .unwrap();
        // sm died: a new run's task for alice gets the record back.
        let mut u = user(&ctx, "alice@localhost");
        handle(&mut u, Event::HibernatedBefore(record)).await;
        let offline = stored(&ctx, "alice@localhost", NS_OFFLINE).await;
        let (unacked, bare) = (
            offline.find("unacked").expect(&offline),
            offline.find("to-bare").expect(&offline),
        );
        assert!(unacked < bare, "in order: {offline}");
        assert_eq!(stored(&ctx, "alice@localhost", NS_HIBERNATED).await, "");
        // The resumption of the dead session fails.
        handle(
            &mut u,
            Event::Resume {
                c2s: "c2s".into(),
                sid: "s2".into(),
                token: "t".into(),
            },
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["type='end'", "item-not-found"]).len(),
            1,
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn start_up_reads_the_index_and_keeps_only_users_with_records() {
        let ctx = ctx(None, "");
        let index = format!("{NS_HIBERNATED}:sm");
        ctx.store
            .set(
                "localhost",
                &index,
                "<user jid='alice@localhost'/><user jid='bob@localhost'/><user jid='alice@localhost'/>",
            )
            .await
            .unwrap();
        ctx.store
            .set(
                "alice@localhost",
                NS_HIBERNATED,
                format!(
                    "<queued token='old' jid='alice@localhost/phone'>{}</queued>",
                    chat("alice@localhost/phone", "kept")
                ),
            )
            .await
            .unwrap();
        super::recover_host(&ctx, "localhost").await.unwrap();
        assert_eq!(
            stored(&ctx, "localhost", &index).await,
            "<user jid='alice@localhost'/>"
        );
    }
}
