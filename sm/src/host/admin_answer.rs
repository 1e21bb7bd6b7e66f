//! A user task's part of an administration request (host/admin.rs asks, as an
//! `Event::Admin`): list, end or message this user's sessions.

use jrs_stream::xml::escape;
use jrs_stream::StreamErrorCondition;

use crate::host::admin_query::{Query, SessionInfo};
use crate::host::ending::end_session;
use crate::host::kernel::User;

/// A user task's part of an administration request.
pub async fn answer(u: &mut User, query: Query) {
    match query {
        Query::Sessions { host, reply } => {
            if host
                .as_deref()
                .is_some_and(|h| h != u.jid.domain().as_str())
            {
                return;
            }
            let sessions = u
                .sessions
                .iter()
                .map(|s| SessionInfo {
                    jid: s.full.clone(),
                    c2s: s.c2s.clone(),
                    state: if s.is_live() { "live" } else { "hibernating" },
                    available: s.available,
                    priority: s.priority,
                })
                .collect();
            let _ = reply.send(sessions);
        }
        Query::Kick { resource, reply } => {
            let keys: Vec<_> = u
                .sessions
                .iter()
                .filter(|s| {
                    resource
                        .as_deref()
                        .is_none_or(|r| s.jid.resource().as_str() == r)
                })
                .map(|s| s.key)
                .collect();
            for key in &keys {
                // The client gets <policy-violation/>; the session ends as any other
                // (unavailable presence to contacts, its queue to offline storage).
                end_session(u, *key, Some(StreamErrorCondition::PolicyViolation)).await;
            }
            let _ = reply.send(keys.len());
        }
        Query::Announce {
            host,
            subject,
            body,
            reply,
        } => {
            if u.jid.domain().as_str() != host {
                return;
            }
            let keys = u.available();
            for key in &keys {
                let Some(s) = u.session(*key) else { continue };
                let id = u.ctx.me.clone();
                let subject = subject.as_deref().map_or(String::new(), |s| {
                    format!("<subject>{}</subject>", escape(s))
                });
                let message = format!(
                    "<message from='{}' to='{}' type='headline' id='announce-{}'>{subject}<body>{}</body></message>",
                    escape(&host),
                    escape(&s.full),
                    escape(&id),
                    escape(&body)
                );
                u.deliver(*key, message);
            }
            let _ = reply.send(keys.len());
        }
    }
}
