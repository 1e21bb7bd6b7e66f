//! The room directory (disco#items of the service) and the rooms each user created
//! (`max-rooms-per-user`), shared by every instance of the service through one
//! append-only log in storage.
//!
//! The log is kept with owner = the service's domain and ns [`NS_LOG`]: a list of
//! entries, each appended with xdb `append` (atomic per request, so instances never
//! overwrite each other's):
//!
//! - `<room jid= name= public= persistent= creator= instance= t=/>`: the room's listing
//!   (`creator`: the bare JID of the user who created it, when known; `instance`: the
//!   component that served it);
//! - `<gone jid= t=/>`: the room ended (destroyed, or temporary and left, or its
//!   instance restarted).
//!
//! `t` is in microseconds since the Unix epoch. Readers fold the log: for each room the
//! entry with the greatest `t` wins wherever it stands (on a tie: `gone`, then the
//! greater listing), so appends may land in any order, and a compaction that appends
//! old entries after another instance's newer ones cannot bring old state back.
//!
//! Compaction (when a read finds the log more than twice as long as its fold, and at
//! least [`COMPACT_MIN`] entries): `take` (read and remove in one step), fold with what
//! was just read, drop `gone` entries older than [`GONE_KEEP`], `append` the rest with
//! their `t`. Another instance reading between the `take` and the `append` sees part of
//! the log: a reader keeps (once) the rooms its previous read had that are missing from
//! the new one, when that read is recent ([`CARRY`]).
//!
//! Each instance keeps the fold of its last read (re-read when older than [`CACHE`], so
//! a burst of disco#items queries costs one read) and its own entries until a read
//! shows them (or something newer); entries that could not be appended are kept and
//! appended again with the next ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jid::BareJid;
use minidom::Element;
use tracing::{debug, info, warn};

use crate::room::Room;
use crate::store::{Store, StoreError};
use crate::xml::attr;

/// The log of room entries.
pub const NS_LOG: &str = "urn:jabberd-rs:muc:rooms:1";
/// The list of persistent rooms of earlier versions (one record, read-modify-written):
/// migrated into the log on start, then deleted.
pub const NS_OLD: &str = "urn:jabberd-rs:muc:rooms:0";

/// How long a read of the log serves the directory and the rooms-per-user check.
pub const CACHE: Duration = Duration::from_secs(2);
/// A reader keeps rooms a new read misses (a compaction in flight) when its previous
/// read is at most this old.
pub const CARRY: Duration = Duration::from_secs(60);
/// `gone` entries younger than this (microseconds) survive compaction, so that readers
/// carrying a room over see that it ended.
pub const GONE_KEEP: u64 = 600 * 1_000_000;
/// The log is compacted when a read finds at least this many entries and more than
/// twice as many as the fold keeps.
pub const COMPACT_MIN: usize = 512;
/// An instance reads the log (and may compact it) after appending this many entries
/// without a read: the log stays bounded even when nobody reads the directory.
pub const READ_AFTER_APPENDS: usize = 256;

/// A room's listing in the log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listing {
    pub name: String,
    pub public: bool,
    pub persistent: bool,
    /// The bare JID of the user who created the room, when known.
    pub creator: Option<String>,
    /// The component name of the instance that served the room (`muc`, `muc-2`...).
    pub instance: String,
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub jid: String,
    /// Microseconds since the Unix epoch.
    pub t: u64,
    /// `None`: the room is gone.
    pub room: Option<Listing>,
}

impl Entry {
    /// Whether this entry wins over `other` (of the same room): the greater `t`; on a
    /// tie `gone`, then the greater listing (so the fold never depends on the order).
    pub fn beats(&self, other: &Entry) -> bool {
        match self.t.cmp(&other.t) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => match (&self.room, &other.room) {
                (None, Some(_)) => true,
                (Some(a), Some(b)) => a > b,
                _ => false,
            },
        }
    }

    fn to_xml(&self, out: &mut String) {
        match &self.room {
            Some(l) => {
                out.push_str("<room");
                out.push_str(&attr("jid", &self.jid));
                out.push_str(&attr("name", &l.name));
                out.push_str(&format!(
                    " public='{}' persistent='{}'",
                    l.public, l.persistent
                ));
                if let Some(c) = &l.creator {
                    out.push_str(&attr("creator", c));
                }
                out.push_str(&attr("instance", &l.instance));
                out.push_str(&format!(" t='{}'/>", self.t));
            }
            None => {
                out.push_str("<gone");
                out.push_str(&attr("jid", &self.jid));
                out.push_str(&format!(" t='{}'/>", self.t));
            }
        }
    }
}

