//! The clients of `loadgen pep`: accounts whose rosters hold mutual contacts, clients
//! announcing capabilities (XEP-0115) that want PEP notifications (XEP-0163), answering
//! the server's disco#info queries, publishing an avatar (XEP-0084) and an OMEMO device
//! list, and counting what reaches them.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::sync::mpsc;

use jrs_stream::{Frame, Stanza};

use crate::caps::{Software, NS_DISCO_INFO};
use crate::client::{Client, DOMAIN};

pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
pub const NS_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
pub const AVATAR_DATA: &str = "urn:xmpp:avatar:data";
pub const AVATAR_METADATA: &str = "urn:xmpp:avatar:metadata";
pub const DEVICELIST: &str = "eu.siacs.conversations.axolotl.devicelist";

/// Keys of [`Counters`].
pub mod key {
    /// Every stanza a client read.
    pub const STANZAS: &str = "stanzas";
    pub const PRESENCE_AVAILABLE: &str = "presence available from contacts";
    pub const PRESENCE_UNAVAILABLE: &str = "presence unavailable from contacts";
    pub const PRESENCE_OWN: &str = "presence own";
    pub const PRESENCE_OTHER: &str = "presence other";
    /// Every disco#info query from the server; `disco <ver>` by the `ver` it names.
    pub const DISCO: &str = "disco";
    /// Every PEP event; `event <node> <live|last> <own|contact>` by kind.
    pub const EVENTS: &str = "events";
    /// Events a client had already had in this phase (same publisher, node, item id).
    pub const DUPLICATES: &str = "duplicate events";
    pub const PUBLISHED: &str = "published";
    pub const PUBLISH_ERRORS: &str = "publish errors";
    pub const OTHER: &str = "other stanzas";
}

/// What the clients received, by key (see [`key`]).
#[derive(Default)]
pub struct Counters {
    map: Mutex<BTreeMap<String, u64>>,
    /// The first publish error, to print.
    pub first_error: Mutex<Option<String>>,
}

/// Counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(pub BTreeMap<String, u64>);

impl Counters {
    pub fn add(&self, key: &str, n: u64) {
        let mut m = self.map.lock().expect("counters");
        match m.get_mut(key) {
            Some(v) => *v += n,
            None => {
                m.insert(key.to_owned(), n);
            }
        }
    }

    pub fn get(&self, key: &str) -> u64 {
        self.map
            .lock()
            .expect("counters")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.map.lock().expect("counters").clone())
    }
}

impl Snapshot {
    /// What was added since `before`.
    pub fn since(&self, before: &Snapshot) -> Snapshot {
        Snapshot(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v - before.get(k)))
                .filter(|(_, v)| *v > 0)
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    /// The entries whose key starts with `prefix` and a space: (rest of the key, count).
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, u64)> {
        self.0.iter().filter_map(move |(k, v)| {
            let rest = k.strip_prefix(prefix)?.strip_prefix(' ')?;
            Some((rest, *v))
        })
    }
}

/// The contacts of user `i` of `users`: the `contacts / 2` users before it and after it
/// (around the ring), so every contact is mutual.
pub fn contacts_of(i: usize, users: usize, contacts: usize) -> Vec<usize> {
    let half = contacts / 2;
    let mut c = vec![];
    for d in 1..=half {
        c.push((i + d) % users);
        c.push((i + users - d) % users);
    }
    c
}

/// The stored roster (`jabber:iq:roster`, as sm keeps it) of user `i`: its contacts,
/// each with `subscription='both'`.
pub fn roster_fragment(i: usize, users: usize, contacts: usize) -> String {
    let mut q = String::from("<query xmlns='jabber:iq:roster' ver='1'>");
    for c in contacts_of(i, users, contacts) {
        q.push_str(&format!(
            "<item jid='user{c}@{DOMAIN}' subscription='both'><group>Bench</group></item>"
        ));
    }
    q.push_str("</query>");
    q
}

/// Bytes of the bench's avatar image.
pub const AVATAR_BYTES: usize = 3000;

