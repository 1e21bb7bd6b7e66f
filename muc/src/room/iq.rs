//! IQs to the room: disco (XEP-0045 6.4), muc#owner (configuration 10.1-10.2, destroy
//! 10.9), muc#admin (affiliation lists and role changes, 9 and 10.3-10.8, a subset), and
//! XEP-0410 self-ping to `room/nick`.

use jid::{BareJid, Jid};
use jrs_stream::children::children;
use jrs_stream::Stanza;
use minidom::Element;

use super::config::{RoomConfig, Whois, FORM_INFO};
use super::{Affiliation, Out, Role, Room};
use crate::mam;
use crate::xml::{
    self, escape, NS_DATA, NS_DISCO_INFO, NS_DISCO_ITEMS, NS_MUC, NS_MUC_ADMIN, NS_MUC_OWNER,
    NS_MUC_USER, NS_OCCUPANT_ID, NS_PING,
};

impl Room {
    pub(super) fn iq_room(&mut self, s: &Stanza, from: &Jid, now: f64, out: &mut Out) {
        let kind = s.kind().unwrap_or("");
        if !matches!(kind, "get" | "set") {
            return;
        }
        let parts = children(s);
        let Some(payload) = parts.first() else {
            out.error(s, xml::BAD_REQUEST, "an IQ needs a payload");
            return;
        };
        if self.fresh && self.occupants.is_empty() {
            out.error(s, xml::ITEM_NOT_FOUND, "no such room");
            return;
        }
        let ns = payload.ns.as_str();
        match (kind, ns) {
            ("get", NS_DISCO_INFO) => match xml::parse_child(s, payload)
                .as_ref()
                .and_then(|q| q.attr("node").map(str::to_owned))
            {
                None => out.push(&xml::iq_result(s, &self.disco_info())),
                // XEP-0045 7.12: the user's reserved nick, if any.
                Some(node) if node == "x-roomuser-item" => {
                    let identity = self
                        .nicks
                        .get(&from.to_bare())
                        .map(|n| {
                            format!(
                                "<identity category='conference' type='text'{}/>",
                                xml::attr("name", n)
                            )
                        })
                        .unwrap_or_default();
                    out.push(&xml::iq_result(
                        s,
                        &format!(
                            "<query xmlns='{NS_DISCO_INFO}' node='x-roomuser-item'>{identity}</query>"
                        ),
                    ))
                }
                Some(_) => out.error(s, xml::ITEM_NOT_FOUND, "no such node"),
            },
            ("get", NS_DISCO_ITEMS) => {
                let r = xml::iq_result(s, &format!("<query xmlns='{NS_DISCO_ITEMS}'/>"));
                out.push(&r);
            }
            ("get", NS_PING) => out.push(&xml::iq_result(s, "")),
            (_, mam::NS_MAM) => self.archive_query(s, from, payload, out),
            (_, super::moderate::NS_MODERATE) => self.moderate(s, from, payload, now, out),
            (_, NS_MUC_OWNER) => {
                if self.affiliation(&from.to_bare()) != Affiliation::Owner {
                    out.error(s, xml::FORBIDDEN, "only owners may configure the room");
                    return;
                }
                match xml::parse_child(s, payload) {
                    Some(_) if kind == "get" => {
                        let form = self.config.form(&self.limits);
                        out.push(&xml::iq_result(
                            s,
                            &format!("<query xmlns='{NS_MUC_OWNER}'>{form}</query>"),
                        ));
                    }
                    Some(q) => self.owner_set(s, &q, out),
                    None => out.error(s, xml::BAD_REQUEST, ""),
                }
            }
            (_, super::register::NS_REGISTER) => self.register(s, from, payload, out),
            (_, NS_MUC_ADMIN) => match xml::parse_child(s, payload) {
                Some(q) if kind == "get" => self.admin_get(s, from, &q, out),
                Some(q) => self.admin_set(s, from, &q, out),
                None => out.error(s, xml::BAD_REQUEST, ""),
            },
            _ => out.error(s, xml::SERVICE_UNAVAILABLE, "not implemented by this room"),
        }
    }

