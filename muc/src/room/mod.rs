//! One room's state and what it does with each stanza, without I/O: `handle` reads a
//! stanza and appends what the room sends to an [`Out`]; the room's task (see
//! `registry`) writes that batch to the router and stores what changed.
//!
//! - `join`: joining, leaving, nick changes, presence updates;
//! - `message`: groupchat messages, subject, private messages, history;
//! - `iq`: disco, muc#owner (configuration, destroy), muc#admin (affiliations), self-ping;
//! - `moderate`: XEP-0425 retraction of messages by moderators;
//! - `config`: the configuration and its form.

pub mod config;
mod iq;
mod join;
mod message;
pub mod moderate;
mod register;
pub use message::stamp;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::BytesMut;
use jid::{BareJid, Jid};
use jrs_component::fanout;
use jrs_stream::Stanza;
use sha1::{Digest, Sha1};

use crate::config::RoomLimits;
use crate::xml::{self, Condition, Template};
use config::RoomConfig;

/// The element a room task gets when the service stops (never from the network: the
/// link hands rooms only messages, presences and IQs).
pub const SHUTDOWN: &str = "shutdown";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Affiliation {
    Outcast,
    None,
    Member,
    Admin,
    Owner,
}

impl Affiliation {
    pub fn name(self) -> &'static str {
        match self {
            Affiliation::Outcast => "outcast",
            Affiliation::None => "none",
            Affiliation::Member => "member",
            Affiliation::Admin => "admin",
            Affiliation::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Affiliation> {
        [
            Affiliation::Outcast,
            Affiliation::None,
            Affiliation::Member,
            Affiliation::Admin,
            Affiliation::Owner,
        ]
        .into_iter()
        .find(|a| a.name() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    None,
    Visitor,
    Participant,
    Moderator,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Visitor => "visitor",
            Role::Participant => "participant",
            Role::Moderator => "moderator",
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    at: f64,
}

impl Bucket {
    fn new(burst: f64, now: f64) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self, limits: &RoomLimits, now: f64) -> bool {
        let elapsed = (now - self.at).max(0.0);
        self.tokens = (self.tokens + elapsed * limits.rate).min(limits.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One occupant: a nick held by one bare JID, with one or more of its sessions.
#[derive(Debug, Clone)]
pub struct Occupant {
    pub nick: String,
    pub bare: BareJid,
    /// Full JIDs joined under this nick, in join order.
    pub sessions: Vec<String>,
    pub role: Role,
    /// The children of the last presence (show, status, caps...), without MUC elements.
    pub payload: String,
    pub occupant_id: String,
    bucket: Bucket,
}

/// One message kept for history.
#[derive(Debug, Clone)]
pub struct HistoryItem {
    pub message: Template,
    /// The stanza-id the room gave it (XEP-0359), by which moderators retract it.
    pub id: String,
    /// Seconds since the epoch.
    pub at: f64,
    pub stamp: String,
    /// Characters of the message as sent (for `maxchars`).
    pub chars: usize,
}

/// What handling stanzas produced: bytes for the router, and what to store.
#[derive(Debug, Default)]
pub struct Out {
    pub buf: BytesMut,
    /// The router takes `<fanout>` packets (not a plain XEP-0114 component): a
    /// broadcast crosses the link once per domain, not once per session.
    pub fanout: bool,
    /// The room's stored state changed (persistent rooms).
    pub save: bool,
    /// The room was destroyed, or is no longer persistent: delete what is stored.
    pub delete: bool,
    /// Messages to archive, and archive queries to run.
    pub archive: Vec<jrs_xdb::archive::Item>,
    pub queries: Vec<crate::mam::Request>,
    /// Retractions (XEP-0425) the task finishes: archive lookup and tombstone first.
    pub moderations: Vec<moderate::Moderation>,
}

impl Out {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn error(&mut self, s: &Stanza, c: Condition, text: &str) {
        let extra = if s.name() == "presence" {
            format!("<x xmlns='{}'/>", xml::NS_MUC)
        } else {
            String::new()
        };
        if let Some(r) = xml::error_reply(s, c, text, &extra) {
            self.buf.extend_from_slice(&r);
        }
    }
}

/// The end of an `<item>` with an `<actor>` and a `<reason>` (kicks and bans), for the
/// `item_extra` of presence.
pub fn item_children(actor: Option<&str>, reason: Option<&str>) -> String {
    if actor.is_none() && reason.is_none() {
        return String::new();
    }
    let mut s = String::from(">");
    if let Some(a) = actor {
        s.push_str(&format!("<actor{}/>", xml::attr("nick", a)));
    }
    if let Some(r) = reason {
        s.push_str(&format!("<reason>{}</reason>", xml::escape(r)));
    }
    s.push_str("</item>");
    s
}

/// A nickname in its normal form (resourceprep), as the nicks of room JIDs are.
pub fn normalize_nick(nick: &str) -> Option<String> {
    jid::ResourcePart::new(nick)
        .ok()
        .map(|r| r.as_str().to_owned())
}

/// Users with an affiliation or a reserved nick, at most, per room (its stored form
/// grows with them).
pub const MAX_AFFILIATIONS: usize = 1000;

pub struct Room {
    /// `room@service`.
    pub jid: BareJid,
    pub config: RoomConfig,
    /// Nick (or empty) and text of the subject; `None`: never set.
    pub subject: Option<(String, String)>,
    pub affiliations: BTreeMap<BareJid, Affiliation>,
    /// Registered (reserved) nicks (XEP-0045 7.10).
    pub nicks: BTreeMap<BareJid, String>,
    /// Occupants in join order.
    pub occupants: Vec<Occupant>,
    /// A new room waits for its owner's configuration (XEP-0045 10.1).
    pub locked: bool,
    /// Created by the first join, not loaded from storage: no owner yet.
    pub fresh: bool,
    pub destroyed: bool,
    pub history: VecDeque<HistoryItem>,
    pub limits: Arc<RoomLimits>,
    /// Domains whose users may create rooms (empty: any).
    pub create_domains: Arc<Vec<String>>,
    /// Hidden input of occupant ids (XEP-0421), so they do not reveal real JIDs.
    salt: Arc<str>,
    next_id: u64,
    /// IQs relayed to occupants, awaiting their answers.
    relayed: VecDeque<iq::Relayed>,
    /// Rooms created per user (the directory, shared); the user who created this room
    /// in this process (the directory keeps it with the room's entry).
    pub creations: Arc<Creations>,
    pub creator: Option<BareJid>,
    /// Invitations sent (invitee, inviter's full JID), the latest [`MAX_INVITED`]: a
    /// decline is passed on only to an inviter of its sender (or from an occupant).
    invited: VecDeque<(BareJid, String)>,
}

/// The rooms each user created that have not ended, against `max-rooms-per-user`:
/// the room directory's log, shared by every instance (see `directory.rs`).
pub use crate::directory::Directory as Creations;

/// Invitations remembered for their declines, per room.
const MAX_INVITED: usize = 256;
/// Invitations in one message, at most.
pub const MAX_INVITES_PER_MESSAGE: usize = 5;

/// What a stanza may change of a room, kept to put back when storing the change fails.
pub struct Snapshot {
    config: RoomConfig,
    subject: Option<(String, String)>,
    affiliations: BTreeMap<BareJid, Affiliation>,
    nicks: BTreeMap<BareJid, String>,
    occupants: Vec<Occupant>,
    locked: bool,
    fresh: bool,
    destroyed: bool,
}

impl Room {
    /// Whether handling `s` may change what is stored (configuration, subject,
    /// affiliations, nicks, destruction): IQs and messages to the room itself but
    /// groupchat messages with a body. Presence and private traffic never do.
    pub fn may_persist(s: &Stanza) -> bool {
        let to_room = s.attr("to").is_some_and(|t| !t.contains('/'));
        match s.name() {
            "iq" => to_room && matches!(s.kind(), Some("set")),
            // Groupchat messages with a body never change what is stored (and are
            // the bulk of the traffic: no snapshot for them).
            "message" => {
                to_room
                    && !(s.kind() == Some("groupchat")
                        && s.inner().windows(5).any(|w| w == b"<body"))
            }
            _ => false,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            config: self.config.clone(),
            subject: self.subject.clone(),
            affiliations: self.affiliations.clone(),
            nicks: self.nicks.clone(),
            occupants: self.occupants.clone(),
            locked: self.locked,
            fresh: self.fresh,
            destroyed: self.destroyed,
        }
    }

    pub fn restore(&mut self, s: Snapshot) {
        self.config = s.config;
        self.subject = s.subject;
        self.affiliations = s.affiliations;
        self.nicks = s.nicks;
        self.occupants = s.occupants;
        self.locked = s.locked;
        self.fresh = s.fresh;
        self.destroyed = s.destroyed;
    }

    pub fn new(
        jid: BareJid,
        limits: Arc<RoomLimits>,
        create_domains: Arc<Vec<String>>,
        salt: Arc<str>,
    ) -> Room {
        Room {
            jid,
            config: RoomConfig::new(&limits),
            subject: None,
            affiliations: BTreeMap::new(),
            nicks: BTreeMap::new(),
            occupants: vec![],
            locked: false,
            fresh: true,
            destroyed: false,
            history: VecDeque::new(),
            limits,
            create_domains,
            salt,
            next_id: 0,
            relayed: VecDeque::new(),
            invited: VecDeque::new(),
            creations: Arc::new(Creations::new(0)),
            creator: None,
        }
    }

    /// The room has nothing left to do in memory: destroyed, or empty and temporary.
    pub fn finished(&self) -> bool {
        self.destroyed || (self.occupants.is_empty() && (!self.config.persistent || self.fresh))
    }

    /// A user's affiliation: their own, else outcast when their domain is banned
    /// (an outcast item with `jid='DOMAIN'`).
    pub fn affiliation(&self, bare: &BareJid) -> Affiliation {
        if let Some(a) = self.affiliations.get(bare) {
            return *a;
        }
        if bare.node().is_some() {
            if let Ok(domain) = BareJid::new(bare.domain().as_str()) {
                if self.affiliations.get(&domain) == Some(&Affiliation::Outcast) {
                    return Affiliation::Outcast;
                }
            }
        }
        Affiliation::None
    }

    /// Whether one more user may get an affiliation or a reserved nick (`bare` has
    /// none yet): at most [`MAX_AFFILIATIONS`] per room.
    fn may_add_affiliation(&self, bare: &BareJid) -> bool {
        if self.affiliations.contains_key(bare) || self.nicks.contains_key(bare) {
            return true;
        }
        let nick_only = self
            .nicks
            .keys()
            .filter(|j| !self.affiliations.contains_key(*j))
            .count();
        self.affiliations.len() + nick_only < MAX_AFFILIATIONS
    }

    /// The role an occupant of this affiliation gets when joining.
    fn default_role(&self, a: Affiliation) -> Role {
        match a {
            Affiliation::Owner | Affiliation::Admin => Role::Moderator,
            Affiliation::Member => Role::Participant,
            Affiliation::None if self.config.moderated => Role::Visitor,
            Affiliation::None => Role::Participant,
            Affiliation::Outcast => Role::None,
        }
    }

    fn occupant_id(&self, bare: &BareJid) -> String {
        let mut h = Sha1::new();
        h.update(self.salt.as_bytes());
        h.update([0]);
        h.update(self.jid.as_str().as_bytes());
        h.update([0]);
        h.update(bare.as_str().as_bytes());
        hex::encode(&h.finalize()[..12])
    }

    fn stanza_id(&mut self, now: f64) -> String {
        self.next_id += 1;
        // Fixed width: ids of one batch (same `now`) must increase in byte order too,
        // as the archive requires ("…-f" < "…-10" would not).
        format!("{:x}-{:016x}", (now * 1e6) as u64, self.next_id)
    }

    /// Takes a token from occupant `i`'s bucket (messages, presence updates, nick
    /// changes, invitations, voice requests, private messages, relayed IQs); without
    /// one, answers `resource-constraint` (wait) and returns false.
    fn charge(&mut self, i: usize, now: f64, s: &Stanza, out: &mut Out) -> bool {
        if self.occupants[i].bucket.take(&self.limits, now) {
            return true;
        }
        out.error(s, xml::RESOURCE_CONSTRAINT, "too many stanzas; slow down");
        false
    }

    /// Whether occupant `i` may send private messages and IQs to other occupants
    /// (`muc#roomconfig_allowpm`).
    fn may_pm(&self, i: usize) -> bool {
        let role = self.occupants[i].role;
        match self.config.allow_pm {
            config::AllowPm::Anyone => true,
            config::AllowPm::Participants => role >= Role::Participant,
            config::AllowPm::Moderators => role == Role::Moderator,
            config::AllowPm::None => false,
        }
    }

    fn by_session(&self, full: &str) -> Option<usize> {
        self.occupants
            .iter()
            .position(|o| o.sessions.iter().any(|s| s == full))
    }

    fn by_nick(&self, nick: &str) -> Option<usize> {
        self.occupants.iter().position(|o| o.nick == nick)
    }

    pub fn nick_jid(&self, nick: &str) -> String {
        format!("{}/{nick}", self.jid)
    }

    /// Handles one stanza addressed to the room or one of its occupants.
    pub fn handle(&mut self, s: &Stanza, now: f64, out: &mut Out) {
        if s.name() == SHUTDOWN {
            return self.shut_down(out);
        }
        if self.destroyed {
            out.error(s, xml::ITEM_NOT_FOUND, "the room was destroyed");
            return;
        }
        let Some(Ok(to)) = s.attr("to").map(|t| Jid::new(&t)) else {
            return;
        };
        let from = match s.attr("from").map(|f| Jid::new(&f)) {
            Some(Ok(f)) => f,
            _ => return,
        };
        let nick = to.resource().map(|r| r.as_str().to_owned());
        match (s.name(), nick) {
            ("presence", Some(nick)) => self.presence(s, &from, &nick, now, out),
            ("presence", None) if !matches!(s.kind(), Some("unavailable" | "error")) => {
                out.error(s, xml::JID_MALFORMED, "a nickname is required to join");
            }
            ("message", None) => self.message_to_room(s, &from, now, out),
            ("message", Some(nick)) => self.private_message(s, &from, &nick, now, out),
            ("iq", None) => self.iq_room(s, &from, now, out),
            ("iq", Some(nick)) => self.iq_occupant(s, &from, &nick, now, out),
            _ => {}
        }
    }

    /// The service is stopping (XEP-0045 status 332): every occupant is told it is
    /// removed; the room's stored state stays for the next start.
    fn shut_down(&mut self, out: &mut Out) {
        let occupants = std::mem::take(&mut self.occupants);
        for o in &occupants {
            let mut attrs = xml::attr("from", &self.nick_jid(&o.nick));
            attrs.push_str(" type='unavailable'");
            let t = Template::new(
                "presence",
                &attrs,
                &format!(
                    "<x xmlns='{}'><item affiliation='{}' role='none'/><status code='110'/>\
                     <status code='332'/></x>",
                    xml::NS_MUC_USER,
                    self.affiliation(&o.bare).name()
                ),
            );
            for s in &o.sessions {
                t.write(s, &mut out.buf);
            }
        }
    }

    /// Sends `t` to every session of every occupant but `skip`.
    fn to_all(&self, t: &Template, skip: Option<usize>, out: &mut Out) {
        let sessions = self
            .occupants
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .flat_map(|(_, o)| o.sessions.iter().map(String::as_str));
        self.fan_out(t, sessions, out);
    }

    /// Sends `t` to each of `sessions` (full JIDs): with fan-out, one `<fanout>` packet
    /// per domain (and per [`fanout::max_recipients`] for the stanza's size) that the
    /// router splits by destination; else one stanza each.
    fn fan_out<'s>(&self, t: &Template, sessions: impl Iterator<Item = &'s str>, out: &mut Out) {
        if !out.fanout {
            for s in sessions {
                t.write(s, &mut out.buf);
            }
            return;
        }
        let mut by_domain: Vec<(&str, Vec<&str>)> = vec![];
        for s in sessions {
            let domain = jrs_stream::addr::domain(s);
            match by_domain.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, list)) => list.push(s),
                None => by_domain.push((domain, vec![s])),
            }
        }
        let from = xml::escape(self.jid.as_str());
        let per_packet = fanout::max_recipients(t.head.len() + t.tail.len());
        for (domain, list) in by_domain {
            for chunk in list.chunks(per_packet) {
                if let [one] = chunk {
                    t.write(one, &mut out.buf);
                    continue;
                }
                fanout::open(&from, &xml::escape(domain), &mut out.buf);
                for s in chunk {
                    let to = xml::escape(s);
                    fanout::recipient(fanout::Recipient { to: &to, sid: None }, &mut out.buf);
                }
                t.write_unaddressed(&mut out.buf);
                out.buf.extend_from_slice(fanout::END);
            }
        }
    }

    /// Whether occupant `viewer` may see real JIDs.
    fn sees_jids(&self, viewer: &Occupant) -> bool {
        self.config.whois == config::Whois::Anyone || viewer.role == Role::Moderator
    }

    /// The presence of occupant `o` as others see it.
    /// `jid`: the real JID to show (or none); `item_extra`: more attributes of `<item>`
    /// (`nick='..'`), optionally followed by its children and end tag
    /// (`><reason>..</reason></item>`, see [`item_children`]); `x_extra`: more children
    /// of `<x>` after the statuses.
    fn presence_template(
        &self,
        o: &Occupant,
        unavailable: bool,
        jid: Option<&str>,
        statuses: &[u16],
        item_extra: &str,
        x_extra: &str,
    ) -> Template {
        let mut attrs = xml::attr("from", &self.nick_jid(&o.nick));
        if unavailable {
            attrs.push_str(" type='unavailable'");
        }
        let mut c = String::with_capacity(256 + o.payload.len());
        if !unavailable || !o.payload.is_empty() {
            c.push_str(&o.payload);
        }
        c.push_str(&format!(
            "<x xmlns='{}'><item affiliation='{}' role='{}'",
            xml::NS_MUC_USER,
            self.affiliation(&o.bare).name(),
            if unavailable { "none" } else { o.role.name() },
        ));
        if let Some(j) = jid {
            c.push_str(&xml::attr("jid", j));
        }
        c.push_str(item_extra);
        if !item_extra.ends_with("</item>") {
            c.push_str("/>");
        }
        for code in statuses {
            c.push_str(&format!("<status code='{code}'/>"));
        }
        c.push_str(x_extra);
        c.push_str(&format!(
            "</x><occupant-id xmlns='{}' id='{}'/>",
            xml::NS_OCCUPANT_ID,
            o.occupant_id
        ));
        Template::new("presence", &attrs, &c)
    }

    /// Sends occupant `i`'s presence to the others (with or without real JID as each
    /// may see) and, with status 110 and `self_codes`, to its own sessions. With `only`,
    /// to that one session of its own and nobody else.
    #[allow(clippy::too_many_arguments)]
    fn broadcast_presence(
        &self,
        i: usize,
        unavailable: bool,
        codes: &[u16],
        self_codes: &[u16],
        item_extra: &str,
        only: Option<&str>,
        out: &mut Out,
    ) {
        let o = &self.occupants[i];
        let real = o.sessions.first().map(String::as_str);
        let with = self.presence_template(o, unavailable, real, codes, item_extra, "");
        let without = self.presence_template(o, unavailable, None, codes, item_extra, "");
        if only.is_none() {
            let others = || self.occupants.iter().enumerate().filter(|(j, _)| *j != i);
            let sessions = |sees: bool| {
                others()
                    .filter(move |(_, other)| self.sees_jids(other) == sees)
                    .flat_map(|(_, other)| other.sessions.iter().map(String::as_str))
            };
            self.fan_out(&with, sessions(true), out);
            self.fan_out(&without, sessions(false), out);
        }
        let mut mine: Vec<u16> = vec![110];
        mine.extend_from_slice(codes);
        mine.extend_from_slice(self_codes);
        for s in &o.sessions {
            if only.is_some_and(|only| only != s) {
                continue;
            }
            self.presence_template(o, unavailable, Some(s), &mine, item_extra, "")
                .write(s, &mut out.buf);
        }
    }
}
