//! What persistent rooms keep through xdb: configuration, subject and affiliations
//! under owner = the room's JID (the room directory's log, under owner = the service's
//! domain, is `directory.rs`'s). `<storage>memory</storage>` keeps nothing.

use jid::BareJid;
use jrs_xdb::archive::{Item, Page, Query, Retention};
use jrs_xdb::client::{XdbClient, XdbError};

use crate::mam::NS_MAM;
use minidom::Element;

use crate::room::config::{AllowPm, RoomConfig, Whois};
use crate::room::{Affiliation, Room};
use crate::xml::{attr, escape};

pub const NS_ROOM: &str = "urn:jabberd-rs:muc:room:0";

pub enum Store {
    Xdb(XdbClient),
    Memory,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Xdb(#[from] XdbError),
    #[error("stored room data is not valid: {0}")]
    Invalid(String),
}

impl Store {
    pub fn xdb(&self) -> Option<&XdbClient> {
        match self {
            Store::Xdb(x) => Some(x),
            Store::Memory => None,
        }
    }

    /// Loads a persistent room's state into `room`; false when nothing is stored.
    pub async fn load(&self, room: &mut Room) -> Result<bool, StoreError> {
        let Some(x) = self.xdb() else {
            return Ok(false);
        };
        let data = x.get(room.jid.as_str(), NS_ROOM).await?;
        if data.iter().all(u8::is_ascii_whitespace) {
            return Ok(false);
        }
        let text = std::str::from_utf8(&data).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let e: Element = text
            .parse()
            .map_err(|e: minidom::Error| StoreError::Invalid(e.to_string()))?;
        from_xml(room, &e);
        Ok(true)
    }

    pub async fn save(&self, room: &Room) -> Result<(), StoreError> {
        if let Some(x) = self.xdb() {
            x.set(room.jid.as_str(), NS_ROOM, to_xml(room)).await?;
        }
        Ok(())
    }

    pub async fn delete(&self, room: &BareJid) -> Result<(), StoreError> {
        if let Some(x) = self.xdb() {
            x.delete(room.as_str(), NS_ROOM).await?;
        }
        Ok(())
    }

    /// Appends a batch of room messages to the room's archive.
    pub async fn archive(
        &self,
        room: &BareJid,
        items: &[Item],
        max_items: Option<u64>,
    ) -> Result<(), StoreError> {
        if let Some(x) = self.xdb() {
            let retention = Retention {
                max_items,
                max_age: None,
            };
            let sent = x.archive_append(room.as_str(), NS_MAM, items, retention)?;
            x.finish(sent).await?;
        }
        Ok(())
    }

    pub async fn archive_query(&self, room: &BareJid, q: &Query) -> Result<Page, StoreError> {
        match self.xdb() {
            Some(x) => Ok(x.archive_query(room.as_str(), NS_MAM, q).await?),
            None => Ok(Page::default()),
        }
    }

