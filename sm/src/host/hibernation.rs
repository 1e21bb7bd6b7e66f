//! Hibernating sessions written through to storage (XEP-0198 on sm's side, see
//! `handover`): what waits for a client that may resume lives in sm's memory for minutes,
//! so an sm that dies (SIGKILL, a crash) must not take it along. Each parked session's
//! queue is kept in storage too, and the sm that starts next gives what a session of its
//! previous run held to the user's other sessions, offline storage or back to the
//! senders, as if that session's wait had ended (`ending::undelivered`). The sessions
//! themselves do not come back: their clients' resumptions fail and they log in again,
//! finding their messages offline.
//!
//! Stored per sm instance under `NS_HIBERNATED:NAME` ([`record_ns`]): for each user
//! (owner the bare JID) `<queued token='T' jid='FULL'>stanza</queued>` items, appended as
//! stanzas are queued and rewritten when a session leaves the queue (resumed or ended,
//! after the packets that carry its stanzas away were sent); for each domain (owner the
//! domain) the list of users with such a record, `<user jid='BARE'/>`, read when the
//! instance starts. Only what a session's end would not drop is kept: messages (not
//! errors) and IQ requests; presence and IQ answers go as RFC 6121 says.
//!
//! What an earlier run left is given back once per user and run: by the start-up pass,
//! or, if the user's task writes first, by that task before its first write (so it
//! never overwrites it).
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

use crate::host::ending::undelivered;
pub use crate::host::hibernated::record_ns;
use crate::host::hibernated::{push_item, worth_keeping};
use crate::host::kernel::{Ctx, User};
use crate::host::session::{Link, Queued};
use crate::xml::{Element, NS_CLIENT};

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

/// Whether [`sync`] has anything to write (the task boxes the write only then: its
/// future is large, and a task's size is that of its largest await point).
pub fn dirty(u: &User) -> bool {
    u.hibernation.rewrite || !u.hibernation.appends.is_empty()
}

/// Writes what changed in the user's record since the last call (nothing for a user who
/// never hibernated). Called by the user's task after it sent the output of its events:
/// a record shrinks only once what it held is on its way. A write that fails is tried
/// again with the next call (as a whole rewrite).
pub async fn sync(u: &mut User) {
    if !dirty(u) {
        return;
    }
    if !u.ctx.hibernated.is_recovered(&u.jid).await {
        // An earlier run's record must not be overwritten: given back first.
        match u.ctx.store.get(&u.bare, &record_ns(&u.ctx.me)).await {
            Ok(old) => given_back(u, old).await,
            Err(e) => {
                error!("reading the hibernated sessions' record of an earlier run failed: {e}");
                u.hibernation.changed();
                return;
            }
        }
        u.flush();
    }
    let ns = record_ns(&u.ctx.me);
    let result = if u.hibernation.rewrite {
        let data = record(u);
        if data.is_empty() {
            if !u.hibernation.stored {
                u.hibernation.rewrite = false;
                return;
            }
            u.ctx.store.delete(&u.bare, &ns).await.map(|()| false)
        } else if listed(u).await {
            u.ctx.store.set(&u.bare, &ns, data).await.map(|()| true)
        } else {
            return;
        }
    } else {
        let data = std::mem::take(&mut u.hibernation.appends);
        if !listed(u).await {
            u.hibernation.changed();
            return;
        }
        u.ctx
            .store
            .append(&u.bare, &ns, data, None)
            .await
            .map(|()| true)
    };
    match result {
        Ok(stored) => {
            u.hibernation.stored = stored;
            u.hibernation.rewrite = false;
        }
        Err(e) => {
            error!("writing the hibernated sessions' record failed (tried again with the next change): {e}");
            u.hibernation.changed();
        }
    }
}

/// Makes sure the domain's list names the user before its record is written.
async fn listed(u: &User) -> bool {
    let ctx = &u.ctx;
    match ctx.hibernated.list(&ctx.store, &ctx.me, &u.jid).await {
        Ok(()) => true,
        Err(e) => {
            error!("listing the user among those with hibernated sessions failed: {e}");
            false
        }
    }
}