/// The publications of user `i`, as one write: the avatar's data, its metadata
/// (XEP-0084) and an OMEMO device list (the legacy node Conversations uses). The IQ ids
/// start with `pub`.
pub fn publications(i: usize) -> String {
    let image: Vec<u8> = (0..AVATAR_BYTES)
        .map(|k| (k as u32).wrapping_mul(2654435761).wrapping_add(i as u32) as u8)
        .collect();
    let id: String = Sha1::digest(&image)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let data = B64.encode(&image);
    let device = 100_000 + i;
    format!(
        "<iq type='set' id='pub-data'><pubsub xmlns='{NS_PUBSUB}'><publish node='{AVATAR_DATA}'><item id='{id}'><data xmlns='{AVATAR_DATA}'>{data}</data></item></publish></pubsub></iq>\
         <iq type='set' id='pub-meta'><pubsub xmlns='{NS_PUBSUB}'><publish node='{AVATAR_METADATA}'><item id='{id}'><metadata xmlns='{AVATAR_METADATA}'><info bytes='{AVATAR_BYTES}' id='{id}' height='64' width='64' type='image/png'/></metadata></item></publish></pubsub></iq>\
         <iq type='set' id='pub-devices'><pubsub xmlns='{NS_PUBSUB}'><publish node='{DEVICELIST}'><item id='current'><list xmlns='eu.siacs.conversations.axolotl'><device id='{device}'/></list></item></publish></pubsub></iq>"
    )
}

/// How many IQs [`publications`] sends.
pub const PUBLICATIONS: u64 = 3;

/// What the bench tells a client's task.
pub enum Cmd {
    /// Send [`publications`] (a new phase: duplicates are counted anew).
    Publish,
    /// Close the stream and end.
    Close,
}

/// The available presence a client sends: its capabilities.
pub fn presence(software: &Software) -> String {
    format!("<presence>{}</presence>", software.caps_element())
}

/// The value of attribute `attr` of the first element named `element` in `xml` (a
/// start tag written by the server: attribute values in either quotes).
pub fn attr_of<'a>(xml: &'a str, element: &str, attr: &str) -> Option<&'a str> {
    let mut from = 0;
    loop {
        let at = from + xml[from..].find(&format!("<{element}"))?;
        let rest = &xml[at + 1 + element.len()..];
        from = at + 1;
        if !rest.starts_with([' ', '/', '>', '\t', '\n']) {
            continue;
        }
        let tag = &rest[..rest.find('>')?];
        let mut search = 0;
        while let Some(p) = tag[search..].find(attr) {
            let p = search + p;
            search = p + attr.len();
            let before_ok = p > 0 && tag.as_bytes()[p - 1].is_ascii_whitespace();
            let after = tag[p + attr.len()..].trim_start();
            let Some(after) = after.strip_prefix('=') else {
                continue;
            };
            let after = after.trim_start();
            let quote = after.chars().next()?;
            if !before_ok || (quote != '\'' && quote != '"') {
                continue;
            }
            let value = &after[1..];
            return Some(&value[..value.find(quote)?]);
        }
        return None;
    }
}