    /// XEP-0313 on the room: who may read the archive, and the query handed to the
    /// room's task (which asks storage after the batch).
    fn archive_query(
        &mut self,
        s: &Stanza,
        from: &Jid,
        payload: &jrs_stream::children::Child,
        out: &mut Out,
    ) {
        if !self.config.archive {
            out.error(s, xml::SERVICE_UNAVAILABLE, "this room keeps no archive");
            return;
        }
        let open = !self.config.members_only && self.config.password.is_none();
        let member = self.affiliation(&from.to_bare()) >= Affiliation::Member;
        if !(open || member || self.by_session(from.as_str()).is_some()) {
            out.error(
                s,
                xml::FORBIDDEN,
                "only occupants and members may read this archive",
            );
            return;
        }
        if s.kind() == Some("get") {
            out.push(&xml::iq_result(s, &mam::form()));
            return;
        }
        let Some(q) = xml::parse_child(s, payload) else {
            out.error(s, xml::BAD_REQUEST, "");
            return;
        };
        match mam::request(q, from.to_string(), s.attr("id").unwrap_or_default()) {
            Ok(r) => out.queries.push(r),
            Err((c, text)) => out.error(s, c, &text),
        }
    }

    fn disco_info(&self) -> String {
        let c = &self.config;
        let mut q = format!(
            "<query xmlns='{NS_DISCO_INFO}'><identity category='conference' type='text'{}/>",
            xml::attr(
                "name",
                if c.name.is_empty() {
                    self.jid.node().map_or("", |n| n.as_str())
                } else {
                    &c.name
                }
            )
        );
        for f in [
            NS_MUC,
            "http://jabber.org/protocol/muc#stable_id",
            "http://jabber.org/protocol/muc#self-ping-optimization",
            NS_OCCUPANT_ID,
            "urn:xmpp:sid:0",
            NS_DISCO_INFO,
            super::register::NS_REGISTER,
            super::moderate::NS_MODERATE,
        ]
        .into_iter()
        .chain(c.archive.then_some(mam::NS_MAM))
        .chain(c.features())
        {
            q.push_str(&format!("<feature var='{f}'/>"));
        }
        let subject = self.subject.as_ref().map_or("", |(_, t)| t.as_str());
        q.push_str(&format!(
            "<x xmlns='{NS_DATA}' type='result'>\
             <field var='FORM_TYPE' type='hidden'><value>{FORM_INFO}</value></field>\
             <field var='muc#roominfo_description' label='Description'><value>{}</value></field>\
             <field var='muc#roominfo_subject' label='Subject'><value>{}</value></field>\
             <field var='muc#roominfo_occupants' label='Occupants'><value>{}</value></field>\
             <field var='muc#roomconfig_roomname' label='Name'><value>{}</value></field>\
             <field var='muc#roominfo_lang' label='Language'><value>{}</value></field>\
             <field var='muc#roomconfig_changesubject' label='Occupants may change the subject'><value>{}</value></field>\
             </x></query>",
            escape(&c.description),
            escape(subject),
            self.occupants.len(),
            escape(&c.name),
            escape(&c.lang),
            u8::from(c.change_subject),
        ));
        q
    }

