//! Message archives (docs/protocol.md, "Archives") in two tables: `archives` (one row
//! per owner and namespace: next sequence number, last id and time) and
//! `archive_items` (one row per item, numbered by `seq` in append order). Queries have
//! the semantics of `jrs_xdb::archive::select`, answered through the indexes by id, by
//! time and by bare `with` (then `seq`): counts, then the page's rows only.
//!
//! An archive's items have consecutive `seq` numbers, from its oldest item's to
//! `next_seq - 1`: appends take the next numbers, and items are only removed as a
//! prefix (retention: times never decrease) or all together (the archive deleted). So
//! a count without filters other than `seq` bounds is a subtraction, not a scan of up
//! to every item ([`Span`]). In the same way the items of one bare `with` are
//! numbered by `with_seq` (1, 2, ... in append order; a prefix of them is what
//! retention removes), so a count filtered by a bare `with` alone is the difference of
//! two `with_seq`s read from the with-index ([`count_with`]).

use bytes::Bytes;
use tokio_postgres::types::ToSql;

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::archive::{
    bare, fit, item_cost, parse_items, parse_retraction, unknown_id, window, Item, Page, Query,
    Retention, MAX_PAGE,
};
use jrs_xdb::Refusal;

use crate::db::Tx;
use crate::owner::Owner;

fn bad(text: String) -> Refusal {
    Refusal::new(StanzaErrorCondition::BadRequest, text)
}

/// Refuses items that are not what an archive holds (as xdb-file does).
pub fn check(item: &Item) -> Result<i64, Refusal> {
    let short = || item.id.chars().take(64).collect::<String>();
    if item.id.is_empty() {
        return Err(bad("an item without an id".into()));
    }
    if item.id.len() > u16::MAX as usize || item.with.len() > u16::MAX as usize {
        return Err(bad(format!(
            "item '{}': id or with longer than 65535 bytes",
            short()
        )));
    }
    let payload = item.payload.trim_ascii();
    if !(payload.starts_with(b"<") && payload.ends_with(b">")) {
        return Err(bad(format!(
            "item '{}': the payload is not an element",
            short()
        )));
    }
    i64::try_from(item.time).map_err(|_| bad(format!("item '{}': time out of range", short())))
}

/// `archive-append` of one owner.
pub async fn append(
    tx: &mut Tx<'_>,
    owner: &Owner,
    ns: &str,
    content: &Bytes,
    retention: Retention,
    now: u64,
) -> Result<(), Refusal> {
    let items = parse_items(content)?;
    append_items(tx, owner, ns, &items, retention, now).await
}

/// Appends `items` in order, then applies `retention`. An item whose id is not after
/// the last one is skipped when the archive has it (a retried append), else the whole
/// request is refused with `conflict`; times must not decrease.
pub async fn append_items(
    tx: &mut Tx<'_>,
    owner: &Owner,
    ns: &str,
    items: &[Item],
    retention: Retention,
    now: u64,
) -> Result<(), Refusal> {
    for item in items {
        check(item)?;
    }
    tx.execute(
        "INSERT INTO archives (host, node, ns) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[&owner.host, &owner.node, &ns],
    )
    .await?;
    // Locked: appends of one archive from elsewhere (another instance) wait.
    let row = tx
        .query_opt(
            "SELECT archive, next_seq, last_id, last_time FROM archives
             WHERE host = $1 AND node = $2 AND ns = $3 FOR UPDATE",
            &[&owner.host, &owner.node, &ns],
        )
        .await?
        .ok_or_else(|| bad("the archive vanished".into()))?;
    let archive: i64 = row.get(0);
    let mut next: i64 = row.get(1);
    let mut last: Option<(String, i64)> = row.get::<_, Option<String>>(2).zip(row.get(3));
    let mut new: Vec<&Item> = vec![];
    for item in items {
        if let Some((last_id, last_time)) = &last {
            if item.id.as_bytes() <= last_id.as_bytes() {
                if new.iter().any(|n| n.id == item.id)
                    || find(tx, archive, &item.id).await?.is_some()
                {
                    continue;
                }
                return Err(Refusal::new(
                    StanzaErrorCondition::Conflict,
                    format!(
                        "item '{}' is not after the archive's last item '{last_id}' and is not in the archive",
                        item.id
                    ),
                ));
            }
            if (item.time as i64) < *last_time {
                return Err(bad(format!(
                    "item '{}': time {} is before the previous item's {last_time}",
                    item.id, item.time
                )));
            }
        }
        last = Some((item.id.clone(), item.time as i64));
        new.push(item);
    }
    if !new.is_empty() {
        let seqs: Vec<i64> = (next..).take(new.len()).collect();
        let ids: Vec<&str> = new.iter().map(|i| i.id.as_str()).collect();
        let times: Vec<i64> = new.iter().map(|i| i.time as i64).collect();
        let withs: Vec<&str> = new.iter().map(|i| i.with.as_str()).collect();
        let bares: Vec<&str> = new.iter().map(|i| bare(&i.with)).collect();
        let stanzas: Vec<&[u8]> = new.iter().map(|i| &i.payload[..]).collect();
        let with_seqs = number_by_with(tx, archive, &bares).await?;
        tx.execute(
            "INSERT INTO archive_items (archive, seq, id, time, with_full, with_bare, stanza, with_seq)
             SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::bytea[], $8::bigint[])",
            &[&archive, &seqs, &ids, &times, &withs, &bares, &stanzas, &with_seqs],
        )
        .await?;
        next += new.len() as i64;
        let (last_id, last_time) = last.as_ref().expect("an item was added");
        tx.execute(
            "UPDATE archives SET next_seq = $2, last_id = $3, last_time = $4 WHERE archive = $1",
            &[&archive, &next, last_id, last_time],
        )
        .await?;
    }
    retain(tx, archive, next, retention, now).await
}

