//! Last activity (XEP-0012): the server's uptime, and for an account the seconds since
//! its last logout (to contacts subscribed to its presence).
//!
//! Stored under `jabber:iq:last` as `<query xmlns='jabber:iq:last' logout='UNIX-SECONDS'
//! at='UNIX-MICROSECONDS'>status text</query>`, written when the user's last session
//! ends (`at` tells one logout from another within a second, for push's count).

use std::sync::Arc;

use tracing::warn;

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::XdbError;

use crate::clock::{now_micros, unix_now};
use crate::config::SmConfig;
use crate::host::{
    storage_error, Declaration, Disco, Hook, Iq, IqKind, Module, Reply, Scope, Session, User,
};
use crate::modules::presence::LastStatus;
use crate::modules::roster;
use crate::xml::Element;

pub const NS_LAST: &str = "jabber:iq:last";

pub struct Last;

pub fn load_module(_config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    Ok(Arc::new(Last))
}

fn answer(seconds: u64, status: Option<String>) -> Reply {
    let mut q = Element::new("query", NS_LAST).with_attr("seconds", seconds.to_string());
    if let Some(s) = status.filter(|s| !s.is_empty()) {
        q = q.with_text(s);
    }
    Reply::with(q)
}

#[async_trait::async_trait]
impl Module for Last {
    fn name(&self) -> &'static str {
        "last"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .requires("roster")
            .requires("presence")
            .iq(
                IqKind::Get,
                &[Scope::Server, Scope::Own, Scope::Contact],
                NS_LAST,
                "query",
            )
            .feature(Disco::Server, NS_LAST)
            .feature(Disco::Account, NS_LAST)
            .hook(Hook::SessionEnded, 0)
    }

    /// Records the logout time when the user's last session ended. Storage may put it
    /// on disk up to a second later (`set_later`): a crash in that second loses the
    /// time of one logout (the query then answers the previous one), and every logout
    /// no longer waits for a disk flush of its own, which was most of what a login and
    /// logout cost xdb-file (docs/benchmarks.md, "Writes nothing waits for").
    async fn session_ended(&self, u: &mut User, s: &Session) {
        if !u.sessions.is_empty() || u.removed {
            return;
        }
        let at = now_micros();
        let mut q = Element::new("query", NS_LAST)
            .with_attr("logout", (at / 1_000_000).to_string())
            .with_attr("at", at.to_string());
        if let Some(status) = s.state.get::<LastStatus>().and_then(|l| l.0.as_deref()) {
            q = q.with_text(status);
        }
        if let Err(e) = u.ctx.store.set_later(&u.bare, NS_LAST, q.to_xml()).await {
            warn!("last activity not stored: {e}");
        }
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        match iq.scope {
            Scope::Server => answer(u.ctx.started.elapsed().as_secs(), None),
            Scope::Own => last_logout(u).await,
            Scope::Contact => {
                let contact = iq.from.as_ref().map(|f| f.to_bare().to_string());
                let allowed = match (contact, roster::load(u).await) {
                    (Some(c), Ok(r)) => r.sub(&c).from,
                    (None, _) => false,
                    (_, Err(e)) => return storage_error(&e),
                };
                if !allowed {
                    return Reply::error(
                        StanzaErrorCondition::Forbidden,
                        "only contacts subscribed to this user's presence may ask",
                    );
                }
                last_logout(u).await
            }
        }
    }
}

/// The user's last logout, if one is recorded: Unix seconds, the microseconds (`at`,
/// absent in records from before it was kept: the seconds then), and the status.
async fn stored_logout(u: &User) -> Result<Option<(u64, u64, String)>, XdbError> {
    let stored = u.ctx.store.get(&u.bare, NS_LAST).await?;
    Ok(Element::parse(&stored, "").ok().and_then(|q| {
        let secs = q.attr("logout")?.parse::<u64>().ok()?;
        let micros = q
            .attr("at")
            .and_then(|a| a.parse().ok())
            .unwrap_or(secs * 1_000_000);
        Some((secs, micros, q.text()))
    }))
}

/// Which logout was the user's last (its time in microseconds), if one is recorded:
/// push restarts its count when this changed since its last notification.
pub async fn logout_time(u: &User) -> Result<Option<u64>, XdbError> {
    Ok(stored_logout(u).await?.map(|(_, micros, _)| micros))
}

/// 0 while the user is online; else the seconds since the last logout, and its status.
async fn last_logout(u: &mut User) -> Reply {
    if !u.available().is_empty() {
        return answer(0, None);
    }
    let logout = match stored_logout(u).await {
        Ok(l) => l,
        Err(e) => return storage_error(&e),
    };
    match logout {
        Some((at, _, status)) => answer(unix_now().saturating_sub(at), Some(status)),
        None => Reply::error(
            StanzaErrorCondition::ItemNotFound,
            "no last activity recorded",
        ),
    }
}
