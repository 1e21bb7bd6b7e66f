//! One task per room: stanzas for a room are queued to its task and handled in order;
//! the task writes each batch's output to the router at once and stores what changed.
//! Rooms are found by their bare JID; a room with nothing left to do ends its task.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use jid::BareJid;
use jrs_stream::Stanza;
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::mam;
use crate::room::{self, HistoryItem, Out, Room};
use crate::store::Listing;
use crate::store::StoreError;
use crate::xml;
use crate::Ctx;
use jrs_stream::StanzaErrorCondition;
use jrs_xdb::XdbError;

/// Stanzas handled before the batch is written, and the most bytes a batch grows to
/// before it is (a big room's fan-out).
const BATCH: usize = 64;
const BATCH_BYTES: usize = 1 << 20;

/// A room in the directory (disco#items of the service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub listing: Listing,
    pub persistent: bool,
}

#[derive(Default)]
pub struct Registry {
    rooms: Mutex<HashMap<String, mpsc::UnboundedSender<Stanza>>>,
    directory: Mutex<BTreeMap<String, Entry>>,
}

impl Registry {
    /// Public rooms: JID and name.
    pub fn public(&self) -> Vec<(String, String)> {
        self.directory
            .lock()
            .expect("directory lock")
            .iter()
            .filter(|(_, e)| e.listing.public)
            .map(|(j, e)| (j.clone(), e.listing.name.clone()))
            .collect()
    }

    /// Adds the stored list of persistent rooms to the directory.
    pub fn merge_index(&self, index: BTreeMap<String, Listing>) {
        let mut d = self.directory.lock().expect("directory lock");
        for (jid, listing) in index {
            d.entry(jid).or_insert(Entry {
                listing,
                persistent: true,
            });
        }
    }

    /// Updates the directory entry of `room`; the persistent rooms' index when it changed.
    fn update(&self, room: &Room) -> Option<BTreeMap<String, Listing>> {
        let key = room.jid.to_string();
        let entry = Entry {
            listing: Listing {
                name: room.config.name.clone(),
                public: room.config.public && !room.locked,
            },
            persistent: room.config.persistent && !room.destroyed,
        };
        let mut d = self.directory.lock().expect("directory lock");
        let old = d.get(&key).cloned();
        let listed = !room.finished() || entry.persistent;
        if listed {
            d.insert(key, entry.clone());
        } else {
            d.remove(&key);
        }
        let was = old.as_ref().filter(|e| e.persistent);
        let now = Some(&entry).filter(|e| listed && e.persistent);
        (was != now).then(|| {
            d.iter()
                .filter(|(_, e)| e.persistent)
                .map(|(j, e)| (j.clone(), e.listing.clone()))
                .collect()
        })
    }
}

