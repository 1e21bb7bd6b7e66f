//! XEP-0198 on sm's side: sessions that outlive their connection. When a resumable
//! session's connection drops, its c2s asks to hand it over (`hibernate`); sm stops
//! sending to that c2s and answers `collect`, so c2s's `park` carries everything sent
//! before, and what arrives after waits here in order. A client that comes back on any
//! c2s instance of the domain asks for the session by its token (`resume`); sm hands it
//! to that connection (`resumed`), collecting it first if the old connection still has
//! it. A session nobody resumes ends when its wait is over, its queue going to offline
//! storage, another session, or back to the senders (`ending::end_session`).
//!
//! Presence does not change while a session hibernates: contacts see it as it was.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::host::ending::{end_session, reset, undelivered};
use crate::host::kernel::User;
use crate::host::session::{self, Held, Link, Park, Parked, Resumer, SessionKey, SessionRef};

/// Numbers each parking, so a timer set for an earlier one does nothing.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// `resumable`: the session's client may resume it with `token`.
pub fn resumable(u: &mut User, r: &SessionRef, token: String) {
    match u.find(r) {
        Some(key) => {
            if let Some(s) = u.session_mut(key) {
                s.resume_token = Some(token);
            }
        }
        None => reset(u, r),
    }
}

/// `hibernate`: the client's connection dropped. From now on stanzas for the session
/// wait here; `collect` tells c2s to send its part (after everything sent before).
pub fn hibernate(u: &mut User, r: &SessionRef) {
    let Some(key) = u.find(r) else {
        return reset(u, r);
    };
    let me = u.ctx.me.clone();
    let Some(s) = u.session_mut(key) else { return };
    if s.is_live() {
        s.link = Link::Held(Box::default());
        u.send(session::packet(&me, "collect", r, b""));
    }
    // Held already: `collect` went out when a resumption asked for the session.
}

/// `park`: c2s handed the session over with what its client has not got. Returns the
/// wait to time (session, parking number, how long) when the session hibernates: the
/// task then tells [`wait_over`].
pub async fn park(
    u: &mut User,
    r: SessionRef,
    park: Park,
) -> Option<(SessionKey, u64, std::time::Duration)> {
    let Some(key) = u.find(&r) else {
        // Ended meanwhile: what it carried is undelivered.
        undelivered(u, &r.jid, None, park.items).await;
        return None;
    };
    let s = u.session_mut(key)?;
    let mut held = match std::mem::take(&mut s.link) {
        Link::Held(held) => held,
        Link::Live => Box::<Held>::default(),
    };
    // c2s's part came first: what waited here arrived after it.
    let mut items = park.items;
    items.append(&mut held.items);
    held.items = items;
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    held.parked = Some(Parked {
        received: park.received,
        acked: park.acked,
        sent: park.sent,
        since: Instant::now(),
        generation,
        max: park.max,
        counted: false,
    });
    let queued = held.items.len();
    let resumer = held.resumer.take();
    s.link = Link::Held(held);
    if let Some(resumer) = resumer {
        complete(u, key, resumer);
        return None;
    }
    let config = &u.ctx.config;
    let (per_user, total) = (config.hibernated_per_user, config.hibernated_total);
    if per_user == 0 || u.ctx.parked.load(Ordering::Relaxed) >= total || queued > park.max {
        warn!(queued, "session cannot hibernate (limits): it ends");
        end_session(u, key, None).await;
        return None;
    }
    // The oldest hibernating sessions of the user give way past the limit.
    loop {
        let parked: Vec<(Instant, SessionKey)> = u
            .sessions
            .iter()
            .filter(|s| s.key != key)
            .filter_map(|s| match &s.link {
                Link::Held(h) => h.parked.as_ref().map(|p| (p.since, s.key)),
                Link::Live => None,
            })
            .collect();
        if parked.len() < per_user {
            break;
        }
        let oldest = parked.iter().min().map(|(_, k)| *k).expect("not empty");
        info!("too many hibernating sessions for this user: the oldest ends");
        end_session(u, oldest, None).await;
    }
    u.ctx.parked.fetch_add(1, Ordering::Relaxed);
    if let Some(Link::Held(h)) = u.session_mut(key).map(|s| &mut s.link) {
        if let Some(p) = &mut h.parked {
            p.counted = true;
        }
    }
    // Its queue goes to storage too (`host::hibernation`).
    u.hibernation.changed();
    info!(queued, timeout = ?park.timeout, "session hibernating");
    Some((key, generation, park.timeout))
}

