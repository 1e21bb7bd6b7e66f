//! A XEP-0227 `<user/>` made into the records sm keeps for the account (no I/O here:
//! `crate::migrate` writes them). What each source puts in its files, and what is
//! carried over, is in docs/migration.md.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;

use jrs_auth::{Credentials, ScramHash, ScramKeys};
use jrs_xdb::archive::Item;

use super::records::{
    archive_id, blocklist_to_storage, pep_to_storage, PepConfig, PepItem, PepNode, Roster,
    RosterItem, ACCESS_MODELS, NS_BLOCKING, NS_OFFLINE, NS_PRIVATE, NS_ROSTER, NS_SID, NS_VCARD,
    SEND_LAST,
};
use super::{vcard, NS_PIE_MAM, NS_SCRAM};
use crate::xml::{Element, Node, NS_CLIENT};

const NS_SERVER: &str = "jabber:server";
const NS_PRIVACY: &str = "jabber:iq:privacy";
const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const NS_PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
const NS_DATA: &str = "jabber:x:data";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_MAM: &str = "urn:xmpp:mam:2";
const NODE_VCARD4: &str = "urn:xmpp:vcard4";
const NODE_AVATAR_DATA: &str = "urn:xmpp:avatar:data";
const NODE_AVATAR_METADATA: &str = "urn:xmpp:avatar:metadata";

/// The largest record sm keeps under one namespace with the shipped limits
/// (sm/src/config.rs `fragment_max`: the 256 KiB stanza limit less room for the storage
/// request around it); larger ones could not travel back through the router.
pub const MAX_RECORD: usize = 256 * 1024 - 2048;

/// One account of a XEP-0227 file, as records.
#[derive(Debug, Default)]
pub struct Account {
    /// The normalised bare JID.
    pub bare: String,
    /// `None` when the file has no password and no SCRAM keys this server can use: the
    /// data is imported, but nobody can log in until an operator sets a password.
    pub credentials: Option<Credentials>,
    /// Records to store (namespace, fragment), credentials not included.
    pub records: Vec<(String, String)>,
    /// Items for the message archive, oldest first, with increasing ids.
    pub archive: Vec<Item>,
    /// What was carried over, for the summary line.
    pub carried: Vec<String>,
    /// What was not, and why.
    pub notes: Vec<String>,
}

/// The account of `<user/>` in `<host jid=host>`; `now` (microseconds since 1970) dates
/// what the file carries no time for.
pub fn account(host: &str, user: &Element, now: u64) -> Result<Account, String> {
    let name = user
        .attr("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{host}: <user/> without name"))?;
    let bare = jid::BareJid::new(&format!("{name}@{host}"))
        .map_err(|e| format!("{name}@{host}: not a valid address: {e}"))?
        .to_string();
    let mut a = Account {
        bare: bare.clone(),
        ..Default::default()
    };
    credentials(user, &mut a);

    let mut roster_query = None;
    let mut pending = vec![];
    let mut vcard_temp = None;
    let mut private = None;
    let mut offline = vec![];
    let mut privacy = None;
    let mut pep_owner = vec![];
    let mut pep_items = vec![];
    let mut archive = vec![];
    for e in user.elements() {
        match (e.name.as_str(), e.ns.as_str()) {
            ("scram-credentials", NS_SCRAM) => {}
            ("query", NS_ROSTER) => roster_query = Some(e),
            // Prosody writes them without a namespace of their own: in the file's.
            ("presence", NS_CLIENT | NS_SERVER) => pending.push(e),
            ("presence", ns) if super::is_pie(ns) => pending.push(e),
            ("vCard", NS_VCARD) => vcard_temp = Some(e),
            ("query", NS_PRIVATE) => private = Some(e),
            ("offline-messages", ns) if super::is_pie(ns) => offline.extend(e.elements()),
            ("query", NS_PRIVACY) => privacy = Some(e),
            ("pubsub", NS_PUBSUB_OWNER) => pep_owner.push(e),
            ("pubsub", NS_PUBSUB) => pep_items.push(e),
            ("archive", NS_PIE_MAM) => archive.extend(e.elements()),
            (name, ns) => a
                .notes
                .push(format!("<{name} xmlns='{ns}'/> is not imported")),
        }
    }

    let now_secs = now / 1_000_000;
    if let Some(r) = roster(&bare, roster_query, &pending, now_secs, &mut a.notes) {
        let shown = r.items.values().filter(|i| !i.hidden).count();
        a.carried.push(format!("roster {shown}"));
        a.records.push((NS_ROSTER.into(), r.to_storage()));
    }
    let pep = pep_nodes(&pep_owner, &pep_items, now, &mut a.notes);
    let vcard = match vcard_temp {
        Some(v) if v.elements().next().is_some() => {
            let mut v = v.clone();
            v.strip_indentation();
            Some(v)
        }
        _ => vcard_from_pep(&pep),
    };
    if let Some(v) = vcard {
        push_record(&mut a, NS_VCARD, v.to_xml(), "vCard");
    }
    if let Some(p) = private.and_then(|p| private_storage(p, &mut a.notes)) {
        let n = p.elements().count();
        push_record(&mut a, NS_PRIVATE, p.to_xml(), &format!("private {n}"));
    }
    if !offline.is_empty() {
        offline_messages(&offline, &mut a);
    }
    if let Some(list) = privacy.and_then(|p| blocklist(p, &mut a.notes)) {
        let n = list.len();
        push_record(
            &mut a,
            NS_BLOCKING,
            blocklist_to_storage(&list),
            &format!("blocklist {n}"),
        );
    }
    if !pep.is_empty() {
        let items: usize = pep.iter().map(|n| n.items.len()).sum();
        let records = pep_to_storage(&pep);
        if let Some((ns, too_big)) = records.iter().find(|(_, d)| d.len() > MAX_RECORD) {
            a.notes.push(format!(
                "PEP not imported: the record {ns} would be {} bytes, over the {MAX_RECORD} sm keeps",
                too_big.len()
            ));
        } else {
            a.carried
                .push(format!("PEP {} nodes, {items} items", pep.len()));
            a.records.extend(records);
        }
    }
    if !archive.is_empty() {
        a.archive = archive_items(&bare, &archive, &mut a.notes);
        a.carried.push(format!("archive {}", a.archive.len()));
    }
    Ok(a)
}

