//! The records sm keeps for a user, as `jabberctl import` writes them and `export`
//! reads them. They must stay what sm's modules write (sm is a program, not a library,
//! so the formats are restated here; each names the module it follows, and the
//! round-trip test in tests/py/test_xep0227.py has sm read what import wrote).

use std::collections::BTreeMap;

use sha1::{Digest, Sha1};

use crate::xml::{Element, NS_CLIENT};

/// sm/src/modules/roster.rs
pub const NS_ROSTER: &str = "jabber:iq:roster";
/// sm/src/modules/vcard.rs: the `<vCard/>` element itself.
pub const NS_VCARD: &str = "vcard-temp";
/// sm/src/modules/private.rs: `<query xmlns='jabber:iq:private'>` holding the elements.
pub const NS_PRIVATE: &str = "jabber:iq:private";
/// sm/src/modules/offline.rs: the messages one after the other, in `jabber:client`.
pub const NS_OFFLINE: &str = "urn:jabberd-rs:offline:0";
/// sm/src/modules/blocking.rs: `<blocklist xmlns='urn:xmpp:blocking'>` of `<item jid/>`.
pub const NS_BLOCKING: &str = "urn:xmpp:blocking";
/// sm/src/modules/pep/store.rs: the index of nodes, and the prefix of their items.
pub const NS_PEP: &str = "urn:jabberd-rs:pep";
/// sm/src/modules/mam: the archive (storage archive operations).
pub const NS_ARCHIVE: &str = "urn:xmpp:mam:2";
pub const NS_SID: &str = "urn:xmpp:sid:0";

/// The storage namespace of a PEP node's items (sm/src/modules/pep/store.rs
/// `items_ns`): the node's name when it is short enough to make a file name, else a
/// hash of it.
pub fn pep_items_ns(node: &str) -> String {
    if node.len() <= 64 {
        format!("{NS_PEP}:{node}")
    } else {
        let hash: String = Sha1::digest(node.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{NS_PEP}:#{hash}")
    }
}

/// An archive id as sm makes them (sm/src/modules/mam/mod.rs `next_id`): the item's
/// time in microseconds, 16 hex digits, so ids increase with time.
pub fn archive_id(time: u64) -> String {
    format!("{time:016x}")
}

fn blank(b: &[u8]) -> bool {
    b.iter().all(u8::is_ascii_whitespace)
}

// -- roster ------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RosterItem {
    pub jid: String,
    pub name: Option<String>,
    pub groups: Vec<String>,
    /// The user receives the contact's presence.
    pub to: bool,
    /// The contact receives the user's presence.
    pub from: bool,
    /// The user asked to subscribe.
    pub ask: bool,
    /// The contact asked to subscribe (request not answered yet).
    pub pending_in: bool,
    /// The user pre-approved the contact's subscription.
    pub approved: bool,
    /// Not in the roster the client sees: kept for a pending request only.
    pub hidden: bool,
    /// The pending request, delivered again at the next login.
    pub request: Option<Element>,
}

impl RosterItem {
    pub fn new(jid: &str) -> RosterItem {
        RosterItem {
            jid: jid.to_owned(),
            ..Default::default()
        }
    }

