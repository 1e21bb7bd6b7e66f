//! In-band registration (XEP-0077) for logged-in users, when `<register enabled='true'/>`:
//! password change (new SCRAM credentials written to storage) and account removal
//! (everything stored deleted, contacts told, every session ended with
//! `<not-authorized/>`). Creating accounts happens in c2s, before login.

use tracing::{error, info};

use jrs_auth::{Credentials, NS_AUTH};
use jrs_stream::{Stanza, StanzaErrorCondition, StreamErrorCondition};

use crate::stanzas::{self, Reply};
use crate::user::User;
use crate::xml::Element;

pub const NS_REGISTER: &str = "jabber:iq:register";

impl User {
    /// Returns the reply, or `None` when it was already delivered (account removal).
    pub async fn register_iq(
        &mut self,
        idx: usize,
        stanza: &Stanza,
        query: &Element,
    ) -> Option<Reply> {
        if !self.ctx.config.register {
            return Some(Reply::error(
                StanzaErrorCondition::ServiceUnavailable,
                "in-band registration is disabled on this server",
            ));
        }
        let node = self
            .jid
            .node()
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default();
        match stanza.kind() {
            Some("get") => Some(Reply::with(
                Element::new("query", NS_REGISTER)
                    .with_child(Element::new("registered", NS_REGISTER))
                    .with_child(Element::new("username", NS_REGISTER).with_text(node))
                    .with_child(Element::new("password", NS_REGISTER)),
            )),
            Some("set") if query.child("remove", NS_REGISTER).is_some() => {
                self.remove_account(idx, stanza).await
            }
            Some("set") => {
                let username = query.child_text("username").unwrap_or_default();
                let Some(password) = query.child_text("password").filter(|p| !p.is_empty()) else {
                    return Some(Reply::error(
                        StanzaErrorCondition::BadRequest,
                        "a new <password/> is required",
                    ));
                };
                let same = jid::BareJid::new(&format!("{}@{}", username, self.jid.domain()))
                    .is_ok_and(|j| j == self.jid);
                if !same {
                    return Some(Reply::error(
                        StanzaErrorCondition::BadRequest,
                        "<username/> must be the logged-in user's",
                    ));
                }
                // PBKDF2 with thousands of iterations: off the async threads.
                let record = tokio::task::spawn_blocking(move || {
                    Credentials::from_password(&password).to_xml()
                })
                .await
                .expect("credentials task");
                Some(match self.ctx.xdb.set(&self.bare, NS_AUTH, record).await {
                    Ok(()) => {
                        info!("password changed");
                        Reply::empty()
                    }
                    Err(e) => {
                        error!("password change not stored: {e}");
                        stanzas::storage_error(&e)
                    }
                })
            }
            _ => Some(Reply::error(
                StanzaErrorCondition::BadRequest,
                "type must be get or set",
            )),
        }
    }

    async fn remove_account(&mut self, idx: usize, stanza: &Stanza) -> Option<Reply> {
        // The roster, to tell the contacts (best effort: the account goes either way).
        let roster = self.roster().await.ok().cloned();
        if let Err(e) = self.ctx.xdb.delete(&self.bare, "*").await {
            error!("account removal failed: {e}");
            return Some(stanzas::storage_error(&e));
        }
        info!("account removed");
        self.removed = true;
        self.ctx.accounts.remember(&self.bare, false);
        if let Some(reply) = Reply::empty().into_bytes(stanza) {
            self.deliver(idx, &reply);
        }
        while !self.sessions.is_empty() {
            self.end_session(0, Some(StreamErrorCondition::NotAuthorized))
                .await;
        }
        if let Some(r) = &roster {
            for item in r.items.values() {
                if item.sub.to || item.sub.ask {
                    let p = stanzas::presence(Some("unsubscribe"), &self.bare, &item.jid);
                    self.ctx.send(p.to_stanza());
                }
                if item.sub.from || item.sub.pending_in {
                    let p = stanzas::presence(Some("unsubscribed"), &self.bare, &item.jid);
                    self.ctx.send(p.to_stanza());
                }
            }
        }
        self.roster = None;
        None
    }
}
