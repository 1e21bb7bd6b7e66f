//! An account's records written as a XEP-0227 `<user/>` (no I/O here: `crate::migrate`
//! reads the records and writes the file). The archive is written item by item as it is
//! read, so a large one is never held whole.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use jrs_auth::Credentials;
use jrs_xdb::archive::Item;

use super::records::{PepNode, Roster, NS_ROSTER};
use super::{NS_PIE, NS_SCRAM};
use crate::xml::{escape, Element, NS_CLIENT};

const NS_PRIVACY: &str = "jabber:iq:privacy";
const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const NS_PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
const NS_DATA: &str = "jabber:x:data";
const NODE_CONFIG: &str = "http://jabber.org/protocol/pubsub#node_config";
/// The name of the privacy list the blocklist is written as (ejabberd's name for it).
pub const BLOCKLIST_NAME: &str = "Blocked contacts";

/// What is stored for one account, read back from storage.
#[derive(Debug, Default)]
pub struct Stored {
    pub credentials: Credentials,
    pub roster: Roster,
    pub vcard: Option<Element>,
    pub private: Option<Element>,
    pub offline: Vec<Element>,
    pub blocklist: Vec<String>,
    pub pep: Vec<PepNode>,
}

/// The start tag of `<user/>`, written inside `<host/>` (the pie namespace in force).
pub fn user_start(name: &str) -> String {
    format!("<user name='{}'>", escape(name))
}

/// The children of `<user/>` for everything but the archive, in the order XEP-0227
/// lists them.
pub fn user_children(bare: &str, s: &Stored) -> Vec<Element> {
    let mut out = vec![];
    for k in &s.credentials.scram {
        out.push(
            Element::new("scram-credentials", NS_SCRAM)
                .with_attr("mechanism", format!("SCRAM-{}", k.hash.name()))
                .text_child("iter-count", &k.iterations.to_string())
                .text_child("salt", &B64.encode(&k.salt))
                .text_child("server-key", &B64.encode(&k.server_key))
                .text_child("stored-key", &B64.encode(&k.stored_key)),
        );
    }
    let visible: Vec<_> = s.roster.items.values().filter(|i| !i.hidden).collect();
    if !visible.is_empty() {
        let mut q = Element::new("query", NS_ROSTER);
        for item in visible {
            q.push(item.to_element());
        }
        out.push(q);
    }
    // Unanswered subscription requests (XEP-0227 4.8).
    for item in s.roster.items.values().filter(|i| i.pending_in) {
        let mut p = item
            .request
            .clone()
            .unwrap_or_else(|| Element::new("presence", NS_CLIENT));
        p.ns = NS_CLIENT.into();
        p.set_attr("type", "subscribe");
        p.set_attr("from", item.jid.clone());
        p.set_attr("to", bare);
        out.push(p);
    }
    if let Some(v) = &s.vcard {
        out.push(v.clone());
    }
    if let Some(p) = &s.private {
        out.push(p.clone());
    }
    if !s.offline.is_empty() {
        let mut o = Element::new("offline-messages", NS_PIE);
        for m in &s.offline {
            o.push(m.clone());
        }
        out.push(o);
    }
    if !s.blocklist.is_empty() {
        // Blocking as a privacy list (XEP-0227 4.7 carries privacy lists).
        let mut list = Element::new("list", NS_PRIVACY).with_attr("name", BLOCKLIST_NAME);
        for (order, jid) in s.blocklist.iter().enumerate() {
            list.push(
                Element::new("item", NS_PRIVACY)
                    .with_attr("type", "jid")
                    .with_attr("value", jid.clone())
                    .with_attr("action", "deny")
                    .with_attr("order", (order + 1).to_string()),
            );
        }
        out.push(
            Element::new("query", NS_PRIVACY)
                .with_child(Element::new("default", NS_PRIVACY).with_attr("name", BLOCKLIST_NAME))
                .with_child(list),
        );
    }
    if !s.pep.is_empty() {
        let mut owner = Element::new("pubsub", NS_PUBSUB_OWNER);
        let mut items = Element::new("pubsub", NS_PUBSUB);
        for n in &s.pep {
            owner.push(
                Element::new("configure", NS_PUBSUB_OWNER)
                    .with_attr("node", n.name.clone())
                    .with_child(node_form(n)),
            );
            if !n.items.is_empty() {
                let mut e = Element::new("items", NS_PUBSUB).with_attr("node", n.name.clone());
                for i in &n.items {
                    e.push(
                        Element::new("item", NS_PUBSUB)
                            .with_attr("id", i.id.clone())
                            .with_child(i.payload.clone()),
                    );
                }
                items.push(e);
            }
        }
        out.push(owner);
        if !items.children.is_empty() {
            out.push(items);
        }
    }
    out
}

