//! XEP-0425 moderation (namespace version 1): a moderator retracts an occupant's
//! message by the stanza-id the room gave it:
//!
//! ```xml
//! <iq type='set' to='room@conf' id='x'><moderate id='STANZA-ID' xmlns='urn:xmpp:message-moderate:1'>
//!   <retract xmlns='urn:xmpp:message-retract:1'/><reason>spam</reason></moderate></iq>
//! ```
//!
//! Every occupant is told with a XEP-0424 `<retract id='STANZA-ID'>` carrying
//! `<moderated by='room@conf/ModNick'>` (and the moderator's occupant id) and the
//! reason; that message gets a stanza-id and is archived like any other. The message
//! leaves the history. In an archived room the room's task first finds the message in
//! the archive and replaces it with a tombstone (`archive-retract`), then calls
//! [`Room::retracted`]; a message neither in the archive nor in the history is
//! `item-not-found`.

use bytes::Bytes;
use jid::Jid;
use jrs_stream::children::Child;
use jrs_stream::Stanza;
use minidom::Element;

use super::{stamp, Out, Role, Room};
use crate::mam;
use crate::xml::{self, attr, escape, Template, NS_OCCUPANT_ID, NS_SID};

pub const NS_MODERATE: &str = "urn:xmpp:message-moderate:1";
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";

/// A retraction a moderator asked for.
#[derive(Debug, Clone)]
pub struct Moderation {
    /// The moderator's IQ, answered when it is done.
    pub iq: Stanza,
    /// The stanza-id of the message retracted.
    pub id: String,
    pub reason: Option<String>,
    /// The moderator's room JID and occupant id.
    pub by: String,
    pub occupant_id: String,
}

impl Moderation {
    /// `<moderated by=..><occupant-id/></moderated>` and the `<reason/>`, the content of
    /// both the retraction and the tombstone.
    fn details(&self) -> String {
        let mut s = format!(
            "<moderated xmlns='{NS_MODERATE}'{}><occupant-id xmlns='{NS_OCCUPANT_ID}'{}/></moderated>",
            attr("by", &self.by),
            attr("id", &self.occupant_id)
        );
        if let Some(r) = &self.reason {
            s.push_str(&format!("<reason>{}</reason>", escape(r)));
        }
        s
    }
}

impl Room {
    /// A `<moderate/>` IQ to the room.
    pub(super) fn moderate(
        &mut self,
        s: &Stanza,
        from: &Jid,
        payload: &Child,
        now: f64,
        out: &mut Out,
    ) {
        if s.kind() != Some("set") {
            out.error(s, xml::BAD_REQUEST, "moderation requests are of type set");
            return;
        }
        let Some(q) = xml::parse_child(s, payload) else {
            out.error(s, xml::BAD_REQUEST, "");
            return;
        };
        let Some(id) = q.attr("id").filter(|id| !id.is_empty()) else {
            out.error(
                s,
                xml::BAD_REQUEST,
                "<moderate/> needs the stanza-id of the message",
            );
            return;
        };
        if q.get_child("retract", NS_RETRACT).is_none() {
            out.error(
                s,
                xml::FEATURE_NOT_IMPLEMENTED,
                "retraction is the only moderation of this room",
            );
            return;
        }
        let Some(i) = self
            .by_session(from.as_str())
            .filter(|&i| self.occupants[i].role == Role::Moderator)
        else {
            out.error(s, xml::FORBIDDEN, "only moderators may retract messages");
            return;
        };
        let o = &self.occupants[i];
        let m = Moderation {
            iq: s.clone(),
            id: id.to_owned(),
            reason: q
                .get_child("reason", NS_MODERATE)
                .map(Element::text)
                .filter(|r| !r.is_empty()),
            by: self.nick_jid(&o.nick),
            occupant_id: o.occupant_id.clone(),
        };
        if self.config.archive {
            // The archive knows messages the history no longer holds: the task asks it.
            out.moderations.push(m);
        } else if self.history.iter().any(|h| h.id == m.id) {
            self.retracted(&m, now, out);
        } else {
            out.error(
                s,
                xml::ITEM_NOT_FOUND,
                "no message of this room has that id",
            );
        }
    }

