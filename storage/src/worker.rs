//! A spool thread: applies the requests of its owners in the order they came and makes
//! what they wrote durable in groups (group commit): it takes every request queued,
//! applies them, makes them durable at once and only then answers them. A write with
//! `flush='later'` (`jrs_xdb::Flush::Later`: a `set` or an `archive-append`) is answered
//! as soon as it is applied, and made durable with the next group commit, which comes
//! at the latest [`DEFERRED_AT_MOST`] later, or when xdb-file stops.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tracing::{debug, error};

use jrs_component::Outbox;
use jrs_metrics::storage::SERVED;
use jrs_stream::Stanza;
use jrs_xdb::{Op, Refusal, Request};

use crate::archive::Archives;
use crate::batch;
use crate::spool::{Owner, Spool};
use crate::{now, retention};

/// What a worker thread does: a request of one owner, or its part of a batch.
pub enum Job {
    /// With when it arrived (for the metrics).
    Request(Stanza, Outbox, Instant),
    Part(batch::Part),
}

/// Most requests answered by one group commit.
const MAX_BATCH: usize = 256;

/// Longest a write answered before its flush waits for it.
pub const DEFERRED_AT_MOST: Duration = Duration::from_secs(1);

/// Writes answered before their flush that make the next commit come at once.
const DEFERRED_WRITES_AT_MOST: usize = 4096;

/// Serves `queue` until every sender is gone, then flushes what is left.
pub fn run(queue: Receiver<Job>, mut spool: Spool, mut archives: Archives, hosts: Vec<String>) {
    // Since when writes that were answered wait for their flush.
    let mut deferred: Option<Instant> = None;
    loop {
        let next = match deferred {
            None => queue.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(since) => queue
                .recv_timeout((since + DEFERRED_AT_MOST).saturating_duration_since(Instant::now())),
        };
        let first = match next {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                flush_deferred(&mut spool, &mut archives);
                deferred = None;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        // Whether something in the batch must be on disk before its answer
        // (`Request::durable_before_answer`; a read may still write, repairing an archive
        // a crash tore, and that repair is flushed with the next commit).
        let mut flush_now = false;
        let answers: Vec<_> = batch
            .iter()
            .map(|job| match job {
                Job::Request(request, ..) => {
                    let (reply, ok, durable) = answer(&mut spool, &mut archives, &hosts, request);
                    flush_now |= durable;
                    Some((reply, ok))
                }
                Job::Part(part) => {
                    part.apply(&mut spool, &mut archives, &hosts);
                    flush_now |= part.durable_before_answer();
                    None
                }
            })
            .collect();
        let uncommitted = spool.uncommitted();
        let due = deferred.is_some_and(|since| since.elapsed() >= DEFERRED_AT_MOST)
            || uncommitted.is_some_and(|n| n >= DEFERRED_WRITES_AT_MOST);
        let durable = if flush_now || due {
            deferred = None;
            spool.commit()
        } else {
            if uncommitted.is_some() {
                deferred.get_or_insert_with(Instant::now);
            }
            Ok(())
        };
        if durable.is_err() {
            archives.clear();
        }
        for (job, reply) in batch.into_iter().zip(answers) {
            match (job, &durable, reply) {
                (Job::Request(request, outbox, start), Ok(()), Some((reply, ok))) => {
                    outbox.send(reply);
                    SERVED.answered(request.kind().unwrap_or(""), ok, start);
                }
                (Job::Request(request, outbox, start), Err(refusal), _) => {
                    SERVED.answered(request.kind().unwrap_or(""), false, start);
                    outbox.send(
                        request
                            .error_reply(refusal.condition, &refusal.text)
                            .expect("requests are never errors or results"),
                    );
                }
                (Job::Part(part), durable, _) => part.done(durable.as_ref().err()),
                (Job::Request(..), Ok(()), None) => unreachable!("requests answer"),
            }
        }
    }
    if deferred.is_some() {
        flush_deferred(&mut spool, &mut archives);
    }
}

/// Makes the writes answered before their flush durable. Nobody waits for this
/// commit: if it fails, the error is logged and those writes are lost (the spool's
/// cache is dropped with them, so reads return what is on disk).
fn flush_deferred(spool: &mut Spool, archives: &mut Archives) {
    if let Err(refusal) = spool.commit() {
        archives.clear();
        error!(
            "writes answered before their flush were lost: {}",
            refusal.text
        );
    }
}

/// Serves one request; always returns an answer: a result (true) or an error, and
/// whether what it wrote must be on disk before the answer goes (a request refused
/// midway may have written some of it).
fn answer(
    spool: &mut Spool,
    archives: &mut Archives,
    hosts: &[String],
    stanza: &Stanza,
) -> (bytes::Bytes, bool, bool) {
    let request = match Request::parse(stanza) {
        Ok(r) => r,
        Err(refusal) => return (jrs_xdb::refused(stanza, &refusal), false, false),
    };
    let durable = request.durable_before_answer();
    match serve(spool, archives, hosts, &request) {
        Ok(content) => (request.result(&content), true, durable),
        Err(refusal) => (jrs_xdb::refused(stanza, &refusal), false, durable),
    }
}

fn serve(
    spool: &mut Spool,
    archives: &mut Archives,
    hosts: &[String],
    request: &Request,
) -> Result<bytes::Bytes, Refusal> {
    let owner = Owner::parse(&request.owner)?;
    if !hosts.iter().any(|h| h == "*" || *h == owner.host) {
        return Err(Refusal::new(
            jrs_stream::StanzaErrorCondition::NotAllowed,
            format!("this storage does not serve '{}'", owner.host),
        ));
    }
    let ns = request.ns.as_str();
    let content = match request.op {
        Op::Get => spool.get(&owner, ns)?,
        Op::Set => {
            spool.set(&owner, ns, &request.content)?;
            bytes::Bytes::new()
        }
        Op::Delete => {
            if ns == "*" {
                archives.forget_under(&spool.owner_dir(&owner));
                spool.delete(&owner, ns)?;
            } else {
                spool.delete(&owner, ns)?;
                let dir = spool.archive_dir(&owner, ns);
                archives.delete(spool, &dir)?;
            }
            bytes::Bytes::new()
        }
        Op::Append => {
            spool.append(&owner, ns, &request.content, request.max_items)?;
            bytes::Bytes::new()
        }
        Op::Take => spool.take(&owner, ns)?,
        Op::ArchiveAppend => {
            let dir = spool.archive_dir(&owner, ns);
            archives.append(spool, &dir, &request.content, retention(request), now())?;
            bytes::Bytes::new()
        }
        Op::ArchiveQuery => {
            let dir = spool.archive_dir(&owner, ns);
            archives.query(spool, &dir, &request.content)?
        }
        Op::ArchiveTrim => {
            let dir = spool.archive_dir(&owner, ns);
            archives.trim(spool, &dir, retention(request), now())?;
            bytes::Bytes::new()
        }
        Op::ArchiveRetract => {
            let dir = spool.archive_dir(&owner, ns);
            archives.retract(spool, &dir, &request.content)?;
            bytes::Bytes::new()
        }
        Op::List if ns == jrs_xdb::LIST_CONTENTS => spool.contents(&owner)?.to_xml(),
        Op::List => {
            let items: String = spool
                .list(&owner.host)?
                .iter()
                .map(|jid| format!("<owner jid='{}'/>", jrs_stream::xml::escape(jid)))
                .collect();
            bytes::Bytes::from(items)
        }
    };
    debug!(op = request.op.name(), owner = %request.owner, ns, "done");
    Ok(content)
}
