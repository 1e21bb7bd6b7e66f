//! Private XML storage (XEP-0049): each user keeps elements only they can read back,
//! one per (name, namespace). Stored under `jabber:iq:private` as
//! `<query xmlns='jabber:iq:private'>` holding the elements.

use std::sync::Arc;

use jrs_stream::StanzaErrorCondition;

use crate::config::{count, SmConfig};
use crate::host::{storage_error, Declaration, Iq, IqKind, Module, Reply, Scope, User};
use crate::xml::{Element, Node};

pub const NS_PRIVATE: &str = "jabber:iq:private";

pub struct Private {
    max_bytes: usize,
}

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    let mut max_bytes = 64 * 1024;
    if let Some(n) = config.module_settings("private")? {
        n.allow(&["max-bytes"], &[])?;
        max_bytes = count(n, "max-bytes", max_bytes)?;
    }
    Ok(Arc::new(Private { max_bytes }))
}

/// Namespaces that may not be stored (XEP-0049 3: `jabber:` ones are reserved).
fn reserved(ns: &str) -> bool {
    ns.is_empty() || ns == NS_PRIVATE || ns.starts_with("jabber:")
}

#[async_trait::async_trait]
impl Module for Private {
    fn name(&self) -> &'static str {
        "private"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .iq(IqKind::Get, &[Scope::Own], NS_PRIVATE, "query")
            .iq(IqKind::Set, &[Scope::Own], NS_PRIVATE, "query")
    }

    async fn iq(&self, u: &mut User, iq: &Iq) -> Reply {
        let query = match iq.element() {
            Ok(q) => q,
            Err(r) => return r,
        };
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
        let stored = match u.ctx.store.get(&u.bare, NS_PRIVATE).await {
            Ok(s) => s,
            Err(e) => return storage_error(&e),
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
        match iq.kind {
            IqKind::Get => {
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
            IqKind::Set => {
                for item in items {
                    all.children
                        .retain(|n| !matches!(n, Node::Element(e) if same(e, item)));
                    all.push(item.clone());
                }
                let data = all.to_xml();
                let max = self.max_bytes.min(u.ctx.config.fragment_max());
                if data.len() > max {
                    return Reply::error(
                        StanzaErrorCondition::NotAcceptable,
                        format!("private storage is limited to {max} bytes per user"),
                    );
                }
                match u.ctx.store.set(&u.bare, NS_PRIVATE, data).await {
                    Ok(()) => Reply::empty(),
                    Err(e) => storage_error(&e),
                }
            }
        }
    }
}