    fn owner_set(&mut self, s: &Stanza, q: &Element, out: &mut Out) {
        if let Some(d) = q.get_child("destroy", NS_MUC_OWNER) {
            let alternate = d.attr("jid").map(str::to_owned);
            let reason = d.get_child("reason", NS_MUC_OWNER).map(Element::text);
            self.destroy(alternate.as_deref(), reason.as_deref(), out);
            out.push(&xml::iq_result(s, ""));
            return;
        }
        let Some(x) = q.get_child("x", NS_DATA) else {
            out.error(s, xml::BAD_REQUEST, "expected a form or <destroy/>");
            return;
        };
        match x.attr("type") {
            Some("cancel") => {
                if self.locked {
                    // XEP-0045 10.1.3: cancelling the configuration of a new room
                    // destroys it.
                    self.destroy(None, None, out);
                }
                out.push(&xml::iq_result(s, ""));
            }
            Some("submit") => {
                let was_persistent = self.config.persistent;
                let mut next: RoomConfig = self.config.clone();
                if let Err(e) = next.apply(x, &self.limits) {
                    out.error(s, xml::NOT_ACCEPTABLE, &e);
                    return;
                }
                let was_locked = self.locked;
                let old_whois = self.config.whois;
                let was_archived = self.config.archive;
                let was_members_only = self.config.members_only;
                self.config = next;
                self.locked = false;
                self.fresh = false;
                while self.history.len() > self.config.history {
                    self.history.pop_front();
                }
                out.push(&xml::iq_result(s, ""));
                if !was_locked {
                    self.config_changed(old_whois, was_archived, out);
                }
                if self.config.members_only && !was_members_only {
                    // Non-members leave a room that became members-only (status 322).
                    while let Some(i) = self
                        .occupants
                        .iter()
                        .position(|o| self.affiliation(&o.bare) < Affiliation::Member)
                    {
                        self.set_role(i, Role::None, &[322], "", out);
                    }
                }
                if self.config.persistent {
                    out.save = true;
                } else if was_persistent {
                    out.delete = true;
                }
            }
            _ => out.error(
                s,
                xml::BAD_REQUEST,
                "expected a form of type submit or cancel",
            ),
        }
    }

    /// Tells the occupants the configuration changed (XEP-0045 10.2.1: status 104, and
    /// 172/173 when the room became non-anonymous or semi-anonymous, 170/171 when
    /// archiving was switched on or off).
    fn config_changed(&self, old_whois: Whois, was_archived: bool, out: &mut Out) {
        let mut codes = String::from("<status code='104'/>");
        match (old_whois, self.config.whois) {
            (Whois::Moderators, Whois::Anyone) => codes.push_str("<status code='172'/>"),
            (Whois::Anyone, Whois::Moderators) => codes.push_str("<status code='173'/>"),
            _ => {}
        }
        match (was_archived, self.config.archive) {
            (false, true) => codes.push_str("<status code='170'/>"),
            (true, false) => codes.push_str("<status code='171'/>"),
            _ => {}
        }
        let t = xml::Template::new(
            "message",
            &format!("{} type='groupchat'", xml::attr("from", self.jid.as_str())),
            &format!("<x xmlns='{NS_MUC_USER}'>{codes}</x>"),
        );
        self.to_all(&t, None, out);
    }

    /// Tells every occupant the room is gone, and forgets it (XEP-0045 10.9).
    pub fn destroy(&mut self, alternate: Option<&str>, reason: Option<&str>, out: &mut Out) {
        let mut extra = String::from("<destroy");
        if let Some(j) = alternate {
            extra.push_str(&xml::attr("jid", j));
        }
        match reason {
            Some(r) => extra.push_str(&format!("><reason>{}</reason></destroy>", escape(r))),
            None => extra.push_str("/>"),
        }
        for o in &self.occupants {
            let mut attrs = xml::attr("from", &self.nick_jid(&o.nick));
            attrs.push_str(" type='unavailable'");
            let t = xml::Template::new(
                "presence",
                &attrs,
                &format!(
                    "<x xmlns='{NS_MUC_USER}'><item affiliation='none' role='none'/>{extra}</x>"
                ),
            );
            for s in &o.sessions {
                t.write(s, &mut out.buf);
            }
        }
        self.occupants.clear();
        self.destroyed = true;
        out.delete = true;
        out.save = false;
    }

    fn admin_get(&mut self, s: &Stanza, from: &Jid, q: &Element, out: &mut Out) {
        let mine = self.affiliation(&from.to_bare());
        let item = q.get_child("item", NS_MUC_ADMIN);
        if let Some(role) = item.and_then(|i| i.attr("role")) {
            return self.role_list(s, from, role, out);
        }
        let Some(want) = item
            .and_then(|i| i.attr("affiliation"))
            .and_then(Affiliation::parse)
        else {
            out.error(
                s,
                xml::BAD_REQUEST,
                "expected an item with an affiliation or a role",
            );
            return;
        };
        if mine < Affiliation::Admin {
            out.error(
                s,
                xml::FORBIDDEN,
                "only admins and owners may see affiliation lists",
            );
            return;
        }
        let mut r = format!("<query xmlns='{NS_MUC_ADMIN}'>");
        for (jid, a) in &self.affiliations {
            if *a == want {
                r.push_str(&format!(
                    "<item affiliation='{}'{}/>",
                    a.name(),
                    xml::attr("jid", jid.as_str())
                ));
            }
        }
        r.push_str("</query>");
        out.push(&xml::iq_result(s, &r));
    }

