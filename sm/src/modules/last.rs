//! Last activity (XEP-0012): the server's uptime, and for an account the seconds since
//! its last logout (to contacts subscribed to its presence).
//!
//! Stored under `jabber:iq:last` as `<query xmlns='jabber:iq:last' logout='UNIX-SECONDS'>
//! status text</query>`, written when the user's last session ends.

use jid::Jid;
use tracing::warn;

use jrs_stream::StanzaErrorCondition;

use crate::context::Ctx;
use crate::stanzas::Reply;
use crate::time::unix_now;
use crate::user::User;
use crate::xml::Element;

pub const NS_LAST: &str = "jabber:iq:last";

fn answer(seconds: u64, status: Option<String>) -> Reply {
    let mut q = Element::new("query", NS_LAST).with_attr("seconds", seconds.to_string());
    if let Some(s) = status.filter(|s| !s.is_empty()) {
        q = q.with_text(s);
    }
    Reply::with(q)
}

/// The server's uptime.
pub fn uptime(ctx: &Ctx) -> Reply {
    answer(ctx.started.elapsed().as_secs(), None)
}

impl User {
    /// Records the logout time (the user's last session ended).
    pub async fn save_logout(&self, status: Option<&str>) {
        let mut q = Element::new("query", NS_LAST).with_attr("logout", unix_now().to_string());
        if let Some(s) = status {
            q = q.with_text(s);
        }
        if let Err(e) = self.ctx.xdb.set(&self.bare, NS_LAST, q.to_xml()).await {
            warn!("last activity not stored: {e}");
        }
    }

    /// A last-activity query about this account from `requester` (None: the user).
    pub async fn last_iq(&mut self, requester: Option<&Jid>) -> Reply {
        if let Some(r) = requester {
            let contact = r.to_bare().to_string();
            if contact != self.bare {
                let allowed = match self.roster().await {
                    Ok(roster) => roster.sub(&contact).from,
                    Err(e) => return crate::stanzas::storage_error(&e),
                };
                if !allowed {
                    return Reply::error(
                        StanzaErrorCondition::Forbidden,
                        "only contacts subscribed to this user's presence may ask",
                    );
                }
            }
        }
        if !self.available().is_empty() {
            return answer(0, None);
        }
        let stored = match self.ctx.xdb.get(&self.bare, NS_LAST).await {
            Ok(s) => s,
            Err(e) => return crate::stanzas::storage_error(&e),
        };
        let Ok(q) = Element::parse(&stored, "") else {
            return Reply::error(
                StanzaErrorCondition::ItemNotFound,
                "no last activity recorded",
            );
        };
        let Some(logout) = q.attr("logout").and_then(|v| v.parse::<u64>().ok()) else {
            return Reply::error(
                StanzaErrorCondition::ItemNotFound,
                "no last activity recorded",
            );
        };
        answer(unix_now().saturating_sub(logout), Some(q.text()))
    }
}