fn push_record(a: &mut Account, ns: &str, data: String, what: &str) {
    if data.len() > MAX_RECORD {
        a.notes.push(format!(
            "{what} not imported: {} bytes, over the {MAX_RECORD} sm keeps",
            data.len()
        ));
    } else {
        a.records.push((ns.to_owned(), data));
        a.carried.push(what.to_owned());
    }
}

// -- credentials -------------------------------------------------------------------------

fn hash_of(mechanism: &str) -> Option<ScramHash> {
    match mechanism {
        "SCRAM-SHA-1" | "sha" | "sha1" => Some(ScramHash::Sha1),
        "SCRAM-SHA-256" | "sha256" => Some(ScramHash::Sha256),
        _ => None,
    }
}

fn key_len(hash: ScramHash) -> usize {
    match hash {
        ScramHash::Sha1 => 20,
        ScramHash::Sha256 => 32,
    }
}

fn b64(text: &str) -> Option<Vec<u8>> {
    let t: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    B64.decode(t).ok()
}

/// SCRAM keys from base64 text. ejabberd (up to at least 23.01) encodes them twice in
/// its exports (it keeps them base64-encoded and encodes them again): when the keys
/// decoded once have not the hash's length but decoded twice do, the salt was encoded
/// twice too.
pub fn scram_keys(
    hash: ScramHash,
    iterations: &str,
    salt: &str,
    stored_key: &str,
    server_key: &str,
) -> Result<ScramKeys, String> {
    let name = hash.name();
    let iterations: u32 = iterations
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("SCRAM-{name}: bad iteration count '{iterations}'"))?;
    let once = |t: &str| b64(t).ok_or_else(|| format!("SCRAM-{name}: bad base64"));
    let (mut salt, mut stored, mut server) = (once(salt)?, once(stored_key)?, once(server_key)?);
    let want = key_len(hash);
    if stored.len() != want || server.len() != want {
        let twice = |b: &[u8]| std::str::from_utf8(b).ok().and_then(b64);
        match (twice(&stored), twice(&server), twice(&salt)) {
            (Some(st), Some(se), Some(sa)) if st.len() == want && se.len() == want => {
                (stored, server, salt) = (st, se, sa);
            }
            _ => {
                return Err(format!(
                    "SCRAM-{name}: keys of {} bytes, not {want}",
                    stored.len()
                ))
            }
        }
    }
    if salt.is_empty() {
        return Err(format!("SCRAM-{name}: empty salt"));
    }
    Ok(ScramKeys {
        hash,
        iterations,
        salt,
        stored_key: stored,
        server_key: server,
    })
}

