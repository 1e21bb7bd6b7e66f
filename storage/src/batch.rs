//! Archive appends for a whole domain: an `archive-append` whose owner is a domain and
//! whose items name their owners (`jrs_xdb::archive::BatchWriter`). sm sends what it
//! archives for all its users in such batches, so that under load one request and one
//! answer carry many messages. The reader splits a batch by owner onto the owners'
//! worker threads (each owner's requests stay in order), each worker applies its part
//! within its group commit, and the last part to be durable sends the answer: a result
//! listing the owners whose items could not be kept (`<failed owner= condition=>`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use jrs_component::Outbox;
use jrs_stream::{Stanza, StanzaErrorCondition};
use jrs_xdb::archive::{failures_to_xml, parse_owned_items, Item};
use jrs_xdb::{Refusal, Request};

use crate::archive::Archives;
use crate::spool::{Owner, Spool};
use crate::{now, retention, worker_for};

/// Whether `stanza` is a batch: an archive append addressed to a domain.
pub fn is_batch(stanza: &Stanza) -> bool {
    stanza.kind() == Some("archive-append") && stanza.to().is_some_and(|to| !to.contains('@'))
}

/// A batch on its way through the workers.
struct Batch {
    request: Request,
    outbox: Outbox,
    /// Parts not yet durable.
    remaining: AtomicUsize,
    failures: Mutex<Vec<(String, Refusal)>>,
}

/// The items of a batch that belong to one worker's owners.
pub struct Part {
    batch: Arc<Batch>,
    owners: Vec<(String, Vec<Item>)>,
    /// Owners whose items this worker could not keep.
    failed: Mutex<Vec<String>>,
}

/// Splits a batch among `workers` worker threads: each part with the index of its
/// worker (none when the batch is answered at once: refused whole, or empty).
pub fn split(stanza: Stanza, outbox: &Outbox, workers: usize) -> Vec<(usize, Part)> {
    let refuse = |r: Refusal| {
        warn!(
            from = stanza.from().unwrap_or(""),
            "archive batch refused: {}", r.text
        );
        if let Some(reply) = stanza.error_reply(r.condition, &r.text) {
            outbox.send(reply);
        }
    };
    let request = match Request::parse(&stanza) {
        Ok(r) => r,
        Err(r) => {
            refuse(r);
            return vec![];
        }
    };
    let items = match parse_owned_items(&request.content) {
        Ok(i) => i,
        Err(r) => {
            refuse(r);
            return vec![];
        }
    };
    // worker -> owner -> items, each owner's items in the order they came.
    let mut parts: BTreeMap<usize, BTreeMap<String, Vec<Item>>> = BTreeMap::new();
    for (owner, item) in items {
        let Some(owner) = owner else {
            refuse(Refusal::new(
                StanzaErrorCondition::BadRequest,
                "the items of an archive append for a domain name their owner",
            ));
            return vec![];
        };
        parts
            .entry(worker_for(&owner, workers))
            .or_default()
            .entry(owner)
            .or_default()
            .push(item);
    }
    if parts.is_empty() {
        outbox.send(request.result(b""));
        return vec![];
    }
    let batch = Arc::new(Batch {
        remaining: AtomicUsize::new(parts.len()),
        failures: Mutex::new(vec![]),
        outbox: outbox.clone(),
        request,
    });
    parts
        .into_iter()
        .map(|(worker, owners)| {
            let part = Part {
                batch: batch.clone(),
                owners: owners.into_iter().collect(),
                failed: Mutex::new(vec![]),
            };
            (worker, part)
        })
        .collect()
}

impl Part {
    /// Whether the batch's items must be on disk before its answer.
    pub fn durable_before_answer(&self) -> bool {
        self.batch.request.durable_before_answer()
    }

    /// Appends each owner's items (before the worker's group commit).
    pub fn apply(&self, spool: &mut Spool, archives: &mut Archives, hosts: &[String]) {
        let request = &self.batch.request;
        let domain = request.owner.to_ascii_lowercase();
        for (owner, items) in &self.owners {
            let result = Owner::parse(owner).and_then(|o| {
                if o.user.is_none() || o.host != domain {
                    return Err(Refusal::new(
                        StanzaErrorCondition::NotAllowed,
                        format!("'{owner}' is not a user of '{domain}'"),
                    ));
                }
                if !hosts.iter().any(|h| h == "*" || *h == o.host) {
                    return Err(Refusal::new(
                        StanzaErrorCondition::NotAllowed,
                        format!("this storage does not serve '{}'", o.host),
                    ));
                }
                let dir = spool.archive_dir(&o, &request.ns);
                archives.append_items(spool, &dir, items, retention(request), now())
            });
            if let Err(r) = result {
                warn!(owner = %owner, condition = r.condition.name(), "archive items refused: {}", r.text);
                self.failed.lock().expect("part lock").push(owner.clone());
                self.batch
                    .failures
                    .lock()
                    .expect("batch lock")
                    .push((owner.clone(), r));
            }
        }
    }

    /// The worker's commit is done (`commit`: why it failed): the last part answers.
    pub fn done(self, commit: Option<&Refusal>) {
        if let Some(r) = commit {
            let failed = self.failed.lock().expect("part lock");
            let mut failures = self.batch.failures.lock().expect("batch lock");
            for (owner, _) in &self.owners {
                if !failed.contains(owner) {
                    failures.push((owner.clone(), r.clone()));
                }
            }
        }
        if self.batch.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let failures = self.batch.failures.lock().expect("batch lock");
            let content = failures_to_xml(&failures);
            self.batch
                .outbox
                .send(self.batch.request.result(content.as_bytes()));
        }
    }
}
