//! One task per active user: everything about a user (sessions, presence, roster) is
//! handled in order by that user's task, so no locks are held across storage requests
//! and users never wait for each other. A task exists while the user has sessions or
//! work queued; it ends (and the state it cached with it) when both are gone.
//!
//! The registry only finds and starts tasks; what a task does is `host::task`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jid::BareJid;
use tokio::sync::mpsc;
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

/// Events travel boxed: a queue allocates its slots 32 at a time, and an idle user
/// should cost 32 pointers, not 32 events.
pub type Sender = mpsc::Sender<Box<Event>>;
pub type Receiver = mpsc::Receiver<Box<Event>>;

/// Events given to a user's task and not yet done with: counted up when one is queued,
/// down after the task sent what it produced. At zero, nothing the task will still send
/// can come before what is sent now (see `host::shortcut`).
pub type Pending = Arc<AtomicUsize>;

#[derive(Clone)]
struct Slot {
    tx: Sender,
    pending: Pending,
}

impl Slot {
    fn try_send(&self, event: Box<Event>) -> Result<(), mpsc::error::TrySendError<Box<Event>>> {
        // Counted first: the task may take the event and count it down at once.
        self.pending.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.try_send(event);
        if sent.is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// Queues a session control event on a full queue: waits for room elsewhere.
    fn send_later(&self, event: Box<Event>) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let (tx, pending) = (self.tx.clone(), self.pending.clone());
        tokio::spawn(async move {
            if tx.send(event).await.is_err() {
                pending.fetch_sub(1, Ordering::AcqRel);
            }
        });
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
                // Session control must not be lost (an end frees the session, a park
                // holds a client's stanzas): wait for room.
                Err(mpsc::error::TrySendError::Full(e)) if e.is_control() => {
                    slot.send_later(e);
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Full(e)) => return Err(e),
                // The task died (a panic): start a new one.
                Err(mpsc::error::TrySendError::Closed(e)) => e,
            },
            None => event,
        };
        let (tx, rx) = mpsc::channel(queue);
        let slot = Slot {
            tx,
            pending: Pending::default(),
        };
        slot.try_send(event).expect("a new queue has room");
        let pending = slot.pending.clone();
        tasks.insert(user.clone(), slot);
        spawn(rx, pending);
        Ok(())
    }

    /// Sends `event` to every user task (link notices); waits where a queue is full.
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
            match slot.try_send(Box::new(make())) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(e)) => slot.send_later(e),
            }
        }
    }

    /// Called by a user task with nothing left to do: removes it unless an event arrived
    /// meanwhile (checked under the lock dispatch holds while sending). True if removed.
    pub fn retire(&self, user: &BareJid, rx: &Receiver) -> bool {
        let mut tasks = self.tasks.lock().expect("registry lock");
        if !rx.is_empty() {
            return false;
        }
        tasks.remove(user);
        debug!(jid = %user, "user task ends");
        true
    }
}
