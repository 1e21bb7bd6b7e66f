//! Presence to `room/nick`: join (XEP-0045 7.2), presence updates (7.7), nick changes
//! (7.6), leaving (7.14), and the creation of a new room by its first occupant (10.1).

use chrono::{DateTime, Utc};
use jid::Jid;
use jrs_stream::children::children;
use jrs_stream::Stanza;
use minidom::Element;

use super::{config::Whois, Affiliation, Bucket, Occupant, Out, Role, Room};
use crate::xml::{self, NS_MUC, NS_MUC_USER};

/// What a joining client asked for in `<x xmlns='..muc'>`.
#[derive(Debug, Default)]
struct JoinRequest {
    password: Option<String>,
    history: Option<Element>,
}

impl Room {
    pub(super) fn presence(&mut self, s: &Stanza, from: &Jid, nick: &str, now: f64, out: &mut Out) {
        let full = from.as_str();
        if from.resource().is_none() {
            out.error(s, xml::JID_MALFORMED, "joining needs a full JID");
            return;
        }
        let kind = s.kind().unwrap_or("");
        let current = self.by_session(full);
        match (kind, current) {
            ("error", Some(_)) => self.bounced(s, from, out),
            ("unavailable", Some(i)) => self.leave(s, i, full, out),
            ("unavailable" | "error", None) => {}
            ("", Some(i)) if !self.charge(i, now, s, out) => {}
            ("", Some(i)) if self.occupants[i].nick == nick => {
                let p = payload(s);
                let changed = p != self.occupants[i].payload;
                self.occupants[i].payload = p;
                if xml::child(s, "x", NS_MUC).is_some() {
                    // A join from a session already joined (a client that lost its
                    // link and joins again): the whole join again, to that session.
                    if changed {
                        self.broadcast_presence(i, false, &[], &[], "", None, out);
                    }
                    let request = join_request(s);
                    let codes = self.self_join_codes(false, rewritten(s, nick));
                    self.send_roster(i, full, out);
                    self.broadcast_presence(i, false, &[], &codes, "", Some(full), out);
                    self.send_history(full, request.history.as_ref(), now, out);
                    self.send_subject(full, out);
                    return;
                }
                self.broadcast_presence(i, false, &[], &[], "", None, out);
            }
            ("", Some(i)) => self.change_nick(s, i, nick, out),
            ("", None) => self.join(s, from, nick, now, out),
            _ => out.error(s, xml::BAD_REQUEST, "unexpected presence type"),
        }
    }

    fn join(&mut self, s: &Stanza, from: &Jid, nick: &str, now: f64, out: &mut Out) {
        let full = from.as_str().to_owned();
        let bare = from.to_bare();
        let request = join_request(s);
        let mut created = false;
        if self.fresh && self.occupants.is_empty() && !self.locked {
            let domain = bare.domain().as_str();
            if !self.create_domains.is_empty() && !self.create_domains.iter().any(|d| d == domain) {
                out.error(
                    s,
                    xml::NOT_ALLOWED,
                    "you may not create rooms on this service",
                );
                return;
            }
            if !self.creations.take(&bare, &self.jid) {
                out.error(
                    s,
                    xml::NOT_ALLOWED,
                    "you have created as many rooms as you may",
                );
                return;
            }
            self.creator = Some(bare.clone());
            // XEP-0045 10.1.1: the creator is the owner; the room stays locked until
            // the owner configures it (or accepts the defaults).
            self.affiliations.insert(bare.clone(), Affiliation::Owner);
            self.locked = true;
            created = true;
        }
        let affiliation = self.affiliation(&bare);
        if self.locked && affiliation != Affiliation::Owner {
            out.error(
                s,
                xml::ITEM_NOT_FOUND,
                "the room is locked until its owner configures it",
            );
            return;
        }
        if affiliation == Affiliation::Outcast {
            out.error(s, xml::FORBIDDEN, "you are banned from this room");
            return;
        }
        if self.config.members_only && affiliation < Affiliation::Member {
            out.error(
                s,
                xml::REGISTRATION_REQUIRED,
                "this room is for members only",
            );
            return;
        }
        if let Some(password) = &self.config.password {
            if affiliation != Affiliation::Owner && request.password.as_deref() != Some(password) {
                out.error(s, xml::NOT_AUTHORIZED, "a password is required");
                return;
            }
        }
        if self.nicks.iter().any(|(who, n)| n == nick && *who != bare) {
            out.error(
                s,
                xml::CONFLICT,
                "that nickname is registered to another user",
            );
            return;
        }
        let shared = match self.by_nick(nick) {
            Some(i) if self.occupants[i].bare != bare => {
                out.error(s, xml::CONFLICT, "that nickname is in use");
                return;
            }
            other => other,
        };
        if let Some(i) = shared {
            // Another session of the same user: it joins the same occupant.
            self.occupants[i].sessions.push(full.clone());
            self.send_roster(i, &full, out);
            let codes = self.self_join_codes(false, rewritten(s, nick));
            self.broadcast_presence(i, false, &[], &codes, "", Some(&full), out);
            self.send_history(&full, request.history.as_ref(), now, out);
            self.send_subject(&full, out);
            return;
        }
        let limit = self.config.max_users.min(self.limits.max_occupants);
        if self.occupants.len() >= limit && affiliation < Affiliation::Admin
            || self.occupants.len() >= self.limits.max_occupants
        {
            out.error(s, xml::SERVICE_UNAVAILABLE_WAIT, "the room is full");
            return;
        }
        let occupant = Occupant {
            nick: nick.to_owned(),
            occupant_id: self.occupant_id(&bare),
            bare,
            sessions: vec![full.clone()],
            role: self.default_role(affiliation),
            payload: payload(s),
            bucket: Bucket::new(self.limits.burst, now),
        };
        self.occupants.push(occupant);
        let i = self.occupants.len() - 1;
        self.send_roster(i, &full, out);
        let self_codes = self.self_join_codes(created, rewritten(s, nick));
        self.broadcast_presence(i, false, &[], &self_codes, "", None, out);
        self.send_history(&full, request.history.as_ref(), now, out);
        self.send_subject(&full, out);
    }