/// The `with_seq` of new items whose bare `with`s are `bares`: each bare's numbers go on
/// from its newest item's in the archive (from 1 when it has none).
async fn number_by_with(
    tx: &mut Tx<'_>,
    archive: i64,
    bares: &[&str],
) -> Result<Vec<i64>, Refusal> {
    let mut distinct: Vec<&str> = bares.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let rows = tx
        .query(
            "SELECT b, (SELECT with_seq FROM archive_items
                        WHERE archive = $1 AND with_bare = b ORDER BY seq DESC LIMIT 1)
             FROM UNNEST($2::text[]) AS b",
            &[&archive, &distinct],
        )
        .await?;
    let mut last: std::collections::HashMap<String, i64> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, Option<i64>>(1).unwrap_or(0),
            )
        })
        .collect();
    Ok(bares
        .iter()
        .map(|b| {
            let n = last.entry((*b).to_owned()).or_insert(0);
            *n += 1;
            *n
        })
        .collect())
}

async fn find(tx: &mut Tx<'_>, archive: i64, id: &str) -> Result<Option<i64>, Refusal> {
    Ok(tx
        .query_opt(
            "SELECT seq FROM archive_items WHERE archive = $1 AND id = $2",
            &[&archive, &id],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The oldest `seq` and time kept by `retention` (items before either go).
pub fn retention_bounds(r: Retention, next: i64, now: u64) -> Option<(i64, i64)> {
    if r.max_items.is_none() && r.max_age.is_none() {
        return None;
    }
    let min_seq = r.max_items.map_or(i64::MIN, |n| {
        next.saturating_sub(i64::try_from(n).unwrap_or(i64::MAX))
    });
    let min_time = r.max_age.map_or(i64::MIN, |age| {
        let cutoff = now.saturating_sub(age.saturating_mul(1_000_000));
        i64::try_from(cutoff).unwrap_or(i64::MAX)
    });
    Some((min_seq, min_time))
}

/// Removes the items retention drops (times never decrease, so those older than the
/// cutoff are a prefix, like those past `max-items`).
async fn retain(
    tx: &mut Tx<'_>,
    archive: i64,
    next: i64,
    retention: Retention,
    now: u64,
) -> Result<(), Refusal> {
    if let Some((min_seq, min_time)) = retention_bounds(retention, next, now) {
        tx.execute(
            "DELETE FROM archive_items WHERE archive = $1 AND (seq < $2 OR time < $3)",
            &[&archive, &min_seq, &min_time],
        )
        .await?;
    }
    Ok(())
}

/// Removes the owner's archive of `ns` (of every namespace when `None`) with its
/// items. The archives' rows are locked first, so an append to them (from another
/// instance) either committed before, and its items are deleted here, or waits and
/// finds the archive gone (items have no foreign key to their archive: see the
/// schema's second step).
pub async fn delete(tx: &mut Tx<'_>, owner: &Owner, ns: Option<&str>) -> Result<(), Refusal> {
    let rows = match ns {
        Some(ns) => {
            tx.query(
                "SELECT archive FROM archives WHERE host = $1 AND node = $2 AND ns = $3 FOR UPDATE",
                &[&owner.host, &owner.node, &ns],
            )
            .await?
        }
        None => {
            tx.query(
                "SELECT archive FROM archives WHERE host = $1 AND node = $2 FOR UPDATE",
                &[&owner.host, &owner.node],
            )
            .await?
        }
    };
    let archives: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    if archives.is_empty() {
        return Ok(());
    }
    // Statements of their own, after the locks: they see what an append committed.
    tx.execute(
        "DELETE FROM archive_items WHERE archive = ANY($1)",
        &[&archives],
    )
    .await?;
    tx.execute("DELETE FROM archives WHERE archive = ANY($1)", &[&archives])
        .await?;
    Ok(())
}

/// `archive-trim`.
pub async fn trim(
    tx: &mut Tx<'_>,
    owner: &Owner,
    ns: &str,
    retention: Retention,
    now: u64,
) -> Result<(), Refusal> {
    let row = tx
        .query_opt(
            "SELECT archive, next_seq FROM archives WHERE host = $1 AND node = $2 AND ns = $3 FOR UPDATE",
            &[&owner.host, &owner.node, &ns],
        )
        .await?;
    match row {
        Some(row) => retain(tx, row.get(0), row.get(1), retention, now).await,
        None => Ok(()),
    }
}

/// `archive-retract`: the live item's stanza replaced; `item-not-found` when none.
pub async fn retract(
    tx: &mut Tx<'_>,
    owner: &Owner,
    ns: &str,
    content: &Bytes,
) -> Result<(), Refusal> {
    let (id, payload) = parse_retraction(content)?;
    let changed = tx
        .execute(
            "UPDATE archive_items SET stanza = $4
             WHERE archive = (SELECT archive FROM archives WHERE host = $1 AND node = $2 AND ns = $3)
               AND id = $5",
            &[&owner.host, &owner.node, &ns, &&payload[..], &id],
        )
        .await?;
    if changed == 0 {
        return Err(unknown_id(&id));
    }
    Ok(())
}

/// A value bound to a query placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Int(i64),
    Text(String),
    Texts(Vec<String>),
}

impl Param {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Text(v) => v,
            Param::Texts(v) => v,
        }
    }
}

