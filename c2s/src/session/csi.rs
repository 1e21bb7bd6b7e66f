//! XEP-0352 Client State Indication on one session, without I/O: while the client says
//! it is inactive, stanzas that can wait (presence updates, of which only the latest per
//! contact is kept; chat states, receipts and markers) are held, and everything held goes
//! out, in order, before the next urgent stanza (a message with content, an IQ, a
//! subscription request, an error), when the client is active again, or when the held
//! queue is full. A phone's radio then wakes for what matters, not for every status
//! change.

use jrs_stream::children::{children, Child, NS_CLIENT};
use jrs_stream::Stanza;

use crate::protocol::Item;

/// Namespaces of message payloads that can wait.
const CAN_WAIT: &[&str] = &[
    "http://jabber.org/protocol/chatstates",
    "urn:xmpp:receipts",
    "urn:xmpp:chat-markers:0",
    "urn:xmpp:hints",
    "urn:xmpp:sid:0",
    "urn:xmpp:delay",
    "http://jabber.org/protocol/nick",
];
const NS_CARBONS: &str = "urn:xmpp:carbons:2";

pub struct Csi {
    inactive: bool,
    held: Vec<Item>,
    /// The `from` of each held presence (to replace an older one by a newer).
    presence_from: Vec<Option<String>>,
    max: usize,
}

impl Csi {
    pub fn new(max: usize) -> Csi {
        Csi {
            inactive: false,
            held: vec![],
            presence_from: vec![],
            max,
        }
    }

    pub fn is_inactive(&self) -> bool {
        self.inactive
    }

    /// `<inactive/>`.
    pub fn inactive(&mut self) {
        self.inactive = true;
    }

    /// `<active/>`: what was held goes out.
    pub fn active(&mut self) -> Vec<Item> {
        self.inactive = false;
        self.take_held()
    }

    /// A stanza for the client: what to write now, in order (nothing when it is held).
    pub fn offer(&mut self, item: Item) -> Vec<Item> {
        if !self.inactive {
            return vec![item];
        }
        match can_wait(&item.bytes) {
            Wait::No => {
                let mut out = self.take_held();
                out.push(item);
                out
            }
            Wait::Presence(from) => {
                if let Some(at) = self
                    .presence_from
                    .iter()
                    .position(|f| f.is_some() && *f == from)
                {
                    // Only the latest presence of a contact matters.
                    self.held.remove(at);
                    self.presence_from.remove(at);
                }
                self.hold(item, from)
            }
            Wait::Yes => self.hold(item, None),
        }
    }

    fn hold(&mut self, item: Item, presence_from: Option<String>) -> Vec<Item> {
        self.held.push(item);
        self.presence_from.push(presence_from);
        if self.held.len() >= self.max {
            return self.take_held();
        }
        vec![]
    }

    /// Everything held, oldest first.
    pub fn take_held(&mut self) -> Vec<Item> {
        self.presence_from.clear();
        std::mem::take(&mut self.held)
    }
}

enum Wait {
    No,
    Yes,
    /// A presence update from this address (replaced by a later one).
    Presence(Option<String>),
}

fn can_wait(bytes: &bytes::Bytes) -> Wait {
    let Ok(stanza) = Stanza::parse(bytes.clone()) else {
        return Wait::No;
    };
    match (stanza.name(), stanza.kind()) {
        ("presence", None | Some("unavailable")) => Wait::Presence(stanza.attr("from")),
        ("message", Some("error")) => Wait::No,
        ("message", _) if message_can_wait(&stanza, &children(&stanza)) => Wait::Yes,
        _ => Wait::No,
    }
}

/// A message can wait when every payload can: no body, no encrypted content, no
/// invitation, nothing unknown. A carbon copy can wait when the message it carries can.
fn message_can_wait(stanza: &Stanza, children: &[Child]) -> bool {
    children.iter().all(|c| {
        if CAN_WAIT.contains(&c.ns.as_str()) || (c.ns == NS_CLIENT && c.name == "thread") {
            return true;
        }
        if c.ns == NS_CARBONS && matches!(c.name.as_str(), "received" | "sent") {
            return carbon_can_wait(&stanza.as_slice()[c.span.clone()]);
        }
        false
    })
}

/// The message inside `<received|sent><forwarded><message/></forwarded></…>`.
fn carbon_can_wait(wrapper: &[u8]) -> bool {
    let Ok(element) = std::str::from_utf8(wrapper)
        .unwrap_or("")
        .parse::<minidom::Element>()
    else {
        return false;
    };
    let inner = element
        .children()
        .find(|f| f.name() == "forwarded")
        .and_then(|f| f.children().find(|m| m.name() == "message"));
    inner.is_some_and(|m| {
        m.children().all(|c| {
            CAN_WAIT.contains(&c.ns().as_str()) || (c.ns() == NS_CLIENT && c.name() == "thread")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn item(xml: &str) -> Item {
        Item::new(Bytes::from(xml.to_owned()))
    }

    fn texts(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .map(|i| String::from_utf8_lossy(&i.bytes).into_owned())
            .collect()
    }

    #[test]
    fn active_sessions_hold_nothing() {
        let mut c = Csi::new(10);
        let p = item("<presence from='a@b/c'/>");
        assert_eq!(c.offer(p.clone()), vec![p]);
    }

    #[test]
    fn holds_presence_and_chat_states_until_something_urgent() {
        let mut c = Csi::new(10);
        c.inactive();
        assert!(c
            .offer(item("<presence from='a@b/c'><show>away</show></presence>"))
            .is_empty());
        assert!(c.offer(item("<presence from='d@e/f'/>")).is_empty());
        assert!(c
            .offer(item("<presence from='a@b/c'><show>xa</show></presence>"))
            .is_empty());
        assert!(c
            .offer(item(
                "<message from='a@b/c'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
            ))
            .is_empty());
        let out = c.offer(item("<message from='a@b/c'><body>hi</body></message>"));
        assert_eq!(
            texts(&out),
            [
                "<presence from='d@e/f'/>",
                "<presence from='a@b/c'><show>xa</show></presence>",
                "<message from='a@b/c'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
                "<message from='a@b/c'><body>hi</body></message>",
            ],
            "the latest presence per contact, in order, then the message"
        );
    }

    #[test]
    fn urgent_stanzas() {
        for urgent in [
            "<iq type='get' id='1'/>",
            "<presence from='a@b' type='subscribe'/>",
            "<message type='error' from='a@b'/>",
            "<message><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>",
            "<message><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>\
             <message xmlns='jabber:client'><body>x</body></message></forwarded></received></message>",
        ] {
            let mut c = Csi::new(10);
            c.inactive();
            assert_eq!(c.offer(item(urgent)).len(), 1, "{urgent}");
        }
        let mut c = Csi::new(10);
        c.inactive();
        let carbon_state = "<message><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>\
             <message xmlns='jabber:client'><active xmlns='http://jabber.org/protocol/chatstates'/></message>\
             </forwarded></sent></message>";
        assert!(
            c.offer(item(carbon_state)).is_empty(),
            "a carbon of a chat state can wait"
        );
    }

    #[test]
    fn flushes_on_active_and_when_full() {
        let mut c = Csi::new(3);
        c.inactive();
        c.offer(item("<presence from='a@b/1'/>"));
        assert_eq!(c.active().len(), 1);
        assert!(!c.is_inactive());
        c.inactive();
        c.offer(item("<presence from='a@b/1'/>"));
        c.offer(item("<presence from='a@b/2'/>"));
        assert_eq!(
            c.offer(item("<presence from='a@b/3'/>")).len(),
            3,
            "the bound flushes"
        );
    }
}