    /// Message `m.id` is retracted: it leaves the history, every occupant is told (a
    /// message with its own stanza-id, archived), and the moderator gets the result.
    pub fn retracted(&mut self, m: &Moderation, now: f64, out: &mut Out) {
        self.history.retain(|h| h.id != m.id);
        let stanza_id = self.stanza_id(now);
        let mut attrs = attr("from", self.jid.as_str());
        attrs.push_str(" type='groupchat'");
        attrs.push_str(&attr("id", &stanza_id));
        let content = format!(
            "<retract xmlns='{NS_RETRACT}'{}>{}</retract><stanza-id xmlns='{NS_SID}'{}{}/>",
            attr("id", &m.id),
            m.details(),
            attr("id", &stanza_id),
            attr("by", self.jid.as_str()),
        );
        self.to_all(&Template::new("message", &attrs, &content), None, out);
        if self.config.archive {
            out.archive.push(jrs_xdb::archive::Item {
                id: stanza_id,
                time: (now * 1e6) as u64,
                with: self.jid.to_string(),
                payload: mam::payload(&attrs, &content),
            });
        }
        out.push(&xml::iq_result(&m.iq, ""));
    }
}

/// The tombstone that replaces an archived message (XEP-0425 "Tombstones"): the
/// message's `from`, `type` and `id`, a `<retracted stamp=..>` with who moderated and
/// why, and the ids naming the message and its author (stanza-id, occupant-id); the body
/// and every other payload go. `None` when `original` is not an archived message.
pub fn tombstone(original: &[u8], m: &Moderation, now: f64) -> Option<Bytes> {
    let e: Element = std::str::from_utf8(original).ok()?.parse().ok()?;
    if e.name() != "message" {
        return None;
    }
    let mut attrs = String::new();
    for k in ["from", "type", "id"] {
        if let Some(v) = e.attr(k) {
            attrs.push_str(&attr(k, v));
        }
    }
    let mut content = format!(
        "<retracted xmlns='{NS_RETRACT}'{}>{}</retracted>",
        attr("stamp", &stamp(now)),
        m.details()
    );
    for c in e
        .children()
        .filter(|c| c.is("stanza-id", NS_SID) || c.is("occupant-id", NS_OCCUPANT_ID))
    {
        content.push_str(&String::from(c));
    }
    Some(mam::payload(&attrs, &content))
}

