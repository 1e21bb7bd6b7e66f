//! Bookmarks for old and new clients alike (XEP-0402 5.3, `#compat` and `#compat-pep`).
//!
//! A user's chat-room bookmarks live in three places, and clients of each kind read
//! only their own:
//! - XEP-0402 (`urn:xmpp:bookmarks:1`): a PEP node with one item per room, the room's
//!   JID as item id and `<conference xmlns='urn:xmpp:bookmarks:1'/>` as payload;
//! - XEP-0048 in XEP-0049 private storage: one `<storage xmlns='storage:bookmarks'>`
//!   holding a `<conference jid/>` per room and the `<url/>`s;
//! - XEP-0048 in PEP (XEP-0223): the same `<storage/>` as item `current` of the node
//!   `storage:bookmarks`.
//!
//! Whatever a client writes to one of them (the `Stored` hook says so), this module
//! writes to the other two: a XEP-0402 item added, changed or retracted becomes that
//! conference in the `<storage/>` (its URLs and other conferences kept); a `<storage/>`
//! stored becomes the XEP-0402 items (published where they differ, retracted where a
//! conference went away: the node's subscribers get the events) and the other copy of
//! the `<storage/>`. Extensions (XEP-0402 `<extensions/>`, other children of a XEP-0048
//! `<conference/>`) go across as they are. A conversion that fails is logged; the
//! client's write stands. Retracting `current` or deleting the `storage:bookmarks` node
//! is not taken as removing every bookmark.
//!
//! A form that is missing is filled from one that exists (bookmarks stored before this
//! module ran) when a client of the user first touches its bookmarks in a run of the
//! user's task: an IQ naming either form (private storage, either PEP node), or an
//! available presence whose capabilities ask for their notifications or are not known
//! yet (PEP then sends the last items). A client that never uses bookmarks costs no
//! reads: comparing at every session start was two of the four storage reads of a
//! login (docs/benchmarks.md, "Bookmarks compared when used").

use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::config::SmConfig;
use crate::host::{
    Change, Declaration, Disco, Flow, Hook, Module, Packet, Reply, SessionKey, Stanzas, Stored,
    User,
};
use crate::modules::caps::{Cache, Caps};
use crate::modules::pep::{self, store};
use crate::modules::private;
use crate::xml::{Element, Node};

pub const NS_BOOKMARKS: &str = "urn:xmpp:bookmarks:1";
/// XEP-0048: the namespace of the `<storage/>`, and the name of its PEP node.
pub const NS_LEGACY: &str = "storage:bookmarks";
/// The item id of the `<storage/>` in the `storage:bookmarks` node.
const LEGACY_ITEM: &str = "current";

/// What this module's writes are marked with ([`Change::by`]).
const ME: &str = "bookmarks";

/// The publish-options of the XEP-0402 node (XEP-0402 3.1).
const OPTIONS: &[(&str, &str)] = &[
    ("pubsub#max_items", "max"),
    ("pubsub#access_model", "whitelist"),
    ("pubsub#persist_items", "true"),
    ("pubsub#send_last_published_item", "never"),
];

/// The publish-options of the XEP-0048 node (XEP-0048 3.3, XEP-0223).
const LEGACY_OPTIONS: &[(&str, &str)] = &[
    ("pubsub#persist_items", "true"),
    ("pubsub#access_model", "whitelist"),
];

pub struct Bookmarks;

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    if let Some(n) = config.module_settings("bookmarks")? {
        n.allow(&[], &[])?;
    }
    Ok(Arc::new(Bookmarks))
}

/// One bookmarked room, whichever form it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Conference {
    jid: String,
    name: Option<String>,
    autojoin: bool,
    nick: Option<String>,
    password: Option<String>,
    /// XEP-0402 `<extensions/>` children; other children of a XEP-0048 conference.
    extensions: Vec<Element>,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v.map(str::trim), Some("true" | "1"))
}

impl Conference {
    /// XEP-0402 item `id` with payload `c`.
    fn from_item(id: &str, c: &Element) -> Option<Conference> {
        if !c.is("conference", NS_BOOKMARKS) || id.is_empty() {
            return None;
        }
        Some(Conference {
            jid: id.to_owned(),
            name: c.attr("name").map(str::to_owned),
            autojoin: truthy(c.attr("autojoin")),
            nick: c.child("nick", NS_BOOKMARKS).map(Element::text),
            password: c.child("password", NS_BOOKMARKS).map(Element::text),
            extensions: c
                .child("extensions", NS_BOOKMARKS)
                .map(|x| x.elements().cloned().collect())
                .unwrap_or_default(),
        })
    }

