//! Private XML storage (XEP-0049): each user keeps elements only they can read back,
//! one per (name, namespace). Stored under `jabber:iq:private` as
//! `<query xmlns='jabber:iq:private'>` holding the elements.

use std::sync::Arc;

use tracing::debug;

use jrs_stream::StanzaErrorCondition;

use crate::config::{count, SmConfig};
use crate::host::shared::Shared;
use crate::host::{
    hooks, storage_error, Change, Declaration, Iq, IqKind, Module, Reply, Scope, Stored, User,
};
use crate::xml::{Element, Node};

pub const NS_PRIVATE: &str = "jabber:iq:private";

#[derive(Clone)]
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

fn same(a: &Element, b: &Element) -> bool {
    a.local_name() == b.local_name() && a.ns == b.ns
}

/// Everything the user keeps, as stored.
async fn stored(u: &User) -> Result<Element, Reply> {
    let stored = u
        .ctx
        .store
        .get(&u.bare, NS_PRIVATE)
        .await
        .map_err(|e| storage_error(&e))?;
    if stored.iter().all(u8::is_ascii_whitespace) {
        return Ok(Element::new("query", NS_PRIVATE));
    }
    Element::parse(&stored, "").map_err(|e| {
        Reply::error(
            StanzaErrorCondition::InternalServerError,
            format!("the stored private data is unreadable: {e}"),
        )
    })
}

/// The element `<name xmlns=ns>` the user keeps, if any (for modules that convert it).
pub async fn get(u: &User, name: &str, ns: &str) -> Result<Option<Element>, Reply> {
    let all = stored(u).await?;
    let found = all.elements().find(|e| e.is(name, ns)).cloned();
    Ok(found)
}

/// Stores `items` for module `by` (a conversion) as a set of the user's client would,
/// and runs [`crate::host::Hook::Stored`].
pub async fn set(u: &mut User, by: &'static str, items: &[Element]) -> Result<(), Reply> {
    let max = u
        .ctx
        .shared
        .get::<Private>()
        .map(|p| p.max_bytes)
        .ok_or_else(|| {
            Reply::error(
                StanzaErrorCondition::ServiceUnavailable,
                "private storage is not loaded",
            )
        })?;
    let refs: Vec<&Element> = items.iter().collect();
    store(u, Some(by), &refs, max).await
}

/// Replaces the stored elements of the names of `items` with them, then runs the hook.
async fn store(
    u: &mut User,
    by: Option<&'static str>,
    items: &[&Element],
    max_bytes: usize,
) -> Result<(), Reply> {
    let mut all = stored(u).await?;
    for item in items {
        all.children
            .retain(|n| !matches!(n, Node::Element(e) if same(e, item)));
        all.push((*item).clone());
    }
    let data = all.to_xml();
    let max = max_bytes.min(u.ctx.config.fragment_max());
    if data.len() > max {
        return Err(Reply::error(
            StanzaErrorCondition::NotAcceptable,
            format!("private storage is limited to {max} bytes per user"),
        ));
    }
    u.ctx
        .store
        .set(&u.bare, NS_PRIVATE, data)
        .await
        .map_err(|e| storage_error(&e))?;
    debug!(by, "private XML stored");
    for item in items {
        let xml = item.to_xml();
        let what = Stored::Private {
            name: item.local_name(),
            ns: &item.ns,
            xml: &xml,
        };
        hooks::stored(u, Change { by, what }).await;
    }
    Ok(())
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

    fn install(&self, shared: &mut Shared) {
        // The limit, for the modules that store through `set`.
        shared.insert(Arc::new(self.clone()));
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
        match iq.kind {
            IqKind::Get => {
                if items.len() != 1 {
                    return Reply::error(
                        StanzaErrorCondition::BadRequest,
                        "get one element at a time",
                    );
                }
                let all = match stored(u).await {
                    Ok(all) => all,
                    Err(r) => return r,
                };
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
            IqKind::Set => match store(u, None, &items, self.max_bytes).await {
                Ok(()) => Reply::empty(),
                Err(r) => r,
            },
        }
    }
}