    /// The occupants of a role (moderator or participant lists, XEP-0045 8.5 and 9.8),
    /// for moderators.
    fn role_list(&self, s: &Stanza, from: &Jid, role: &str, out: &mut Out) {
        let Some(i) = self.by_session(from.as_str()) else {
            out.error(s, xml::FORBIDDEN, "only moderators may see role lists");
            return;
        };
        if self.occupants[i].role != Role::Moderator {
            out.error(s, xml::FORBIDDEN, "only moderators may see role lists");
            return;
        }
        let mut r = format!("<query xmlns='{NS_MUC_ADMIN}'>");
        for o in self.occupants.iter().filter(|o| o.role.name() == role) {
            r.push_str(&format!(
                "<item role='{role}' affiliation='{}'{}{}/>",
                self.affiliation(&o.bare).name(),
                xml::attr("nick", &o.nick),
                xml::attr("jid", o.bare.as_str()),
            ));
        }
        r.push_str("</query>");
        out.push(&xml::iq_result(s, &r));
    }

    /// Affiliation changes (owners and admins) and role changes (moderators): kick
    /// (role none, 307), voice (participant/visitor), moderator.
    fn admin_set(&mut self, s: &Stanza, from: &Jid, q: &Element, out: &mut Out) {
        // All items or none: each is checked as it is applied, and the first one
        // refused puts everything back (state and what was about to be sent).
        let before = (
            self.affiliations.clone(),
            self.nicks.clone(),
            self.occupants.clone(),
            out.buf.len(),
        );
        match self.admin_apply(from, q, out) {
            Ok(changed) => {
                out.push(&xml::iq_result(s, ""));
                if changed && self.config.persistent {
                    out.save = true;
                }
            }
            Err((c, text)) => {
                (self.affiliations, self.nicks, self.occupants) = (before.0, before.1, before.2);
                out.buf.truncate(before.3);
                out.error(s, c, text);
            }
        }
    }

