//! One task per active user: everything about a user (sessions, presence, roster) is
//! handled in order by that user's task, so no locks are held across storage requests
//! and users never wait for each other. A task exists while the user has sessions or
//! work queued; it ends (and its cached roster with it) when both are gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jid::{BareJid, FullJid, Jid};
use tokio::sync::mpsc;
use tracing::{debug, error, Instrument};

use jrs_stream::Stanza;

use crate::context::Ctx;
use crate::user::User;

/// A session as c2s names it.
#[derive(Debug, Clone)]
pub struct SessionRef {
    /// The c2s instance holding the client connection (`c2s-1`).
    pub c2s: String,
    pub sid: String,
    pub jid: FullJid,
}

/// A `normal` packet addressed to a user.
#[derive(Debug)]
pub struct Inbound {
    pub stanza: Stanza,
    pub to: Jid,
    /// The sender, when its address parses.
    pub from: Option<Jid>,
}

#[derive(Debug)]
pub enum Event {
    Start(SessionRef),
    /// A stanza from the client, already checked to be one message, presence or iq.
    Stanza(SessionRef, Stanza),
    End(SessionRef),
    Inbound(Inbound),
    /// A c2s instance disconnected: its sessions are gone.
    C2sGone(String),
    /// Our own router link was lost: c2s dropped every session of ours.
    LinkLost,
}

#[derive(Default)]
pub struct Registry {
    /// Events travel boxed: a queue allocates its slots 32 at a time, and an idle user
    /// should cost 32 pointers, not 32 events.
    tasks: Mutex<HashMap<BareJid, mpsc::Sender<Box<Event>>>>,
}

impl Registry {
    /// Hands `event` to the user's task, starting one if needed. Gives the event back
    /// when the user's queue is full.
    pub fn dispatch(&self, ctx: &Arc<Ctx>, user: &BareJid, event: Event) -> Result<(), Box<Event>> {
        let mut tasks = self.tasks.lock().expect("registry lock");
        let event = Box::new(event);
        let event = match tasks.get(user) {
            Some(tx) => match tx.try_send(event) {
                Ok(()) => return Ok(()),
                // An end must not be lost: it frees the session. Wait for room.
                Err(mpsc::error::TrySendError::Full(e)) if matches!(*e, Event::End(_)) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(e).await;
                    });
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Full(e)) => return Err(e),
                // The task died (a panic): start a new one.
                Err(mpsc::error::TrySendError::Closed(e)) => e,
            },
            None => event,
        };
        let (tx, rx) = mpsc::channel(ctx.config.user_queue);
        tx.try_send(event).expect("a new queue has room");
        tasks.insert(user.clone(), tx);
        let span = tracing::info_span!("user", jid = %user);
        let user = User::new(ctx.clone(), user.clone());
        tokio::spawn(user.run(rx).instrument(span));
        Ok(())
    }

    /// Sends `event` to every user task (link notices); waits where a queue is full.
    pub fn broadcast(&self, make: impl Fn() -> Event) {
        let tasks: Vec<mpsc::Sender<Box<Event>>> = self
            .tasks
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        for tx in tasks {
            match tx.try_send(Box::new(make())) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(e)) => {
                    tokio::spawn(async move {
                        let _ = tx.send(e).await;
                    });
                }
            }
        }
    }

    /// Called by a user task with nothing left to do: removes it unless an event arrived
    /// meanwhile (checked under the lock dispatch holds while sending). True if removed.
    pub fn retire(&self, user: &BareJid, rx: &mpsc::Receiver<Box<Event>>) -> bool {
        let mut tasks = self.tasks.lock().expect("registry lock");
        if !rx.is_empty() {
            return false;
        }
        tasks.remove(user);
        debug!(jid = %user, "user task ends");
        true
    }
}

/// Logs a failed dispatch (queue full) and answers the sender where possible.
pub fn overloaded(ctx: &Ctx, event: Event) {
    use jrs_stream::StanzaErrorCondition::ResourceConstraint;
    let text = "too many stanzas queued for this user; try again later";
    match event {
        Event::Inbound(inb) => {
            error!(to = %inb.to, "user queue full: stanza refused");
            if let Some(reply) = inb.stanza.error_reply(ResourceConstraint, text) {
                ctx.send(reply);
            }
        }
        Event::Stanza(s, stanza) => {
            error!(jid = %s.jid, "user queue full: client stanza refused");
            if let Some(reply) = stanza.error_reply(ResourceConstraint, text) {
                let packet = crate::sessions::packet(ctx, "stanza", &s, &reply);
                ctx.send(packet);
            }
        }
        Event::Start(s) => {
            error!(jid = %s.jid, "user queue full: session refused");
            ctx.send(crate::sessions::refuse_start(
                ctx,
                &s,
                ResourceConstraint,
                text,
            ));
        }
        other => error!("user queue full: {other:?} dropped"),
    }
}