/// The `WHERE` clause of the items matching a query's filters, with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub sql: String,
    pub params: Vec<Param>,
    /// The `seq` bounds of the clause: from `.0` (inclusive) to `.1` (exclusive).
    pub seqs: (Option<i64>, Option<i64>),
    /// What the clause filters on besides `seq`, for [`count`].
    pub kind: FilterKind,
}

/// What a [`Filter`] filters on besides `seq` bounds.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterKind {
    /// Nothing: counted from the archive's [`Span`].
    Seq,
    /// A bare `with` alone: counted by [`count_with`].
    Bare(String),
    /// Anything else (a full `with`, time bounds, ids): counted by the database.
    Other,
}

/// Where an archive's items are: `seq` from `first` (the oldest item's, `None` when
/// there is none) to `next - 1`, every number in between (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub first: Option<i64>,
    pub next: i64,
}

impl Span {
    /// How many items a filter on `seq` only keeps.
    pub fn count(&self, seqs: (Option<i64>, Option<i64>)) -> usize {
        let Some(first) = self.first else {
            return 0;
        };
        let lo = seqs.0.map_or(first, |l| l.max(first));
        let hi = seqs.1.map_or(self.next, |h| h.min(self.next));
        usize::try_from(hi.saturating_sub(lo)).unwrap_or(0)
    }
}

