//! A user's PEP nodes as sm keeps them: an index of the nodes with their configuration
//! (storage namespace `urn:jabberd-rs:pep`, read on first use) and each node's items in
//! a fragment of its own (read when something needs them), so that a contact coming
//! online reads the index and the last items it wants, not every avatar.

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::{Refusal, XdbError};
use sha1::{Digest, Sha1};
use tracing::warn;

use crate::host::User;
use crate::modules::pep::node::Config;
use crate::xml::Element;

/// The storage namespace of the index, and the prefix of the nodes' fragments.
pub const NS_STORE: &str = "urn:jabberd-rs:pep";

/// The storage namespace of a node's items: the node's name when it is short enough to
/// make a file name, else a hash of it.
pub fn items_ns(node: &str) -> String {
    if node.len() <= 64 {
        format!("{NS_STORE}:{node}")
    } else {
        let hash: String = Sha1::digest(node.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{NS_STORE}:#{hash}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    /// When it was published (microseconds since 1970).
    pub stamp: u64,
    /// The payload element, self-contained XML.
    pub payload: String,
}

#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub config: Config,
    /// Oldest first; `None` until read.
    pub items: Option<Vec<Item>>,
    /// Bytes of payload stored (for the per-user limit).
    pub bytes: usize,
}

/// The user's nodes (user state).
#[derive(Debug, Default)]
pub struct Pep {
    pub nodes: Vec<Node>,
}

impl Pep {
    pub fn find(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn bytes(&self) -> usize {
        self.nodes.iter().map(|n| n.bytes).sum()
    }

    fn index(&self) -> String {
        let mut all = Element::new("nodes", NS_STORE);
        for n in &self.nodes {
            let mut e = Element::new("node", NS_STORE)
                .with_attr("name", n.name.clone())
                .with_attr("bytes", n.bytes.to_string());
            n.config.write(&mut e);
            all.push(e);
        }
        all.to_xml()
    }
}

fn unreadable(what: &str, e: impl std::fmt::Display) -> XdbError {
    warn!("stored PEP {what} unreadable: {e}");
    XdbError::Refused(Refusal::new(
        StanzaErrorCondition::InternalServerError,
        format!("stored PEP {what} unreadable: {e}"),
    ))
}

fn blank(b: &[u8]) -> bool {
    b.iter().all(u8::is_ascii_whitespace)
}

/// The user's nodes, read from storage on first use.
pub async fn load(u: &mut User) -> Result<&mut Pep, XdbError> {
    if u.state.get::<Pep>().is_none() {
        let stored = u.ctx.store.get(&u.bare, NS_STORE).await?;
        let mut pep = Pep::default();
        if !blank(&stored) {
            let index = Element::parse(&stored, "").map_err(|e| unreadable("index", e))?;
            for e in index.elements().filter(|e| e.local_name() == "node") {
                let Some(name) = e.attr("name") else { continue };
                pep.nodes.push(Node {
                    name: name.to_owned(),
                    config: Config::read(e),
                    items: None,
                    bytes: e.attr("bytes").and_then(|b| b.parse().ok()).unwrap_or(0),
                });
            }
        }
        u.state.insert(pep);
    }
    Ok(u.state.get_mut::<Pep>().expect("loaded above"))
}

/// The items of node number `at` of the loaded nodes, read on first use.
pub async fn items(u: &mut User, at: usize) -> Result<&mut Vec<Item>, XdbError> {
    let pep = u.state.get::<Pep>().expect("nodes loaded first");
    if pep.nodes[at].items.is_none() {
        let ns = items_ns(&pep.nodes[at].name);
        let stored = u.ctx.store.get(&u.bare, &ns).await?;
        let mut items = vec![];
        if !blank(&stored) {
            let all = Element::parse(&stored, "").map_err(|e| unreadable("items", e))?;
            for e in all.elements() {
                let Some(payload) = e.elements().next() else {
                    continue;
                };
                items.push(Item {
                    id: e.attr("id").unwrap_or_default().to_owned(),
                    stamp: e.attr("stamp").and_then(|s| s.parse().ok()).unwrap_or(0),
                    payload: payload.to_xml(),
                });
            }
        }
        let pep = u.state.get_mut::<Pep>().expect("loaded");
        pep.nodes[at].items = Some(items);
    }
    let pep = u.state.get_mut::<Pep>().expect("loaded");
    Ok(pep.nodes[at].items.as_mut().expect("read above"))
}

/// The items of the user's node `node`, oldest first; `None` when there is no such node.
pub async fn node_items(u: &mut User, node: &str) -> Result<Option<Vec<Item>>, XdbError> {
    let Some(at) = load(u).await?.find(node) else {
        return Ok(None);
    };
    Ok(Some(items(u, at).await?.clone()))
}

/// Writes the index. On failure the cached nodes are dropped, so the next use reads
/// what storage really holds.
pub async fn save_index(u: &mut User) -> Result<(), XdbError> {
    let Some(pep) = u.state.get::<Pep>() else {
        return Ok(());
    };
    let data = pep.index();
    let result = u.ctx.store.set(&u.bare, NS_STORE, data).await;
    if result.is_err() {
        u.state.remove::<Pep>();
    }
    result
}

/// Writes node `at`'s items (and counts their bytes). The caller writes the index.
pub async fn save_items(u: &mut User, at: usize) -> Result<(), XdbError> {
    let pep = u.state.get_mut::<Pep>().expect("loaded");
    let node = &mut pep.nodes[at];
    let ns = items_ns(&node.name);
    let items = node.items.as_deref().unwrap_or(&[]);
    node.bytes = items.iter().map(|i| i.payload.len()).sum();
    let mut data = format!("<items xmlns='{NS_STORE}'>");
    for i in items {
        data.push_str(&format!(
            "<item id='{}' stamp='{}'>{}</item>",
            jrs_stream::xml::escape(&i.id),
            i.stamp,
            i.payload
        ));
    }
    data.push_str("</items>");
    let empty = items.is_empty();
    let result = if empty {
        u.ctx.store.delete(&u.bare, &ns).await
    } else {
        u.ctx.store.set(&u.bare, &ns, data).await
    };
    if result.is_err() {
        u.state.remove::<Pep>();
    }
    result
}

/// Removes node `at`'s items from storage and the node from the index.
pub async fn remove(u: &mut User, at: usize) -> Result<(), XdbError> {
    let pep = u.state.get_mut::<Pep>().expect("loaded");
    let node = pep.nodes.remove(at);
    if let Err(e) = u.ctx.store.delete(&u.bare, &items_ns(&node.name)).await {
        // The node is still stored: forget the cached nodes, which no longer have it.
        u.state.remove::<Pep>();
        return Err(e);
    }
    save_index(u).await
}