    fn admin_apply(
        &mut self,
        from: &Jid,
        q: &Element,
        out: &mut Out,
    ) -> Result<bool, (xml::Condition, &'static str)> {
        let actor_aff = self.affiliation(&from.to_bare());
        let actor_role = self
            .by_session(from.as_str())
            .map_or(Role::None, |i| self.occupants[i].role);
        let actor_nick = self
            .by_session(from.as_str())
            .map(|i| self.occupants[i].nick.clone());
        let reason = |item: &Element| {
            item.get_child("reason", NS_MUC_ADMIN)
                .map(Element::text)
                .filter(|r| !r.is_empty())
        };
        let items: Vec<&Element> = q
            .children()
            .filter(|c| c.is("item", NS_MUC_ADMIN))
            .collect();
        if items.is_empty() {
            return Err((xml::BAD_REQUEST, "no items"));
        }
        let mut changed = false;
        for item in items {
            if let Some(a) = item.attr("affiliation") {
                let Some(a) = Affiliation::parse(a) else {
                    return Err((xml::BAD_REQUEST, "unknown affiliation"));
                };
                let Some(target) =
                    item.attr("jid")
                        .and_then(|j| BareJid::new(j).ok())
                        .or_else(|| {
                            item.attr("nick")
                                .and_then(super::normalize_nick)
                                .and_then(|n| self.by_nick(&n))
                                .map(|i| self.occupants[i].bare.clone())
                        })
                else {
                    return Err((xml::BAD_REQUEST, "an affiliation item needs a jid or nick"));
                };
                let current = self.affiliation(&target);
                let may = actor_aff == Affiliation::Owner
                    || (actor_aff == Affiliation::Admin
                        && current < Affiliation::Admin
                        && a < Affiliation::Admin);
                if !may {
                    return Err((xml::NOT_ALLOWED, "you may not change that affiliation"));
                }
                if current == Affiliation::Owner
                    && a != Affiliation::Owner
                    && self
                        .affiliations
                        .values()
                        .filter(|x| **x == Affiliation::Owner)
                        .count()
                        == 1
                {
                    return Err((xml::CONFLICT, "a room keeps at least one owner"));
                }
                if a != Affiliation::None && !self.may_add_affiliation(&target) {
                    return Err((xml::RESOURCE_CONSTRAINT, "too many affiliations"));
                }
                if a == Affiliation::Outcast {
                    self.nicks.remove(&target);
                }
                if a == Affiliation::None {
                    self.affiliations.remove(&target);
                } else {
                    self.affiliations.insert(target.clone(), a);
                }
                changed = true;
                let why = super::item_children(actor_nick.as_deref(), reason(item).as_deref());
                self.after_affiliation_change(&target, a, &why, out);
            } else if let Some(r) = item.attr("role") {
                let role = match r {
                    "none" => Role::None,
                    "visitor" => Role::Visitor,
                    "participant" => Role::Participant,
                    "moderator" => Role::Moderator,
                    _ => {
                        return Err((xml::BAD_REQUEST, "unknown role"));
                    }
                };
                let Some(i) = item
                    .attr("nick")
                    .and_then(super::normalize_nick)
                    .and_then(|n| self.by_nick(&n))
                else {
                    return Err((xml::ITEM_NOT_FOUND, "no occupant has that nickname"));
                };
                let bare = self.occupants[i].bare.clone();
                let target_aff = self.affiliation(&bare);
                // The role is the user's: every occupant (nick) of that bare JID.
                let nicks: Vec<String> = self
                    .occupants
                    .iter()
                    .filter(|o| o.bare == bare)
                    .map(|o| o.nick.clone())
                    .collect();
                let was_moderator = self
                    .occupants
                    .iter()
                    .any(|o| o.bare == bare && o.role == Role::Moderator);
                let may = actor_role == Role::Moderator
                    && target_aff < Affiliation::Admin
                    && (role != Role::Moderator || actor_aff >= Affiliation::Admin)
                    // XEP-0045 9.7: only admins and owners take the moderator role.
                    && (!was_moderator || actor_aff >= Affiliation::Admin);
                if !may {
                    return Err((xml::NOT_ALLOWED, "you may not change that occupant's role"));
                }
                let codes: &[u16] = if role == Role::None { &[307] } else { &[] };
                let why = super::item_children(actor_nick.as_deref(), reason(item).as_deref());
                for nick in nicks {
                    if let Some(i) = self.by_nick(&nick) {
                        self.set_role(i, role, codes, &why, out);
                    }
                }
            } else {
                return Err((xml::BAD_REQUEST, "an item needs an affiliation or a role"));
            }
        }
        Ok(changed)
    }

    /// An affiliation changed: an occupant who is now banned (301) or no longer a
    /// member of a members-only room (321) leaves; others get their new role.
    fn after_affiliation_change(
        &mut self,
        target: &BareJid,
        a: Affiliation,
        why: &str,
        out: &mut Out,
    ) {
        // Every occupant of that user (one per nick it joined under).
        let nicks: Vec<String> = self
            .occupants
            .iter()
            .filter(|o| {
                &o.bare == target
                    // A banned domain: its users without an affiliation of their own.
                    || (target.node().is_none()
                        && o.bare.domain() == target.domain()
                        && !self.affiliations.contains_key(&o.bare))
            })
            .map(|o| o.nick.clone())
            .collect();
        for nick in nicks {
            let Some(i) = self.by_nick(&nick) else {
                continue;
            };
            if a == Affiliation::Outcast {
                self.set_role(i, Role::None, &[301], why, out);
            } else if self.config.members_only && a < Affiliation::Member {
                self.set_role(i, Role::None, &[321], why, out);
            } else {
                let role = self
                    .default_role(a)
                    .max(self.occupants[i].role.min(Role::Participant));
                self.set_role(i, role, &[], "", out);
            }
        }
    }