    /// The archived message `id` of a room; `None` when the archive has no such item.
    pub async fn archive_item(&self, room: &BareJid, id: &str) -> Result<Option<Item>, StoreError> {
        let q = Query {
            ids: vec![id.to_owned()],
            paging: jrs_xdb::archive::Paging {
                max: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        match self.archive_query(room, &q).await {
            Ok(page) => Ok(page.items.into_iter().next()),
            Err(StoreError::Xdb(XdbError::Refused(r)))
                if r.condition == jrs_stream::StanzaErrorCondition::ItemNotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces the archived message `id` of a room with `payload` (a tombstone).
    pub async fn archive_retract(
        &self,
        room: &BareJid,
        id: &str,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        if let Some(x) = self.xdb() {
            x.archive_retract(room.as_str(), NS_MAM, id, payload)
                .await?;
        }
        Ok(())
    }

    /// Empties a destroyed room's archive.
    pub async fn archive_clear(&self, room: &BareJid) -> Result<(), StoreError> {
        if let Some(x) = self.xdb() {
            let retention = Retention {
                max_items: Some(0),
                max_age: None,
            };
            x.archive_trim(room.as_str(), NS_MAM, retention).await?;
        }
        Ok(())
    }
}

pub fn to_xml(room: &Room) -> String {
    let c = &room.config;
    let mut x = format!(
        "<room xmlns='{NS_ROOM}'><config{}{}{} public='{}' members-only='{}' moderated='{}' \
         whois='{}' max-users='{}' history='{}' change-subject='{}' allow-invites='{}' allow-pm='{}'",
        attr("name", &c.name),
        attr("description", &c.description),
        attr("lang", &c.lang),
        c.public,
        c.members_only,
        c.moderated,
        match c.whois {
            Whois::Anyone => "anyone",
            Whois::Moderators => "moderators",
        },
        c.max_users,
        c.history,
        c.change_subject,
        c.allow_invites,
        c.allow_pm.name(),
    );
    x.push_str(&format!(
        " archive='{}' register-members='{}'",
        c.archive, c.register_members
    ));
    if let Some(p) = &c.password {
        x.push_str(&attr("password", p));
    }
    x.push_str("/>");
    if let Some((nick, text)) = &room.subject {
        x.push_str(&format!(
            "<subject{}>{}</subject>",
            attr("nick", nick),
            escape(text)
        ));
    }
    for (jid, a) in &room.affiliations {
        let nick = room
            .nicks
            .get(jid)
            .map(|n| attr("nick", n))
            .unwrap_or_default();
        x.push_str(&format!(
            "<affiliation{}{nick} type='{}'/>",
            attr("jid", jid.as_str()),
            a.name()
        ));
    }
    // Reserved nicks of users without an affiliation.
    for (jid, nick) in &room.nicks {
        if !room.affiliations.contains_key(jid) {
            x.push_str(&format!(
                "<affiliation{}{} type='none'/>",
                attr("jid", jid.as_str()),
                attr("nick", nick)
            ));
        }
    }
    x.push_str("</room>");
    x
}

pub fn from_xml(room: &mut Room, e: &Element) {
    let mut c = RoomConfig::new(&room.limits);
    if let Some(n) = e.get_child("config", NS_ROOM) {
        let s = |k: &str| n.attr(k).unwrap_or("").to_owned();
        let b = |k: &str| n.attr(k) == Some("true");
        let num = |k: &str, d: usize| n.attr(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        c.name = s("name");
        c.description = s("description");
        c.lang = s("lang");
        c.public = b("public");
        c.members_only = b("members-only");
        c.moderated = b("moderated");
        c.whois = if n.attr("whois") == Some("anyone") {
            Whois::Anyone
        } else {
            Whois::Moderators
        };
        c.max_users = num("max-users", c.max_users).min(room.limits.max_occupants);
        c.history = num("history", c.history).min(room.limits.max_history);
        c.change_subject = b("change-subject");
        c.allow_invites = b("allow-invites");
        c.register_members = b("register-members");
        c.allow_pm = n
            .attr("allow-pm")
            .and_then(AllowPm::parse)
            .unwrap_or(AllowPm::Anyone);
        c.password = n.attr("password").map(str::to_owned);
        c.archive = room.limits.archive && n.attr("archive") != Some("false");
    }
    c.persistent = true;
    room.config = c;
    room.subject = e
        .get_child("subject", NS_ROOM)
        .map(|s| (s.attr("nick").unwrap_or("").to_owned(), s.text()));
    room.affiliations = e
        .children()
        .filter(|a| a.name() == "affiliation")
        .filter_map(|a| {
            Some((
                BareJid::new(a.attr("jid")?).ok()?,
                Affiliation::parse(a.attr("type")?).filter(|t| *t != Affiliation::None)?,
            ))
        })
        .collect();
    room.nicks = e
        .children()
        .filter(|a| a.name() == "affiliation")
        .filter_map(|a| {
            Some((
                BareJid::new(a.attr("jid")?).ok()?,
                a.attr("nick")?.to_owned(),
            ))
        })
        .collect();
    room.fresh = false;
    room.locked = false;
}
