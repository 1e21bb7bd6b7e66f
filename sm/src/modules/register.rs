//! In-band registration (XEP-0077) for logged-in users, when the `register` module is
//! loaded: password change (new SCRAM credentials written to storage) and account removal
//! (everything stored deleted, contacts told, every session ended with
//! `<not-authorized/>`). Creating accounts happens in c2s, before login.

use std::sync::Arc;

use tracing::{error, info};

use jrs_auth::{Credentials, NS_AUTH};
use jrs_stream::{StanzaErrorCondition, StreamErrorCondition};

use crate::config::SmConfig;
use crate::host::ending::end_session;
use crate::host::{
    hooks, storage_error, Declaration, Disco, Iq, IqKind, Module, Reply, Scope, User,
};
use crate::xml::Element;

pub const NS_REGISTER: &str = "jabber:iq:register";

pub struct Register;

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    if let Some(n) = config.module_settings("register")? {
        n.allow(&[], &[])?;
    }
    Ok(Arc::new(Register))
}

#[async_trait::async_trait]
impl Module for Register {
    fn name(&self) -> &'static str {
        "register"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(IqKind::Get, &[Scope::Server], NS_REGISTER, "query")
            .iq(IqKind::Set, &[Scope::Server], NS_REGISTER, "query")
            .feature(Disco::Server, NS_REGISTER)
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        let Some(key) = iq.session else {
            return Reply::error(
                StanzaErrorCondition::NotAllowed,
                "accounts are registered while connecting, before login",
            );
        };
        let query = match iq.element() {
            Ok(q) => q,
            Err(r) => return r,
        };
        let node = u
            .jid
            .node()
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default();
        match iq.kind {
            IqKind::Get => Reply::with(
                Element::new("query", NS_REGISTER)
                    .with_child(Element::new("registered", NS_REGISTER))
                    .with_child(Element::new("username", NS_REGISTER).with_text(node))
                    .with_child(Element::new("password", NS_REGISTER)),
            ),
            IqKind::Set if query.child("remove", NS_REGISTER).is_some() => {
                remove_account(u, key, iq).await
            }
            IqKind::Set => change_password(u, &query).await,
        }
    }
}

async fn change_password(u: &mut User, query: &Element) -> Reply {
    let username = query.child_text("username").unwrap_or_default();
    let Some(password) = query.child_text("password").filter(|p| !p.is_empty()) else {
        return Reply::error(
            StanzaErrorCondition::BadRequest,
            "a new <password/> is required",
        );
    };
    let same =
        jid::BareJid::new(&format!("{}@{}", username, u.jid.domain())).is_ok_and(|j| j == u.jid);
    if !same {
        return Reply::error(
            StanzaErrorCondition::BadRequest,
            "<username/> must be the logged-in user's",
        );
    }
    // PBKDF2 with thousands of iterations: off the async threads.
    let record =
        tokio::task::spawn_blocking(move || Credentials::from_password(&password).to_xml())
            .await
            .expect("credentials task");
    match u.ctx.store.set(&u.bare, NS_AUTH, record).await {
        Ok(()) => {
            info!("password changed");
            Reply::empty()
        }
        Err(e) => {
            error!("password change not stored: {e}");
            storage_error(&e)
        }
    }
}

/// Removes the account: every module gets ready ([`hooks::account_removing`]),
/// everything stored goes, the answer is sent, every session ends with
/// `<not-authorized/>`, and the modules finish ([`hooks::account_removed`]: contacts
/// are told).
async fn remove_account(u: &mut User, key: u32, iq: &Iq) -> Reply {
    hooks::account_removing(u).await;
    if let Err(e) = u.ctx.store.delete(&u.bare, "*").await {
        error!("account removal failed: {e}");
        return storage_error(&e);
    }
    info!("account removed");
    u.removed = true;
    u.ctx.accounts.remember(&u.bare, false);
    if let Some(reply) = Reply::empty().into_bytes(&iq.stanza) {
        u.deliver(key, reply);
    }
    while let Some(s) = u.sessions.first().map(|s| s.key) {
        end_session(u, s, Some(StreamErrorCondition::NotAuthorized)).await;
    }
    hooks::account_removed(u).await;
    Reply::Done
}