    /// A XEP-0048 `<conference/>` (one without a `jid` is no bookmark).
    fn from_legacy(c: &Element) -> Option<Conference> {
        let jid = c.attr("jid")?.trim();
        if jid.is_empty() {
            return None;
        }
        let own = |e: &Element| e.ns == NS_LEGACY && matches!(e.local_name(), "nick" | "password");
        Some(Conference {
            jid: jid.to_owned(),
            name: c.attr("name").map(str::to_owned),
            autojoin: truthy(c.attr("autojoin")),
            nick: c.child("nick", NS_LEGACY).map(Element::text),
            password: c.child("password", NS_LEGACY).map(Element::text),
            extensions: c.elements().filter(|e| !own(e)).cloned().collect(),
        })
    }

    /// The XEP-0402 payload.
    fn to_item(&self) -> Element {
        let mut c = Element::new("conference", NS_BOOKMARKS);
        self.fill(&mut c, NS_BOOKMARKS);
        if !self.extensions.is_empty() {
            let mut x = Element::new("extensions", NS_BOOKMARKS);
            for e in &self.extensions {
                x.push(e.clone());
            }
            c.push(x);
        }
        c
    }

    /// The XEP-0048 `<conference/>`.
    fn to_legacy(&self) -> Element {
        let mut c = Element::new("conference", NS_LEGACY).with_attr("jid", self.jid.clone());
        self.fill(&mut c, NS_LEGACY);
        for e in &self.extensions {
            c.push(e.clone());
        }
        c
    }

    fn fill(&self, c: &mut Element, ns: &str) {
        if let Some(name) = &self.name {
            c.set_attr("name", name.clone());
        }
        if self.autojoin {
            c.set_attr("autojoin", "true");
        }
        if let Some(nick) = &self.nick {
            c.push(Element::new("nick", ns).with_text(nick.clone()));
        }
        if let Some(password) = &self.password {
            c.push(Element::new("password", ns).with_text(password.clone()));
        }
    }
}

fn empty_storage() -> Element {
    Element::new("storage", NS_LEGACY)
}

fn is_conference(e: &Element) -> bool {
    e.is("conference", NS_LEGACY)
}

/// The conferences of a XEP-0048 `<storage/>`, the first of each room.
fn conferences(storage: &Element) -> Vec<Conference> {
    let mut all: Vec<Conference> = vec![];
    for c in storage.elements().filter(|e| is_conference(e)) {
        match Conference::from_legacy(c) {
            Some(c) if !all.iter().any(|o| o.jid == c.jid) => all.push(c),
            _ => {}
        }
    }
    all
}

/// Puts `c` in `storage` in place of the conference of its room (at its place), or
/// at the end; true if that changed anything.
fn upsert(storage: &mut Element, c: &Conference) -> bool {
    let new = c.to_legacy();
    let at = storage.children.iter().position(|n| {
        matches!(n, Node::Element(e) if is_conference(e) && e.attr("jid").map(str::trim) == Some(&c.jid))
    });
    match at {
        Some(at) => {
            let old = match &storage.children[at] {
                Node::Element(e) => Conference::from_legacy(e),
                Node::Text(_) => None,
            };
            if old.as_ref() == Some(c) {
                return false;
            }
            storage.children[at] = Node::Element(new);
        }
        None => storage.push(new),
    }
    true
}

/// Removes the conferences of the rooms `jids` picks; true if any was there.
fn remove(storage: &mut Element, picks: impl Fn(&str) -> bool) -> bool {
    let before = storage.children.len();
    storage.children.retain(|n| match n {
        Node::Element(e) if is_conference(e) => !picks(e.attr("jid").unwrap_or("").trim()),
        _ => true,
    });
    storage.children.len() != before
}

/// Parses stored XML, logging what cannot be read.
fn parse(xml: &str, what: &str) -> Option<Element> {
    match Element::parse(xml.as_bytes(), "") {
        Ok(e) => Some(e),
        Err(e) => {
            warn!("{what} unreadable, not converted: {e}");
            None
        }
    }
}

/// The XEP-0048 `<storage/>` kept in private storage, if any.
async fn private_copy(u: &User) -> Result<Option<Element>, Reply> {
    private::get(u, "storage", NS_LEGACY).await
}

