//! Archive appends of every user of this sm, sent to storage in batches: one
//! `archive-append` per domain with each item naming its owner, so that under load one
//! storage request (and one answer, and two router hops) carries many messages, and a
//! message's payload is copied once, into the batch.
//!
//! An item is queued by the user's task and sent [`WINDOW`] later with everything
//! archived meanwhile (or at once when the batch is full), so that messages coming one
//! at a time share batches too: nothing waits for the archive copy (storage answers
//! before it is on disk, `flush='later'`), and a batch per message was most of what
//! archiving a lone message cost (docs/benchmarks.md, "Writes nothing waits for").
//! Storage applies each owner's requests in the order they arrive; before any archive
//! read the module calls [`Writer::flush`], so a query sees everything archived before
//! it. When sm stops, [`Writer::drain`] sends what is queued and waits for the answers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jid::Jid;
use tracing::{error, warn};

use jrs_xdb::archive::{parse_failures, BatchWriter, Retention};
use jrs_xdb::Flush;

use crate::host::{Ctx, Packet, User};
use crate::xml::NS_CLIENT;

use super::ARCHIVE;

/// Most bytes one batch takes before it is sent (about 200 chat messages).
const BATCH_BYTES: usize = 64 * 1024;

/// How long an item waits for others to share its batch.
const WINDOW: Duration = Duration::from_millis(5);

/// How long a stopping sm waits for the answers to its last batches.
const DRAIN_AT_MOST: Duration = Duration::from_secs(2);

pub struct Writer {
    retention: Retention,
    /// Whether storage answers a batch before it is on disk (`<mam flush>`).
    flush: Flush,
    queue: Mutex<Queue>,
    /// Batches sent and not answered yet.
    unanswered: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Queue {
    /// Items not yet sent, by domain (storage requests are routed by domain).
    batches: BTreeMap<String, BatchWriter>,
    /// A task will send them.
    scheduled: bool,
}

impl Writer {
    pub fn new(retention: Retention, flush: Flush) -> Writer {
        Writer {
            retention,
            flush,
            queue: Mutex::new(Queue::default()),
            unanswered: Arc::default(),
        }
    }

    /// Archives `p` for user `u` as item (`id`, `time`) with `with`.
    pub fn push(self: &Arc<Self>, u: &User, (id, time): (String, u64), with: &Jid, p: &Packet) {
        #[cfg(test)]
        if let crate::host::store::Store::Memory(m) = &u.ctx.store {
            // Storage in memory (unit tests) keeps it at once.
            let item = jrs_xdb::archive::Item {
                id,
                time,
                with: with.to_string(),
                payload: p.forwardable(),
            };
            m.lock()
                .unwrap()
                .archive_append(&u.bare, ARCHIVE, &[item], self.retention);
            return;
        }
        // A batch must fit one packet on the router link, with the request around it.
        let budget = u
            .ctx
            .config
            .fragment_max()
            .saturating_sub(2048)
            .min(BATCH_BYTES);
        if p.bytes().len() + 512 > budget {
            warn!(bytes = p.bytes().len(), "message too large to archive");
            return;
        }
        let domain = u.jid.domain().as_str();
        let mut q = self.queue.lock().expect("writer lock");
        // Looked up by `&str`: a copy of the domain only for its first batch.
        if !q.batches.contains_key(domain) {
            q.batches.insert(domain.to_owned(), BatchWriter::default());
        }
        let batch = q.batches.get_mut(domain).expect("inserted above");
        if batch.bytes() + p.bytes().len() + 512 > budget {
            let full = std::mem::take(batch);
            self.send(&u.ctx, domain, full);
        }
        q.batches.get_mut(domain).expect("inserted above").push(
            &u.bare,
            &id,
            time,
            with.as_str(),
            |out| p.stanza().write_with_xmlns(Some(NS_CLIENT), out),
        );
        if !q.scheduled {
            q.scheduled = true;
            let (writer, ctx) = (self.clone(), u.ctx.clone());
            tokio::spawn(async move {
                // Let the messages of the next few milliseconds add theirs first.
                tokio::time::sleep(WINDOW).await;
                writer.flush(&ctx);
            });
        }
    }

    /// Sends everything queued, now.
    pub fn flush(&self, ctx: &Arc<Ctx>) {
        // Sent under the lock, so batches leave in the order they were filled.
        let mut q = self.queue.lock().expect("writer lock");
        q.scheduled = false;
        for (domain, batch) in std::mem::take(&mut q.batches) {
            self.send(ctx, &domain, batch);
        }
    }

    /// Sends everything queued and waits (at most [`DRAIN_AT_MOST`]) until every batch
    /// sent is answered: sm is stopping.
    pub async fn drain(&self, ctx: &Arc<Ctx>) {
        self.flush(ctx);
        let deadline = tokio::time::Instant::now() + DRAIN_AT_MOST;
        while self.unanswered.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                warn!(
                    batches = self.unanswered.load(Ordering::Acquire),
                    "stopping with archive batches unanswered"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends one batch (with the queue locked) and awaits its answer in a task.
    fn send(&self, ctx: &Arc<Ctx>, domain: &str, mut batch: BatchWriter) {
        let Some(xdb) = ctx.store.xdb() else { return };
        let count = batch.len();
        match xdb.archive_append_batch(domain, ARCHIVE, batch.take(), self.retention, self.flush) {
            Ok(sent) => {
                let ctx = ctx.clone();
                let answered = Answered::count(&self.unanswered);
                tokio::spawn(async move {
                    let _answered = answered;
                    let Some(xdb) = ctx.store.xdb() else { return };
                    match xdb.finish(sent).await.map(|answer| parse_failures(&answer)) {
                        Ok(Ok(failures)) => {
                            for (owner, r) in failures {
                                warn!(jid = %owner, condition = r.condition.name(),
                                      "message not archived: {}", r.text);
                            }
                        }
                        Ok(Err(e)) => warn!("unreadable answer to an archive batch: {}", e.text),
                        Err(e) => error!(count, "{count} messages not archived: {e}"),
                    }
                });
            }
            Err(e) => error!(count, "{count} messages not archived: {e}"),
        }
    }
}

/// A batch counted as unanswered until this is dropped (its task ended, however it
/// ended, or never ran).
struct Answered(Arc<AtomicUsize>);

impl Answered {
    fn count(unanswered: &Arc<AtomicUsize>) -> Answered {
        unanswered.fetch_add(1, Ordering::AcqRel);
        Answered(unanswered.clone())
    }
}

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
