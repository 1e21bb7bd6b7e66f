//! vcard-temp (XEP-0054): users set their own vCard and anyone may read it; the server
//! has an empty one. Stored under `vcard-temp` as the `<vCard xmlns='vcard-temp'>`
//! element itself.

use std::sync::Arc;

use tracing::info;

use jrs_stream::StanzaErrorCondition;

use crate::config::{count, SmConfig};
use crate::host::shared::Shared;
use crate::host::{
    hooks, storage_error, Change, Declaration, Disco, Iq, IqKind, Module, Reply, Scope, Stored,
    User,
};
use crate::xml::Element;

pub const NS_VCARD: &str = "vcard-temp";

#[derive(Clone)]
pub struct VCard {
    max_bytes: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut max_bytes = 64 * 1024;
    if let Some(n) = config.module_settings("vcard")? {
        n.allow(&["max-bytes"], &[])?;
        max_bytes = count(n, "max-bytes", max_bytes)?;
    }
    Ok(Arc::new(VCard { max_bytes }))
}

fn empty() -> Element {
    Element::new("vCard", NS_VCARD)
}

/// The user's vCard (an empty one when none is stored).
pub async fn get(u: &User) -> Result<Element, Reply> {
    let stored = u
        .ctx
        .store
        .get(&u.bare, NS_VCARD)
        .await
        .map_err(|e| storage_error(&e))?;
    if stored.iter().all(u8::is_ascii_whitespace) {
        return Ok(empty());
    }
    Element::parse(&stored, "").map_err(|e| {
        Reply::error(
            StanzaErrorCondition::InternalServerError,
            format!("the stored vCard is unreadable: {e}"),
        )
    })
}

/// Stores `vcard` as the user's for module `by` (a conversion), as a set of the user's
/// client would, and runs [`crate::host::Hook::Stored`].
pub async fn set(u: &mut User, by: &'static str, vcard: &Element) -> Result<(), Reply> {
    let max = u
        .ctx
        .shared
        .get::<VCard>()
        .map(|v| v.max_bytes)
        .ok_or_else(|| {
            Reply::error(
                StanzaErrorCondition::ServiceUnavailable,
                "vcard-temp is not loaded",
            )
        })?;
    store(u, Some(by), vcard, max).await
}

async fn store(
    u: &mut User,
    by: Option<&'static str>,
    vcard: &Element,
    max_bytes: usize,
) -> Result<(), Reply> {
    let data = vcard.to_xml();
    let max = max_bytes.min(u.ctx.config.fragment_max());
    if data.len() > max {
        return Err(Reply::error(
            StanzaErrorCondition::NotAcceptable,
            format!("the vCard is larger than {max} bytes"),
        ));
    }
    let result = if vcard.children.is_empty() {
        u.ctx.store.delete(&u.bare, NS_VCARD).await
    } else {
        u.ctx.store.set(&u.bare, NS_VCARD, data.clone()).await
    };
    result.map_err(|e| storage_error(&e))?;
    info!(by, "vCard updated");
    let what = Stored::VCard { xml: &data };
    hooks::stored(u, Change { by, what }).await;
    Ok(())
}

#[async_trait::async_trait]
impl Module for VCard {
    fn name(&self) -> &'static str {
        "vcard"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(
                IqKind::Get,
                &[Scope::Server, Scope::Own, Scope::Contact],
                NS_VCARD,
                "vCard",
            )
            .iq(
                IqKind::Set,
                &[Scope::Own, Scope::Contact],
                NS_VCARD,
                "vCard",
            )
            .feature(Disco::Server, NS_VCARD)
            .feature(Disco::Account, NS_VCARD)
    }

    fn install(&self, shared: &mut Shared) {
        // The limit, for the modules that store through `set`.
        shared.insert(Arc::new(self.clone()));
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        match (iq.kind, iq.scope) {
            (IqKind::Get, Scope::Server) => Reply::with(empty()),
            (IqKind::Get, _) => match get(u).await {
                Ok(v) => Reply::with(v),
                Err(r) => r,
            },
            (IqKind::Set, Scope::Own) => {
                let payload = match iq.element() {
                    Ok(p) => p,
                    Err(r) => return r,
                };
                match store(u, None, &payload, self.max_bytes).await {
                    Ok(()) => Reply::empty(),
                    Err(r) => r,
                }
            }
            (IqKind::Set, _) => Reply::error(
                StanzaErrorCondition::Forbidden,
                "only the owner may change a vCard",
            ),
        }
    }
}