impl Filter {
    /// Items of `archive` with `seq` in `lo..hi` passing the query's `with`, time and
    /// `<id>` filters.
    pub fn new(archive: i64, q: &Query, lo: Option<i64>, hi: Option<i64>) -> Filter {
        let mut f = Filter {
            sql: "archive = $1".into(),
            params: vec![Param::Int(archive)],
            seqs: (lo, hi),
            kind: match &q.with {
                _ if q.start.is_some() || q.end.is_some() || !q.ids.is_empty() => FilterKind::Other,
                None => FilterKind::Seq,
                Some(w) if w.contains('/') => FilterKind::Other,
                Some(w) => FilterKind::Bare(w.clone()),
            },
        };
        if let Some(lo) = lo {
            f.push("seq >=", Param::Int(lo));
        }
        if let Some(hi) = hi {
            f.push("seq <", Param::Int(hi));
        }
        if let Some(w) = &q.with {
            // The bare index serves full JIDs too.
            f.push("with_bare =", Param::Text(bare(w).to_owned()));
            if w.contains('/') {
                f.push("with_full =", Param::Text(w.clone()));
            }
        }
        let time = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        if let Some(t) = q.start {
            f.push("time >=", Param::Int(time(t)));
        }
        if let Some(t) = q.end {
            f.push("time <=", Param::Int(time(t)));
        }
        if !q.ids.is_empty() {
            f.sql
                .push_str(&format!(" AND id = ANY(${})", f.params.len() + 1));
            f.params.push(Param::Texts(q.ids.clone()));
        }
        f
    }

    /// `AND column op $n`.
    fn push(&mut self, column_op: &str, p: Param) {
        self.params.push(p);
        self.sql
            .push_str(&format!(" AND {column_op} ${}", self.params.len()));
    }

    /// The same filter narrowed by one more condition.
    pub fn and(&self, column_op: &str, p: Param) -> Filter {
        let mut f = self.clone();
        let (lo, hi) = f.seqs;
        let max = |a: Option<i64>, b: i64| Some(a.map_or(b, |a| a.max(b)));
        let min = |a: Option<i64>, b: i64| Some(a.map_or(b, |a| a.min(b)));
        match (column_op, &p) {
            ("seq >=", Param::Int(v)) => f.seqs.0 = max(lo, *v),
            ("seq >", Param::Int(v)) => f.seqs.0 = max(lo, v.saturating_add(1)),
            ("seq <", Param::Int(v)) => f.seqs.1 = min(hi, *v),
            ("seq <=", Param::Int(v)) => f.seqs.1 = min(hi, v.saturating_add(1)),
            _ => f.kind = FilterKind::Other,
        }
        f.push(column_op, p);
        f
    }

    pub fn args(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(Param::sql).collect()
    }

    /// The archive the filter is on (its first parameter).
    fn params_archive(&self) -> i64 {
        match self.params.first() {
            Some(Param::Int(a)) => *a,
            _ => unreachable!("a filter starts with its archive"),
        }
    }
}

/// How many items `f` keeps: from the archive's `span` when it filters on `seq` alone,
/// from `with_seq`s when on a bare `with` too, else counted by the database.
async fn count(tx: &mut Tx<'_>, f: &Filter, span: Span) -> Result<usize, Refusal> {
    match &f.kind {
        FilterKind::Seq => return Ok(span.count(f.seqs)),
        FilterKind::Bare(with) => return count_with(tx, f.params_archive(), with, f.seqs).await,
        FilterKind::Other => {}
    }
    let sql = format!("SELECT COUNT(*) FROM archive_items WHERE {}", f.sql);
    let rows = tx.query(&sql, &f.args()).await?;
    Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as usize)
}

/// How many items with bare `with` have `seq` within `seqs`: the difference of the
/// `with_seq`s of the first and the last of them, two reads of the with-index.
async fn count_with(
    tx: &mut Tx<'_>,
    archive: i64,
    with: &str,
    seqs: (Option<i64>, Option<i64>),
) -> Result<usize, Refusal> {
    let (lo, hi) = (seqs.0.unwrap_or(i64::MIN), seqs.1.unwrap_or(i64::MAX));
    if lo >= hi {
        return Ok(0);
    }
    let edge = |order: &str, op: &str| {
        format!(
            "SELECT with_seq FROM archive_items WHERE archive = $1 AND with_bare = $2 AND seq {op} $3
             ORDER BY seq {order} LIMIT 1"
        )
    };
    let first = tx
        .query_opt(&edge("ASC", ">="), &[&archive, &with, &lo])
        .await?;
    let last = tx
        .query_opt(&edge("DESC", "<"), &[&archive, &with, &hi])
        .await?;
    Ok(match (first, last) {
        (Some(f), Some(l)) => {
            usize::try_from(l.get::<_, i64>(0) - f.get::<_, i64>(0) + 1).unwrap_or(0)
        }
        _ => 0,
    })
}

