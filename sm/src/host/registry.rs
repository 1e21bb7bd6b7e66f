//! One task per active user: everything about a user (sessions, presence, roster) is
//! handled in order by that user's task, so no locks are held across storage requests
//! and users never wait for each other. A task exists while the user has sessions or
//! work queued; it ends (and the state it cached with it) when both are gone.
//!
//! The registry only finds and starts tasks; what a task does is `host::task`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_channel::mpsc;
use jid::BareJid;
use tracing::debug;

use jrs_stream::Stanza;

use crate::host::packet::Packet;
use crate::host::session::{Park, Queued, SessionKey, SessionRef};

#[derive(Debug)]
pub enum Event {
    Start(SessionRef),
    /// A stanza from the client, already checked to be one message, presence or iq.
    Stanza(SessionRef, Stanza),
    /// The client is gone; what it did not get comes back.
    End(SessionRef, Vec<Queued>),
    /// XEP-0198: the session may be resumed with this token.
    Resumable(SessionRef, String),
    /// The client's connection dropped; c2s wants to hand the session over.
    Hibernate(SessionRef),
    /// c2s hands the session over.
    Park(SessionRef, Park),
    /// A new connection (c2s `c2s`, session id `sid`) asks for the session `token`.
    Resume {
        c2s: String,
        sid: String,
        token: String,
    },
    /// The client has `count` more of the offline messages given to the session.
    Delivered(SessionRef, usize),
    /// A parked session's wait is over (if it is still parking number `generation`).
    HibernationEnds {
        key: SessionKey,
        generation: u64,
    },
    /// A `normal` packet addressed to the user (`to` set and parsed).
    Inbound(Packet),
    /// A c2s instance disconnected: its sessions are gone.
    C2sGone(String),
    /// c2s tells again a session sm lost (it restarted) or kept over its own link's loss.
    Restore(SessionRef, jrs_component::session::SessionState),
    /// Our own router link was lost and is back: every live session waits for its c2s
    /// to restore it.
    LinkLost,
    /// The wait for restores after [`Event::LinkLost`] is over: sessions not restored end.
    StaleOver,
    /// The stored queues of sessions that hibernated in sm's last run (read at
    /// start-up, `host::hibernation`).
    HibernatedBefore(bytes::Bytes),
    /// An administrator's question (jabberctl: sessions, kick, announce).
    Admin(crate::host::admin_query::Query),
    /// Work a module left for later comes due (an answer it waited for arrived):
    /// handed to that module's [`crate::host::Module::woken`].
    Wake {
        module: &'static str,
        data: Wake,
    },
}

/// What a module left for its [`Event::Wake`]: its own type, which it downcasts.
pub struct Wake(pub Box<dyn std::any::Any + Send>);

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wake(..)")
    }
}

impl Event {
    /// Session control: never refused for a full queue (it has no sender to answer).
    pub fn is_control(&self) -> bool {
        !matches!(
            self,
            Event::Start(_) | Event::Stanza(..) | Event::Inbound(_)
        )
    }
}

/// A user's queue: futures-channel's unbounded channel, bounded by the registry (see
/// `Slot::try_send`). tokio's bounded channel allocates a block of 32 slots with every
/// channel and keeps it, its state padded to cache lines: 800 bytes per user with a
/// session; this one about 100 (docs/benchmarks.md, "Channels that cost nothing idle").
/// Events travel boxed, so that the channel's empty node is a pointer, not an event.
pub type Sender = mpsc::UnboundedSender<Box<Event>>;
pub type Receiver = mpsc::UnboundedReceiver<Box<Event>>;

/// Events given to a user's task and not yet done with: counted up when one is queued,
/// down after the task sent what it produced. At zero, nothing the task will still send
/// can come before what is sent now (see `host::shortcut`).
pub type Pending = Arc<AtomicUsize>;

#[derive(Clone)]
struct Slot {
    tx: Sender,
    pending: Pending,
    /// How many events may be pending before stanzas are refused.
    queue: usize,
}

/// Why an event was not queued; it comes back.
enum Refused {
    /// The user's queue holds `queue` events already (session control is never refused).
    Full(Box<Event>),
    /// The task is gone (a panic).
    Closed(Box<Event>),
}

impl Slot {
    fn try_send(&self, event: Box<Event>) -> Result<(), Refused> {
        // Counted first: the task may take the event and count it down at once.
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        // Session control must not be lost (an end frees the session, a park holds a
        // client's stanzas): it goes past a full queue.
        if before >= self.queue && !event.is_control() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full(event));
        }
        self.tx.unbounded_send(event).map_err(|e| {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            Refused::Closed(e.into_inner())
        })
    }
}

#[derive(Default)]
pub struct Registry {
    tasks: Mutex<HashMap<BareJid, Slot>>,
}

impl Registry {
    /// Whether `user` has a task now (only then can it have sessions).
    pub fn is_loaded(&self, user: &BareJid) -> bool {
        self.tasks.lock().expect("registry lock").contains_key(user)
    }

    /// Users with a task now.
    pub fn user_count(&self) -> usize {
        self.tasks.lock().expect("registry lock").len()
    }

    /// Hands `event` to the user's task, starting one with `spawn` (given a queue of
    /// `queue` events and its pending count) if needed. Gives the event back when the
    /// user's queue is full.
    pub fn dispatch(
        &self,
        user: &BareJid,
        event: Event,
        queue: usize,
        spawn: impl FnOnce(Receiver, Pending),
    ) -> Result<(), Box<Event>> {
        let mut tasks = self.tasks.lock().expect("registry lock");
        let event = Box::new(event);
        let event = match tasks.get(user) {
            Some(slot) => match slot.try_send(event) {
                Ok(()) => return Ok(()),
                Err(Refused::Full(e)) => return Err(e),
                // The task died (a panic): start a new one.
                Err(Refused::Closed(e)) => e,
            },
            None => event,
        };
        let (tx, rx) = mpsc::unbounded();
        let slot = Slot {
            tx,
            pending: Pending::default(),
            queue,
        };
        if slot.try_send(event).is_err() {
            unreachable!("a new queue has room and a receiver");
        }
        let pending = slot.pending.clone();
        tasks.insert(user.clone(), slot);
        spawn(rx, pending);
        Ok(())
    }

    /// Sends `event` (session control: never refused) to every user task.
    pub fn broadcast(&self, make: impl Fn() -> Event) {
        // Copied out: a broadcast to every user must not hold up dispatch meanwhile.
        let tasks: Vec<Slot> = self
            .tasks
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        for slot in &tasks {
            let event = Box::new(make());
            debug_assert!(event.is_control());
            // A task that died takes nothing; the next dispatch starts a new one.
            let _ = slot.try_send(event);
        }
    }

    /// Called by a user task with nothing left to do (its own events counted down
    /// from `pending`): removes it unless an event arrived meanwhile (checked under the
    /// lock dispatch holds while sending). True if removed.
    pub fn retire(&self, user: &BareJid, pending: &Pending) -> bool {
        let mut tasks = self.tasks.lock().expect("registry lock");
        if pending.load(Ordering::Acquire) != 0 {
            return false;
        }
        tasks.remove(user);
        debug!(jid = %user, "user task ends");
        true
    }
}
