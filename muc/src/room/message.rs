//! Messages: to the room (groupchat, subject changes; XEP-0045 7.4, 8.1) and to one
//! occupant (private messages, 7.5).

use chrono::{DateTime, SecondsFormat};
use jid::Jid;
use jrs_stream::children::children;
use jrs_stream::Stanza;
use minidom::Element;

use super::{Affiliation, HistoryItem, Out, Role, Room};
use crate::xml::{self, Template, NS_CLIENT, NS_MUC_USER, NS_OCCUPANT_ID, NS_SID};

impl Room {
    pub(super) fn message_to_room(&mut self, s: &Stanza, from: &Jid, now: f64, out: &mut Out) {
        match s.kind() {
            Some("groupchat") => {}
            Some("error") => return self.bounced(s, from, out),
            _ => {
                if let Some(form) = xml::child(s, "x", xml::NS_DATA) {
                    return self.voice_request(s, from, &form, now, out);
                }
                match xml::child(s, "x", NS_MUC_USER) {
                    Some(x) => self.invitations(s, from, &x, now, out),
                    None => out.error(
                        s,
                        xml::FEATURE_NOT_IMPLEMENTED,
                        "messages to the room must be of type groupchat, or invitations",
                    ),
                }
                return;
            }
        }
        let Some(i) = self.by_session(from.as_str()) else {
            out.error(
                s,
                xml::NOT_ACCEPTABLE,
                "only occupants may send to the room",
            );
            return;
        };
        if !self.occupants[i].bucket.take(&self.limits, now) {
            out.error(s, xml::RESOURCE_CONSTRAINT, "too many messages; slow down");
            return;
        }
        let parts = children(s);
        let has = |name: &str| parts.iter().any(|c| c.name == name && c.ns == NS_CLIENT);
        if has("subject") && !has("body") {
            return self.change_subject(s, i, out);
        }
        if self.occupants[i].role < Role::Participant {
            out.error(
                s,
                xml::FORBIDDEN,
                "visitors may not speak in this moderated room",
            );
            return;
        }
        let nick = self.occupants[i].nick.clone();
        let stanza_id = self.stanza_id(now);
        let mut attrs = xml::attr("from", &self.nick_jid(&nick));
        attrs.push_str(" type='groupchat'");
        if let Some(id) = s.attr("id") {
            attrs.push_str(&xml::attr("id", &id));
        }
        let bytes = s.as_slice();
        let mut content = String::with_capacity(bytes.len() + 160);
        for c in &parts {
            // What a client cannot claim itself: ids of this room and delays.
            let ours = (c.ns == NS_SID && c.name == "stanza-id")
                || c.ns == NS_OCCUPANT_ID
                || c.ns == xml::NS_DELAY;
            if !ours {
                content.push_str(&xml::child_bytes(s, c));
            }
        }
        content.push_str(&format!(
            "<stanza-id xmlns='{NS_SID}' id='{stanza_id}'{}/><occupant-id xmlns='{NS_OCCUPANT_ID}' id='{}'/>",
            xml::attr("by", self.jid.as_str()),
            self.occupants[i].occupant_id
        ));
        let t = Template::new("message", &attrs, &content);
        self.to_all(&t, None, out);
        // Kept (history, archive): messages with a body, or a XEP-0334 store hint; not
        // chat states or markers alone.
        let keep = has("body") || parts.iter().any(|c| c.name == "store" && c.ns == NS_HINTS);
        if !keep {
            return;
        }
        if self.config.archive {
            out.archive.push(jrs_xdb::archive::Item {
                id: stanza_id.clone(),
                time: (now * 1e6) as u64,
                with: self.nick_jid(&nick),
                payload: crate::mam::payload(&attrs, &content),
            });
        }
        if self.config.history > 0 {
            let chars = t.head.len() + t.tail.len();
            self.history.push_back(HistoryItem {
                message: t,
                id: stanza_id,
                at: now,
                stamp: stamp(now),
                chars,
            });
            while self.history.len() > self.config.history {
                self.history.pop_front();
            }
        }
    }