async fn position(tx: &mut Tx<'_>, archive: i64, id: &str) -> Result<i64, Refusal> {
    find(tx, archive, id).await?.ok_or_else(|| unknown_id(id))
}

/// `archive-query`: one page, as `<archive/>`.
pub async fn query(
    tx: &mut Tx<'_>,
    owner: &Owner,
    ns: &str,
    content: &[u8],
) -> Result<Bytes, Refusal> {
    let q = Query::parse(content)?;
    let (archive, next): (i64, i64) = tx
        .query_opt(
            "SELECT archive, next_seq FROM archives WHERE host = $1 AND node = $2 AND ns = $3",
            &[&owner.host, &owner.node, &ns],
        )
        .await?
        .map_or((-1, 0), |r| (r.get(0), r.get(1))); // no archive: no items, every id unknown
                                                    // The archive's first and last items: its metadata, and where its items are.
    let bound = |order: &str| {
        format!(
            "SELECT seq, id, time FROM archive_items WHERE archive = $1 ORDER BY seq {order} LIMIT 1"
        )
    };
    let edge = |r: &tokio_postgres::Row| (r.get::<_, String>(1), r.get::<_, i64>(2) as u64);
    let oldest = tx.query_opt(&bound("ASC"), &[&archive]).await?;
    let newest = tx.query_opt(&bound("DESC"), &[&archive]).await?;
    let span = Span {
        first: oldest.as_ref().map(|r| r.get::<_, i64>(0)),
        next,
    };
    let (oldest, newest) = (oldest.as_ref().map(edge), newest.as_ref().map(edge));
    let lo = match &q.after_id {
        Some(id) => Some(position(tx, archive, id).await? + 1),
        None => None,
    };
    let hi = match &q.before_id {
        Some(id) => Some(position(tx, archive, id).await?),
        None => None,
    };
    for id in &q.ids {
        position(tx, archive, id).await?;
    }
    let filter = Filter::new(archive, &q, lo, hi);
    let total = count(tx, &filter, span).await?;
    let after = match &q.paging.after {
        Some(id) => Some(position(tx, archive, id).await?),
        None => None,
    };
    let before = match &q.paging.before {
        Some(id) => Some(position(tx, archive, id).await?),
        None => None,
    };
    // The page's window among the matching items, as `select` computes it.
    let from = match after {
        Some(p) => count(tx, &filter.and("seq <=", Param::Int(p)), span).await?,
        None => 0,
    };
    let to = match before {
        Some(p) => count(tx, &filter.and("seq <", Param::Int(p)), span).await?,
        None => total,
    };
    let backwards = q.paging.from_end || q.paging.before.is_some();
    let (mut start, mut end) = window(from, to.max(from), q.paging.max.min(MAX_PAGE), backwards);
    let mut items = vec![];
    if end > start {
        // Forwards the page is the first items after `after`; backwards the last ones
        // before `before` (at least `from` either way, by the window).
        let (f, order) = match (backwards, after, before) {
            (false, Some(p), _) => (filter.and("seq >", Param::Int(p)), "ASC"),
            (false, None, _) => (filter.clone(), "ASC"),
            (true, _, Some(p)) => (filter.and("seq <", Param::Int(p)), "DESC"),
            (true, _, None) => (filter.clone(), "DESC"),
        };
        let sql = format!(
            "SELECT id, time, with_full, stanza FROM archive_items WHERE {} ORDER BY seq {order} LIMIT {}",
            f.sql,
            end - start
        );
        items = tx
            .query(&sql, &f.args())
            .await?
            .iter()
            .map(|r| Item {
                id: r.get(0),
                time: r.get::<_, i64>(1) as u64,
                with: r.get(2),
                payload: Bytes::from(r.get::<_, Vec<u8>>(3)),
            })
            .collect::<Vec<_>>();
        if backwards {
            items.reverse();
        }
        // Fewer rows than counted cannot happen within one transaction; stay safe.
        if items.len() < end - start {
            if backwards {
                start = end - items.len();
            } else {
                end = start + items.len();
            }
        }
        if let Some(budget) = q.paging.max_bytes {
            let first = start;
            let (s, e) = fit(start, end, budget, backwards, |m| {
                item_cost(&items[m - first])
            });
            items = items[s - first..e - first].to_vec();
            (start, end) = (s, e);
        }
    }
    let page = Page {
        count: total,
        first_index: (start < end).then_some(start),
        complete: if backwards { start == 0 } else { end == total },
        items,
        oldest,
        newest,
    };
    Ok(page.to_bytes())
}

