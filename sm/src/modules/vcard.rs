//! vcard-temp (XEP-0054): users set their own vCard and anyone may read it. Stored under
//! `vcard-temp` as the `<vCard xmlns='vcard-temp'>` element itself.

use tracing::info;

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::stanzas::Reply;
use crate::user::User;
use crate::xml::Element;

pub const NS_VCARD: &str = "vcard-temp";

pub fn empty() -> Element {
    Element::new("vCard", NS_VCARD)
}

impl User {
    /// A vCard get (anyone) or set (`own`: the user's own session).
    pub async fn vcard_iq(&mut self, stanza: &Stanza, payload: &Element, own: bool) -> Reply {
        match stanza.kind() {
            Some("get") => {
                let stored = match self.ctx.xdb.get(&self.bare, NS_VCARD).await {
                    Ok(s) => s,
                    Err(e) => return crate::stanzas::storage_error(&e),
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
            Some("set") if own => {
                let data = payload.to_xml();
                let max = self
                    .ctx
                    .config
                    .vcard_max_bytes
                    .min(self.ctx.config.fragment_max());
                if data.len() > max {
                    return Reply::error(
                        StanzaErrorCondition::NotAcceptable,
                        format!("the vCard is larger than {max} bytes"),
                    );
                }
                let result = if payload.children.is_empty() {
                    self.ctx.xdb.delete(&self.bare, NS_VCARD).await
                } else {
                    self.ctx.xdb.set(&self.bare, NS_VCARD, data).await
                };
                match result {
                    Ok(()) => {
                        info!("vCard updated");
                        Reply::empty()
                    }
                    Err(e) => crate::stanzas::storage_error(&e),
                }
            }
            _ => Reply::error(
                StanzaErrorCondition::Forbidden,
                "only the owner may change a vCard",
            ),
        }
    }
}
