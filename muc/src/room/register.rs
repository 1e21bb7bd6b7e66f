//! Registering with a room (XEP-0045 7.10): a user reserves a nick and becomes a
//! member; nobody else may then use that nick in the room.

use jid::Jid;
use jrs_stream::children::Child;
use jrs_stream::Stanza;
use minidom::Element;

use super::{Affiliation, Out, Room};
use crate::xml::{self, NS_DATA};

pub const NS_REGISTER: &str = "jabber:iq:register";
const FORM_REGISTER: &str = "http://jabber.org/protocol/muc#register";

impl Room {
    pub(super) fn register(&mut self, s: &Stanza, from: &Jid, payload: &Child, out: &mut Out) {
        let bare = from.to_bare();
        let affiliation = self.affiliation(&bare);
        if affiliation == Affiliation::Outcast {
            out.error(s, xml::FORBIDDEN, "you are banned from this room");
            return;
        }
        if s.kind() == Some("get") {
            let body = match self.nicks.get(&bare) {
                Some(nick) => format!(
                    "<query xmlns='{NS_REGISTER}'><registered/><username>{}</username></query>",
                    xml::escape(nick)
                ),
                None => format!(
                    "<query xmlns='{NS_REGISTER}'><instructions>Choose a nickname to reserve in this room.</instructions>\
                     <x xmlns='{NS_DATA}' type='form'><title>Registration</title>\
                     <field var='FORM_TYPE' type='hidden'><value>{FORM_REGISTER}</value></field>\
                     <field var='muc#register_roomnick' type='text-single' label='Nickname'><required/></field>\
                     </x></query>"
                ),
            };
            out.push(&xml::iq_result(s, &body));
            return;
        }
        let Some(q) = xml::parse_child(s, payload) else {
            out.error(s, xml::BAD_REQUEST, "");
            return;
        };
        if q.get_child("remove", NS_REGISTER).is_some() {
            if self.nicks.remove(&bare).is_none() {
                out.error(s, xml::ITEM_NOT_FOUND, "you are not registered");
                return;
            }
            if affiliation == Affiliation::Member && self.config.register_members {
                self.affiliations.remove(&bare);
            }
            out.push(&xml::iq_result(s, ""));
            out.save |= self.config.persistent;
            return;
        }
        let nick = q
            .get_child("x", NS_DATA)
            .and_then(|x| {
                x.children()
                    .find(|f| f.name() == "field" && f.attr("var") == Some("muc#register_roomnick"))
            })
            .and_then(|f| f.children().find(|v| v.name() == "value"))
            .map(Element::text)
            .filter(|n| !n.is_empty());
        let Some(nick) = nick else {
            out.error(s, xml::NOT_ACCEPTABLE, "muc#register_roomnick is required");
            return;
        };
        // Stored and compared in normal form, as the nicks of room JIDs are.
        let Some(nick) = super::normalize_nick(&nick) else {
            out.error(s, xml::NOT_ACCEPTABLE, "that is not a valid nickname");
            return;
        };
        let taken = self.nicks.iter().any(|(who, n)| *n == nick && *who != bare)
            || self
                .by_nick(&nick)
                .is_some_and(|i| self.occupants[i].bare != bare);
        if taken {
            out.error(s, xml::CONFLICT, "that nickname is taken");
            return;
        }
        if self.config.members_only && affiliation < Affiliation::Member {
            out.error(
                s,
                xml::REGISTRATION_REQUIRED,
                "members are invited in this room",
            );
            return;
        }
        if affiliation == Affiliation::Outcast {
            out.error(s, xml::FORBIDDEN, "you are banned from this room");
            return;
        }
        let new_entry = !self.nicks.contains_key(&bare) && !self.affiliations.contains_key(&bare);
        if new_entry && !self.may_add_affiliation(&bare) {
            out.error(s, xml::RESOURCE_CONSTRAINT, "too many registrations");
            return;
        }
        // Registering reserves the nick; it makes a member only when the room says so.
        if affiliation == Affiliation::None && self.config.register_members {
            self.affiliations.insert(bare.clone(), Affiliation::Member);
        }
        self.nicks.insert(bare, nick);
        out.push(&xml::iq_result(s, ""));
        out.save |= self.config.persistent;
    }
}
