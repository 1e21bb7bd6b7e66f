//! vcard-temp (XEP-0054): users set their own vCard and anyone may read it; the server
//! has an empty one. Stored under `vcard-temp` as the `<vCard xmlns='vcard-temp'>`
//! element itself.

use std::sync::Arc;

use tracing::info;

use jrs_stream::StanzaErrorCondition;

use crate::config::{count, SmConfig};
use crate::host::{storage_error, Declaration, Disco, Iq, IqKind, Module, Reply, Scope, User};
use crate::xml::Element;

pub const NS_VCARD: &str = "vcard-temp";

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

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        match (iq.kind, iq.scope) {
            (IqKind::Get, Scope::Server) => Reply::with(empty()),
            (IqKind::Get, _) => {
                let stored = match u.ctx.store.get(&u.bare, NS_VCARD).await {
                    Ok(s) => s,
                    Err(e) => return storage_error(&e),
                };
                if stored.iter().all(u8::is_ascii_whitespace) {
                    return Reply::with(empty());
                }
                match Element::parse(&stored, "") {
                    Ok(v) => Reply::with(v),
                    Err(e) => Reply::error(
                        StanzaErrorCondition::InternalServerError,
                        format!("the stored vCard is unreadable: {e}"),
                    ),
                }
            }
            (IqKind::Set, Scope::Own) => {
                let payload = match iq.element() {
                    Ok(p) => p,
                    Err(r) => return r,
                };
                let data = payload.to_xml();
                let max = self.max_bytes.min(u.ctx.config.fragment_max());
                if data.len() > max {
                    return Reply::error(
                        StanzaErrorCondition::NotAcceptable,
                        format!("the vCard is larger than {max} bytes"),
                    );
                }
                let result = if payload.children.is_empty() {
                    u.ctx.store.delete(&u.bare, NS_VCARD).await
                } else {
                    u.ctx.store.set(&u.bare, NS_VCARD, data).await
                };
                match result {
                    Ok(()) => {
                        info!("vCard updated");
                        Reply::empty()
                    }
                    Err(e) => storage_error(&e),
                }
            }
            (IqKind::Set, _) => Reply::error(
                StanzaErrorCondition::Forbidden,
                "only the owner may change a vCard",
            ),
        }
    }
}