/// From a plain password (derived here), else from SCRAM keys, SHA-1 and SHA-256 as the
/// file has them. Never invented: without either the account gets none.
fn credentials(user: &Element, a: &mut Account) {
    let password = user.attr("password").unwrap_or_default();
    if !password.is_empty() && !password.starts_with("scram:") {
        a.credentials = Some(Credentials::from_password(password));
        a.carried
            .push("password (SCRAM-SHA-1 and SCRAM-SHA-256 keys made from it)".into());
        return;
    }
    let mut found: BTreeMap<&'static str, ScramKeys> = BTreeMap::new();
    let mut keep = |keys: Result<ScramKeys, String>, notes: &mut Vec<String>| match keys {
        Ok(k) => {
            found.insert(k.hash.name(), k);
        }
        Err(e) => notes.push(format!("credentials not usable: {e}")),
    };
    // An old ejabberd form: password='scram:[HASH,]STORED,SERVER,SALT,ITERATIONS'.
    if let Some(old) = password.strip_prefix("scram:") {
        let parts: Vec<&str> = old.split(',').collect();
        let (hash, rest) = match parts.as_slice() {
            [h, rest @ ..] if rest.len() == 4 => (hash_of(h), rest),
            rest if rest.len() == 4 => (Some(ScramHash::Sha1), rest),
            _ => (None, &[][..]),
        };
        match hash {
            Some(h) => keep(
                scram_keys(h, rest[3], rest[2], rest[0], rest[1]),
                &mut a.notes,
            ),
            None => a
                .notes
                .push("credentials not usable: an unknown 'scram:' password form".into()),
        }
    }
    for s in user
        .elements()
        .filter(|e| e.is("scram-credentials", NS_SCRAM))
    {
        let mechanism = s.attr("mechanism").unwrap_or_default();
        let Some(hash) = hash_of(mechanism) else {
            a.notes.push(format!(
                "{mechanism} keys are not usable here (SCRAM-SHA-1 and SCRAM-SHA-256 are)"
            ));
            continue;
        };
        // The children are in the scram namespace; found by name whatever it is.
        let get = |n: &str| {
            s.elements()
                .find(|c| c.name == n)
                .map(Element::text)
                .unwrap_or_default()
        };
        keep(
            scram_keys(
                hash,
                &get("iter-count"),
                &get("salt"),
                &get("stored-key"),
                &get("server-key"),
            ),
            &mut a.notes,
        );
    }
    if found.is_empty() {
        a.notes.push(
            "no password and no usable SCRAM keys: data imported, but no login until \
             `jabberctl adduser` gives the account a password"
                .into(),
        );
        return;
    }
    a.carried.push(format!(
        "{} keys",
        found
            .keys()
            .map(|h| format!("SCRAM-{h}"))
            .collect::<Vec<_>>()
            .join(" and ")
    ));
    a.credentials = Some(Credentials {
        scram: found.into_values().collect(),
    });
}

// -- roster ------------------------------------------------------------------------------

fn contact(jid: &str) -> Option<String> {
    jid::Jid::new(jid.trim())
        .ok()
        .map(|j| j.to_bare().to_string())
}

/// `version` becomes a new counter: the import time in seconds, so that a client's
/// roster version cached from the old server never matches by chance (it then fetches
/// the whole roster once).
fn roster(
    bare: &str,
    query: Option<&Element>,
    pending: &[&Element],
    version: u64,
    notes: &mut Vec<String>,
) -> Option<Roster> {
    let mut r = Roster {
        ver: version,
        items: BTreeMap::new(),
    };
    for e in query
        .into_iter()
        .flat_map(|q| q.elements())
        .filter(|e| e.is("item", NS_ROSTER))
    {
        let raw = e.attr("jid").unwrap_or_default();
        let Some(jid) = contact(raw) else {
            notes.push(format!(
                "roster item '{raw}' is not a valid address: left out"
            ));
            continue;
        };
        if jid == bare {
            continue;
        }
        let sub = e.attr("subscription").unwrap_or("none");
        if sub == "remove" {
            continue;
        }
        let mut item = RosterItem::new(&jid);
        item.name = e.attr("name").filter(|n| !n.is_empty()).map(str::to_owned);
        for g in e.elements().filter(|g| g.is("group", NS_ROSTER)) {
            let g = g.text();
            if !g.is_empty() && !item.groups.contains(&g) {
                item.groups.push(g);
            }
        }
        item.to = matches!(sub, "to" | "both");
        item.from = matches!(sub, "from" | "both");
        item.ask = e.attr("ask") == Some("subscribe");
        item.approved = matches!(e.attr("approved"), Some("true" | "1"));
        r.items.insert(jid, item);
    }
    for p in pending {
        if p.attr("type") != Some("subscribe") {
            continue;
        }
        let Some(from) = p.attr("from").and_then(contact) else {
            continue;
        };
        if from == bare {
            continue;
        }
        // Kept as sm keeps a request (sm/src/modules/subscription.rs): from the
        // contact's bare JID, without to and id.
        let mut request = (*p).clone();
        let ns = request.ns.clone();
        rename_ns(&mut request, &ns, NS_CLIENT);
        request.set_attr("from", from.clone());
        request.remove_attr("to");
        request.remove_attr("id");
        request.strip_indentation();
        let item = r.items.entry(from.clone()).or_insert_with(|| {
            let mut i = RosterItem::new(&from);
            i.hidden = true;
            i
        });
        item.pending_in = true;
        item.request = Some(request);
    }
    if query.is_none() && r.items.is_empty() {
        return None;
    }
    Some(r)
}