    /// Voice requests (XEP-0045 7.13): a visitor's request goes to the moderators as a
    /// form; a moderator's approval (the form back with `muc#request_allow` true) gives
    /// the occupant voice (8.6).
    fn voice_request(&mut self, s: &Stanza, from: &Jid, form: &Element, now: f64, out: &mut Out) {
        let field = |var: &str| {
            form.children()
                .find(|f| f.name() == "field" && f.attr("var") == Some(var))
                .and_then(|f| f.children().find(|v| v.name() == "value"))
                .map(Element::text)
        };
        if field("FORM_TYPE").as_deref() != Some(NS_REQUEST) {
            out.error(
                s,
                xml::FEATURE_NOT_IMPLEMENTED,
                "not implemented by this room",
            );
            return;
        }
        let Some(i) = self.by_session(from.as_str()) else {
            out.error(s, xml::NOT_ACCEPTABLE, "only occupants may ask for voice");
            return;
        };
        if !self.charge(i, now, s, out) {
            return;
        }
        if form.attr("type") == Some("submit") && field("muc#request_allow").is_some() {
            // A moderator's answer.
            if self.occupants[i].role != Role::Moderator {
                out.error(s, xml::FORBIDDEN, "only moderators may grant voice");
                return;
            }
            let allow = matches!(field("muc#request_allow").as_deref(), Some("1" | "true"));
            let target = field("muc#roomnick")
                .and_then(|n| super::normalize_nick(&n))
                .and_then(|n| self.by_nick(&n));
            if let (true, Some(j)) = (allow, target) {
                if self.occupants[j].role == Role::Visitor {
                    self.set_role(j, Role::Participant, &[], "", out);
                }
            }
            return;
        }
        if self.occupants[i].role != Role::Visitor {
            out.error(s, xml::NOT_ACCEPTABLE, "you have voice already");
            return;
        }
        let o = &self.occupants[i];
        let request = format!(
            "<x xmlns='{}' type='form'><title>Voice request</title>\
             <instructions>To approve this request for voice, select the 'Grant voice' checkbox and submit.</instructions>\
             <field var='FORM_TYPE' type='hidden'><value>{NS_REQUEST}</value></field>\
             <field var='muc#role' type='list-single' label='Requested role'><value>participant</value></field>\
             <field var='muc#jid' type='jid-single' label='User ID'><value>{}</value></field>\
             <field var='muc#roomnick' type='text-single' label='Room Nickname'><value>{}</value></field>\
             <field var='muc#request_allow' type='boolean' label='Grant voice?'><value>false</value></field></x>",
            xml::NS_DATA,
            xml::escape(from.as_str()),
            xml::escape(&o.nick),
        );
        let t = Template::new("message", &xml::attr("from", self.jid.as_str()), &request);
        for m in self.occupants.iter().filter(|m| m.role == Role::Moderator) {
            for session in &m.sessions {
                t.write(session, &mut out.buf);
            }
        }
    }

    /// Mediated invitations and declines (XEP-0045 7.8.2, 7.8.3).
    fn invitations(&mut self, s: &Stanza, from: &Jid, x: &Element, now: f64, out: &mut Out) {
        let invites: Vec<&Element> = x
            .children()
            .filter(|c| c.is("invite", NS_MUC_USER))
            .collect();
        let declines: Vec<&Element> = x
            .children()
            .filter(|c| c.is("decline", NS_MUC_USER))
            .collect();
        if invites.is_empty() && declines.is_empty() {
            out.error(
                s,
                xml::FEATURE_NOT_IMPLEMENTED,
                "not implemented by this room",
            );
            return;
        }
        let reason = |e: &Element| {
            e.get_child("reason", NS_MUC_USER)
                .map(|r| format!("<reason>{}</reason>", xml::escape(&r.text())))
                .unwrap_or_default()
        };
        let room = xml::attr("from", self.jid.as_str());
        if invites.len() + declines.len() > super::MAX_INVITES_PER_MESSAGE {
            out.error(s, xml::BAD_REQUEST, "too many invitations in one message");
            return;
        }
        let sender = self.by_session(from.as_str());
        if let Some(i) = sender {
            if !self.charge(i, now, s, out) {
                return;
            }
        }
        for d in declines {
            // From someone invited, to the inviter: the room passes it on. Only from
            // someone it invited (to an inviter of theirs) or an occupant: the room is
            // no reflector of messages to anyone.
            let Some(to) = d.attr("to").and_then(|t| Jid::new(t).ok()) else {
                out.error(s, xml::JID_MALFORMED, "a decline needs a valid 'to'");
                return;
            };
            let bare = from.to_bare();
            let invitation = self.invited.iter().position(|(invitee, inviter)| {
                *invitee == bare && Jid::new(inviter).is_ok_and(|j| j == to || j.to_bare() == to)
            });
            match invitation {
                Some(k) => {
                    self.invited.remove(k);
                }
                None if sender.is_some() => {}
                None => {
                    out.error(s, xml::NOT_ACCEPTABLE, "you have no invitation to decline");
                    return;
                }
            }
            Template::new(
                "message",
                &room,
                &format!(
                    "<x xmlns='{NS_MUC_USER}'><decline{}>{}</decline></x>",
                    xml::attr("from", from.to_bare().as_str()),
                    reason(d)
                ),
            )
            .write(to.as_str(), &mut out.buf);
        }
        if invites.is_empty() {
            return;
        }
        let Some(i) = sender else {
            out.error(s, xml::NOT_ACCEPTABLE, "only occupants may invite");
            return;
        };
        let inviter = self.affiliation(&self.occupants[i].bare);
        let may = self.config.allow_invites
            || self.occupants[i].role == Role::Moderator
            || inviter >= Affiliation::Admin;
        if !may
            || (self.config.members_only
                && inviter < Affiliation::Admin
                && !self.config.allow_invites)
        {
            out.error(s, xml::FORBIDDEN, "you may not invite to this room");
            return;
        }
        let mut targets = vec![];
        for inv in &invites {
            match inv.attr("to").and_then(|t| Jid::new(t).ok()) {
                Some(t) => targets.push(t),
                None => {
                    out.error(s, xml::JID_MALFORMED, "an invitation needs a valid 'to'");
                    return;
                }
            }
        }
        for (inv, to) in invites.iter().zip(targets) {
            let bare = to.to_bare();
            if self.invited.len() >= super::MAX_INVITED {
                self.invited.pop_front();
            }
            self.invited
                .push_back((bare.clone(), from.as_str().to_owned()));
            if self.config.members_only && self.affiliation(&bare) == Affiliation::None {
                // An invitation to a members-only room makes the invitee a member (never
                // an outcast: an invitation does not lift a ban).
                if !self.may_add_affiliation(&bare) {
                    out.error(s, xml::RESOURCE_CONSTRAINT, "too many affiliations");
                    return;
                }
                self.affiliations.insert(bare, Affiliation::Member);
                out.save |= self.config.persistent;
            }
            let password = self
                .config
                .password
                .as_ref()
                .map(|p| format!("<password>{}</password>", xml::escape(p)))
                .unwrap_or_default();
            Template::new(
                "message",
                &room,
                &format!(
                    "<x xmlns='{NS_MUC_USER}'><invite{}>{}</invite>{password}</x>\
                     <body>{} invites you to the room {}</body>",
                    xml::attr("from", from.as_str()),
                    reason(inv),
                    xml::escape(from.to_bare().as_str()),
                    xml::escape(self.jid.as_str()),
                ),
            )
            .write(to.as_str(), &mut out.buf);
        }
    }