    pub fn subscription(&self) -> &'static str {
        match (self.to, self.from) {
            (true, true) => "both",
            (true, false) => "to",
            (false, true) => "from",
            (false, false) => "none",
        }
    }

    /// The item as clients see it (and as XEP-0227 carries it).
    pub fn to_element(&self) -> Element {
        let mut e = Element::new("item", NS_ROSTER)
            .with_attr("jid", self.jid.clone())
            .with_attr("subscription", self.subscription())
            .with_opt("name", self.name.as_deref());
        if self.ask {
            e.set_attr("ask", "subscribe");
        }
        if self.approved {
            e.set_attr("approved", "true");
        }
        for g in &self.groups {
            e.push(Element::new("group", NS_ROSTER).with_text(g.clone()));
        }
        e
    }

    fn to_storage(&self) -> Element {
        let mut e = self.to_element();
        if self.pending_in {
            e.set_attr("pending-in", "true");
        }
        if self.hidden {
            e.set_attr("hidden", "true");
        }
        if let Some(r) = &self.request {
            e.push(r.clone());
        }
        e
    }

    fn from_storage(e: &Element) -> Option<RosterItem> {
        let flag = |k: &str| e.attr(k) == Some("true");
        let subscription = e.attr("subscription").unwrap_or("none");
        Some(RosterItem {
            jid: e.attr("jid")?.to_owned(),
            name: e.attr("name").map(str::to_owned),
            groups: e
                .elements()
                .filter(|g| g.is("group", NS_ROSTER))
                .map(Element::text)
                .collect(),
            to: matches!(subscription, "to" | "both"),
            from: matches!(subscription, "from" | "both"),
            ask: e.attr("ask") == Some("subscribe"),
            pending_in: flag("pending-in"),
            approved: flag("approved"),
            hidden: flag("hidden"),
            request: e.elements().find(|r| r.is("presence", NS_CLIENT)).cloned(),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roster {
    pub ver: u64,
    pub items: BTreeMap<String, RosterItem>,
}

impl Roster {
    pub fn parse(fragment: &[u8]) -> Result<Roster, String> {
        if blank(fragment) {
            return Ok(Roster::default());
        }
        let q = Element::parse(fragment, "")?;
        if !q.is("query", NS_ROSTER) {
            return Err("the stored roster is not a jabber:iq:roster query".into());
        }
        let mut r = Roster {
            ver: q.attr("ver").and_then(|v| v.parse().ok()).unwrap_or(0),
            items: BTreeMap::new(),
        };
        for item in q
            .elements()
            .filter(|e| e.is("item", NS_ROSTER))
            .filter_map(RosterItem::from_storage)
        {
            r.items.insert(item.jid.clone(), item);
        }
        Ok(r)
    }

    pub fn to_storage(&self) -> String {
        let mut q = Element::new("query", NS_ROSTER).with_attr("ver", self.ver.to_string());
        for item in self.items.values() {
            q.push(item.to_storage());
        }
        q.to_xml()
    }
}

// -- blocklist ---------------------------------------------------------------------------

pub fn blocklist_parse(fragment: &[u8]) -> Result<Vec<String>, String> {
    if blank(fragment) {
        return Ok(vec![]);
    }
    let list = Element::parse(fragment, "")?;
    Ok(list
        .elements()
        .filter(|e| e.name == "item")
        .filter_map(|e| e.attr("jid").map(str::to_owned))
        .collect())
}

pub fn blocklist_to_storage(jids: &[String]) -> String {
    let mut list = Element::new("blocklist", NS_BLOCKING);
    for j in jids {
        list.push(Element::new("item", NS_BLOCKING).with_attr("jid", j.clone()));
    }
    list.to_xml()
}

// -- PEP ---------------------------------------------------------------------------------

/// A node's configuration as sm keeps it in the index (sm/src/modules/pep/node.rs
/// `Config::write`/`read`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PepConfig {
    /// open, presence, roster or whitelist.
    pub access: String,
    /// `None`: `max`, the service's limit.
    pub max_items: Option<usize>,
    pub persist: bool,
    pub notify_retract: bool,
    /// never, on_sub or on_sub_and_presence.
    pub send_last: String,
    pub groups: Vec<String>,
    pub title: Option<String>,
}

impl Default for PepConfig {
    /// sm's defaults (XEP-0163): presence access, one item.
    fn default() -> PepConfig {
        PepConfig {
            access: "presence".into(),
            max_items: Some(1),
            persist: true,
            notify_retract: true,
            send_last: "on_sub_and_presence".into(),
            groups: vec![],
            title: None,
        }
    }
}

pub const ACCESS_MODELS: [&str; 4] = ["open", "presence", "roster", "whitelist"];
pub const SEND_LAST: [&str; 3] = ["never", "on_sub", "on_sub_and_presence"];

impl PepConfig {
    fn write(&self, node: &mut Element) {
        node.set_attr("access", self.access.clone());
        let max = self.max_items.map_or("max".to_owned(), |n| n.to_string());
        node.set_attr("max-items", max);
        node.set_attr("persist", if self.persist { "1" } else { "0" });
        node.set_attr(
            "notify-retract",
            if self.notify_retract { "1" } else { "0" },
        );
        node.set_attr("send-last", self.send_last.clone());
        if let Some(t) = &self.title {
            node.set_attr("title", t.clone());
        }
        for g in &self.groups {
            node.push(Element::new("group", NS_PEP).with_text(g.clone()));
        }
    }

    fn read(node: &Element) -> PepConfig {
        let d = PepConfig::default();
        let flag = |k: &str, d: bool| node.attr(k).map(|v| v == "1").unwrap_or(d);
        PepConfig {
            access: node
                .attr("access")
                .filter(|a| ACCESS_MODELS.contains(a))
                .map_or(d.access, str::to_owned),
            max_items: match node.attr("max-items") {
                Some("max") => None,
                v => v.and_then(|v| v.parse().ok()).or(d.max_items),
            },
            persist: flag("persist", d.persist),
            notify_retract: flag("notify-retract", d.notify_retract),
            send_last: node
                .attr("send-last")
                .filter(|s| SEND_LAST.contains(s))
                .map_or(d.send_last, str::to_owned),
            groups: node
                .elements()
                .filter(|e| e.name == "group")
                .map(Element::text)
                .collect(),
            title: node.attr("title").map(str::to_owned),
        }
    }

    /// How many items a node with this configuration keeps (sm: `Config::keep`, the
    /// service's limit aside).
    pub fn keep(&self) -> usize {
        if self.persist {
            self.max_items.unwrap_or(usize::MAX)
        } else {
            1
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PepItem {
    pub id: String,
    /// When it was published (microseconds since 1970).
    pub stamp: u64,
    pub payload: Element,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PepNode {
    pub name: String,
    pub config: PepConfig,
    /// Oldest first.
    pub items: Vec<PepItem>,
}

/// The index of nodes (names and configurations; items are read separately).
pub fn pep_index_parse(fragment: &[u8]) -> Result<Vec<(String, PepConfig)>, String> {
    if blank(fragment) {
        return Ok(vec![]);
    }
    let index = Element::parse(fragment, "")?;
    Ok(index
        .elements()
        .filter(|e| e.name == "node")
        .filter_map(|e| Some((e.attr("name")?.to_owned(), PepConfig::read(e))))
        .collect())
}

pub fn pep_items_parse(fragment: &[u8]) -> Result<Vec<PepItem>, String> {
    if blank(fragment) {
        return Ok(vec![]);
    }
    let all = Element::parse(fragment, "")?;
    Ok(all
        .elements()
        .filter_map(|e| {
            Some(PepItem {
                id: e.attr("id").unwrap_or_default().to_owned(),
                stamp: e.attr("stamp").and_then(|s| s.parse().ok()).unwrap_or(0),
                payload: e.elements().next()?.clone(),
            })
        })
        .collect())
}

/// The records of `nodes`: the index, and each node's items under its namespace (none
/// for a node without items, as sm removes the record when a node is emptied).
pub fn pep_to_storage(nodes: &[PepNode]) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut index = Element::new("nodes", NS_PEP);
    for n in nodes {
        let mut data = format!("<items xmlns='{NS_PEP}'>");
        let mut bytes = 0;
        for i in &n.items {
            let payload = i.payload.to_xml();
            bytes += payload.len();
            data.push_str(&format!(
                "<item id='{}' stamp='{}'>{payload}</item>",
                crate::xml::escape(&i.id),
                i.stamp
            ));
        }
        data.push_str("</items>");
        let mut e = Element::new("node", NS_PEP)
            .with_attr("name", n.name.clone())
            .with_attr("bytes", bytes.to_string());
        n.config.write(&mut e);
        index.push(e);
        if !n.items.is_empty() {
            out.push((pep_items_ns(&n.name), data));
        }
    }
    out.insert(0, (NS_PEP.to_owned(), index.to_xml()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roster_round_trip() {
        let stored = "<query xmlns='jabber:iq:roster' ver='7'>\
            <item jid='bob@example.com' subscription='both' name='Bob'><group>Friends</group></item>\
            <item jid='dave@example.com' subscription='none' pending-in='true' hidden='true'>\
            <presence xmlns='jabber:client' type='subscribe' from='dave@example.com'/></item></query>";
        let r = Roster::parse(stored.as_bytes()).unwrap();
        assert_eq!(r.ver, 7);
        let dave = &r.items["dave@example.com"];
        assert!(dave.pending_in && dave.hidden && dave.request.is_some());
        assert_eq!(Roster::parse(r.to_storage().as_bytes()).unwrap(), r);
    }

    #[test]
    fn pep_records_and_long_node_names() {
        let nodes = vec![PepNode {
            name: "urn:xmpp:avatar:metadata".into(),
            config: PepConfig {
                access: "open".into(),
                ..Default::default()
            },
            items: vec![PepItem {
                id: "abc".into(),
                stamp: 5,
                payload: Element::new("metadata", "urn:xmpp:avatar:metadata"),
            }],
        }];
        let records = pep_to_storage(&nodes);
        assert_eq!(records[0].0, NS_PEP);
        assert_eq!(records[1].0, "urn:jabberd-rs:pep:urn:xmpp:avatar:metadata");
        let index = pep_index_parse(records[0].1.as_bytes()).unwrap();
        assert_eq!(
            index,
            vec![(nodes[0].name.clone(), nodes[0].config.clone())]
        );
        assert_eq!(
            pep_items_parse(records[1].1.as_bytes()).unwrap(),
            nodes[0].items
        );
        assert!(pep_items_ns(&"x".repeat(65)).starts_with("urn:jabberd-rs:pep:#"));
        assert_eq!(archive_id(1), "0000000000000001");
    }
}