/// Moves elements of namespace `from` (a stanza of `jabber:server`) to `to`.
fn rename_ns(e: &mut Element, from: &str, to: &str) {
    let mut stack = vec![e];
    while let Some(e) = stack.pop() {
        if e.ns == from {
            e.ns = to.to_owned();
        }
        stack.extend(e.elements_mut());
    }
}

// -- private, offline, privacy -----------------------------------------------------------

/// Namespaces XEP-0049 reserves (sm refuses to store them).
fn reserved(ns: &str) -> bool {
    ns.is_empty() || ns == NS_PRIVATE || ns.starts_with("jabber:")
}

fn private_storage(q: &Element, notes: &mut Vec<String>) -> Option<Element> {
    let mut out = Element::new("query", NS_PRIVATE);
    for e in q.elements() {
        if reserved(&e.ns) {
            notes.push(format!(
                "private XML <{} xmlns='{}'/> is in a reserved namespace: left out",
                e.name, e.ns
            ));
            continue;
        }
        // One element per (name, namespace): the last one wins, as a client's set would.
        out.children
            .retain(|n| !matches!(n, Node::Element(o) if o.name == e.name && o.ns == e.ns));
        let mut e = e.clone();
        e.strip_indentation();
        out.push(e);
    }
    (!out.children.is_empty()).then_some(out)
}

fn offline_messages(messages: &[&Element], a: &mut Account) {
    let mut kept: Vec<String> = vec![];
    for m in messages {
        if m.name != "message" || !(m.ns == NS_CLIENT || m.ns == NS_SERVER) {
            a.notes.push(format!(
                "<{} xmlns='{}'/> among the offline messages is not a message: left out",
                m.name, m.ns
            ));
            continue;
        }
        let mut m = (*m).clone();
        rename_ns(&mut m, NS_SERVER, NS_CLIENT);
        m.strip_indentation();
        kept.push(m.to_stanza());
    }
    // The whole store must fit one record: the oldest go first when it does not.
    let mut total: usize = kept.iter().map(String::len).sum();
    let mut dropped = 0;
    while total > MAX_RECORD && !kept.is_empty() {
        total -= kept.remove(0).len();
        dropped += 1;
    }
    if dropped > 0 {
        a.notes.push(format!(
            "{dropped} oldest offline messages left out: the store holds at most {MAX_RECORD} bytes"
        ));
    }
    if !kept.is_empty() {
        a.carried.push(format!("offline {}", kept.len()));
        a.records.push((NS_OFFLINE.into(), kept.concat()));
    }
}

/// The blocklist from the default privacy list (ejabberd keeps XEP-0191 blocking there):
/// its rules that deny everything from a JID.
fn blocklist(q: &Element, notes: &mut Vec<String>) -> Option<Vec<String>> {
    let default = q.child("default", NS_PRIVACY).and_then(|d| d.attr("name"));
    let mut out = vec![];
    for list in q.elements().filter(|e| e.is("list", NS_PRIVACY)) {
        let name = list.attr("name").unwrap_or_default();
        let items: Vec<&Element> = list.elements().filter(|e| e.name == "item").collect();
        if Some(name) != default {
            notes.push(format!(
                "privacy list '{name}' ({} rules) is not imported: only the default list's \
                 blocking rules are",
                items.len()
            ));
            continue;
        }
        let mut others = 0;
        for i in items {
            let blocks_all = i.attr("type") == Some("jid")
                && i.attr("action") == Some("deny")
                && i.elements().next().is_none();
            match i.attr("value").and_then(|v| jid::Jid::new(v.trim()).ok()) {
                Some(j) if blocks_all => {
                    let j = j.to_string();
                    if !out.contains(&j) {
                        out.push(j);
                    }
                }
                _ => others += 1,
            }
        }
        if others > 0 {
            notes.push(format!(
                "privacy list '{name}': {others} rules other than blocking a JID are not imported"
            ));
        }
    }
    (!out.is_empty()).then_some(out)
}

// -- PEP ---------------------------------------------------------------------------------

