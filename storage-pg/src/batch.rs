//! Archive appends for a whole domain (docs/protocol.md, "Batches for a domain"): the
//! reader splits the batch by owner onto the owners' workers (each owner's requests
//! stay in order), each owner's items are appended in their own transaction, and the
//! last part done answers, listing the owners whose items were not kept.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use jrs_component::Outbox;
use jrs_stream::{Stanza, StanzaErrorCondition};
use jrs_xdb::archive::{failures_to_xml, parse_owned_items, Item};
use jrs_xdb::{Refusal, Request};

use crate::db::Conn;
use crate::owner::Owner;
use crate::{now, retention, worker_for, Job};

pub fn is_batch(stanza: &Stanza) -> bool {
    stanza.kind() == Some("archive-append") && stanza.to().is_some_and(|to| !to.contains('@'))
}

struct Batch {
    request: Request,
    outbox: Outbox,
    remaining: AtomicUsize,
    failures: Mutex<Vec<(String, Refusal)>>,
}

/// The items of a batch that belong to one worker's owners.
pub struct Part {
    batch: Arc<Batch>,
    owners: Vec<(String, Vec<Item>)>,
}

/// Splits a batch onto the workers (or answers it at once when it is refused whole).
pub fn split(stanza: Stanza, outbox: &Outbox, jobs: &[UnboundedSender<Job>]) -> anyhow::Result<()> {
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
            return Ok(());
        }
    };
    let items = match parse_owned_items(&request.content) {
        Ok(i) => i,
        Err(r) => {
            refuse(r);
            return Ok(());
        }
    };
    let mut parts: BTreeMap<usize, BTreeMap<String, Vec<Item>>> = BTreeMap::new();
    for (owner, item) in items {
        let Some(owner) = owner else {
            refuse(Refusal::new(
                StanzaErrorCondition::BadRequest,
                "the items of an archive append for a domain name their owner",
            ));
            return Ok(());
        };
        parts
            .entry(worker_for(&owner, jobs.len()))
            .or_default()
            .entry(owner)
            .or_default()
            .push(item);
    }
    if parts.is_empty() {
        outbox.send(request.result(b""));
        return Ok(());
    }
    let batch = Arc::new(Batch {
        remaining: AtomicUsize::new(parts.len()),
        failures: Mutex::new(vec![]),
        outbox: outbox.clone(),
        request,
    });
    for (worker, owners) in parts {
        jobs[worker]
            .send(Job::Part(Part {
                batch: batch.clone(),
                owners: owners.into_iter().collect(),
            }))
            .map_err(|_| anyhow::anyhow!("a database worker stopped"))?;
    }
    Ok(())
}

impl Part {
    /// Appends each owner's items, each owner in a transaction of its own, then answers
    /// if this is the last part. `conn`: `Err` when the database cannot be reached.
    /// Returns whether the database was found unavailable (the worker reconnects).
    pub async fn apply(self, conn: Result<&mut Conn, &Refusal>, hosts: &[String]) -> bool {
        let request = &self.batch.request;
        let domain = request.owner.to_ascii_lowercase();
        let mut failures = vec![];
        match conn {
            Err(r) => failures.extend(self.owners.iter().map(|(o, _)| (o.clone(), r.clone()))),
            Ok(conn) => {
                for (owner, items) in &self.owners {
                    let result = crate::with_timeout(async {
                        let o = Owner::parse(owner)?;
                        if !o.is_user() || o.host != domain {
                            return Err(Refusal::new(
                                StanzaErrorCondition::NotAllowed,
                                format!("'{owner}' is not a user of '{domain}'"),
                            ));
                        }
                        o.check_served(hosts)?;
                        let mut tx = conn.begin().await?;
                        if request.flush == jrs_xdb::Flush::Later {
                            tx.flush_later().await?;
                        }
                        crate::archive::append_items(
                            &mut tx,
                            &o,
                            &request.ns,
                            items,
                            retention(request),
                            now(),
                        )
                        .await?;
                        tx.commit().await
                    })
                    .await;
                    if let Err(r) = result {
                        warn!(owner = %owner, condition = r.condition.name(), "archive items refused: {}", r.text);
                        failures.push((owner.clone(), r));
                    }
                }
            }
        }
        let unavailable = failures
            .iter()
            .any(|(_, r)| r.condition == StanzaErrorCondition::ServiceUnavailable);
        self.batch
            .failures
            .lock()
            .expect("batch lock")
            .extend(failures);
        if self.batch.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let failures = self.batch.failures.lock().expect("batch lock");
            let content = failures_to_xml(&failures);
            self.batch
                .outbox
                .send(self.batch.request.result(content.as_bytes()));
        }
        unavailable
    }
}