/// Entries as appended to the log.
pub fn render<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> String {
    let mut out = String::new();
    for e in entries {
        e.to_xml(&mut out);
    }
    out
}

fn parse_elements(data: &[u8], ns: &str) -> Result<Option<Element>, StoreError> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let text = std::str::from_utf8(data).map_err(|e| StoreError::Invalid(e.to_string()))?;
    // The log is a list of elements: read them inside one.
    format!("<log xmlns='{ns}'>{text}</log>")
        .parse()
        .map(Some)
        .map_err(|e: minidom::Error| StoreError::Invalid(e.to_string()))
}

/// The entries of the log, in their order (entries without a `jid` or a numeric `t`
/// are skipped).
pub fn parse(data: &[u8]) -> Result<Vec<Entry>, StoreError> {
    let Some(log) = parse_elements(data, NS_LOG)? else {
        return Ok(vec![]);
    };
    Ok(log
        .children()
        .filter_map(|c| {
            let jid = c.attr("jid")?.to_owned();
            let t = c.attr("t")?.parse().ok()?;
            let room = match c.name() {
                "room" => Some(Listing {
                    name: c.attr("name").unwrap_or("").to_owned(),
                    public: c.attr("public") == Some("true"),
                    persistent: c.attr("persistent") == Some("true"),
                    creator: c.attr("creator").map(str::to_owned),
                    instance: c.attr("instance").unwrap_or("").to_owned(),
                }),
                "gone" => None,
                _ => return None,
            };
            Some(Entry { jid, t, room })
        })
        .collect())
}

/// The list of persistent rooms of earlier versions (`<rooms><room jid= name= public=/>
/// </rooms>`) as log entries: persistent, creator unknown, `t` = 1 so that any entry
/// written since wins.
pub fn parse_old(data: &[u8]) -> Result<Vec<Entry>, StoreError> {
    let Some(log) = parse_elements(data, NS_OLD)? else {
        return Ok(vec![]);
    };
    let rooms = log.children().find(|c| c.name() == "rooms");
    Ok(rooms
        .into_iter()
        .flat_map(|r| r.children())
        .filter(|c| c.name() == "room")
        .filter_map(|c| {
            Some(Entry {
                jid: c.attr("jid")?.to_owned(),
                t: 1,
                room: Some(Listing {
                    name: c.attr("name").unwrap_or("").to_owned(),
                    public: c.attr("public") == Some("true"),
                    persistent: true,
                    creator: None,
                    instance: String::new(),
                }),
            })
        })
        .collect())
}

/// For each room, the entry that wins (see [`Entry::beats`]).
pub fn fold(entries: impl IntoIterator<Item = Entry>) -> BTreeMap<String, Entry> {
    let mut out: BTreeMap<String, Entry> = BTreeMap::new();
    for e in entries {
        match out.get(&e.jid) {
            Some(old) if !e.beats(old) => {}
            _ => {
                out.insert(e.jid.clone(), e);
            }
        }
    }
    out
}

/// What a compaction writes back: every room, and `gone` entries younger than
/// [`GONE_KEEP`].
pub fn compacted(folded: BTreeMap<String, Entry>, now: u64) -> BTreeMap<String, Entry> {
    let mut kept = folded;
    kept.retain(|_, e| e.room.is_some() || now.saturating_sub(e.t) < GONE_KEEP);
    kept
}

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The directory of one instance: its view of the log, and its entries on the way there.
pub struct Directory {
    service: String,
    /// This instance's component name.
    instance: String,
    /// `max-rooms-per-user`; 0: no limit.
    max_per_user: usize,
    /// When this process started (entries of earlier runs are older).
    started: u64,
    state: Mutex<State>,
    /// One read of the log at a time (the others wait and use it).
    reading: tokio::sync::Mutex<()>,
    /// The log itself with memory storage (shared between directories in tests).
    memory: Arc<Mutex<Vec<u8>>>,
}