/// The fields of a `jabber:x:data` form: var -> values.
fn form_fields(x: &Element) -> BTreeMap<String, Vec<String>> {
    x.elements()
        .filter(|f| f.name == "field")
        .filter_map(|f| {
            let values = f
                .elements()
                .filter(|v| v.name == "value")
                .map(|v| v.text().trim().to_owned())
                .collect();
            Some((f.attr("var")?.to_owned(), values))
        })
        .collect()
}

fn node_config(node: &str, x: Option<&Element>, notes: &mut Vec<String>) -> PepConfig {
    let mut c = PepConfig::default();
    let Some(x) = x else { return c };
    let fields = form_fields(x);
    let one = |var: &str| {
        fields
            .get(var)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .map(String::as_str)
    };
    let flag = |var: &str| one(var).map(|v| matches!(v, "1" | "true"));
    if let Some(access) = one("pubsub#access_model") {
        if ACCESS_MODELS.contains(&access) {
            c.access = access.to_owned();
        } else {
            notes.push(format!(
                "PEP node '{node}': access model '{access}' is not offered here: owner only (whitelist)"
            ));
            c.access = "whitelist".into();
        }
    }
    match one("pubsub#max_items") {
        Some("max") => c.max_items = None,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n > 0 => c.max_items = Some(n),
            _ => notes.push(format!("PEP node '{node}': max_items '{n}' ignored")),
        },
        None => {}
    }
    if let Some(p) = flag("pubsub#persist_items") {
        c.persist = p;
    }
    if let Some(n) = flag("pubsub#notify_retract") {
        c.notify_retract = n;
    }
    if let Some(s) = one("pubsub#send_last_published_item") {
        if SEND_LAST.contains(&s) {
            c.send_last = s.to_owned();
        }
    }
    if let Some(groups) = fields.get("pubsub#roster_groups_allowed") {
        c.groups = groups.iter().filter(|g| !g.is_empty()).cloned().collect();
    }
    c.title = one("pubsub#title").map(str::to_owned);
    c
}

fn pep_nodes(
    owner: &[&Element],
    items: &[&Element],
    now: u64,
    notes: &mut Vec<String>,
) -> Vec<PepNode> {
    let mut nodes: Vec<PepNode> = vec![];
    fn at(nodes: &mut Vec<PepNode>, name: &str) -> usize {
        match nodes.iter().position(|n| n.name == name) {
            Some(i) => i,
            None => {
                nodes.push(PepNode {
                    name: name.to_owned(),
                    config: PepConfig::default(),
                    items: vec![],
                });
                nodes.len() - 1
            }
        }
    }
    for e in owner.iter().flat_map(|p| p.elements()) {
        let Some(node) = e.attr("node").filter(|n| !n.is_empty()) else {
            continue;
        };
        match e.name.as_str() {
            "configure" => {
                let i = at(&mut nodes, node);
                nodes[i].config = node_config(node, e.child("x", NS_DATA), notes);
            }
            "affiliations" | "subscriptions" => {
                let others = e
                    .elements()
                    .filter(|a| a.attr("affiliation") != Some("owner"))
                    .count();
                if others > 0 {
                    notes.push(format!(
                        "PEP node '{node}': {others} {} not imported (access follows the node's access model)",
                        e.name
                    ));
                }
            }
            other => notes.push(format!("PEP node '{node}': <{other}/> not imported")),
        }
    }
    for e in items.iter().flat_map(|p| p.elements()) {
        let Some(node) = e.attr("node").filter(|n| !n.is_empty()) else {
            continue;
        };
        let i = at(&mut nodes, node);
        for item in e.elements().filter(|i| i.name == "item") {
            let Some(payload) = item.elements().next() else {
                continue;
            };
            let mut payload = payload.clone();
            payload.strip_indentation();
            let id = item.attr("id").unwrap_or_default().to_owned();
            // An id published again replaces the earlier item.
            nodes[i].items.retain(|o| o.id != id || id.is_empty());
            nodes[i].items.push(PepItem {
                id,
                stamp: now,
                payload,
            });
        }
    }
    for n in &mut nodes {
        let keep = n.config.keep();
        if n.items.len() > keep {
            let extra = n.items.len() - keep;
            n.items.drain(..extra);
            notes.push(format!(
                "PEP node '{}': {extra} older items beyond its max_items left out",
                n.name
            ));
        }
    }
    nodes
}