/// The XEP-0048 `<storage/>` kept in PEP, if any.
async fn pep_copy(u: &mut User) -> Result<Option<Element>, String> {
    let items = store::node_items(u, NS_LEGACY)
        .await
        .map_err(|e| e.to_string())?;
    let item = items.and_then(|i| i.into_iter().rev().find(|i| i.id == LEGACY_ITEM));
    Ok(item
        .and_then(|i| parse(&i.payload, "the PEP copy of the XEP-0048 bookmarks"))
        .filter(|s| s.is("storage", NS_LEGACY)))
}

/// The XEP-0048 bookmarks: the private storage copy, else the PEP one.
async fn legacy(u: &mut User) -> Result<Option<Element>, String> {
    match private_copy(u).await {
        Ok(Some(s)) => Ok(Some(s)),
        Ok(None) => pep_copy(u).await,
        Err(r) => Err(format!("{r:?}")),
    }
}

/// The XEP-0402 conferences (`None`: no node), in the node's order.
async fn native(u: &mut User) -> Result<Option<Vec<Conference>>, String> {
    let items = store::node_items(u, NS_BOOKMARKS)
        .await
        .map_err(|e| e.to_string())?;
    Ok(items.map(|items| {
        items
            .iter()
            .filter_map(|i| {
                let payload = Element::parse(i.payload.as_bytes(), "").ok()?;
                Conference::from_item(&i.id, &payload)
            })
            .collect()
    }))
}

/// Where a XEP-0048 `<storage/>` was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    Private,
    Pep,
}

/// Writes the XEP-0048 `<storage/>` to private storage.
async fn write_private(u: &mut User, storage: &Element) {
    match private::set(u, ME, std::slice::from_ref(storage)).await {
        Ok(()) => debug!("XEP-0048 bookmarks written to private storage"),
        Err(r) => warn!("bookmarks not copied to private storage: {r:?}"),
    }
}

/// Publishes the XEP-0048 `<storage/>` to its PEP node.
async fn write_pep(u: &mut User, storage: &Element) {
    let payload = storage.to_xml();
    match pep::publish_item(u, ME, NS_LEGACY, LEGACY_ITEM, &payload, LEGACY_OPTIONS).await {
        Ok(()) => debug!("XEP-0048 bookmarks published to PEP"),
        Err(r) => warn!("bookmarks not copied to the PEP node {NS_LEGACY}: {r:?}"),
    }
}

/// Writes both XEP-0048 copies.
async fn write_legacy(u: &mut User, storage: &Element) {
    write_private(u, storage).await;
    write_pep(u, storage).await;
}

/// Makes the XEP-0402 node hold `wanted`: publishes the conferences it lacks or holds
/// otherwise, retracts those it holds that `wanted` does not.
async fn write_native(u: &mut User, wanted: &[Conference], have: &[Conference]) {
    for c in wanted {
        if have.iter().any(|h| h == c) {
            continue;
        }
        let payload = c.to_item().to_xml();
        if let Err(r) = pep::publish_item(u, ME, NS_BOOKMARKS, &c.jid, &payload, OPTIONS).await {
            // The same answer would come for every other one (a node configured
            // otherwise, storage down): once is enough.
            warn!(room = %c.jid, "bookmarks not converted to XEP-0402: {r:?}");
            return;
        }
    }
    for h in have {
        if !wanted.iter().any(|c| c.jid == h.jid) {
            if let Err(r) = pep::retract_item(u, ME, NS_BOOKMARKS, &h.jid).await {
                warn!(room = %h.jid, "bookmark not retracted from XEP-0402: {r:?}");
            }
        }
    }
}

/// A XEP-0402 item was published: that conference in the XEP-0048 copies.
async fn from_item(u: &mut User, id: &str, payload: &str) {
    let Some(el) = parse(payload, "a XEP-0402 bookmark") else {
        return;
    };
    let Some(c) = Conference::from_item(id, &el) else {
        debug!(id, "not a XEP-0402 conference: not converted");
        return;
    };
    let mut storage = match legacy(u).await {
        Ok(s) => s.unwrap_or_else(empty_storage),
        Err(e) => {
            warn!(room = %c.jid, "XEP-0048 bookmarks unreadable, the bookmark not copied: {e}");
            return;
        }
    };
    if upsert(&mut storage, &c) {
        write_legacy(u, &storage).await;
    }
}