    /// IQs to `room/nick`: self-ping answered by the room (XEP-0410); others relayed to
    /// the occupant's (first) session as from the sender's room JID, and their answers
    /// relayed back (XEP-0045 7.5 for IQs, as vCard requests use it).
    pub(super) fn iq_occupant(
        &mut self,
        s: &Stanza,
        from: &Jid,
        nick: &str,
        now: f64,
        out: &mut Out,
    ) {
        let kind = s.kind().unwrap_or("");
        if matches!(kind, "result" | "error") {
            return self.iq_answer(s, from, nick, out);
        }
        if !matches!(kind, "get" | "set") {
            return;
        }
        let parts = children(s);
        let ping = parts
            .first()
            .is_some_and(|c| c.ns == NS_PING && c.name == "ping");
        let Some(i) = self.by_session(from.as_str()) else {
            out.error(s, xml::NOT_JOINED, "you are not joined to this room");
            return;
        };
        if ping && self.occupants[i].nick == nick {
            // XEP-0410: the room answers a self-ping itself.
            out.push(&xml::iq_result(s, ""));
            return;
        }
        if !self.may_pm(i) {
            out.error(
                s,
                xml::FORBIDDEN,
                "private traffic is not allowed in this room",
            );
            return;
        }
        let Some(j) = self.by_nick(nick) else {
            out.error(s, xml::ITEM_NOT_FOUND, "no occupant has that nickname");
            return;
        };
        let Some(id) = s.attr("id") else {
            out.error(s, xml::BAD_REQUEST, "an IQ needs an id");
            return;
        };
        if !self.charge(i, now, s, out) {
            return;
        }
        // vCard requests go to the user's account (XEP-0054 answers for the bare
        // JID), others to the occupant's first session.
        let vcard = kind == "get"
            && parts
                .first()
                .is_some_and(|c| c.name == "vCard" && c.ns == "vcard-temp");
        let target = if vcard {
            self.occupants[j].bare.to_string()
        } else {
            self.occupants[j].sessions[0].clone()
        };
        if self.relayed.len() >= MAX_RELAYED {
            self.relayed.pop_front();
        }
        // The room's own id, so that two askers using the same id do not collide.
        self.next_id += 1;
        let relay_id = format!("muc-iq-{:x}", self.next_id);
        let sender_nick = self.occupants[i].nick.clone();
        self.relayed.push_back(Relayed {
            target: target.clone(),
            target_nick: self.occupants[j].nick.clone(),
            id: relay_id.clone(),
            original_id: id,
            sender: from.as_str().to_owned(),
        });
        let inner = xml::inner_bytes(s);
        let attrs = format!(
            "{}{}{}",
            xml::attr("from", &self.nick_jid(&sender_nick)),
            xml::attr("type", kind),
            xml::attr("id", &relay_id)
        );
        xml::Template::new("iq", &attrs, &inner).write(&target, &mut out.buf);
    }

    /// An occupant's answer to a relayed IQ goes back to the session that asked, with
    /// the id it used.
    fn iq_answer(&mut self, s: &Stanza, from: &Jid, nick: &str, out: &mut Out) {
        let Some(id) = s.attr("id") else {
            return;
        };
        let Some(at) = self
            .relayed
            .iter()
            .position(|r| r.target == from.as_str() && r.id == id)
        else {
            return;
        };
        let r = self.relayed.remove(at).expect("found");
        if self
            .by_session(&r.sender)
            .is_none_or(|k| self.occupants[k].nick != nick)
        {
            return;
        }
        let attrs = format!(
            "{}{}{}",
            xml::attr("from", &self.nick_jid(&r.target_nick)),
            xml::attr("type", s.kind().unwrap_or("result")),
            xml::attr("id", &r.original_id)
        );
        let inner = xml::inner_bytes(s);
        xml::Template::new("iq", &attrs, &inner).write(&r.sender, &mut out.buf);
    }
}

/// IQs relayed to occupants and not answered yet, at most this many per room.
const MAX_RELAYED: usize = 256;

/// An IQ relayed to an occupant: who was asked, its id, and who asked.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// Who was asked: a session, or a bare JID for vCards.
    target: String,
    target_nick: String,
    /// The room's id of the relayed IQ, and the asker's.
    id: String,
    original_id: String,
    sender: String,
}