fn vcard_from_pep(pep: &[PepNode]) -> Option<Element> {
    let last = |name: &str| {
        pep.iter()
            .find(|n| n.name == name)
            .and_then(|n| n.items.last())
            .map(|i| &i.payload)
    };
    let v4 = last(NODE_VCARD4).filter(|p| p.name == "vcard");
    let data_node = pep.iter().find(|n| n.name == NODE_AVATAR_DATA);
    let data = |id: &str| -> Option<String> {
        data_node?
            .items
            .iter()
            .find(|i| i.id == id)
            .and_then(|i| vcard::avatar_data(&i.payload))
    };
    let meta = last(NODE_AVATAR_METADATA);
    vcard::from_pep(
        v4,
        meta.map(|m| (m, &data as &dyn Fn(&str) -> Option<String>)),
    )
}

// -- archive -----------------------------------------------------------------------------

fn parse_stamp(s: &str) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(s.trim()).ok()?;
    u64::try_from(t.timestamp_micros()).ok()
}

/// Items from `<result xmlns='urn:xmpp:mam:2'>` elements (XEP-0227 1.1): each its
/// `<forwarded/>` message and delay stamp. Sorted by time; ids made as sm makes them
/// (from the time, bumped by a microsecond where two are equal), so importing the same
/// file again makes the same ids and storage skips what it has.
fn archive_items(bare: &str, results: &[&Element], notes: &mut Vec<String>) -> Vec<Item> {
    let mut found: Vec<(u64, String, Element)> = vec![];
    let mut bad = 0;
    for r in results {
        let forwarded = r
            .is("result", NS_MAM)
            .then(|| r.child("forwarded", NS_FORWARD))
            .flatten();
        let parsed = forwarded.and_then(|f| {
            let time = parse_stamp(f.child("delay", NS_DELAY)?.attr("stamp")?)?;
            let m = f
                .elements()
                .find(|m| m.name == "message" && (m.ns == NS_CLIENT || m.ns == NS_SERVER))?;
            Some((time, m.clone()))
        });
        let Some((time, mut m)) = parsed else {
            bad += 1;
            continue;
        };
        rename_ns(&mut m, NS_SERVER, NS_CLIENT);
        m.strip_indentation();
        let party = |k: &str| m.attr(k).and_then(|j| jid::Jid::new(j).ok());
        let (from, to) = (party("from"), party("to"));
        let inbound = to.as_ref().is_some_and(|t| t.to_bare().to_string() == bare);
        let with = if inbound { from } else { to };
        // Stanza ids the old server gave are not ours: sm puts its own in what it
        // archives of a received message (sm/src/modules/mam/mod.rs).
        m.children.retain(|n| {
            !matches!(n, Node::Element(c) if c.is("stanza-id", NS_SID) && c.attr("by") == Some(bare))
        });
        found.push((time, with.map(|w| w.to_string()).unwrap_or_default(), m));
    }
    found.sort_by_key(|(t, _, _)| *t);
    let mut out = Vec::with_capacity(found.len());
    let mut last = 0u64;
    for (time, with, mut m) in found {
        let time = time.max(last + 1);
        last = time;
        let id = archive_id(time);
        let to_user = m
            .attr("to")
            .and_then(|t| jid::Jid::new(t).ok())
            .is_some_and(|t| t.to_bare().to_string() == bare);
        if to_user {
            m.push(
                Element::new("stanza-id", NS_SID)
                    .with_attr("by", bare)
                    .with_attr("id", id.clone()),
            );
        }
        let payload = m.to_xml();
        if payload.len() + 512 > MAX_RECORD {
            bad += 1;
            continue;
        }
        out.push(Item {
            id,
            time,
            with,
            payload: Bytes::from(payload),
        });
    }
    if bad > 0 {
        notes.push(format!(
            "{bad} archived messages left out (no message or time in them, or too large)"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(xml: &str) -> Element {
        Element::parse(xml.as_bytes(), "").unwrap()
    }

    /// Keys of the password "pencil" for SCRAM-SHA-1 (RFC 5802's example).
    const SALT: &str = "QSXCR+Q6sek8bf92";
    const STORED: &str = "6dlGYMOdZcOPutkcNY8U2g7vK9Y=";
    const SERVER: &str = "D+CSWLOshSulAsxiupA+qs2/fTE=";

    fn twice(s: &str) -> String {
        B64.encode(s)
    }

    #[test]
    fn scram_keys_once_or_twice_encoded() {
        let once = scram_keys(ScramHash::Sha1, "4096", SALT, STORED, SERVER).unwrap();
        let c = Credentials {
            scram: vec![once.clone()],
        };
        assert!(c.check_password("pencil"));
        // ejabberd's exports: everything base64-encoded twice.
        let doubled = scram_keys(
            ScramHash::Sha1,
            "4096",
            &twice(SALT),
            &twice(STORED),
            &twice(SERVER),
        )
        .unwrap();
        assert_eq!(doubled, once);
        assert!(scram_keys(ScramHash::Sha256, "4096", SALT, STORED, SERVER).is_err());
        assert!(scram_keys(ScramHash::Sha1, "0", SALT, STORED, SERVER).is_err());
    }

    #[test]
    fn a_sha1_only_account_is_a_valid_credentials_record() {
        let u = user(&format!(
            "<user xmlns='urn:xmpp:pie:0' name='Alice'><scram-credentials xmlns='urn:xmpp:pie:0#scram' \
             mechanism='SCRAM-SHA-1'><server-key>{SERVER}</server-key><stored-key>{STORED}</stored-key>\
             <iter-count>4096</iter-count><salt>{SALT}</salt></scram-credentials>\
             <scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-512'/></user>"
        ));
        let a = account("localhost", &u, 0).unwrap();
        assert_eq!(a.bare, "alice@localhost");
        let c = a.credentials.unwrap();
        let stored = Credentials::parse(c.to_xml().as_bytes()).unwrap().unwrap();
        assert_eq!(stored, c);
        assert!(stored.keys(ScramHash::Sha256).is_none());
        assert!(stored.check_password("pencil"));
        assert!(a.notes.iter().any(|n| n.contains("SCRAM-SHA-512")));
    }

    #[test]
    fn a_plain_password_makes_both_hashes_and_nothing_makes_none() {
        let a = account(
            "localhost",
            &user("<user xmlns='urn:xmpp:pie:0' name='bob' password='s3cret'/>"),
            0,
        )
        .unwrap();
        let c = a.credentials.unwrap();
        assert!(c.keys(ScramHash::Sha1).is_some() && c.keys(ScramHash::Sha256).is_some());
        assert!(c.check_password("s3cret"));
        let a = account(
            "localhost",
            &user("<user xmlns='urn:xmpp:pie:0' name='bob'/>"),
            0,
        )
        .unwrap();
        assert!(a.credentials.is_none());
        // The old ejabberd form.
        let a = account(
            "localhost",
            &user(&format!(
                "<user xmlns='urn:xmpp:pie:0' name='bob' password='scram:{STORED},{SERVER},{SALT},4096'/>"
            )),
            0,
        )
        .unwrap();
        assert!(a.credentials.unwrap().check_password("pencil"));
    }

    #[test]
    fn roster_with_pending_requests_private_offline_and_blocklist() {
        let u = user(
            "<user xmlns='urn:xmpp:pie:0' name='alice' password='x'>\
             <query xmlns='jabber:iq:roster' version='5'>\
               <item jid='Bob@Example.com' name='Bobby' subscription='both'><group>Friends</group><group>Friends</group></item>\
               <item jid='alice@localhost' subscription='both'/>\
               <item jid='carol@example.com' subscription='none' ask='subscribe'/></query>\
             <presence xmlns='jabber:client' type='subscribe' from='dave@example.com/x' to='alice@localhost' id='1'>\
               <status>hi</status></presence>\
             <presence type='subscribe' from='carol@example.com'/>\
             <query xmlns='jabber:iq:private'><prefs xmlns='exodus:prefs'/><x xmlns='jabber:x:oob'/></query>\
             <offline-messages><message xmlns='jabber:client' from='bob@example.com/p' to='alice@localhost' type='chat'>\
               <body>hi</body><delay xmlns='urn:xmpp:delay' stamp='2024-01-01T00:00:00Z'/></message></offline-messages>\
             <query xmlns='jabber:iq:privacy'><default name='Blocked contacts'/><list name='Blocked contacts'>\
               <item type='jid' value='spam@evil.example' action='deny' order='1'/>\
               <item type='group' value='G' action='deny' order='2'/></list></query>\
             <unknown xmlns='urn:example'/></user>",
        );
        let a = account("localhost", &u, 1_700_000_000_000_000).unwrap();
        let get = |ns: &str| &a.records.iter().find(|(n, _)| n == ns).unwrap().1;
        let r = Roster::parse(get(NS_ROSTER).as_bytes()).unwrap();
        assert_eq!(r.ver, 1_700_000_000);
        assert_eq!(
            r.items.keys().collect::<Vec<_>>(),
            ["bob@example.com", "carol@example.com", "dave@example.com"]
        );
        let bob = &r.items["bob@example.com"];
        assert!(bob.to && bob.from && bob.groups == ["Friends"]);
        let carol = &r.items["carol@example.com"];
        assert!(carol.ask && carol.pending_in && !carol.hidden);
        let dave = &r.items["dave@example.com"];
        assert!(dave.hidden && dave.pending_in);
        assert_eq!(
            dave.request.as_ref().unwrap().to_xml(),
            "<presence xmlns='jabber:client' type='subscribe' from='dave@example.com'><status>hi</status></presence>"
        );
        assert_eq!(
            get(NS_PRIVATE),
            "<query xmlns='jabber:iq:private'><prefs xmlns='exodus:prefs'/></query>"
        );
        assert_eq!(
            get(NS_OFFLINE),
            "<message from='bob@example.com/p' to='alice@localhost' type='chat'><body>hi</body>\
             <delay xmlns='urn:xmpp:delay' stamp='2024-01-01T00:00:00Z'/></message>"
        );
        assert_eq!(
            get(NS_BLOCKING),
            "<blocklist xmlns='urn:xmpp:blocking'><item jid='spam@evil.example'/></blocklist>"
        );
        assert!(a.notes.iter().any(|n| n.contains("urn:example")));
        assert!(a.notes.iter().any(|n| n.contains("jabber:x:oob")));
        assert!(a.notes.iter().any(|n| n.contains("1 rules other")));
    }

    #[test]
    fn prosody_pep_vcard4_and_archive() {
        let u = user(
            "<user xmlns='urn:xmpp:pie:0' name='alice'>\
             <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'>\
               <configure node='urn:xmpp:vcard4'><x xmlns='jabber:x:data' type='submit'>\
                 <field var='pubsub#max_items' type='text-single'/>\
                 <field var='pubsub#access_model'><value>open</value></field></x></configure>\
               <configure node='n2'><x xmlns='jabber:x:data' type='submit'>\
                 <field var='pubsub#max_items'><value>max</value></field>\
                 <field var='pubsub#access_model'><value>authorize</value></field></x></configure>\
               <affiliations node='n2'><affiliation jid='alice@localhost' affiliation='owner'/></affiliations></pubsub>\
             <pubsub xmlns='http://jabber.org/protocol/pubsub'>\
               <items node='urn:xmpp:vcard4'><item id='current'><vcard xmlns='urn:ietf:params:xml:ns:vcard-4.0'>\
                 <fn><text>Alice</text></fn></vcard></item></items>\
               <items node='n2'><item id='a'><x xmlns='urn:n2'>1</x></item><item id='b'><x xmlns='urn:n2'>2</x></item></items>\
             </pubsub>\
             <archive xmlns='urn:xmpp:pie:0#mam'>\
               <result xmlns='urn:xmpp:mam:2' id='u2'><forwarded xmlns='urn:xmpp:forward:0'>\
                 <delay xmlns='urn:xmpp:delay' stamp='2024-01-01T00:00:00Z'/>\
                 <message xmlns='jabber:client' from='alice@localhost/x' to='bob@localhost' type='chat'><body>2</body></message>\
               </forwarded></result>\
               <result xmlns='urn:xmpp:mam:2' id='u1'><forwarded xmlns='urn:xmpp:forward:0'>\
                 <delay xmlns='urn:xmpp:delay' stamp='2024-01-01T00:00:00Z'/>\
                 <message xmlns='jabber:client' from='bob@localhost/y' to='alice@localhost' type='chat'><body>1</body>\
                 <stanza-id xmlns='urn:xmpp:sid:0' by='alice@localhost' id='old'/></message>\
               </forwarded></result></archive></user>",
        );
        let a = account("localhost", &u, 7).unwrap();
        let get = |ns: &str| &a.records.iter().find(|(n, _)| n == ns).unwrap().1;
        assert_eq!(
            get(NS_VCARD),
            "<vCard xmlns='vcard-temp'><FN>Alice</FN></vCard>"
        );
        let index =
            super::super::records::pep_index_parse(get("urn:jabberd-rs:pep").as_bytes()).unwrap();
        assert_eq!(index[0].1.access, "open");
        assert_eq!(index[0].1.max_items, Some(1));
        assert_eq!(
            (index[1].1.access.as_str(), index[1].1.max_items),
            ("whitelist", None)
        );
        let n2 = super::super::records::pep_items_parse(get("urn:jabberd-rs:pep:n2").as_bytes())
            .unwrap();
        assert_eq!(n2.len(), 2);
        // Same stamp: kept in file order, one microsecond apart.
        let t = 1_704_067_200_000_000u64;
        assert_eq!(a.archive.len(), 2);
        assert_eq!((a.archive[0].time, a.archive[1].time), (t, t + 1));
        assert_eq!(a.archive[1].id, archive_id(t + 1));
        assert_eq!(a.archive[0].with, "bob@localhost");
        assert_eq!(a.archive[1].with, "bob@localhost/y");
        let received = std::str::from_utf8(&a.archive[1].payload).unwrap();
        assert!(received.contains(&format!("id='{}'", archive_id(t + 1))));
        assert!(!received.contains("'old'"));
    }
}