#[derive(Default)]
struct State {
    /// The fold of the last read, with the rooms carried over from the read before.
    read: BTreeMap<String, Entry>,
    /// Rooms of `read` carried over (never carried twice).
    carried: BTreeSet<String>,
    /// When the log was last read (or a read failed).
    read_at: Option<Instant>,
    /// A read succeeded once.
    ever_read: bool,
    /// This process's entries, until a read shows them or something newer.
    own: BTreeMap<String, Entry>,
    /// Entries to append (new, or not stored yet).
    unsent: Vec<Entry>,
    /// Entries appended since the last read.
    appended: usize,
    /// The last `t` given out (they increase).
    last_t: u64,
}

impl State {
    /// The winning entry of `jid`: the read's or this process's.
    fn current(&self, jid: &str) -> Option<&Entry> {
        match (self.read.get(jid), self.own.get(jid)) {
            (Some(r), Some(o)) => Some(if o.beats(r) { o } else { r }),
            (r, o) => r.or(o),
        }
    }

    /// Every room's winning entry, by JID.
    fn view(&self) -> Vec<&Entry> {
        let mut jids: BTreeSet<&str> = self.read.keys().map(String::as_str).collect();
        jids.extend(self.own.keys().map(String::as_str));
        jids.into_iter().filter_map(|j| self.current(j)).collect()
    }

    fn next_t(&mut self) -> u64 {
        self.last_t = now_micros().max(self.last_t + 1);
        self.last_t
    }

    /// Records an entry of this process, to be appended.
    fn record(&mut self, jid: String, room: Option<Listing>) {
        let e = Entry {
            jid: jid.clone(),
            t: self.next_t(),
            room,
        };
        self.own.insert(jid, e.clone());
        self.unsent.push(e);
    }

    /// Live rooms `who` created, but `except`.
    fn rooms_of(&self, who: &str, except: &str) -> usize {
        self.view()
            .into_iter()
            .filter(|e| e.jid != except)
            .filter(|e| {
                e.room
                    .as_ref()
                    .is_some_and(|l| l.creator.as_deref() == Some(who))
            })
            .count()
    }
}

impl Directory {
    /// A directory of rooms without a service (a room's own tests): counts rooms per
    /// user in memory.
    pub fn new(max_per_user: usize) -> Directory {
        Directory::for_service("", "", max_per_user)
    }