/// `resume`: a new connection (`c2s`, `sid`) asks for the session `token`.
pub fn resume(u: &mut User, c2s: String, sid: String, token: String) {
    let me = u.ctx.me.clone();
    let found = u
        .sessions
        .iter()
        .find(|s| !token.is_empty() && s.resume_token.as_deref() == Some(token.as_str()))
        .map(|s| s.key);
    let Some(key) = found else {
        info!(%c2s, "resumption of an unknown or ended session refused");
        let refusal = session::refuse_resume(&me, &c2s, &sid, &u.bare);
        return u.send(refusal);
    };
    let resumer = Resumer { c2s, sid };
    let Some(s) = u.session_mut(key) else { return };
    let old = s.reference();
    match &mut s.link {
        Link::Live => {
            // The old connection still has it (its client vanished without a trace).
            debug!(old_c2s = %old.c2s, old_sid = %old.sid, "collecting the session from its old connection");
            s.link = Link::Held(Box::new(Held {
                resumer: Some(resumer),
                ..Held::default()
            }));
            u.send(session::packet(&me, "collect", &old, b""));
        }
        Link::Held(held) if held.parked.is_some() => complete(u, key, resumer),
        Link::Held(held) => {
            // Its c2s has yet to hand it over; the latest connection gets it.
            if let Some(earlier) = held.resumer.replace(resumer) {
                let refusal = session::refuse_resume(&me, &earlier.c2s, &earlier.sid, &u.bare);
                u.send(refusal);
            }
        }
    }
}

/// Hands parked session `key` to `to`: the session now lives there.
fn complete(u: &mut User, key: SessionKey, to: Resumer) {
    let me = u.ctx.me.clone();
    let Some(s) = u.session_mut(key) else { return };
    let Link::Held(held) = std::mem::take(&mut s.link) else {
        return;
    };
    let Some(parked) = held.parked else {
        s.link = Link::Held(held);
        return;
    };
    s.c2s = to.c2s;
    s.sid = to.sid;
    let r = s.reference();
    let waited = parked.since.elapsed();
    // What the new c2s tells us again should we lose the session (`restore`).
    let s = u.session(key).expect("found");
    let mut state = jrs_component::session::SessionState {
        presence: s
            .presence
            .as_ref()
            .filter(|_| s.available)
            .map(|p| bytes::Bytes::from(p.to_stanza())),
        token: s.resume_token.clone(),
        ..Default::default()
    };
    for m in u.ctx.modules.all() {
        m.session_state(s, &mut state);
    }
    u.send(session::resumed(&me, &r, &parked, &held.items, &state));
    u.hibernation.changed();
    if parked.counted {
        u.ctx.parked.fetch_sub(1, Ordering::Relaxed);
    }
    info!(c2s = %r.c2s, sid = %r.sid, queued = held.items.len(), waited = ?waited, "session resumed");
}