/// Queues `stanza` for the task of `room`, starting the task if the room is not loaded.
pub fn dispatch(ctx: &Arc<Ctx>, room: BareJid, stanza: Stanza) {
    let mut rooms = ctx.rooms.rooms.lock().expect("rooms lock");
    let stanza = match rooms.get(room.as_str()) {
        Some(tx) => match tx.send(stanza) {
            Ok(()) => return,
            Err(e) => e.0,
        },
        None => stanza,
    };
    if rooms.len() >= ctx.config.max_rooms {
        drop(rooms);
        warn!(room = %room, "room limit reached");
        if let Some(r) = xml::error_reply(
            &stanza,
            xml::RESOURCE_CONSTRAINT,
            "too many rooms on this service",
            "",
        ) {
            ctx.send(r.freeze());
        }
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(stanza);
    rooms.insert(room.to_string(), tx);
    drop(rooms);
    let span = tracing::info_span!("room", room = %room);
    tokio::spawn(run(ctx.clone(), room, rx).instrument(span));
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn run(ctx: Arc<Ctx>, jid: BareJid, mut rx: mpsc::UnboundedReceiver<Stanza>) {
    let mut room = Room::new(
        jid.clone(),
        ctx.limits.clone(),
        ctx.create_domains.clone(),
        ctx.salt.clone(),
    );
    match ctx.store.load(&mut room).await {
        Ok(true) => {
            info!("persistent room loaded");
            if room.config.archive && room.config.history > 0 {
                load_history(&ctx, &mut room).await;
            }
        }
        Ok(false) => debug!("room task started"),
        Err(e) => {
            // Never start over a room whose stored state could not be read: refuse
            // what is queued, end, and let the next stanza try again.
            warn!("could not load the room: {e}");
            loop {
                while let Ok(s) = rx.try_recv() {
                    if let Some(r) = xml::error_reply(
                        &s,
                        xml::SERVICE_UNAVAILABLE,
                        "storage is not available",
                        "",
                    ) {
                        ctx.send(r.freeze());
                    }
                }
                if remove_if_idle(&ctx, &jid, &rx) {
                    return;
                }
            }
        }
    }
    let mut archived = false;
    while let Some(first) = rx.recv().await {
        let mut out = Out::default();
        let now = unix_now();
        room.handle(&first, now, &mut out);
        for _ in 1..BATCH {
            if out.buf.len() >= BATCH_BYTES {
                break;
            }
            match rx.try_recv() {
                Ok(s) => room.handle(&s, now, &mut out),
                Err(_) => break,
            }
        }
        // The whole batch in one write to the router.
        if !out.buf.is_empty() {
            ctx.send(out.buf.split().freeze());
        }
        if !out.archive.is_empty() {
            archived = true;
            if let Err(e) = ctx
                .store
                .archive(&room.jid, &out.archive, ctx.limits.archive_max_items)
                .await
            {
                warn!(messages = out.archive.len(), "could not archive: {e}");
            }
        }
        for q in out.queries.drain(..) {
            let answer = match ctx.store.archive_query(&room.jid, &q.query).await {
                Ok(page) => mam::answer(room.jid.as_str(), &q, &page),
                Err(StoreError::Xdb(XdbError::Refused(r)))
                    if r.condition == StanzaErrorCondition::ItemNotFound =>
                {
                    mam::error(room.jid.as_str(), &q, xml::ITEM_NOT_FOUND, &r.text)
                }
                Err(e) => {
                    warn!("archive query failed: {e}");
                    mam::error(
                        room.jid.as_str(),
                        &q,
                        xml::SERVICE_UNAVAILABLE,
                        "storage is not available",
                    )
                }
            };
            ctx.send(answer.into());
        }
        // A destroyed room's archive goes with it, and so does a temporary room's when
        // the room ends: a new room of the same name starts empty.
        let forget = room.destroyed || (archived && !room.config.persistent);
        if ctx.limits.archive && room.finished() && forget {
            if let Err(e) = ctx.store.archive_clear(&room.jid).await {
                warn!("could not empty the archive: {e}");
            }
            archived = false;
        }
        let stored = if out.delete {
            ctx.store.delete(&room.jid).await
        } else if out.save {
            ctx.store.save(&room).await
        } else {
            Ok(())
        };
        if let Err(e) = stored {
            warn!("could not store the room: {e}");
        }
        if let Some(index) = ctx.rooms.update(&room) {
            if let Err(e) = ctx.store.save_index(&ctx.config.service, &index).await {
                warn!("could not store the room list: {e}");
            }
        }
        if room.finished() {
            if remove_if_idle(&ctx, &jid, &rx) {
                debug!("room unloaded");
                return;
            }
            // Stanzas arrived while the room ended: they meet a new room of that name
            // (its stored state, if any, was deleted).
            room = Room::new(
                jid.clone(),
                ctx.limits.clone(),
                ctx.create_domains.clone(),
                ctx.salt.clone(),
            );
        }
    }
}

/// The last messages of a persistent room's archive become its history again.
async fn load_history(ctx: &Ctx, room: &mut Room) {
    let query = jrs_xdb::archive::Query {
        paging: jrs_xdb::archive::Paging {
            max: room.config.history,
            from_end: true,
            ..Default::default()
        },
        ..Default::default()
    };
    match ctx.store.archive_query(&room.jid, &query).await {
        Ok(page) => {
            for item in page.items {
                let Some(message) = mam::history_template(&item.payload) else {
                    continue;
                };
                let at = item.time as f64 / 1e6;
                let chars = message.head.len() + message.tail.len();
                room.history.push_back(HistoryItem {
                    message,
                    at,
                    stamp: room::stamp(at),
                    chars,
                });
            }
        }
        Err(e) => warn!("could not read the room's history from its archive: {e}"),
    }
}

/// Removes the room from the registry unless stanzas arrived meanwhile (senders queue
/// under the same lock, so none is lost).
fn remove_if_idle(ctx: &Ctx, jid: &BareJid, rx: &mpsc::UnboundedReceiver<Stanza>) -> bool {
    let mut rooms = ctx.rooms.rooms.lock().expect("rooms lock");
    if rx.is_empty() {
        rooms.remove(jid.as_str());
        true
    } else {
        false
    }
}