fn field(var: &str, kind: &str, values: &[&str]) -> Element {
    let mut f = Element::new("field", NS_DATA)
        .with_attr("var", var)
        .with_attr("type", kind);
    for v in values {
        f = f.text_child("value", v);
    }
    f
}

/// The node's configuration as a submitted `pubsub#node_config` form.
fn node_form(n: &PepNode) -> Element {
    let c = &n.config;
    let bool_value = |b: bool| if b { "1" } else { "0" };
    let max = c.max_items.map_or("max".to_owned(), |m| m.to_string());
    let groups: Vec<&str> = c.groups.iter().map(String::as_str).collect();
    let mut x = Element::new("x", NS_DATA)
        .with_attr("type", "submit")
        .with_child(field("FORM_TYPE", "hidden", &[NODE_CONFIG]))
        .with_child(field("pubsub#access_model", "list-single", &[&c.access]))
        .with_child(field("pubsub#max_items", "text-single", &[&max]))
        .with_child(field(
            "pubsub#persist_items",
            "boolean",
            &[bool_value(c.persist)],
        ))
        .with_child(field(
            "pubsub#notify_retract",
            "boolean",
            &[bool_value(c.notify_retract)],
        ))
        .with_child(field(
            "pubsub#send_last_published_item",
            "list-single",
            &[&c.send_last],
        ))
        .with_child(field("pubsub#roster_groups_allowed", "list-multi", &groups));
    if let Some(t) = &c.title {
        x.push(field("pubsub#title", "text-single", &[t]));
    }
    x
}

/// One archive item as XEP-0227 1.1 carries it: a XEP-0313 result, the stored
/// stanza inside (it is self-contained XML, written as stored).
pub fn archive_result(item: &Item, out: &mut Vec<u8>) {
    let stamp = chrono::DateTime::from_timestamp_micros(item.time as i64)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ");
    out.extend_from_slice(
        format!(
            "<result xmlns='urn:xmpp:mam:2' id='{}'><forwarded xmlns='urn:xmpp:forward:0'>\
             <delay xmlns='urn:xmpp:delay' stamp='{stamp}'/>",
            escape(&item.id)
        )
        .as_bytes(),
    );
    out.extend_from_slice(&item.payload);
    out.extend_from_slice(b"</forwarded></result>");
}

#[cfg(test)]
mod tests {
    use super::super::import;
    use super::super::records::{PepConfig, PepItem, RosterItem};
    use super::*;

