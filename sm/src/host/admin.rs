//! What `jabberctl sessions|kick|announce|stats` ask an sm instance (docs/protocol.md,
//! "Administration"): IQs addressed to this instance's component name (`sm`, `sm-2`)
//! from the trusted `admin` component, in `urn:jabberd-rs:admin:0`. The router lets only
//! the component named `admin` send from that name, so the check of `from` is the check
//! of who asks. Each instance answers for the users it holds; jabberctl asks every
//! instance (it learns them from link notices) and merges.
//!
//! Sessions live in their users' tasks: a question for all of them goes to every task as
//! an [`Event::Admin`], each answers on a channel, and the answer is complete when every
//! task has dropped its sender.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use jid::{BareJid, Jid};
use tokio::sync::mpsc;
use tracing::{info, warn};

use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::host::admin_query::Query;
use crate::host::kernel::Ctx;
use crate::host::registry::Event;
use crate::host::task::dispatch;
use crate::xml::{Element, NS_CLIENT};

pub const NS_ADMIN: &str = "urn:jabberd-rs:admin:0";
/// The component allowed to ask (router-users.xml's `admin` entry, jabberctl).
pub const ADMIN: &str = "admin";

/// Whether `from` is the admin component: `admin`, or an instance of it (`admin-N`: each
/// jabberctl run connects as `admin-PID`, which the router authenticates with the
/// `admin` entry's secret).
fn is_admin(from: Option<&str>) -> bool {
    from.is_some_and(|f| {
        f == ADMIN
            || f.strip_prefix("admin-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Whether a packet to `to_domain` is an administration request for this instance.
pub fn is_for_me(ctx: &Ctx, to_domain: &str, stanza: &Stanza) -> bool {
    to_domain == ctx.me && stanza.name() == "iq"
}

/// Answers an administration IQ (the packet's `to` is this instance).
pub fn request(ctx: &Arc<Ctx>, stanza: Stanza) {
    if !is_admin(stanza.from()) {
        warn!(
            from = stanza.from().unwrap_or(""),
            "administration request not from the admin component: refused"
        );
        if let Some(r) = stanza.error_reply(
            StanzaErrorCondition::Forbidden,
            "only jabberctl (the admin component) may ask",
        ) {
            ctx.send(r);
        }
        return;
    }
    if !matches!(stanza.kind(), Some("get" | "set")) {
        return;
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let answer = match parse(&stanza) {
            Ok(q) => run(&ctx, q).await,
            Err(text) => Err(text),
        };
        let reply = match answer {
            Ok(inner) => result(&stanza, &inner),
            Err(text) => stanza
                .error_reply(StanzaErrorCondition::BadRequest, &text)
                .unwrap_or_default(),
        };
        ctx.send(reply);
    });
}

/// A request as read from the IQ.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Sessions {
        host: Option<String>,
    },
    Kick {
        jid: Jid,
    },
    Announce {
        host: String,
        subject: Option<String>,
        body: String,
    },
    Stats,
}

fn parse(iq: &Stanza) -> Result<Request, String> {
    let root = Element::parse(iq.bytes(), NS_CLIENT)
        .map_err(|e| format!("unreadable request: {}", e.0))?;
    let child = root
        .elements()
        .find(|c| c.ns == NS_ADMIN)
        .ok_or("no request in urn:jabberd-rs:admin:0")?;
    match child.local_name() {
        "sessions" => Ok(Request::Sessions {
            host: child.attr("host").map(str::to_owned),
        }),
        "kick" => {
            let jid = child.attr("jid").ok_or("kick needs jid")?;
            let jid = Jid::new(jid).map_err(|e| format!("jid: {e}"))?;
            if jid.node().is_none() {
                return Err("kick needs a user's JID".into());
            }
            Ok(Request::Kick { jid })
        }
        "announce" => {
            let host = child.attr("host").ok_or("announce needs host")?.to_owned();
            let body = child
                .child("body", NS_ADMIN)
                .map(Element::text)
                .unwrap_or_default();
            if body.is_empty() {
                return Err("announce needs a body".into());
            }
            let subject = child.child("subject", NS_ADMIN).map(Element::text);
            Ok(Request::Announce {
                host,
                subject,
                body,
            })
        }
        "stats" => Ok(Request::Stats),
        other => Err(format!("unknown request '{other}'")),
    }
}

async fn run(ctx: &Arc<Ctx>, request: Request) -> Result<String, String> {
    match request {
        Request::Sessions { host } => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            ctx.users.broadcast(|| {
                Event::Admin(Query::Sessions {
                    host: host.clone(),
                    reply: tx.clone(),
                })
            });
            drop(tx);
            let mut all = vec![];
            while let Some(mut some) = rx.recv().await {
                all.append(&mut some);
            }
            all.sort_by(|a, b| a.jid.cmp(&b.jid));
            let items: String = all
                .iter()
                .map(|s| {
                    format!(
                        "<session jid='{}' c2s='{}' state='{}' available='{}' priority='{}'/>",
                        escape(&s.jid),
                        escape(&s.c2s),
                        s.state,
                        s.available,
                        s.priority
                    )
                })
                .collect();
            Ok(format!(
                "<sessions xmlns='{NS_ADMIN}' sm='{}'>{items}</sessions>",
                escape(&ctx.me)
            ))
        }
        Request::Kick { jid } => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let user: BareJid = jid.to_bare();
            // Only a user whose task runs here has sessions here.
            if ctx.users.is_loaded(&user) {
                let resource = jid.resource().map(|r| r.as_str().to_owned());
                dispatch(
                    ctx,
                    &user,
                    Event::Admin(Query::Kick {
                        resource,
                        reply: tx,
                    }),
                );
            } else {
                drop(tx);
            }
            let ended = rx.recv().await.unwrap_or(0);
            info!(%jid, ended, "sessions ended by an administrator");
            Ok(format!("<kick xmlns='{NS_ADMIN}' ended='{ended}'/>"))
        }
        Request::Announce {
            host,
            subject,
            body,
        } => {
            if !ctx.config.serves(&host) {
                return Err(format!("this sm does not serve '{host}'"));
            }
            let (tx, mut rx) = mpsc::unbounded_channel();
            ctx.users.broadcast(|| {
                Event::Admin(Query::Announce {
                    host: host.clone(),
                    subject: subject.clone(),
                    body: body.clone(),
                    reply: tx.clone(),
                })
            });
            drop(tx);
            let mut sent = 0;
            while let Some(n) = rx.recv().await {
                sent += n;
            }
            info!(%host, sent, "announcement delivered");
            Ok(format!("<announce xmlns='{NS_ADMIN}' sent='{sent}'/>"))
        }
        Request::Stats => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            ctx.users.broadcast(|| {
                Event::Admin(Query::Sessions {
                    host: None,
                    reply: tx.clone(),
                })
            });
            drop(tx);
            let (mut live, mut hibernating, mut available, mut users) = (0, 0, 0, 0);
            while let Some(sessions) = rx.recv().await {
                users += usize::from(!sessions.is_empty());
                for s in sessions {
                    if s.state == "live" {
                        live += 1;
                    } else {
                        hibernating += 1;
                    }
                    available += usize::from(s.available);
                }
            }
            Ok(format!(
                "<stats xmlns='{NS_ADMIN}' sm='{}' users-online='{users}' sessions='{live}' \
                 hibernating='{hibernating}' available='{available}' parked='{}' \
                 uptime='{}'/>",
                escape(&ctx.me),
                ctx.parked.load(Ordering::Relaxed),
                ctx.started.elapsed().as_secs()
            ))
        }
    }
}