/// At start-up (once the first router link is up): the users whose sessions hibernated
/// in this instance's last run get their stored queues back
/// ([`crate::host::registry::Event::HibernatedBefore`]); each domain's list keeps only them and those listed
/// since. Retried until storage answers (it may connect after sm), each domain on its
/// own.
pub async fn recover(ctx: Arc<Ctx>, give_back: GiveBack) {
    for host in ctx.config.hosts.clone() {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let since = std::time::Instant::now();
            let mut wait = Duration::from_millis(100);
            while let Err(e) = recover_host(&ctx, &host, give_back).await {
                if since.elapsed() > Duration::from_secs(10) {
                    warn!(%host, "hibernated sessions of the last run not read yet: {e}");
                } else {
                    debug!(%host, "hibernated sessions of the last run not read yet: {e}");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        });
    }
}

/// How the start-up pass hands a user's record to the user's task (the task module's
/// dispatch of [`crate::host::registry::Event::HibernatedBefore`]).
pub type GiveBack = fn(&Arc<Ctx>, &BareJid, Bytes);

async fn recover_host(
    ctx: &Arc<Ctx>,
    host: &str,
    give_back: GiveBack,
) -> Result<(), jrs_xdb::XdbError> {
    let ns = record_ns(&ctx.me);
    let index = ctx.store.get(host, &ns).await?;
    let items = match Element::parse_fragment(&index, NS_CLIENT) {
        Ok(items) => items,
        Err(e) => {
            error!(%host, "the list of users with hibernated sessions is unreadable, left as it is: {e}");
            return Ok(());
        }
    };
    let mut users: Vec<BareJid> = vec![];
    for item in items {
        let user = item.attr("jid").and_then(|j| BareJid::new(j).ok());
        if let Some(user) = user.filter(|u| !users.contains(u)) {
            users.push(user);
        }
    }
    // Those whose record could not be read stay listed, for the next start.
    let mut kept = vec![];
    let mut given = 0;
    for user in users {
        match ctx.store.get(user.as_str(), &ns).await {
            Ok(record) if record.iter().all(u8::is_ascii_whitespace) => {}
            Ok(record) => {
                give_back(ctx, &user, record);
                kept.push(user);
                given += 1;
            }
            Err(e) => {
                warn!(%user, "a hibernated sessions' record not read: left for the next start: {e}");
                kept.push(user);
            }
        }
    }
    if given > 0 {
        info!(%host, users = given, "stored queues of sessions hibernating in the last run: given back");
    }
    // Those whose records were found, and those this run listed meanwhile.
    ctx.hibernated.relist(&ctx.store, &ctx.me, host, kept).await
}

