//! Answering a query from the indexes, with the semantics of
//! [`jrs_xdb::archive::select`]: id and time bounds by binary search over the segment
//! indexes, `with` through the with-index, `count` and `first-index` by arithmetic on
//! positions. Only the page's own records are read.

use std::io;

use jrs_xdb::archive::{bare, fit, unknown_id, window, Page, Query, MAX_PAGE};
use jrs_xdb::Refusal;

use super::files::Files;
use super::format::with_hash;
use super::internal;
use super::store::Archive;
use super::with::WithFile;

/// The items matching a query's filters, in archive order, as sequence numbers.
enum Matching {
    /// Every item in `start..end`.
    Range(u64, u64),
    /// These items.
    List(Vec<u64>),
    /// The items of entries `first..end` of a with-index file.
    With(WithFile, u64, u64),
}

impl Matching {
    fn len(&self) -> u64 {
        match self {
            Matching::Range(a, b) | Matching::With(_, a, b) => b - a,
            Matching::List(l) => l.len() as u64,
        }
    }

    /// How many matching items come before item `seq`.
    fn rank(&self, seq: u64) -> io::Result<u64> {
        Ok(match self {
            Matching::Range(a, b) => seq.clamp(*a, *b) - a,
            Matching::List(l) => l.partition_point(|&s| s < seq) as u64,
            Matching::With(w, a, b) => w.partition(*a, *b, seq)? - a,
        })
    }

    /// The matching items `from..to`.
    fn seqs(&self, from: u64, to: u64) -> io::Result<Vec<u64>> {
        Ok(match self {
            Matching::Range(a, _) => (a + from..a + to).collect(),
            Matching::List(l) => l[from as usize..to as usize].to_vec(),
            Matching::With(w, a, _) => w
                .read(a + from, a + to)?
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
        })
    }
}

pub fn query(a: &mut Archive, files: &mut Files, q: &Query) -> Result<Page, Refusal> {
    let io =
        |a: &Archive, e: io::Error| internal(format!("archive {}: reading: {e}", a.dir.display()));
    let (low, next) = (a.low, a.next);
    let position = |a: &mut Archive, files: &mut Files, id: &str| {
        a.find_id(files, id, low, next)
            .ok_or_else(|| unknown_id(id))
    };
    // Bounds: ids (exclusive), then times (inclusive).
    let lo = match &q.after_id {
        Some(id) => position(a, files, id)? + 1,
        None => low,
    };
    let hi = match &q.before_id {
        Some(id) => position(a, files, id)?,
        None => next,
    };
    // Every id asked for must be in the archive (XEP-0313: item-not-found).
    let mut named = Vec::with_capacity(q.ids.len());
    for id in &q.ids {
        named.push(position(a, files, id)?);
    }
    let lo = match q.start {
        Some(t) => lo.max(a.time_from(files, low, next, t)),
        None => lo,
    };
    let hi = match q.end {
        Some(t) => hi.min(a.time_after(files, low, next, t)),
        None => hi,
    }
    .max(lo);
    let matching = if !q.ids.is_empty() {
        Matching::List(by_ids(a, files, q, named, lo, hi))
    } else if let Some(with) = &q.with {
        match a
            .with_file(files, bare(with), false)
            .map_err(|e| io(a, e))?
        {
            None => Matching::List(vec![]),
            Some(w) => {
                let first = w.partition(0, w.len, lo).map_err(|e| io(a, e))?;
                let end = w.partition(first, w.len, hi).map_err(|e| io(a, e))?;
                if with.contains('/') {
                    Matching::List(full_jid(&w, first, end, with_hash(with)).map_err(|e| io(a, e))?)
                } else {
                    Matching::With(w, first, end)
                }
            }
        }
    } else {
        Matching::Range(lo, hi)
    };
    let count = matching.len();
    // The page's window among the matching items.
    let from = match &q.paging.after {
        Some(id) => {
            let p = position(a, files, id)?;
            matching.rank(p + 1).map_err(|e| io(a, e))?
        }
        None => 0,
    };
    let to = match &q.paging.before {
        Some(id) => {
            let p = position(a, files, id)?;
            matching.rank(p).map_err(|e| io(a, e))?
        }
        None => count,
    };
    let backwards = q.paging.from_end || q.paging.before.is_some();
    let (start, end) = window(
        from as usize,
        to.max(from) as usize,
        q.paging.max.min(MAX_PAGE),
        backwards,
    );
    let mut seqs = matching
        .seqs(start as u64, end as u64)
        .map_err(|e| io(a, e))?;
    let mut entries = a.entries_for(files, &seqs);
    let (mut start, mut end) = (start, end);
    if let Some(budget) = q.paging.max_bytes {
        let base = start;
        // An unreadable entry (reported) costs what an empty item would.
        let cost = |m: usize| entries[m - base].map_or(64, |e| e.item_cost());
        (start, end) = fit(start, end, budget, backwards, cost);
        seqs = seqs[start - base..end - base].to_vec();
        entries = entries[start - base..end - base].to_vec();
    }
    let items = a
        .items(files, &seqs, &entries)
        .into_iter()
        .flatten()
        .collect();
    if a.oldest.is_none() {
        a.oldest = Some(if low < next {
            a.id_time_from(files, low)
        } else {
            None
        });
    }
    let live = low < next;
    Ok(Page {
        count: count as usize,
        first_index: (start < end).then_some(start),
        complete: if backwards {
            start == 0
        } else {
            end == count as usize
        },
        items,
        oldest: a.oldest.clone().flatten(),
        newest: if live { a.last.clone() } else { None },
    })
}

/// The `named` items in `lo..hi` that pass the `with` filter, in order.
fn by_ids(
    a: &mut Archive,
    files: &mut Files,
    q: &Query,
    named: Vec<u64>,
    lo: u64,
    hi: u64,
) -> Vec<u64> {
    let mut seqs: Vec<u64> = named.into_iter().filter(|s| (lo..hi).contains(s)).collect();
    seqs.sort_unstable();
    seqs.dedup();
    if let Some(with) = &q.with {
        let entries = a.entries_for(files, &seqs);
        let items = a.items(files, &seqs, &entries);
        seqs = seqs
            .into_iter()
            .zip(items)
            // An unreadable item stays (it is reported and left out of the page).
            .filter(|(_, i)| {
                i.as_ref()
                    .is_none_or(|i| jrs_xdb::archive::with_matches(with, &i.with))
            })
            .map(|(s, _)| s)
            .collect();
    }
    seqs
}

/// The items of with-index entries `first..end` whose full `with` has `hash`.
fn full_jid(w: &WithFile, first: u64, end: u64, hash: u64) -> io::Result<Vec<u64>> {
    const CHUNK: u64 = 4096;
    let mut out = vec![];
    let mut k = first;
    while k < end {
        let to = end.min(k + CHUNK);
        out.extend(
            w.read(k, to)?
                .into_iter()
                .filter(|&(_, h)| h == hash)
                .map(|(s, _)| s),
        );
        k = to;
    }
    Ok(out)
}