// The queries against the reference `jrs_xdb::archive::select` on a real database are
// tests/storage.rs's `archive_queries_match_the_reference::pg` (a throwaway cluster).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_checked() {
        let item = |id: &str, time: u64, payload: &'static [u8]| Item {
            id: id.into(),
            time,
            with: "bob@localhost".into(),
            payload: Bytes::from_static(payload),
        };
        assert_eq!(check(&item("1", 5, b" <message/> ")).unwrap(), 5);
        assert!(check(&item("", 5, b"<message/>")).is_err());
        assert!(check(&item("1", 5, b"text")).is_err());
        assert!(check(&item("1", u64::MAX, b"<message/>")).is_err());
        assert!(check(&item(&"x".repeat(70000), 5, b"<message/>")).is_err());
    }

    #[test]
    fn retention() {
        let r = |max_items, max_age| Retention { max_items, max_age };
        assert_eq!(retention_bounds(r(None, None), 10, 0), None);
        assert_eq!(
            retention_bounds(r(Some(3), None), 10, 0),
            Some((7, i64::MIN))
        );
        assert_eq!(
            retention_bounds(r(None, Some(2)), 10, 5_000_000),
            Some((i64::MIN, 3_000_000))
        );
        assert_eq!(
            retention_bounds(r(Some(u64::MAX), Some(u64::MAX)), 10, 5),
            Some((10 - i64::MAX, 0))
        );
    }

    #[test]
    fn filters() {
        let q = Query {
            with: Some("bob@localhost/phone".into()),
            start: Some(10),
            end: Some(u64::MAX),
            ids: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        let f = Filter::new(7, &q, Some(2), None);
        assert_eq!(
            f.sql,
            "archive = $1 AND seq >= $2 AND with_bare = $3 AND with_full = $4 AND time >= $5 AND time <= $6 AND id = ANY($7)"
        );
        assert_eq!(
            f.params,
            vec![
                Param::Int(7),
                Param::Int(2),
                Param::Text("bob@localhost".into()),
                Param::Text("bob@localhost/phone".into()),
                Param::Int(10),
                Param::Int(i64::MAX),
                Param::Texts(vec!["a".into(), "b".into()]),
            ]
        );
        let g = Filter::new(
            7,
            &Query {
                with: Some("bob@localhost".into()),
                ..Default::default()
            },
            None,
            Some(9),
        )
        .and("seq >", Param::Int(3));
        assert_eq!(
            g.sql,
            "archive = $1 AND seq < $2 AND with_bare = $3 AND seq > $4"
        );
        assert_eq!(g.args().len(), 4);
        assert_eq!(f.kind, FilterKind::Other);
        assert_eq!(g.kind, FilterKind::Bare("bob@localhost".into()));
        assert_eq!(
            g.and("time <", Param::Int(3)).kind,
            FilterKind::Other,
            "one more condition than the bare with"
        );
    }

    #[test]
    fn counts_by_seq() {
        let f = Filter::new(7, &Query::default(), Some(5), Some(20));
        assert_eq!(f.kind, FilterKind::Seq);
        assert_eq!(f.seqs, (Some(5), Some(20)));
        let span = Span {
            first: Some(10),
            next: 30,
        };
        assert_eq!(span.count(f.seqs), 10); // 10..20
        assert_eq!(span.count(f.and("seq <=", Param::Int(12)).seqs), 3); // 10..13
        assert_eq!(span.count(f.and("seq <", Param::Int(3)).seqs), 0);
        assert_eq!(span.count(f.and("seq >", Param::Int(18)).seqs), 1); // 19
        assert_eq!(span.count((None, None)), 20);
        assert_eq!(span.count((Some(40), None)), 0);
        assert_eq!(
            Span {
                first: None,
                next: 30
            }
            .count((None, None)),
            0
        );
        assert_eq!(f.and("time >=", Param::Int(3)).kind, FilterKind::Other);
        let ids = Query {
            ids: vec!["a".into()],
            ..Query::default()
        };
        assert_eq!(Filter::new(7, &ids, None, None).kind, FilterKind::Other);
    }
}