    pub fn for_service(service: &str, instance: &str, max_per_user: usize) -> Directory {
        let started = now_micros();
        Directory {
            service: service.to_owned(),
            instance: instance.to_owned(),
            max_per_user,
            started,
            state: Mutex::new(State {
                last_t: started,
                ..State::default()
            }),
            reading: tokio::sync::Mutex::new(()),
            memory: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("directory lock")
    }

    /// Public rooms of every instance: JID and name.
    pub fn public(&self) -> Vec<(String, String)> {
        self.state()
            .view()
            .into_iter()
            .filter_map(|e| {
                let l = e.room.as_ref().filter(|l| l.public)?;
                Some((e.jid.clone(), l.name.clone()))
            })
            .collect()
    }

    /// Rooms `who` created that have not ended (persistent or temporary, on any instance).
    pub fn rooms_of(&self, who: &BareJid) -> usize {
        self.state().rooms_of(who.as_str(), "")
    }

    /// `who` creates `room`: false when they are at `max-rooms-per-user`. Otherwise the
    /// room counts as theirs from now on (recorded, appended with the room's next
    /// entries).
    pub fn take(&self, who: &BareJid, room: &BareJid) -> bool {
        let mut st = self.state();
        if self.max_per_user > 0 && st.rooms_of(who.as_str(), room.as_str()) >= self.max_per_user {
            return false;
        }
        let listing = Listing {
            name: String::new(),
            public: false,
            persistent: false,
            creator: Some(who.to_string()),
            instance: self.instance.clone(),
        };
        st.record(room.to_string(), Some(listing));
        true
    }

    /// `room` ended (recorded, to be appended).
    pub fn ended(&self, room: &BareJid) {
        let mut st = self.state();
        if st.current(room.as_str()).is_some_and(|e| e.room.is_some()) {
            st.record(room.to_string(), None);
        }
    }

    /// Records the entry of `room` when its listing changed (or it ended), to be
    /// appended by [`Directory::flush`].
    pub fn note(&self, room: &Room) {
        let jid = room.jid.as_str();
        let mut st = self.state();
        let current = st.current(jid).and_then(|e| e.room.clone());
        if room.finished() {
            if current.is_some() {
                st.record(jid.to_owned(), None);
            }
            return;
        }
        let creator = match (&room.creator, &current) {
            (Some(c), _) => Some(c.to_string()),
            (None, Some(l)) => l.creator.clone(),
            // A room loaded from storage before the log was ever read: its creator is
            // in the log; the entry waits for a read (the room's next batch).
            (None, None) if !st.ever_read => return,
            (None, None) => None,
        };
        let listing = Listing {
            name: room.config.name.clone(),
            public: room.config.public && !room.locked,
            persistent: room.config.persistent && !room.destroyed,
            creator,
            instance: self.instance.clone(),
        };
        let same = current.is_some_and(|c| {
            (&c.name, c.public, c.persistent, &c.creator)
                == (&listing.name, listing.public, listing.persistent, &listing.creator)
                // Which instance holds a persistent room does not matter (it survives
                // restarts); a temporary room dies with its instance.
                && (listing.persistent || c.instance == listing.instance)
        });
        if !same {
            st.record(jid.to_owned(), Some(listing));
        }
    }

    /// Appends the entries recorded and not stored yet. On failure they are kept, and
    /// appended with the next ones.
    pub async fn flush(&self, store: &Store) -> Result<(), StoreError> {
        self.append_unsent(store).await?;
        let read = self.state().appended >= READ_AFTER_APPENDS;
        if read {
            if let Err(e) = self.refresh(store, true).await {
                debug!("could not read the room directory: {e}");
            }
        }
        Ok(())
    }

    async fn append_unsent(&self, store: &Store) -> Result<(), StoreError> {
        let batch = std::mem::take(&mut self.state().unsent);
        if batch.is_empty() {
            return Ok(());
        }
        match self.append(store, render(&batch)).await {
            Ok(()) => {
                self.state().appended += batch.len();
                Ok(())
            }
            Err(e) => {
                // Kept (only the newest entry of each room), before what came meanwhile.
                let mut st = self.state();
                let newer = std::mem::take(&mut st.unsent);
                st.unsent = fold(batch).into_values().chain(newer).collect();
                Err(e)
            }
        }
    }

    /// Reads the log again unless the last read is recent (or `force`): the directory
    /// and the rooms-per-user check see every instance's rooms. Compacts the log when
    /// it has grown. On failure, the last read serves (and is tried again after
    /// [`CACHE`]).
    pub async fn refresh(&self, store: &Store, force: bool) -> Result<(), StoreError> {
        let fresh = |d: &Directory| d.state().read_at.is_some_and(|at| at.elapsed() < CACHE);
        if !force && fresh(self) {
            return Ok(());
        }
        let _reading = self.reading.lock().await;
        if !force && fresh(self) {
            // Read by another task meanwhile.
            return Ok(());
        }
        let entries = match self.get(store, false).await.and_then(|d| parse(&d)) {
            Ok(e) => e,
            Err(e) => {
                self.state().read_at = Some(Instant::now());
                return Err(e);
            }
        };
        let raw = entries.len();
        let folded = fold(entries);
        let kept = folded.len();
        self.install(folded);
        if let Err(e) = self.append_unsent(store).await {
            warn!("could not store the room directory's entries (kept, retried later): {e}");
        }
        if raw >= COMPACT_MIN && raw > 2 * kept {
            self.compact(store, raw).await;
        }
        Ok(())
    }

    /// Only when the log was never read (a room loaded from storage needs its creator).
    pub async fn read_once(&self, store: &Store) {
        if self.state().ever_read {
            return;
        }
        if let Err(e) = self.refresh(store, false).await {
            debug!("could not read the room directory: {e}");
        }
    }

    /// Makes `folded` (a new read) the view.
    fn install(&self, folded: BTreeMap<String, Entry>) {
        let mut st = self.state();
        let mut read = folded;
        let mut carried = BTreeSet::new();
        if st.read_at.is_some_and(|at| at.elapsed() < CARRY) {
            // Missing from this read but in the last: taken by a compaction that has
            // not appended them back yet (entries are never removed otherwise but
            // old `gone` ones, which the last read would show).
            for (jid, e) in &st.read {
                if !read.contains_key(jid) && !st.carried.contains(jid) {
                    read.insert(jid.clone(), e.clone());
                    carried.insert(jid.clone());
                }
            }
        }
        let now = now_micros();
        let unsent: BTreeSet<String> = st.unsent.iter().map(|e| e.jid.clone()).collect();
        st.own.retain(|jid, e| {
            let shown = read.get(jid).is_some_and(|r| !e.beats(r));
            let expired =
                e.room.is_none() && now.saturating_sub(e.t) >= GONE_KEEP && !unsent.contains(jid);
            !shown && !expired
        });
        st.read = read;
        st.carried = carried;
        st.read_at = Some(Instant::now());
        st.ever_read = true;
        st.appended = 0;
    }

    async fn compact(&self, store: &Store, raw: usize) {
        let taken = match self.get(store, true).await {
            Ok(d) => d,
            Err(e) => {
                warn!("could not compact the room directory: {e}");
                return;
            }
        };
        let entries = match parse(&taken) {
            Ok(e) => e,
            Err(e) => {
                // Put back as it was (it was valid a moment ago).
                warn!("the room directory taken for compaction is not valid ({e}); put back");
                if let Err(e) = self.append(store, taken).await {
                    warn!("could not put the room directory back: {e}");
                }
                return;
            }
        };
        let kept = {
            let mut st = self.state();
            // With what was just read: a lost answer to `take` (taken, then sent again
            // and answered empty) loses nothing that read had.
            let all = fold(entries.into_iter().chain(st.read.values().cloned()));
            let kept = compacted(all, now_micros());
            st.read = kept.clone();
            st.carried.clear();
            kept
        };
        match self.append(store, render(kept.values())).await {
            Ok(()) => info!(entries = raw, kept = kept.len(), "room directory compacted"),
            Err(e) => {
                warn!("could not store the compacted room directory (retried later): {e}");
                self.state().unsent.extend(kept.into_values());
            }
        }
    }

    /// On start (once storage answers): the list of earlier versions goes into the log;
    /// the temporary rooms the log says this instance held in an earlier run ended with
    /// it.
    pub async fn start(&self, store: &Store) -> Result<(), StoreError> {
        self.migrate(store).await?;
        self.refresh(store, true).await?;
        let dead = {
            let mut st = self.state();
            let dead: Vec<String> = st
                .view()
                .into_iter()
                .filter(|e| e.t < self.started)
                .filter(|e| {
                    e.room
                        .as_ref()
                        .is_some_and(|l| !l.persistent && l.instance == self.instance)
                })
                .map(|e| e.jid.clone())
                .collect();
            for jid in &dead {
                st.record(jid.clone(), None);
            }
            dead.len()
        };
        if dead > 0 {
            info!(
                rooms = dead,
                "temporary rooms of this instance's last run ended"
            );
        }
        self.flush(store).await?;
        let st = self.state();
        info!(
            rooms = st.view().iter().filter(|e| e.room.is_some()).count(),
            "room directory read"
        );
        Ok(())
    }

    async fn migrate(&self, store: &Store) -> Result<(), StoreError> {
        let Some(x) = store.xdb() else {
            return Ok(());
        };
        let data = x.get(&self.service, NS_OLD).await?;
        if data.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let entries = match parse_old(&data) {
            Ok(e) => e,
            Err(e) => {
                warn!("the list of persistent rooms of an earlier version is not valid, left as it is: {e}");
                return Ok(());
            }
        };
        if !entries.is_empty() {
            self.append(store, render(&entries)).await?;
        }
        x.delete(&self.service, NS_OLD).await?;
        info!(
            rooms = entries.len(),
            "list of persistent rooms moved into the room directory's log"
        );
        Ok(())
    }

    /// Reads (or takes) the log.
    async fn get(&self, store: &Store, take: bool) -> Result<Vec<u8>, StoreError> {
        match store.xdb() {
            Some(x) if take => Ok(x.take(&self.service, NS_LOG).await?.to_vec()),
            Some(x) => Ok(x.get(&self.service, NS_LOG).await?.to_vec()),
            None => {
                let mut m = self.memory.lock().expect("log lock");
                Ok(if take {
                    std::mem::take(&mut *m)
                } else {
                    m.clone()
                })
            }
        }
    }

    async fn append(&self, store: &Store, data: impl Into<Vec<u8>>) -> Result<(), StoreError> {
        let data = data.into();
        match store.xdb() {
            Some(x) => Ok(x.append(&self.service, NS_LOG, data, None).await?),
            None => {
                self.memory
                    .lock()
                    .expect("log lock")
                    .extend_from_slice(&data);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(jid: &str, t: u64, name: &str, creator: &str, persistent: bool) -> Entry {
        Entry {
            jid: jid.to_owned(),
            t,
            room: Some(Listing {
                name: name.to_owned(),
                public: true,
                persistent,
                creator: (!creator.is_empty()).then(|| creator.to_owned()),
                instance: "muc".to_owned(),
            }),
        }
    }

    fn gone(jid: &str, t: u64) -> Entry {
        Entry {
            jid: jid.to_owned(),
            t,
            room: None,
        }
    }

    fn names(folded: &BTreeMap<String, Entry>) -> Vec<(String, Option<String>)> {
        folded
            .values()
            .map(|e| (e.jid.clone(), e.room.as_ref().map(|l| l.name.clone())))
            .collect()
    }

    #[test]
    fn entries_round_trip() {
        let entries = vec![
            room("a@conf", 5, "It's <A> & co", "alice@x", true),
            room("b@conf", 6, "", "", false),
            gone("c@conf", 7),
        ];
        let text = render(&entries);
        assert_eq!(parse(text.as_bytes()).unwrap(), entries);
        assert!(parse(b"").unwrap().is_empty());
        assert!(parse(b"<room jid='x@conf'/><room t='1'/>")
            .unwrap()
            .is_empty());
        assert!(parse(b"<room").is_err());
    }

    #[test]
    fn the_greatest_t_wins_wherever_it_stands() {
        let folded = fold([
            room("a@conf", 9, "new", "", true),
            room("a@conf", 3, "old", "", true),
            room("b@conf", 1, "B", "", true),
            gone("b@conf", 2),
            gone("c@conf", 4),
            room("c@conf", 5, "again", "", false),
        ]);
        assert_eq!(
            names(&folded),
            [
                ("a@conf".to_owned(), Some("new".to_owned())),
                ("b@conf".to_owned(), None),
                ("c@conf".to_owned(), Some("again".to_owned())),
            ]
        );
        // A tie does not depend on the order: gone wins, then the greater listing.
        for order in [
            [room("d@conf", 1, "x", "", true), gone("d@conf", 1)],
            [gone("d@conf", 1), room("d@conf", 1, "x", "", true)],
        ] {
            assert_eq!(fold(order)["d@conf"].room, None);
        }
        let (x, y) = (
            room("e@conf", 1, "x", "", true),
            room("e@conf", 1, "y", "", true),
        );
        assert_eq!(fold([x.clone(), y.clone()]), fold([y, x]));
    }

    /// Instance A compacts (takes the log, folds it, appends the fold) while instance B
    /// appends newer entries between the take and the append: the old state A appends
    /// last does not come back.
    #[test]
    fn a_compaction_racing_an_append_loses_nothing() {
        let log = render(&[
            room("a@conf", 1, "A", "alice@x", true),
            room("a@conf", 2, "A2", "alice@x", true),
            room("b@conf", 3, "B", "bob@x", false),
        ]);
        // A takes the log.
        let taken = parse(log.as_bytes()).unwrap();
        // B appends to the (now empty) log: a@conf destroyed, c@conf created.
        let mut after = render(&[gone("a@conf", 10), room("c@conf", 11, "C", "", true)]);
        // A appends its fold.
        let folded = compacted(fold(taken), 12);
        after.push_str(&render(folded.values()));
        let now = fold(parse(after.as_bytes()).unwrap());
        assert_eq!(
            names(&now),
            [
                ("a@conf".to_owned(), None),
                ("b@conf".to_owned(), Some("B".to_owned())),
                ("c@conf".to_owned(), Some("C".to_owned())),
            ]
        );
    }

    #[test]
    fn compaction_drops_old_gone_entries_only() {
        let now = GONE_KEEP * 3;
        let kept = compacted(
            fold([
                room("a@conf", 1, "A", "", true),
                gone("b@conf", 2),
                gone("c@conf", now - 5),
            ]),
            now,
        );
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["a@conf", "c@conf"]);
    }

    #[test]
    fn the_list_of_earlier_versions_becomes_entries() {
        let old = b"<rooms xmlns='urn:jabberd-rs:muc:rooms:0'><room jid='a@conf' name='A' public='true'/><room jid='b@conf' name='' public='false'/></rooms>";
        let entries = parse_old(old).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].t, 1);
        assert!(entries.iter().all(|e| e.room.as_ref().unwrap().persistent));
        // Any entry written since wins over the migrated one.
        let folded = fold(entries.into_iter().chain([gone("a@conf", 2)]));
        assert_eq!(folded["a@conf"].room, None);
        assert!(!folded["b@conf"].room.as_ref().unwrap().public);
        assert!(parse_old(b"").unwrap().is_empty());
    }

    fn shared(of: &Directory, instance: &str, max: usize) -> Directory {
        let mut d = Directory::for_service("conf", instance, max);
        d.memory = of.memory.clone();
        d
    }

    fn bare(j: &str) -> BareJid {
        BareJid::new(j).unwrap()
    }

    /// Two instances share the log: each lists the other's rooms once it read the
    /// log again, counts the rooms a user created on either, and an instance that
    /// restarts ends the temporary rooms it held.
    #[tokio::test]
    async fn instances_share_rooms_and_counts() {
        let store = Store::Memory;
        let one = Directory::for_service("conf", "muc", 2);
        let two = shared(&one, "muc-2", 2);
        let alice = bare("alice@x");
        assert!(one.take(&alice, &bare("a@conf")));
        one.flush(&store).await.unwrap();
        assert!(two.take(&alice, &bare("b@conf")));
        two.flush(&store).await.unwrap();
        // `one` has not read the log since: it does not know b@conf yet.
        assert_eq!(one.rooms_of(&alice), 1);
        one.refresh(&store, true).await.unwrap();
        assert_eq!(one.rooms_of(&alice), 2);
        assert!(!one.take(&alice, &bare("c@conf")), "at the limit");
        // Creating a room again that the log says is alice's does not count it twice.
        assert!(one.take(&alice, &bare("a@conf")));
        // b@conf ends (on `two`): alice may create another.
        two.ended(&bare("b@conf"));
        two.flush(&store).await.unwrap();
        one.refresh(&store, true).await.unwrap();
        assert_eq!(one.rooms_of(&alice), 1);
        assert!(one.take(&alice, &bare("c@conf")));
        one.flush(&store).await.unwrap();
        // `one` restarts: its temporary rooms a@conf and c@conf died with it.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let again = shared(&one, "muc", 2);
        again.start(&store).await.unwrap();
        two.refresh(&store, true).await.unwrap();
        assert_eq!(two.rooms_of(&alice), 0);
        assert!(two.public().is_empty());
    }

    #[tokio::test]
    async fn the_log_is_compacted_and_reads_carry_rooms_over() {
        let store = Store::Memory;
        let one = Directory::for_service("conf", "muc", 0);
        let two = shared(&one, "muc-2", 0);
        // Many changes of a few rooms.
        let mut room = Room::new(
            bare("r@conf"),
            Arc::new(crate::config::RoomLimits {
                max_occupants: 3,
                default_max_users: 3,
                max_history: 10,
                default_history: 5,
                rate: 1.0,
                burst: 3.0,
                archive: false,
                archive_max_items: None,
            }),
            Arc::new(vec![]),
            Arc::from("salt"),
        );
        room.fresh = false;
        room.config.persistent = true;
        room.config.public = true;
        one.refresh(&store, true).await.unwrap();
        two.refresh(&store, true).await.unwrap();
        for k in 0..COMPACT_MIN + 10 {
            room.config.name = format!("name {k}");
            one.note(&room);
        }
        one.flush(&store).await.unwrap();
        two.refresh(&store, true).await.unwrap();
        assert_eq!(
            two.public(),
            [("r@conf".to_owned(), format!("name {}", COMPACT_MIN + 9))]
        );
        // `one` read the log (after so many appends) and compacted it.
        let log = parse(&one.memory.lock().unwrap()).unwrap();
        assert_eq!(log.len(), 1, "{log:?}");
        // A compaction in flight (the log taken, not yet appended): a reader keeps
        // the rooms its last read had.
        let taken = std::mem::take(&mut *one.memory.lock().unwrap());
        two.refresh(&store, true).await.unwrap();
        assert_eq!(two.public().len(), 1);
        one.memory.lock().unwrap().extend_from_slice(&taken);
    }
}