/// One client's task: answers the server's disco#info queries with `software`'s,
/// counts what it reads into `counters`, and follows the bench's commands.
pub async fn run(
    mut client: Client,
    index: usize,
    software: Arc<Software>,
    counters: Arc<Counters>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) -> anyhow::Result<()> {
    let me = format!("user{index}@{DOMAIN}");
    let mut seen: HashSet<(String, String, String)> = HashSet::new();
    let mut closing = false;
    loop {
        tokio::select! {
            frame = client.reader.next_frame() => {
                let frame = match frame {
                    Ok(f) => f,
                    Err(_) if closing => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                let Frame::Element(bytes) = frame else {
                    // The server's stream close.
                    return Ok(());
                };
                let stanza = Stanza::parse(bytes)?;
                counters.add(key::STANZAS, 1);
                if let Some(answer) = handle(&stanza, &me, &software, &counters, &mut seen) {
                    if !closing {
                        client.send(answer.as_bytes()).await?;
                    }
                }
            }
            cmd = cmds.recv(), if !closing => match cmd {
                Some(Cmd::Publish) => {
                    seen.clear();
                    client.send(publications(index).as_bytes()).await?;
                }
                Some(Cmd::Close) | None => {
                    closing = true;
                    client.send(b"</stream:stream>").await?;
                }
            },
        }
    }
}

/// Counts `stanza`; the answer to send, if it needs one.
fn handle(
    stanza: &Stanza,
    me: &str,
    software: &Software,
    counters: &Counters,
    seen: &mut HashSet<(String, String, String)>,
) -> Option<String> {
    let from = stanza.from().unwrap_or("");
    let from_bare = from.split('/').next().unwrap_or("");
    let inner = String::from_utf8_lossy(stanza.inner());
    match stanza.name() {
        "presence" => {
            let k = if from_bare == me {
                key::PRESENCE_OWN
            } else {
                match stanza.kind() {
                    None => key::PRESENCE_AVAILABLE,
                    Some("unavailable") => key::PRESENCE_UNAVAILABLE,
                    Some(_) => key::PRESENCE_OTHER,
                }
            };
            counters.add(k, 1);
            None
        }
        "iq" => match stanza.kind() {
            Some("get") if inner.contains(NS_DISCO_INFO) => {
                let node = attr_of(&inner, "query", "node").unwrap_or("").to_owned();
                let ver = node.rsplit_once('#').map(|(_, v)| v).unwrap_or("(none)");
                counters.add(key::DISCO, 1);
                counters.add(&format!("{} {ver}", key::DISCO), 1);
                Some(format!(
                    "<iq type='result' id='{}' to='{}'>{}</iq>",
                    stanza.id().unwrap_or(""),
                    from,
                    software.info.query(&node)
                ))
            }
            Some("get") | Some("set") => {
                counters.add(key::OTHER, 1);
                let ping = inner.contains("urn:xmpp:ping");
                Some(if ping {
                    format!(
                        "<iq type='result' id='{}' to='{from}'/>",
                        stanza.id().unwrap_or("")
                    )
                } else {
                    format!(
                        "<iq type='error' id='{}' to='{from}'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
                        stanza.id().unwrap_or("")
                    )
                })
            }
            Some("result") if stanza.id().is_some_and(|i| i.starts_with("pub")) => {
                counters.add(key::PUBLISHED, 1);
                None
            }
            Some("error") if stanza.id().is_some_and(|i| i.starts_with("pub")) => {
                counters.add(key::PUBLISH_ERRORS, 1);
                let mut first = counters.first_error.lock().expect("first error");
                if first.is_none() {
                    *first = Some(String::from_utf8_lossy(stanza.bytes()).into_owned());
                }
                None
            }
            _ => {
                counters.add(key::OTHER, 1);
                None
            }
        },
        "message" if inner.contains(NS_EVENT) => {
            let node = attr_of(&inner, "items", "node")
                .unwrap_or("(no items)")
                .to_owned();
            let id = attr_of(&inner, "item", "id").unwrap_or("").to_owned();
            let last = inner.contains("urn:xmpp:delay");
            let own = from_bare == me;
            counters.add(key::EVENTS, 1);
            counters.add(
                &format!(
                    "{} {node} {} {}",
                    key::EVENTS,
                    if last { "last" } else { "live" },
                    if own { "own" } else { "contact" }
                ),
                1,
            );
            if !seen.insert((from_bare.to_owned(), node, id)) {
                counters.add(key::DUPLICATES, 1);
            }
            None
        }
        _ => {
            counters.add(key::OTHER, 1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacts_are_mutual() {
        let (users, contacts) = (50, 10);
        for i in 0..users {
            let mine = contacts_of(i, users, contacts);
            assert_eq!(mine.len(), contacts);
            assert!(!mine.contains(&i));
            for c in mine {
                assert!(contacts_of(c, users, contacts).contains(&i));
            }
        }
    }

    #[test]
    fn attributes_are_found() {
        let x = "<event xmlns='e'><items node=\"a:b\"><item id='x1'><p/></item></items></event>";
        assert_eq!(attr_of(x, "items", "node"), Some("a:b"));
        assert_eq!(attr_of(x, "item", "id"), Some("x1"));
        assert_eq!(attr_of(x, "item", "node"), None);
        let q = "<query xmlns='q' node='n#v='/>";
        assert_eq!(attr_of(q, "query", "node"), Some("n#v="));
    }
}