    /// What export writes, import reads back to the same records.
    #[test]
    fn export_then_import_gives_the_same_records() {
        let mut roster = Roster {
            ver: 3,
            ..Default::default()
        };
        let mut bob = RosterItem::new("bob@example.com");
        bob.name = Some("Bob".into());
        bob.groups = vec!["Friends".into()];
        bob.to = true;
        bob.from = true;
        bob.approved = true;
        let mut dave = RosterItem::new("dave@example.com");
        dave.hidden = true;
        dave.pending_in = true;
        dave.request = Some(
            Element::parse(
                b"<presence xmlns='jabber:client' type='subscribe' from='dave@example.com'><status>hi</status></presence>",
                "",
            )
            .unwrap(),
        );
        roster.items.insert(bob.jid.clone(), bob);
        roster.items.insert(dave.jid.clone(), dave);
        let stored = Stored {
            credentials: Credentials::from_password("pw"),
            roster,
            vcard: Some(
                Element::parse(b"<vCard xmlns='vcard-temp'><FN>A</FN></vCard>", "").unwrap(),
            ),
            private: Some(
                Element::parse(
                    b"<query xmlns='jabber:iq:private'><p xmlns='urn:p'/></query>",
                    "",
                )
                .unwrap(),
            ),
            offline: vec![Element::parse(
                b"<message xmlns='jabber:client' from='b@example.com'><body>x</body></message>",
                "",
            )
            .unwrap()],
            blocklist: vec!["spam@evil.example".into()],
            pep: vec![PepNode {
                name: "n".into(),
                config: PepConfig {
                    access: "roster".into(),
                    max_items: None,
                    groups: vec!["Friends".into()],
                    title: Some("T".into()),
                    ..Default::default()
                },
                items: vec![PepItem {
                    id: "i".into(),
                    stamp: 9,
                    payload: Element::parse(b"<x xmlns='urn:x'>1</x>", "").unwrap(),
                }],
            }],
        };
        let mut user = Element::new("user", NS_PIE).with_attr("name", "alice");
        for c in user_children("alice@localhost", &stored) {
            user.push(c);
        }
        // Through text, as in a file.
        let user = Element::parse(user.to_xml().as_bytes(), "").unwrap();
        let a = import::account("localhost", &user, 9_000_000).unwrap();
        assert_eq!(a.credentials.as_ref(), Some(&stored.credentials));
        assert!(a.notes.is_empty(), "{:?}", a.notes);
        let get = |ns: &str| &a.records.iter().find(|(n, _)| n == ns).unwrap().1;
        let mut expected = stored.roster.clone();
        expected.ver = 9;
        assert_eq!(Roster::parse(get(NS_ROSTER).as_bytes()).unwrap(), expected);
        assert_eq!(get("vcard-temp"), &stored.vcard.as_ref().unwrap().to_xml());
        assert_eq!(
            get("jabber:iq:private"),
            &stored.private.as_ref().unwrap().to_xml()
        );
        assert_eq!(
            get("urn:jabberd-rs:offline:0"),
            "<message from='b@example.com'><body>x</body></message>"
        );
        assert_eq!(
            get("urn:xmpp:blocking"),
            "<blocklist xmlns='urn:xmpp:blocking'><item jid='spam@evil.example'/></blocklist>"
        );
        let mut pep = stored.pep.clone();
        pep[0].items[0].stamp = 9_000_000;
        let records = super::super::records::pep_to_storage(&pep);
        for (ns, data) in records {
            assert_eq!(get(&ns), &data);
        }
    }

    #[test]
    fn archive_results_read_back() {
        let item = Item {
            id: "0006".into(),
            time: 1_704_067_200_000_001,
            with: "bob@localhost".into(),
            payload: bytes::Bytes::from_static(
                b"<message xmlns='jabber:client' from='alice@localhost/a' to='bob@localhost'><body>x</body></message>",
            ),
        };
        let mut out =
            b"<user xmlns='urn:xmpp:pie:0' name='alice'><archive xmlns='urn:xmpp:pie:0#mam'>"
                .to_vec();
        archive_result(&item, &mut out);
        out.extend_from_slice(b"</archive></user>");
        let user = Element::parse(&out, "").unwrap();
        let a = import::account("localhost", &user, 0).unwrap();
        assert_eq!(a.archive.len(), 1);
        assert_eq!(a.archive[0].time, item.time);
        assert_eq!(a.archive[0].with, item.with);
        assert_eq!(a.archive[0].payload, item.payload);
    }
}