    /// The status codes of a joining session's own presence besides 110: 100 in a
    /// non-anonymous room, 170 in an archived one, 201 when it created the room, 210
    /// when its nick is not as it wrote it.
    fn self_join_codes(&self, created: bool, rewritten: bool) -> Vec<u16> {
        let mut codes = vec![];
        if self.config.whois == Whois::Anyone {
            codes.push(100);
        }
        if self.config.archive {
            codes.push(170);
        }
        if created {
            codes.push(201);
        }
        if rewritten {
            codes.push(210);
        }
        codes
    }

    /// The presences of every other occupant, to a joining session.
    fn send_roster(&self, i: usize, to: &str, out: &mut Out) {
        let viewer = &self.occupants[i];
        let sees = self.sees_jids(viewer);
        for (j, o) in self.occupants.iter().enumerate() {
            if j == i {
                continue;
            }
            let jid = if sees {
                o.sessions.first().map(String::as_str)
            } else {
                None
            };
            self.presence_template(o, false, jid, &[], "", "")
                .write(to, &mut out.buf);
        }
    }

    fn leave(&mut self, s: &Stanza, i: usize, full: &str, out: &mut Out) {
        let o = &mut self.occupants[i];
        let kept = std::mem::replace(&mut o.payload, payload(s));
        if o.sessions.len() > 1 {
            // One of several sessions leaves: only it hears about it, and the others
            // keep their presence.
            self.broadcast_presence(i, true, &[], &[], "", Some(full), out);
            self.occupants[i].payload = kept;
            self.occupants[i].sessions.retain(|x| x != full);
            return;
        }
        self.broadcast_presence(i, true, &[], &[], "", None, out);
        self.occupants.remove(i);
    }

    /// An error from an occupant's session (a bounced message or presence): when it
    /// says the session is gone, the session leaves; the last one takes the occupant
    /// with it, and the others are told with status 333 (XEP-0045 18.1.2).
    pub(super) fn bounced(&mut self, s: &Stanza, from: &Jid, out: &mut Out) {
        let full = from.as_str();
        let Some(i) = self.by_session(full) else {
            return;
        };
        let condition = xml::child(s, "error", xml::NS_CLIENT).and_then(|e| {
            e.children()
                .find(|c| c.ns() == xml::NS_STANZAS && c.name() != "text")
                .map(|c| c.name().to_owned())
        });
        let gone = matches!(
            condition.as_deref(),
            Some(
                "gone"
                    | "item-not-found"
                    | "recipient-unavailable"
                    | "redirect"
                    | "remote-server-not-found"
                    | "remote-server-timeout"
                    | "service-unavailable"
                    | "jid-malformed"
            ) | None
        );
        if !gone {
            return;
        }
        if self.occupants[i].sessions.len() > 1 {
            self.occupants[i].sessions.retain(|x| x != full);
            return;
        }
        // Not to the gone session itself.
        self.occupants[i].sessions.clear();
        self.broadcast_presence(i, true, &[333], &[], "", None, out);
        self.occupants.remove(i);
    }

    fn change_nick(&mut self, s: &Stanza, i: usize, nick: &str, out: &mut Out) {
        if self
            .nicks
            .iter()
            .any(|(who, n)| n == nick && *who != self.occupants[i].bare)
        {
            out.error(
                s,
                xml::CONFLICT,
                "that nickname is registered to another user",
            );
            return;
        }
        if let Some(j) = self.by_nick(nick) {
            if self.occupants[j].bare != self.occupants[i].bare {
                out.error(s, xml::CONFLICT, "that nickname is in use");
                return;
            }
            // The same user joined under that nick from another session: a client
            // moving one session over is not supported yet.
            out.error(
                s,
                xml::NOT_ACCEPTABLE,
                "another of your sessions holds that nickname",
            );
            return;
        }
        let item = xml::attr("nick", nick);
        self.broadcast_presence(i, true, &[303], &[], &item, None, out);
        self.occupants[i].nick = nick.to_owned();
        self.occupants[i].payload = payload(s);
        let codes: &[u16] = if rewritten(s, nick) { &[210] } else { &[] };
        self.broadcast_presence(i, false, &[], codes, "", None, out);
    }