/// A parked session's wait is over (if parking `generation` is still the one).
pub async fn wait_over(u: &mut User, key: SessionKey, generation: u64) {
    let still = u.session(key).is_some_and(|s| match &s.link {
        Link::Held(h) => {
            h.resumer.is_none()
                && h.parked
                    .as_ref()
                    .is_some_and(|p| p.generation == generation)
        }
        Link::Live => false,
    });
    if still {
        info!("hibernation over: the session ends");
        end_session(u, key, None).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use crate::host::registry::Event;
    use crate::host::session::{Park, Queued};
    use crate::host::task::handle;
    use crate::modules::offline::NS_OFFLINE;
    use crate::modules::testing::*;

    fn chat(to: &str, body: &str) -> String {
        format!("<message to='{to}' from='bob@localhost/b' type='chat' id='{body}'><body>{body}</body></message>")
    }

    fn park(items: &[&str]) -> Park {
        Park {
            received: 7,
            acked: 3,
            sent: 2,
            timeout: Duration::from_secs(300),
            max: 5,
            items: items
                .iter()
                .map(|s| Queued::new(Bytes::from(s.to_string())))
                .collect(),
        }
    }

    fn resume_event(c2s: &str, sid: &str, token: &str) -> Event {
        Event::Resume {
            c2s: c2s.into(),
            sid: sid.into(),
            token: token.into(),
        }
    }

    /// alice/phone online and resumable with token `t`.
    async fn resumable_phone(u: &mut crate::host::User) -> crate::host::session::SessionRef {
        online(u, "phone", 0).await;
        let r = reference(u, "phone");
        handle(u, Event::Resumable(r.clone(), "t".into())).await;
        take(u);
        r
    }

    #[tokio::test]
    async fn a_hibernating_session_keeps_order_and_is_resumed_elsewhere() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        let r = resumable_phone(&mut u).await;
        handle(&mut u, Event::Hibernate(r.clone())).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["type='collect'", "sid='phone'"]).len(),
            1,
            "{out:?}"
        );
        // What arrives now waits here, after what c2s still has.
        inbound(&mut u, &chat("alice@localhost/phone", "later")).await;
        assert!(to(&take(&mut u), "phone", &[]).is_empty());
        handle(
            &mut u,
            Event::Park(
                r.clone(),
                park(&[&chat("alice@localhost/phone", "earlier")]),
            ),
        )
        .await;
        assert_eq!(ctx.parked.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Presence did not change: still available.
        assert!(u.sessions[0].available);
        handle(&mut u, resume_event("c2s-2", "s9", "t")).await;
        let out = take(&mut u);
        let resumed = to(
            &out,
            "",
            &[
                "type='resumed'",
                "to='c2s-2'",
                "sid='s9'",
                "h='7'",
                "acked='3'",
                "sent='2'",
            ],
        );
        assert_eq!(resumed.len(), 1, "{out:?}");
        let (earlier, later) = (
            resumed[0].find("earlier").unwrap(),
            resumed[0].find("later").unwrap(),
        );
        assert!(earlier < later, "in order: {}", resumed[0]);
        assert_eq!(ctx.parked.load(std::sync::atomic::Ordering::Relaxed), 0);
        // The session lives on the new connection.
        inbound(&mut u, &chat("alice@localhost/phone", "after")).await;
        let out = u.out.take();
        assert!(
            matches!(&out[..], [crate::host::out::Output::Deliver { to, .. }] if to.c2s == "c2s-2" && to.sid == "s9"),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn resuming_a_live_session_collects_it_first_and_unknown_tokens_fail() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        let r = resumable_phone(&mut u).await;
        handle(&mut u, resume_event("c2s-2", "s9", "wrong")).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["type='end'", "item-not-found", "sid='s9'"]).len(),
            1,
            "{out:?}"
        );
        handle(&mut u, resume_event("c2s-2", "s9", "t")).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["type='collect'", "to='c2s'", "sid='phone'"]).len(),
            1,
            "{out:?}"
        );
        handle(&mut u, Event::Park(r, park(&[]))).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["type='resumed'", "to='c2s-2'"]).len(),
            1,
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn when_the_wait_is_over_messages_go_to_offline_storage() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        let r = resumable_phone(&mut u).await;
        handle(&mut u, Event::Hibernate(r.clone())).await;
        inbound(&mut u, &chat("alice@localhost", "queued")).await;
        let mut p = park(&[
            &chat("alice@localhost/phone", "unacked"),
            "<iq type='get' id='q1' from='bob@localhost/b' to='alice@localhost/phone'><query xmlns='jabber:iq:version'/></iq>",
        ]);
        p.items.push(Queued {
            bytes: Bytes::from(chat("alice@localhost", "from-offline")),
            offline: true,
        });
        handle(&mut u, Event::Park(r, p)).await;
        take(&mut u);
        let key = u.sessions[0].key;
        let generation = match &u.sessions[0].link {
            super::Link::Held(h) => h.parked.as_ref().unwrap().generation,
            _ => unreachable!(),
        };
        // A timer for an earlier parking does nothing.
        handle(
            &mut u,
            Event::HibernationEnds {
                key,
                generation: generation - 1,
            },
        )
        .await;
        assert_eq!(u.sessions.len(), 1);
        handle(&mut u, Event::HibernationEnds { key, generation }).await;
        assert!(u.sessions.is_empty());
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "",
                &["type='error'", "id='q1'", "service-unavailable"]
            )
            .len(),
            1,
            "{out:?}"
        );
        let stored = ctx.store.get("alice@localhost", NS_OFFLINE).await.unwrap();
        let stored = String::from_utf8_lossy(&stored);
        assert!(
            stored.contains("unacked") && stored.contains("queued"),
            "{stored}"
        );
        // An offline message given to the session is in storage still: not stored twice.
        assert!(!stored.contains("from-offline"), "{stored}");
        assert_eq!(ctx.parked.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn limits_end_hibernating_sessions() {
        let ctx = ctx(None, "<sessions hibernated-per-user='1'/>");
        let mut u = user(&ctx, "alice@localhost");
        for resource in ["one", "two"] {
            online(&mut u, resource, 0).await;
            let r = reference(&u, resource);
            handle(&mut u, Event::Hibernate(r.clone())).await;
            handle(&mut u, Event::Park(r, park(&[]))).await;
        }
        let left: Vec<&str> = u
            .sessions
            .iter()
            .map(|s| s.jid.resource().as_str())
            .collect();
        assert_eq!(left, ["two"], "the older one gave way");
        // Past its queue bound (5) a hibernating session ends.
        for i in 0..6 {
            let stanza = jrs_stream::Stanza::parse(Bytes::from(chat(
                "alice@localhost/two",
                &format!("m{i}"),
            )))
            .unwrap();
            let to = jid::Jid::new("alice@localhost/two").ok();
            handle(
                &mut u,
                Event::Inbound(crate::host::Packet::new(stanza, to, None)),
            )
            .await;
        }
        assert!(u.sessions.is_empty());
        let stored = ctx.store.get("alice@localhost", NS_OFFLINE).await.unwrap();
        assert!(String::from_utf8_lossy(&stored).contains("m5"));
    }

    #[tokio::test]
    async fn what_a_session_never_got_goes_to_another_session() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 5).await;
        online(&mut u, "desk", 0).await;
        take(&mut u);
        let r = reference(&u, "phone");
        let items = vec![
            Queued::new(Bytes::from(chat("alice@localhost/phone", "to-phone"))),
            // To the bare JID, delivered to the phone alone (higher priority): the desk
            // did not get it.
            Queued::new(Bytes::from(chat("alice@localhost", "to-bare"))),
        ];
        handle(&mut u, Event::End(r, items)).await;
        let out = take(&mut u);
        assert_eq!(to(&out, "desk", &["to-phone"]).len(), 1, "{out:?}");
        assert_eq!(to(&out, "desk", &["to-bare"]).len(), 1, "{out:?}");
        // Same priority: a bare JID message went to both already.
        online(&mut u, "tablet", 0).await;
        take(&mut u);
        let r = reference(&u, "tablet");
        let items = vec![Queued::new(Bytes::from(chat("alice@localhost", "both")))];
        handle(&mut u, Event::End(r, items)).await;
        assert!(to(&take(&mut u), "desk", &["both"]).is_empty());
    }
}
