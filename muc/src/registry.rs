//! One task per room: stanzas for a room are queued to its task and handled in order;
//! the task writes each batch's output to the router at once and stores what changed.
//! Rooms are found by their bare JID; a room with nothing left to do ends its task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use jid::BareJid;
use jrs_stream::Stanza;
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::config::Mode;
use crate::mam;
use crate::room::moderate::{self, Moderation};
use crate::room::{self, HistoryItem, Out, Room};
use crate::store::StoreError;
use crate::xml;
use crate::Ctx;
use jrs_stream::StanzaErrorCondition;
use jrs_xdb::XdbError;

/// Stanzas handled before the batch is written, and the most bytes a batch grows to
/// before it is (a big room's fan-out).
const BATCH: usize = 64;
const BATCH_BYTES: usize = 1 << 20;

#[derive(Default)]
pub struct Registry {
    rooms: Mutex<HashMap<String, mpsc::Sender<Stanza>>>,
}

/// The service is stopping: every loaded room tells its occupants (status 332), then
/// the rooms are given up to 2 s to have sent it.
pub async fn shut_down(ctx: &Arc<Ctx>) {
    let rooms: Vec<mpsc::Sender<Stanza>> = ctx
        .rooms
        .rooms
        .lock()
        .expect("rooms lock")
        .values()
        .cloned()
        .collect();
    info!(
        rooms = rooms.len(),
        "stopping: occupants told the service goes down"
    );
    let notice = Stanza::parse(bytes::Bytes::from(format!("<{}/>", room::SHUTDOWN)))
        .expect("a well-formed element");
    for tx in &rooms {
        let _ = tx.send(notice.clone()).await;
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline
        && rooms.iter().any(|tx| tx.capacity() < tx.max_capacity())
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // What the last batches wrote is on its way out of the link.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Queues `stanza` for the task of `room`, starting the task if the room is not loaded.
pub fn dispatch(ctx: &Arc<Ctx>, room: BareJid, stanza: Stanza) {
    let mut rooms = ctx.rooms.rooms.lock().expect("rooms lock");
    let stanza = match rooms.get(room.as_str()) {
        Some(tx) => match tx.try_send(stanza) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(stanza)) => {
                // The room is behind: refuse rather than hold up the link's reader.
                drop(rooms);
                debug!(room = %room, "room queue full");
                if let Some(r) = xml::error_reply(
                    &stanza,
                    xml::RESOURCE_CONSTRAINT,
                    "the room is busy; try again",
                    "",
                ) {
                    ctx.send(r.freeze());
                }
                return;
            }
            Err(mpsc::error::TrySendError::Closed(stanza)) => stanza,
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
    let (tx, rx) = mpsc::channel(ctx.config.room_queue);
    let _ = tx.try_send(stanza);
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

fn new_room(ctx: &Ctx, jid: &BareJid) -> Room {
    let mut room = Room::new(
        jid.clone(),
        ctx.limits.clone(),
        ctx.create_domains.clone(),
        ctx.salt.clone(),
    );
    room.creations = ctx.directory.clone();
    room
}

async fn run(ctx: Arc<Ctx>, jid: BareJid, mut rx: mpsc::Receiver<Stanza>) {
    let mut room = new_room(&ctx, &jid);
    match ctx.store.load(&mut room).await {
        Ok(true) => {
            info!("persistent room loaded");
            // Its directory entry (with its creator) is in the log.
            ctx.directory.read_once(&ctx.store).await;
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
                        xml::SERVICE_UNAVAILABLE_WAIT,
                        "storage is not available",
                        "",
                    ) {
                        ctx.send(r.freeze());
                    }
                }
                if remove_if_idle(&ctx, &jid, &rx) {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }
    }
    let mut archived = false;
    loop {
        // An empty persistent room stays loaded a while (its history, disco), then
        // goes: rooms loaded only by disco or a failed join cannot pile up.
        let first = if room.occupants.is_empty() && !room.finished() {
            match tokio::time::timeout(ctx.config.idle_unload, rx.recv()).await {
                Ok(first) => first,
                Err(_) => {
                    if remove_if_idle(&ctx, &jid, &rx) {
                        debug!("idle room unloaded");
                        return;
                    }
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(first) = first else {
            return;
        };
        let mut out = Out {
            fanout: ctx.config.mode == Mode::Router,
            ..Out::default()
        };
        let now = unix_now();
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(s) = next.take() {
            handled += 1;
            if ctx.config.max_rooms_per_user > 0 && may_create(&room, &s) {
                // The rooms the user created on every instance (`max-rooms-per-user`).
                if let Err(e) = ctx.directory.refresh(&ctx.store, false).await {
                    debug!("could not read the room directory: {e}");
                }
            }
            handle_one(&ctx, &mut room, &s, now, &mut out).await;
            if handled < BATCH && out.buf.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
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
        // After the batch's messages are archived, so that they can be retracted.
        for m in std::mem::take(&mut out.moderations) {
            archived |= moderate_archived(&ctx, &mut room, m).await;
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
                        xml::SERVICE_UNAVAILABLE_WAIT,
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
        // The room's directory entry (a room that ended is `gone`: no longer one of its
        // creator's rooms). Kept and appended again later when storage fails.
        ctx.directory.note(&room);
        if let Err(e) = ctx.directory.flush(&ctx.store).await {
            warn!("could not store the room directory's entries (retried later): {e}");
        }
        if room.finished() {
            if remove_if_idle(&ctx, &jid, &rx) {
                debug!("room unloaded");
                return;
            }
            // Stanzas arrived while the room ended: they meet a new room of that name
            // (its stored state, if any, was deleted).
            room = new_room(&ctx, &jid);
        }
    }
}

/// Handles one stanza into the batch `out`. A stanza that changes what is stored is
/// stored before anything it produced is sent (what the batch produced before it goes
/// out first): if storing fails, the room is put back as it was, what the stanza
/// produced is dropped, and the sender is answered `internal-server-error` (wait).
/// Stanzas are stored in order, so a batch that deletes and then saves ends saved.
async fn handle_one(ctx: &Ctx, room: &mut Room, s: &Stanza, now: f64, out: &mut Out) {
    let snapshot = Room::may_persist(s).then(|| room.snapshot());
    let mark = out.buf.len();
    room.handle(s, now, out);
    if !out.save && !out.delete {
        return;
    }
    let delete = out.delete;
    out.save = false;
    out.delete = false;
    let produced = out.buf.split_off(mark);
    if !out.buf.is_empty() {
        ctx.send(out.buf.split().freeze());
    }
    let stored = if delete {
        ctx.store.delete(&room.jid).await
    } else {
        ctx.store.save(room).await
    };
    match stored {
        Ok(()) => out.buf.unsplit(produced),
        Err(e) => {
            warn!("could not store the room: {e}");
            if let Some(snapshot) = snapshot {
                room.restore(snapshot);
            }
            if let Some(r) = xml::error_reply(
                s,
                xml::INTERNAL_SERVER_ERROR,
                "the change could not be stored; try again",
                "",
            ) {
                out.buf.extend_from_slice(&r);
            }
        }
    }
}

/// A retraction (XEP-0425) in an archived room: the message is looked up in the archive
/// and replaced by its tombstone, then the room tells its occupants (and archives that).
/// Returns whether something was archived.
async fn moderate_archived(ctx: &Ctx, room: &mut Room, m: Moderation) -> bool {
    let refuse = |c, text: &str| {
        if let Some(r) = xml::error_reply(&m.iq, c, text, "") {
            ctx.send(r.freeze());
        }
        false
    };
    let now = unix_now();
    match ctx.store.archive_item(&room.jid, &m.id).await {
        Ok(Some(item)) => match moderate::tombstone(&item.payload, &m, now) {
            Some(t) => {
                if let Err(e) = ctx.store.archive_retract(&room.jid, &m.id, &t).await {
                    warn!(id = %m.id, "could not replace the message with its tombstone: {e}");
                    return refuse(
                        xml::INTERNAL_SERVER_ERROR,
                        "the message could not be retracted; try again",
                    );
                }
            }
            None => warn!(id = %m.id, "archived item is not a message; left as it is"),
        },
        // Not archived (archiving was off then, or failed), yet in the history.
        Ok(None) if room.history.iter().any(|h| h.id == m.id) => {}
        Ok(None) => return refuse(xml::ITEM_NOT_FOUND, "no message of this room has that id"),
        Err(e) => {
            warn!("archive lookup failed: {e}");
            return refuse(xml::SERVICE_UNAVAILABLE_WAIT, "storage is not available");
        }
    }
    if room.destroyed {
        return refuse(xml::ITEM_NOT_FOUND, "the room was destroyed");
    }
    let mut out = Out {
        fanout: ctx.config.mode == Mode::Router,
        ..Out::default()
    };
    room.retracted(&m, now, &mut out);
    ctx.send(out.buf.split().freeze());
    if out.archive.is_empty() {
        return false;
    }
    if let Err(e) = ctx
        .store
        .archive(&room.jid, &out.archive, ctx.limits.archive_max_items)
        .await
    {
        warn!("could not archive the retraction: {e}");
    }
    true
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
                // Retractions and tombstones are for clients catching up through the
                // archive; joiners never get the retracted message at all.
                if moderate::is_retraction(&item.payload) {
                    continue;
                }
                let Some(message) = mam::history_template(&item.payload) else {
                    continue;
                };
                let at = item.time as f64 / 1e6;
                let chars = message.head.len() + message.tail.len();
                room.history.push_back(HistoryItem {
                    message,
                    id: item.id,
                    at,
                    stamp: room::stamp(at),
                    chars,
                });
            }
        }
        Err(e) => warn!("could not read the room's history from its archive: {e}"),
    }
}

/// Whether `s` may create the room: a join of a room that does not exist.
fn may_create(room: &Room, s: &Stanza) -> bool {
    room.fresh
        && room.occupants.is_empty()
        && !room.locked
        && s.name() == "presence"
        && s.kind().is_none()
}

/// Removes the room from the registry unless stanzas arrived meanwhile (senders queue
/// under the same lock, so none is lost).
fn remove_if_idle(ctx: &Ctx, jid: &BareJid, rx: &mpsc::Receiver<Stanza>) -> bool {
    let mut rooms = ctx.rooms.rooms.lock().expect("rooms lock");
    if rx.is_empty() {
        rooms.remove(jid.as_str());
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoomLimits;

    fn persistent(jid: &str, name: &str) -> Room {
        let limits = RoomLimits {
            max_occupants: 3,
            default_max_users: 3,
            max_history: 10,
            default_history: 5,
            rate: 1.0,
            burst: 3.0,
            archive: false,
            archive_max_items: None,
        };
        let mut r = Room::new(
            BareJid::new(jid).unwrap(),
            Arc::new(limits),
            Arc::new(vec![]),
            Arc::from("salt"),
        );
        r.fresh = false;
        r.config.persistent = true;
        r.config.name = name.to_owned();
        r
    }

    fn stanza(xml: &str) -> Stanza {
        Stanza::parse(bytes::Bytes::from(xml.to_owned())).unwrap()
    }

    /// Storage that fails (an xdb client without a router link): the owner's change is
    /// answered `internal-server-error` (wait), never `result`, and is undone.
    #[tokio::test]
    async fn a_change_that_cannot_be_stored_is_refused_and_undone() {
        let node = jrs_config::Node::parse_str(
            "<muc><router name='muc' secret='s'/><service>conf</service></muc>",
            Arc::new(std::path::PathBuf::from("muc.xml")),
        )
        .unwrap();
        let config = crate::config::MucConfig::from_node(&node).unwrap();
        let store = crate::store::Store::Xdb(jrs_xdb::client::XdbClient::new(
            "muc",
            std::time::Duration::from_millis(50),
        ));
        let ctx = crate::Ctx::detached(config, store);
        let mut room = persistent("r@conf", "R");
        room.affiliations
            .insert(BareJid::new("alice@x").unwrap(), room::Affiliation::Owner);
        let mut out = Out::default();
        let ban = stanza("<iq from='alice@x/a' to='r@conf' type='set' id='b'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='outcast' jid='eve@x'/></query></iq>");
        handle_one(&ctx, &mut room, &ban, 1.0, &mut out).await;
        let text = String::from_utf8(out.buf.to_vec()).unwrap();
        assert!(!text.contains("type='result'"), "{text}");
        assert!(
            text.contains("<error type='wait'><internal-server-error "),
            "{text}"
        );
        assert!(!room
            .affiliations
            .contains_key(&BareJid::new("eve@x").unwrap()));
        assert!(!out.save && !out.delete);
    }

    fn memory_ctx(rooms: &str) -> Arc<crate::Ctx> {
        let node = jrs_config::Node::parse_str(
            &format!("<muc><router name='conf' secret='s'/><service>conf</service><plain/><storage>memory</storage>{rooms}</muc>"),
            Arc::new(std::path::PathBuf::from("muc.xml")),
        )
        .unwrap();
        let config = crate::config::MucConfig::from_node(&node).unwrap();
        Arc::new(crate::Ctx::detached(config, crate::store::Store::Memory))
    }

    fn loaded(ctx: &crate::Ctx) -> usize {
        ctx.rooms.rooms.lock().unwrap().len()
    }

    /// An empty persistent room is unloaded after `idle-unload`; a room's queue is
    /// bounded (a full one refuses, never blocks the reader).
    #[tokio::test]
    async fn idle_rooms_are_unloaded_and_queues_are_bounded() {
        let ctx = memory_ctx("<rooms idle-unload='1' room-queue='2'/>");
        let room = BareJid::new("r@conf").unwrap();
        for xml in [
            "<presence from='a@x/a' to='r@conf/A'><x xmlns='http://jabber.org/protocol/muc'/></presence>",
            "<iq from='a@x/a' to='r@conf' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_persistentroom'><value>1</value></field></x></query></iq>",
        ] {
            dispatch(&ctx, room.clone(), stanza(xml));
        }
        // The queue holds two (the task has not run yet): a third at once is refused
        // at once (its error is dropped here: no link), the reader never waits.
        assert_eq!(ctx.rooms.rooms.lock().unwrap()["r@conf"].capacity(), 0);
        dispatch(
            &ctx,
            room.clone(),
            stanza("<presence from='a@x/a' to='r@conf/A' type='unavailable'/>"),
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(loaded(&ctx), 1);
        dispatch(
            &ctx,
            room.clone(),
            stanza("<presence from='a@x/a' to='r@conf/A' type='unavailable'/>"),
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(loaded(&ctx), 1, "persistent: stays a while");
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert_eq!(loaded(&ctx), 0, "unloaded when idle");
    }
}