/// XEP-0402 items were retracted (`None`: all of them): those conferences out of the
/// XEP-0048 copies.
async fn from_retract(u: &mut User, ids: Option<&[String]>) {
    let mut storage = match legacy(u).await {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            warn!("XEP-0048 bookmarks unreadable, a removal not copied: {e}");
            return;
        }
    };
    let gone = remove(&mut storage, |jid| {
        ids.is_none_or(|ids| ids.iter().any(|i| i == jid))
    });
    if gone {
        write_legacy(u, &storage).await;
    }
}

/// A XEP-0048 `<storage/>` was written where `kept` says: the other copy and XEP-0402.
async fn from_legacy(u: &mut User, xml: &str, kept: Kept) {
    let Some(storage) = parse(xml, "XEP-0048 bookmarks") else {
        return;
    };
    if !storage.is("storage", NS_LEGACY) {
        return;
    }
    match kept {
        Kept::Private => match pep_copy(u).await {
            Ok(Some(other)) if other == storage => {}
            _ => write_pep(u, &storage).await,
        },
        Kept::Pep => match private_copy(u).await {
            Ok(Some(other)) if other == storage => {}
            _ => write_private(u, &storage).await,
        },
    }
    let have = match native(u).await {
        Ok(have) => have.unwrap_or_default(),
        Err(e) => {
            warn!("XEP-0402 bookmarks unreadable, XEP-0048 ones not converted: {e}");
            return;
        }
    };
    write_native(u, &conferences(&storage), &have).await;
}

/// Fills a form that is missing from one that exists (bookmarks stored before this
/// module ran).
async fn fill_missing(u: &mut User) {
    let private = match private_copy(u).await {
        Ok(p) => p,
        Err(r) => {
            debug!("bookmarks not compared: {r:?}");
            return;
        }
    };
    let (pep, native) = match (pep_copy(u).await, native(u).await) {
        (Ok(p), Ok(n)) => (p, n),
        (Err(e), _) | (_, Err(e)) => {
            debug!("bookmarks not compared: {e}");
            return;
        }
    };
    match (&private, &pep) {
        (Some(p), None) => write_pep(u, p).await,
        (None, Some(p)) => write_private(u, p).await,
        _ => {}
    }
    match (private.or(pep), native) {
        (Some(storage), None) => {
            let wanted = conferences(&storage);
            if !wanted.is_empty() {
                info!(
                    count = wanted.len(),
                    "XEP-0048 bookmarks converted to XEP-0402"
                );
                write_native(u, &wanted, &[]).await;
            }
        }
        (None, Some(have)) if !have.is_empty() => {
            info!(
                count = have.len(),
                "XEP-0402 bookmarks converted to XEP-0048"
            );
            let mut storage = empty_storage();
            for c in &have {
                storage.push(c.to_legacy());
            }
            write_legacy(u, &storage).await;
        }
        _ => {}
    }
}

/// The forms were compared on this task (user state).
struct Compared;

/// Whether `p`, from one of the user's clients, reads or writes bookmarks or makes PEP
/// send them: an IQ that names either form (a false alarm costs one comparison), or an
/// available presence with capabilities that want their notifications or are not known
/// yet.
fn touches_bookmarks(u: &User, p: &Packet) -> bool {
    match p.name() {
        "iq" => [NS_LEGACY, NS_BOOKMARKS]
            .iter()
            .any(|ns| memchr::memmem::find(p.bytes(), ns.as_bytes()).is_some()),
        "presence" if p.to.is_none() && p.kind().is_none() => match Caps::of_packet(p) {
            None => false,
            Some(caps) => match u.ctx.shared.get::<Cache>().and_then(|c| c.known(&caps.ver)) {
                Some(features) => features.notifies(NS_LEGACY) || features.notifies(NS_BOOKMARKS),
                None => true,
            },
        },
        _ => false,
    }
}