    /// The subject, always sent last when joining (XEP-0045 7.2.15).
    fn send_subject(&self, to: &str, out: &mut Out) {
        let (from, text) = match &self.subject {
            Some((nick, text)) if !nick.is_empty() => (self.nick_jid(nick), text.as_str()),
            Some((_, text)) => (self.jid.to_string(), text.as_str()),
            None => (self.jid.to_string(), ""),
        };
        let subject = if text.is_empty() {
            "<subject/>".to_owned()
        } else {
            format!("<subject>{}</subject>", xml::escape(text))
        };
        xml::Template::new(
            "message",
            &format!("{} type='groupchat'", xml::attr("from", &from)),
            &subject,
        )
        .write(to, &mut out.buf);
    }

    /// History, as the joining client asked (XEP-0045 7.2.14), with XEP-0203 delays.
    fn send_history(&self, to: &str, request: Option<&Element>, now: f64, out: &mut Out) {
        let num = |name: &str| {
            request
                .and_then(|h| h.attr(name))
                .and_then(|v| v.parse::<usize>().ok())
        };
        let max_stanzas = num("maxstanzas").unwrap_or(usize::MAX);
        let max_chars = num("maxchars").unwrap_or(usize::MAX);
        let since = num("seconds")
            .map(|s| now - s as f64)
            .into_iter()
            .chain(
                request
                    .and_then(|h| h.attr("since"))
                    .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
                    .map(|d| d.with_timezone(&Utc).timestamp_micros() as f64 / 1e6),
            )
            .fold(f64::MIN, f64::max);
        let mut chosen = 0;
        let mut chars = 0usize;
        for item in self.history.iter().rev() {
            if chosen >= max_stanzas || item.at < since || chars + item.chars > max_chars {
                break;
            }
            chars += item.chars;
            chosen += 1;
        }
        let delay_from = xml::attr("from", self.jid.as_str());
        for item in self.history.iter().skip(self.history.len() - chosen) {
            let t = &item.message;
            let close = t.tail.len() - "</message>".len();
            out.push(t.head.as_bytes());
            out.push(xml::escape(to).as_bytes());
            out.push(&t.tail.as_bytes()[..close]);
            out.push(
                format!(
                    "<delay xmlns='{}'{delay_from} stamp='{}'/></message>",
                    xml::NS_DELAY,
                    item.stamp
                )
                .as_bytes(),
            );
        }
    }

    /// Makes `role` the role of occupant `i` (moderation) and tells everyone.
    /// `why`: the actor and reason ([`super::item_children`]) or empty.
    pub(super) fn set_role(
        &mut self,
        i: usize,
        role: Role,
        codes: &[u16],
        why: &str,
        out: &mut Out,
    ) {
        if role == Role::None {
            self.broadcast_presence(i, true, codes, &[], why, None, out);
            self.occupants.remove(i);
        } else {
            let was = self.occupants[i].role;
            self.occupants[i].role = role;
            self.broadcast_presence(i, false, codes, &[], why, None, out);
            if role == Role::Moderator
                && was != Role::Moderator
                && self.config.whois != Whois::Anyone
            {
                // A new moderator sees real JIDs: the others' presence again, with them.
                for session in self.occupants[i].sessions.clone() {
                    self.send_roster(i, &session, out);
                }
            }
        }
    }
}

/// The children of a presence that others see: everything but MUC's own elements.
fn payload(s: &Stanza) -> String {
    let mut p = String::new();
    for c in children(s) {
        if c.ns == NS_MUC || c.ns == NS_MUC_USER || c.ns == xml::NS_OCCUPANT_ID {
            continue;
        }
        p.push_str(&xml::child_bytes(s, &c));
    }
    p
}

/// Whether the room's nick differs from the one the client wrote in `to` (it was
/// normalised: XEP-0045 7.2.9, status 210).
fn rewritten(s: &Stanza, nick: &str) -> bool {
    let asked = s
        .attr("to")
        .and_then(|to| to.split_once('/').map(|(_, r)| r.to_owned()));
    asked.is_some_and(|asked| asked != nick)
}

fn join_request(s: &Stanza) -> JoinRequest {
    let Some(x) = xml::child(s, "x", NS_MUC) else {
        return JoinRequest::default();
    };
    JoinRequest {
        password: x.get_child("password", NS_MUC).map(Element::text),
        history: x.get_child("history", NS_MUC).cloned(),
    }
}