/// Whether an archived message is a retraction or a tombstone: not history to give
/// joiners when a room's history is read back from its archive.
pub fn is_retraction(payload: &[u8]) -> bool {
    let ns = format!("xmlns='{NS_RETRACT}'");
    payload.windows(ns.len()).any(|w| w == ns.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use jid::BareJid;
    use jrs_stream::Stanza;
    use minidom::Element;

    use super::*;
    use crate::config::RoomLimits;
    use crate::room::Affiliation;
    use crate::xml::{NS_CLIENT, NS_STANZAS};

    const ROOM: &str = "room@conf.example";

    fn room(archive: bool) -> Room {
        let limits = RoomLimits {
            max_occupants: 10,
            default_max_users: 10,
            max_history: 10,
            default_history: 5,
            rate: 100.0,
            burst: 100.0,
            archive,
            archive_max_items: None,
        };
        let mut r = Room::new(
            BareJid::new(ROOM).unwrap(),
            Arc::new(limits),
            Arc::new(vec![]),
            Arc::from("salt"),
        );
        r.fresh = false;
        r.config.archive = archive;
        r.affiliations
            .insert(BareJid::new("mod@x").unwrap(), Affiliation::Owner);
        for (full, nick) in [("mod@x/m", "Mod"), ("bob@x/b", "Bob"), ("eve@x/e", "Eve")] {
            feed(&mut r, &format!("<presence from='{full}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
        }
        r
    }

    fn feed(room: &mut Room, xml: &str) -> (Vec<Element>, Out) {
        let mut out = Out::default();
        room.handle(
            &Stanza::parse(Bytes::from(xml.to_owned())).unwrap(),
            1000.0,
            &mut out,
        );
        let text = String::from_utf8(out.buf.to_vec()).unwrap();
        let w: Element = format!("<w xmlns='{NS_CLIENT}'>{text}</w>")
            .parse()
            .unwrap();
        (w.children().cloned().collect(), out)
    }

    /// Bob says something; returns its stanza-id.
    fn say(room: &mut Room, body: &str) -> String {
        let (got, _) = feed(
            room,
            &format!("<message from='bob@x/b' to='{ROOM}' type='groupchat' id='m'><body>{body}</body></message>"),
        );
        got[0]
            .get_child("stanza-id", NS_SID)
            .unwrap()
            .attr("id")
            .unwrap()
            .to_owned()
    }

    fn moderate(from: &str, id: &str) -> String {
        format!(
            "<iq from='{from}' to='{ROOM}' type='set' id='q'><moderate id='{id}' xmlns='{NS_MODERATE}'><retract xmlns='{NS_RETRACT}'/><reason>spam &amp; more</reason></moderate></iq>"
        )
    }

    fn error(e: &Element) -> String {
        let err = e.get_child("error", NS_CLIENT).expect("an error");
        err.children()
            .find(|c| c.ns() == NS_STANZAS)
            .unwrap()
            .name()
            .to_owned()
    }

    #[test]
    fn moderators_retract_messages_for_everyone() {
        let mut r = room(false);
        let kept = say(&mut r, "hello");
        let id = say(&mut r, "buy pills");
        assert_eq!(r.history.len(), 2);
        let (got, out) = feed(&mut r, &moderate("mod@x/m", &id));
        assert!(out.moderations.is_empty() && out.archive.is_empty());
        // The three occupants, then the result.
        assert_eq!(got.len(), 4, "{got:?}");
        let mod_occupant = r.occupants[0].occupant_id.clone();
        for m in &got[..3] {
            assert_eq!(m.name(), "message");
            assert_eq!(m.attr("from"), Some(ROOM));
            assert_eq!(m.attr("type"), Some("groupchat"));
            let retract = m.get_child("retract", NS_RETRACT).unwrap();
            assert_eq!(retract.attr("id"), Some(id.as_str()));
            let moderated = retract.get_child("moderated", NS_MODERATE).unwrap();
            assert_eq!(moderated.attr("by"), Some("room@conf.example/Mod"));
            let oid = moderated.get_child("occupant-id", NS_OCCUPANT_ID).unwrap();
            assert_eq!(oid.attr("id"), Some(mod_occupant.as_str()));
            assert_eq!(
                retract.get_child("reason", NS_RETRACT).unwrap().text(),
                "spam & more"
            );
            let sid = m.get_child("stanza-id", NS_SID).unwrap();
            assert_eq!(sid.attr("by"), Some(ROOM));
            assert_eq!(sid.attr("id"), m.attr("id"));
        }
        let mut to: Vec<&str> = got[..3].iter().map(|m| m.attr("to").unwrap()).collect();
        to.sort();
        assert_eq!(to, ["bob@x/b", "eve@x/e", "mod@x/m"]);
        assert_eq!(got[3].name(), "iq");
        assert_eq!(got[3].attr("type"), Some("result"));
        assert_eq!(got[3].attr("to"), Some("mod@x/m"));
        // Gone from the history (new joiners do not get it), the other one stays.
        let ids: Vec<&str> = r.history.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, [kept.as_str()]);
        let (got, _) = feed(&mut r, &format!("<presence from='new@x/n' to='{ROOM}/New'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
        let bodies: Vec<String> = got
            .iter()
            .filter_map(|m| m.get_child("body", NS_CLIENT).map(Element::text))
            .collect();
        assert_eq!(bodies, ["hello"]);
        // Retracted already: no longer known.
        let (got, _) = feed(&mut r, &moderate("mod@x/m", &id));
        assert_eq!(error(&got[0]), "item-not-found");
    }

    #[test]
    fn only_moderators_and_known_ids() {
        let mut r = room(false);
        let id = say(&mut r, "x");
        let (got, _) = feed(&mut r, &moderate("eve@x/e", &id));
        assert_eq!((got.len(), error(&got[0])), (1, "forbidden".into()));
        let (got, _) = feed(&mut r, &moderate("stranger@x/s", &id));
        assert_eq!(error(&got[0]), "forbidden");
        let (got, _) = feed(&mut r, &moderate("mod@x/m", "nope"));
        assert_eq!(error(&got[0]), "item-not-found");
        let (got, _) = feed(
            &mut r,
            &format!("<iq from='mod@x/m' to='{ROOM}' type='set' id='q'><moderate xmlns='{NS_MODERATE}'><retract xmlns='{NS_RETRACT}'/></moderate></iq>"),
        );
        assert_eq!(error(&got[0]), "bad-request");
        let (got, _) = feed(
            &mut r,
            &format!("<iq from='mod@x/m' to='{ROOM}' type='set' id='q'><moderate id='{id}' xmlns='{NS_MODERATE}'/></iq>"),
        );
        assert_eq!(error(&got[0]), "feature-not-implemented");
        assert_eq!(r.history.len(), 1);
        // Advertised in the room's disco#info.
        let (got, _) = feed(
            &mut r,
            &format!("<iq from='eve@x/e' to='{ROOM}' type='get' id='d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
        );
        let q = got[0]
            .get_child("query", "http://jabber.org/protocol/disco#info")
            .unwrap();
        assert!(q
            .children()
            .any(|f| f.name() == "feature" && f.attr("var") == Some(NS_MODERATE)));
    }

    /// In an archived room the task does the rest (archive lookup, tombstone): the room
    /// hands the moderation over and answers nothing yet; `retracted` then archives the
    /// retraction.
    #[test]
    fn archived_rooms_hand_moderations_to_the_task() {
        let mut r = room(true);
        let id = say(&mut r, "buy pills");
        let (got, mut out) = feed(&mut r, &moderate("mod@x/m", &id));
        assert!(got.is_empty(), "{got:?}");
        let m = out.moderations.pop().unwrap();
        assert_eq!(m.id, id);
        assert_eq!(m.reason.as_deref(), Some("spam & more"));
        assert_eq!(m.by, "room@conf.example/Mod");
        let mut out = Out::default();
        r.retracted(&m, 2000.0, &mut out);
        assert!(r.history.is_empty());
        assert_eq!(out.archive.len(), 1);
        let item = &out.archive[0];
        assert!(item.id.as_str() > id.as_str(), "ids increase");
        assert_eq!(item.with, ROOM);
        assert!(is_retraction(&item.payload));
        let e: Element = std::str::from_utf8(&item.payload).unwrap().parse().unwrap();
        assert_eq!(
            e.get_child("retract", NS_RETRACT).unwrap().attr("id"),
            Some(id.as_str())
        );
    }

    #[test]
    fn tombstones_keep_the_ids_and_lose_the_content() {
        let m = Moderation {
            iq: Stanza::parse(Bytes::from_static(b"<iq type='set' id='q'/>")).unwrap(),
            id: "s1".into(),
            reason: Some("spam".into()),
            by: "r@c/Mod".into(),
            occupant_id: "mo".into(),
        };
        let original = mam::payload(
            " from='r@c/Bob' type='groupchat' id='m1'",
            "<body>buy pills</body><x xmlns='urn:x'>more</x><stanza-id xmlns='urn:xmpp:sid:0' id='s1' by='r@c'/><occupant-id xmlns='urn:xmpp:occupant-id:0' id='bo'/>",
        );
        let t = tombstone(&original, &m, 1_700_000_000.0).unwrap();
        assert!(is_retraction(&t) && !is_retraction(&original));
        // As a history template reads it back: the archived form.
        assert!(mam::history_template(&t).is_some());
        let e: Element = std::str::from_utf8(&t).unwrap().parse().unwrap();
        assert_eq!(
            (e.attr("from"), e.attr("type"), e.attr("id")),
            (Some("r@c/Bob"), Some("groupchat"), Some("m1"))
        );
        assert!(e.get_child("body", NS_CLIENT).is_none());
        assert!(!std::str::from_utf8(&t).unwrap().contains("more"));
        let retracted = e.get_child("retracted", NS_RETRACT).unwrap();
        assert_eq!(retracted.attr("stamp"), Some("2023-11-14T22:13:20.000Z"));
        let moderated = retracted.get_child("moderated", NS_MODERATE).unwrap();
        assert_eq!(moderated.attr("by"), Some("r@c/Mod"));
        assert_eq!(
            moderated
                .get_child("occupant-id", NS_OCCUPANT_ID)
                .unwrap()
                .attr("id"),
            Some("mo")
        );
        assert_eq!(
            retracted.get_child("reason", NS_RETRACT).unwrap().text(),
            "spam"
        );
        assert_eq!(
            e.get_child("stanza-id", NS_SID).unwrap().attr("id"),
            Some("s1")
        );
        assert_eq!(
            e.get_child("occupant-id", NS_OCCUPANT_ID)
                .unwrap()
                .attr("id"),
            Some("bo")
        );
        assert!(tombstone(b"<iq xmlns='jabber:client'/>", &m, 0.0).is_none());
        assert!(tombstone(b"not xml", &m, 0.0).is_none());
    }
}