#[async_trait::async_trait]
impl Module for Bookmarks {
    fn name(&self) -> &'static str {
        "bookmarks"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .requires("pep")
            .requires("private")
            .hook(Hook::Stored, 0)
            // Before PEP's (250): the forms are filled before it sends the last items.
            .stanzas(Hook::Outbound, Stanzas::Iq, 260)
            .stanzas(Hook::Outbound, Stanzas::Presence, 260)
            .feature(Disco::Account, "urn:xmpp:bookmarks:1#compat")
            .feature(Disco::Account, "urn:xmpp:bookmarks:1#compat-pep")
    }

    async fn outbound(&self, u: &mut User, _from: SessionKey, p: &mut Packet) -> Flow {
        if u.state.get::<Compared>().is_none() && touches_bookmarks(u, p) {
            u.state.insert(Compared);
            fill_missing(u).await;
        }
        Flow::Pass
    }

    async fn stored(&self, u: &mut User, change: &Change<'_>) {
        if change.by == Some(ME) {
            return;
        }
        match change.what {
            Stored::PepPublished {
                node: NS_BOOKMARKS,
                id,
                payload,
            } => from_item(u, id, payload).await,
            Stored::PepRetracted {
                node: NS_BOOKMARKS,
                ids,
            } => from_retract(u, Some(ids)).await,
            Stored::PepCleared { node: NS_BOOKMARKS } => from_retract(u, None).await,
            Stored::PepPublished {
                node: NS_LEGACY,
                id: LEGACY_ITEM,
                payload,
            } => from_legacy(u, payload, Kept::Pep).await,
            Stored::Private {
                name: "storage",
                ns: NS_LEGACY,
                xml,
            } => from_legacy(u, xml, Kept::Private).await,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::caps::Cache;
    use crate::modules::testing::*;

    /// Capabilities that want XEP-0402 and XEP-0048 (PEP) notifications.
    const CAPS: &str =
        "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='bm='/>";

    async fn alice(settings: &str) -> User {
        let ctx = ctx(None, settings);
        let cache = ctx.shared.get::<Cache>().unwrap();
        cache.insert(
            "bm=",
            vec![
                format!("{NS_BOOKMARKS}+notify"),
                format!("{NS_LEGACY}+notify"),
            ],
        );
        user(&ctx, "alice@localhost")
    }

    async fn phone(u: &mut User) {
        online(u, "phone", 0).await;
        send(u, "phone", &format!("<presence>{CAPS}</presence>")).await;
        take(u);
    }

    fn options(fields: &[(&str, &str)]) -> String {
        let fields: String = fields
            .iter()
            .map(|(k, v)| format!("<field var='{k}'><value>{v}</value></field>"))
            .collect();
        format!("<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>{fields}</x></publish-options>")
    }

    fn publish_native(room: &str, inner: &str) -> String {
        format!("<iq type='set' id='p'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{NS_BOOKMARKS}'><item id='{room}'><conference xmlns='{NS_BOOKMARKS}' name='The room' autojoin='true'>{inner}</conference></item></publish>{}</pubsub></iq>", options(OPTIONS))
    }

    fn private_set(storage: &str) -> String {
        format!("<iq type='set' id='s'><query xmlns='jabber:iq:private'>{storage}</query></iq>")
    }

    async fn private_get(u: &mut User) -> String {
        send(u, "phone", &format!("<iq type='get' id='g'><query xmlns='jabber:iq:private'><storage xmlns='{NS_LEGACY}'/></query></iq>")).await;
        let out = take(u);
        to(&out, "phone", &["id='g'", "type='result'"])[0].to_owned()
    }

    async fn items(u: &mut User, node: &str) -> String {
        send(u, "phone", &format!("<iq type='get' id='i'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='{node}'/></pubsub></iq>")).await;
        let out = take(u);
        to(&out, "phone", &["id='i'"])[0].to_owned()
    }

    #[tokio::test]
    async fn a_native_bookmark_reaches_both_legacy_copies_and_leaves_them_with_its_retraction() {
        let mut u = alice("").await;
        phone(&mut u).await;
        // A URL kept by an old client stays.
        let url = format!(
            "<storage xmlns='{NS_LEGACY}'><url name='Site' url='https://example.org/'/></storage>"
        );
        send(&mut u, "phone", &private_set(&url)).await;
        take(&mut u);
        let ext = "<minimize xmlns='urn:example:ext'/>";
        send(
            &mut u,
            "phone",
            &publish_native(
                "room@conference.localhost",
                &format!("<nick>al</nick><password>pw</password><extensions>{ext}</extensions>"),
            ),
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='p'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        assert_eq!(
            to(
                &out,
                "phone",
                &[
                    "pubsub#event",
                    NS_BOOKMARKS,
                    "<item id='room@conference.localhost'>"
                ]
            )
            .len(),
            1,
            "{out:?}"
        );
        let private = private_get(&mut u).await;
        for part in [
            "<conference jid='room@conference.localhost' name='The room' autojoin='true'><nick>al</nick><password>pw</password>",
            ext,
            "url='https://example.org/'",
        ] {
            assert!(private.contains(part), "{part}: {private}");
        }
        let pep = items(&mut u, NS_LEGACY).await;
        assert!(
            pep.contains("<item id='current'>")
                && pep.contains("jid='room@conference.localhost'")
                && pep.contains("https://example.org/"),
            "{pep}"
        );

        send(&mut u, "phone", &format!("<iq type='set' id='r'><pubsub xmlns='http://jabber.org/protocol/pubsub'><retract node='{NS_BOOKMARKS}' notify='true'><item id='room@conference.localhost'/></retract></pubsub></iq>")).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='r'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        let private = private_get(&mut u).await;
        assert!(
            !private.contains("<conference") && private.contains("https://example.org/"),
            "{private}"
        );
        assert!(!items(&mut u, NS_LEGACY).await.contains("<conference"));
    }

    #[tokio::test]
    async fn legacy_bookmarks_become_native_items_with_their_events() {
        let mut u = alice("").await;
        phone(&mut u).await;
        let two = format!("<storage xmlns='{NS_LEGACY}'><conference jid='a@muc.localhost' autojoin='1' name='A'><nick>al</nick></conference><conference jid='b@muc.localhost'/><url url='https://example.org/'/></storage>");
        send(&mut u, "phone", &private_set(&two)).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='s'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        let events = to(&out, "phone", &["pubsub#event", NS_BOOKMARKS]);
        assert_eq!(events.len(), 2, "{out:?}");
        assert!(events[0].contains("<item id='a@muc.localhost'><conference xmlns='urn:xmpp:bookmarks:1' name='A' autojoin='true'><nick>al</nick></conference>"), "{events:?}");
        // The PEP copy of the legacy storage follows (with its own event).
        assert_eq!(
            to(
                &out,
                "phone",
                &[
                    "pubsub#event",
                    "node='storage:bookmarks'",
                    "https://example.org/"
                ]
            )
            .len(),
            1,
            "{out:?}"
        );
        let native = items(&mut u, NS_BOOKMARKS).await;
        assert!(
            native.contains("id='a@muc.localhost'") && native.contains("id='b@muc.localhost'"),
            "{native}"
        );

        // One goes away (an old client rewrote the list): it is retracted, with an event.
        let one = format!("<storage xmlns='{NS_LEGACY}'><conference jid='a@muc.localhost' autojoin='1' name='A'><nick>al</nick></conference></storage>");
        send(&mut u, "phone", &private_set(&one)).await;
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "phone",
                &["pubsub#event", "<retract id='b@muc.localhost'/>"]
            )
            .len(),
            1,
            "{out:?}"
        );
        // The unchanged one is not published again.
        assert!(
            to(
                &out,
                "phone",
                &["pubsub#event", "<item id='a@muc.localhost'>"]
            )
            .is_empty(),
            "{out:?}"
        );
        let native = items(&mut u, NS_BOOKMARKS).await;
        assert!(
            native.contains("id='a@muc.localhost'") && !native.contains("id='b@muc.localhost'"),
            "{native}"
        );

        // The same through the PEP copy (XEP-0223).
        let pep = format!("<iq type='set' id='l'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{NS_LEGACY}'><item id='current'><storage xmlns='{NS_LEGACY}'><conference jid='c@muc.localhost' name='C'/></storage></item></publish>{}</pubsub></iq>", options(LEGACY_OPTIONS));
        send(&mut u, "phone", &pep).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='l'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        assert_eq!(
            to(
                &out,
                "phone",
                &["pubsub#event", "<item id='c@muc.localhost'>"]
            )
            .len(),
            1,
            "{out:?}"
        );
        assert_eq!(
            to(
                &out,
                "phone",
                &["pubsub#event", "<retract id='a@muc.localhost'/>"]
            )
            .len(),
            1,
            "{out:?}"
        );
        assert!(private_get(&mut u).await.contains("jid='c@muc.localhost'"));
    }

    /// A XEP-0048 list in private storage, as if stored before the module ran.
    async fn stored_before(u: &mut User) {
        u.ctx
            .store
            .set("alice@localhost", "jabber:iq:private", format!("<query xmlns='jabber:iq:private'><storage xmlns='{NS_LEGACY}'><conference jid='old@muc.localhost' name='Old'/></storage></query>"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn bookmarks_stored_before_are_converted_at_login() {
        let mut u = alice("").await;
        stored_before(&mut u).await;
        phone(&mut u).await;
        let native = items(&mut u, NS_BOOKMARKS).await;
        assert!(native.contains("<item id='old@muc.localhost'><conference xmlns='urn:xmpp:bookmarks:1' name='Old'/>"), "{native}");
        assert!(items(&mut u, NS_LEGACY).await.contains("old@muc.localhost"));
        // The node is what XEP-0402 asks for: a client publishing with its options meets it.
        send(&mut u, "phone", &publish_native("new@muc.localhost", "")).await;
        assert_eq!(
            to(&take(&mut u), "phone", &["id='p'", "type='result'"]).len(),
            1
        );
    }

    #[tokio::test]
    async fn the_forms_are_compared_only_for_a_client_that_uses_bookmarks() {
        let mut u = alice("").await;
        stored_before(&mut u).await;
        // No capabilities, or known ones without the bookmarks' notifications: nothing
        // read, nothing converted.
        online(&mut u, "bot", 0).await;
        let plain =
            "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='plain='/>";
        u.ctx
            .shared
            .get::<Cache>()
            .unwrap()
            .insert("plain=", vec!["urn:xmpp:ping".into()]);
        start(&mut u, "plain").await;
        send(&mut u, "plain", &format!("<presence>{plain}</presence>")).await;
        send(
            &mut u,
            "bot",
            "<iq type='get' id='v' to='localhost'><query xmlns='jabber:iq:version'/></iq>",
        )
        .await;
        take(&mut u);
        assert!(u.state.get::<Compared>().is_none());
        // Its first request for either form compares them, before it is answered.
        send(&mut u, "bot", &format!("<iq type='get' id='i'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='{NS_BOOKMARKS}'/></pubsub></iq>")).await;
        let out = take(&mut u);
        assert!(u.state.get::<Compared>().is_some());
        assert!(
            to(&out, "bot", &["id='i'", "<item id='old@muc.localhost'>"]).len() == 1,
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn a_client_whose_capabilities_are_not_known_yet_gets_the_forms_compared() {
        let mut u = alice("").await;
        start(&mut u, "new").await;
        send(&mut u, "new", "<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='unknown='/></presence>").await;
        assert!(u.state.get::<Compared>().is_some());
    }

    #[tokio::test]
    async fn a_failed_conversion_does_not_fail_the_write() {
        // Private storage too small for the converted bookmarks.
        let mut u = alice("<private max-bytes='60'/>").await;
        phone(&mut u).await;
        send(
            &mut u,
            "phone",
            &publish_native("room@conference.localhost", "<nick>al</nick>"),
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='p'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        assert!(items(&mut u, NS_BOOKMARKS)
            .await
            .contains("room@conference.localhost"));
        // Private storage refused it (logged); the PEP copy has it all the same.
        assert!(!private_get(&mut u)
            .await
            .contains("room@conference.localhost"));
        assert!(items(&mut u, NS_LEGACY)
            .await
            .contains("room@conference.localhost"));
    }

    #[tokio::test]
    async fn the_account_advertises_the_conversions() {
        let mut u = alice("").await;
        phone(&mut u).await;
        send(&mut u, "phone", "<iq type='get' id='d' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
        let out = take(&mut u);
        let info = to(&out, "phone", &["id='d'", "type='result'"]);
        assert!(
            info[0].contains("urn:xmpp:bookmarks:1#compat'")
                && info[0].contains("urn:xmpp:bookmarks:1#compat-pep'"),
            "{info:?}"
        );
    }

    #[test]
    fn conferences_convert_both_ways() {
        let legacy = Element::parse(format!("<conference xmlns='{NS_LEGACY}' jid='r@m' autojoin='true' name='R'><nick>n</nick><password>p</password><x xmlns='urn:e'/></conference>").as_bytes(), "").unwrap();
        let c = Conference::from_legacy(&legacy).unwrap();
        let item = c.to_item();
        assert_eq!(item.to_xml(), format!("<conference xmlns='{NS_BOOKMARKS}' name='R' autojoin='true'><nick>n</nick><password>p</password><extensions><x xmlns='urn:e'/></extensions></conference>"));
        assert_eq!(Conference::from_item("r@m", &item).as_ref(), Some(&c));
        assert_eq!(Conference::from_legacy(&c.to_legacy()), Some(c));
    }
}
