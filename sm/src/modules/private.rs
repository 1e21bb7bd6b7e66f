//! Private XML storage (XEP-0049): each user keeps elements only they can read back,
//! one per (name, namespace). Stored under `jabber:iq:private` as
//! `<query xmlns='jabber:iq:private'>` holding the elements.

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::stanzas::Reply;
use crate::user::User;
use crate::xml::{Element, Node};

pub const NS_PRIVATE: &str = "jabber:iq:private";

/// Namespaces that may not be stored (XEP-0049 3: `jabber:` ones are reserved).
fn reserved(ns: &str) -> bool {
    ns.is_empty() || ns == NS_PRIVATE || ns.starts_with("jabber:")
}

impl User {
    pub async fn private_iq(&mut self, stanza: &Stanza, query: &Element) -> Reply {
        let items: Vec<&Element> = query.elements().collect();
        if items.is_empty() {
            return Reply::error(
                StanzaErrorCondition::NotAcceptable,
                "name the element to get or store",
            );
        }
        if let Some(e) = items.iter().find(|e| reserved(&e.ns)) {
            return Reply::error(
                StanzaErrorCondition::NotAcceptable,
                format!("namespace '{}' may not be stored", e.ns),
            );
        }
        let stored = match self.ctx.xdb.get(&self.bare, NS_PRIVATE).await {
            Ok(s) => s,
            Err(e) => return crate::stanzas::storage_error(&e),
        };
        let mut all = if stored.iter().all(u8::is_ascii_whitespace) {
            Element::new("query", NS_PRIVATE)
        } else {
            match Element::parse(&stored, "") {
                Ok(q) => q,
                Err(e) => {
                    return Reply::error(
                        StanzaErrorCondition::InternalServerError,
                        format!("the stored private data is unreadable: {e}"),
                    )
                }
            }
        };
        let same = |a: &Element, b: &Element| a.local_name() == b.local_name() && a.ns == b.ns;
        match stanza.kind() {
            Some("get") => {
                if items.len() != 1 {
                    return Reply::error(
                        StanzaErrorCondition::BadRequest,
                        "get one element at a time",
                    );
                }
                let want = items[0];
                let found = all.elements().find(|e| same(e, want)).cloned();
                let mut q = Element::new("query", NS_PRIVATE);
                q.push(found.unwrap_or_else(|| {
                    let mut empty = want.clone();
                    empty.children.clear();
                    empty
                }));
                Reply::with(q)
            }
            Some("set") => {
                for item in items {
                    all.children
                        .retain(|n| !matches!(n, Node::Element(e) if same(e, item)));
                    all.push(item.clone());
                }
                let data = all.to_xml();
                let max = self
                    .ctx
                    .config
                    .private_max_bytes
                    .min(self.ctx.config.fragment_max());
                if data.len() > max {
                    return Reply::error(
                        StanzaErrorCondition::NotAcceptable,
                        format!("private storage is limited to {max} bytes per user"),
                    );
                }
                match self.ctx.xdb.set(&self.bare, NS_PRIVATE, data).await {
                    Ok(()) => Reply::empty(),
                    Err(e) => crate::stanzas::storage_error(&e),
                }
            }
            _ => Reply::error(StanzaErrorCondition::BadRequest, "type must be get or set"),
        }
    }
}