/// [`crate::host::registry::Event::HibernatedBefore`] (and a user's first write in a run): the stored queues of
/// sessions that hibernated in an earlier run of this sm instance (`record`). Their
/// sessions are gone: what they held is undelivered, once per user and run, and the
/// record is rewritten with what is held now.
pub async fn given_back(u: &mut User, record: Bytes) {
    if !u.ctx.hibernated.recover_once(&u.jid).await {
        return;
    }
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
    if count > 0 {
        info!(
            count,
            "stanzas held by sessions of an earlier run: undelivered"
        );
    }
    for (full, run) in runs {
        undelivered(u, &full, None, run).await;
    }
    if !record.iter().all(u8::is_ascii_whitespace) {
        u.hibernation.stored = true;
        u.hibernation.changed();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::{record_ns, sync};
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
        sync(u).await;
    }

    /// alice's record, as stored.
    async fn record_of(ctx: &crate::host::Ctx) -> Bytes {
        ctx.store
            .get("alice@localhost", &record_ns("sm"))
            .await
            .unwrap()
    }

    /// A new connection of alice's asks for the session `token`.
    async fn resume(u: &mut crate::host::User, token: &str) {
        let resume = Event::Resume {
            c2s: "c2s".into(),
            sid: "s2".into(),
            token: token.into(),
        };
        handle(u, resume).await;
    }

    /// A new run of sm over storage holding `record` for alice.
    async fn new_run_with(record: &Bytes) -> std::sync::Arc<crate::host::Ctx> {
        let ctx = ctx(None, "");
        ctx.store
            .set("alice@localhost", &record_ns("sm"), record.clone())
            .await
            .unwrap();
        ctx
    }

    #[tokio::test]
    async fn a_new_run_never_overwrites_the_last_runs_record() {
        let ctx1 = ctx(None, "");
        let mut u = user(&ctx1, "alice@localhost");
        parked(&mut u, &[&chat("alice@localhost/phone", "old")]).await;
        let record = record_of(&ctx1).await;
        // The new run's task writes before the start-up pass reached alice.
        let ctx = new_run_with(&record).await;
        let mut u = user(&ctx, "alice@localhost");
        parked_with(&mut u, "t2", &[&chat("alice@localhost/phone", "new")]).await;
        // The old stanza went to alice's session of the same resource (hibernating
        // too, so into its record), once; the new one is kept.
        let old_once = |offline: &str, record: &str| {
            offline.matches("'old'").count() + record.matches("'old'").count() == 1
        };
        let offline = stored(&ctx, "alice@localhost", NS_OFFLINE).await;
        let record = stored(&ctx, "alice@localhost", &record_ns("sm")).await;
        assert!(record.contains("'new'"), "{record}");
        assert!(old_once(&offline, &record), "{offline} {record}");
        // The start-up pass's copy of the old record comes later: nothing twice.
        let old_record = record_of(&ctx1).await;
        handle(&mut u, Event::HibernatedBefore(old_record)).await;
        sync(&mut u).await;
        let offline = stored(&ctx, "alice@localhost", NS_OFFLINE).await;
        let record = stored(&ctx, "alice@localhost", &record_ns("sm")).await;
        assert!(old_once(&offline, &record), "{offline} {record}");
    }

    async fn stored(ctx: &crate::host::Ctx, owner: &str, ns: &str) -> String {
        String::from_utf8_lossy(&ctx.store.get(owner, ns).await.unwrap()).into_owned()
    }

    /// alice/phone resumable with token `t`, parked with `items` from c2s.
    async fn parked(u: &mut crate::host::User, items: &[&str]) {
        parked_with(u, "t", items).await
    }

    /// alice/phone resumable with `token`, parked with `items` from c2s.
    async fn parked_with(u: &mut crate::host::User, token: &str, items: &[&str]) {
        online(u, "phone", 0).await;
        let r = reference(u, "phone");
        handle(u, Event::Resumable(r.clone(), token.into())).await;
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
        sync(u).await;
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
        let record = stored(&ctx, "alice@localhost", &record_ns("sm")).await;
        let (unacked, later) = (
            record.find("unacked").expect(&record),
            record.find("later").expect(&record),
        );
        assert!(unacked < later, "in order: {record}");
        assert!(record.contains("token='t'") && record.contains("jid='alice@localhost/phone'"));
        assert!(!record.contains("presence"), "{record}");
        let index = stored(&ctx, "localhost", &record_ns("sm")).await;
        assert_eq!(index, "<user jid='alice@localhost'/>");
        resume(&mut u, "t").await;
        sync(&mut u).await;
        assert_eq!(stored(&ctx, "alice@localhost", &record_ns("sm")).await, "");
    }

    #[tokio::test]
    async fn a_new_run_gives_what_was_held_to_offline_storage() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        parked(&mut u, &[&chat("alice@localhost/phone", "unacked")]).await;
        arrives(&mut u, &chat("alice@localhost", "to-bare")).await;
        let record = record_of(&ctx).await;
        // sm died: a new run (a new context, the record in its storage) gets the record
        // back, once.
        let ctx = new_run_with(&record).await;
        let mut u = user(&ctx, "alice@localhost");
        handle(&mut u, Event::HibernatedBefore(record.clone())).await;
        handle(&mut u, Event::HibernatedBefore(record)).await;
        sync(&mut u).await;
        let offline = stored(&ctx, "alice@localhost", NS_OFFLINE).await;
        let (unacked, bare) = (
            offline.find("unacked").expect(&offline),
            offline.find("to-bare").expect(&offline),
        );
        assert!(unacked < bare, "in order: {offline}");
        assert_eq!(
            offline.matches("id='unacked'").count(),
            1,
            "once: {offline}"
        );
        assert_eq!(stored(&ctx, "alice@localhost", &record_ns("sm")).await, "");
        // The resumption of the dead session fails.
        resume(&mut u, "t").await;
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
        let index = record_ns("sm");
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
                &record_ns("sm"),
                format!(
                    "<queued token='old' jid='alice@localhost/phone'>{}</queued>",
                    chat("alice@localhost/phone", "kept")
                ),
            )
            .await
            .unwrap();
        super::recover_host(&ctx, "localhost", |_, _, _| {})
            .await
            .unwrap();
        assert_eq!(
            stored(&ctx, "localhost", &index).await,
            "<user jid='alice@localhost'/>"
        );
    }
}
