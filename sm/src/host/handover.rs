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
        Link::Held(held) if held.parked.is_some() => {
            held.resumer = Some(resumer.clone());
            complete(u, key, resumer);
        }
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
    u.send(session::resumed(&me, &r, &parked, &held.items));
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