    fn change_subject(&mut self, s: &Stanza, i: usize, out: &mut Out) {
        let o = &self.occupants[i];
        let allowed = o.role == Role::Moderator
            || (self.config.change_subject && o.role >= Role::Participant);
        if !allowed {
            out.error(s, xml::FORBIDDEN, "you may not change the subject");
            return;
        }
        let text = xml::child(s, "subject", NS_CLIENT)
            .map(|e| e.text())
            .unwrap_or_default();
        let nick = o.nick.clone();
        let subject = if text.is_empty() {
            "<subject/>".to_owned()
        } else {
            format!("<subject>{}</subject>", xml::escape(&text))
        };
        let mut attrs = xml::attr("from", &self.nick_jid(&nick));
        attrs.push_str(" type='groupchat'");
        if let Some(id) = s.attr("id") {
            attrs.push_str(&xml::attr("id", &id));
        }
        self.to_all(&Template::new("message", &attrs, &subject), None, out);
        self.subject = Some((nick, text));
        out.save = self.config.persistent;
    }

    pub(super) fn private_message(
        &mut self,
        s: &Stanza,
        from: &Jid,
        nick: &str,
        now: f64,
        out: &mut Out,
    ) {
        if s.kind() == Some("error") {
            return self.bounced(s, from, out);
        }
        if s.kind() == Some("groupchat") {
            out.error(
                s,
                xml::BAD_REQUEST,
                "groupchat messages go to the room, not to an occupant",
            );
            return;
        }
        let Some(i) = self.by_session(from.as_str()) else {
            out.error(
                s,
                xml::NOT_ACCEPTABLE,
                "only occupants may send private messages",
            );
            return;
        };
        if !self.charge(i, now, s, out) {
            return;
        }
        if !self.may_pm(i) {
            out.error(
                s,
                xml::FORBIDDEN,
                "private messages are not allowed in this room",
            );
            return;
        }
        let Some(j) = self.by_nick(nick) else {
            out.error(s, xml::ITEM_NOT_FOUND, "no occupant has that nickname");
            return;
        };
        let mut attrs = xml::attr("from", &self.nick_jid(&self.occupants[i].nick));
        attrs.push_str(&xml::attr("type", s.kind().unwrap_or("normal")));
        if let Some(id) = s.attr("id") {
            attrs.push_str(&xml::attr("id", &id));
        }
        let mut content = String::new();
        for c in children(s) {
            if c.ns != NS_MUC_USER && c.ns != NS_OCCUPANT_ID {
                content.push_str(&xml::child_bytes(s, &c));
            }
        }
        content.push_str(&format!("<x xmlns='{NS_MUC_USER}'/>"));
        let t = Template::new("message", &attrs, &content);
        for session in &self.occupants[j].sessions {
            t.write(session, &mut out.buf);
        }
    }
}

const NS_HINTS: &str = "urn:xmpp:hints";
const NS_REQUEST: &str = "http://jabber.org/protocol/muc#request";

/// XEP-0082 date-time of `now` (seconds since the epoch).
pub fn stamp(now: f64) -> String {
    DateTime::from_timestamp_micros((now * 1e6) as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}