fn result(iq: &Stanza, inner: &str) -> bytes::Bytes {
    let attr = |name, value: Option<&str>| {
        value.map_or(String::new(), |v| format!(" {name}='{}'", escape(v)))
    };
    format!(
        "<iq type='result'{}{}{}>{inner}</iq>",
        attr("to", iq.from()),
        attr("from", iq.to()),
        attr("id", iq.id())
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_admin_component_and_its_instances_may_ask() {
        assert!(is_admin(Some("admin")));
        assert!(is_admin(Some("admin-4242")));
        for other in ["admins", "admin-", "admin-x1", "c2s", "alice@localhost", ""] {
            assert!(!is_admin(Some(other)), "{other}");
        }
        assert!(!is_admin(None));
    }

    #[test]
    fn requests_are_read() {
        let iq = |inner: &str| {
            Stanza::parse(bytes::Bytes::from(format!(
                "<iq type='set' id='1' to='sm-2' from='admin'>{inner}</iq>"
            )))
            .unwrap()
        };
        assert_eq!(
            parse(&iq(&format!(
                "<kick xmlns='{NS_ADMIN}' jid='Alice@localhost/phone'/>"
            ))),
            Ok(Request::Kick {
                jid: Jid::new("alice@localhost/phone").unwrap()
            })
        );
        assert_eq!(
            parse(&iq(&format!(
                "<announce xmlns='{NS_ADMIN}' host='localhost'><body>down at 5</body></announce>"
            ))),
            Ok(Request::Announce {
                host: "localhost".into(),
                subject: None,
                body: "down at 5".into()
            })
        );
        assert!(parse(&iq(&format!("<kick xmlns='{NS_ADMIN}' jid='localhost'/>"))).is_err());
        assert!(parse(&iq(&format!(
            "<announce xmlns='{NS_ADMIN}' host='localhost'/>"
        )))
        .is_err());
        assert!(
            parse(&iq("<stats/>")).is_err(),
            "not in the admin namespace"
        );
    }
}
