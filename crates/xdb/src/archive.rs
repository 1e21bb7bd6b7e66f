//! Message archives in the storage protocol: the `archive-append`, `archive-query`,
//! `archive-trim` and `archive-retract` operations (see `docs/protocol.md`, "Archives").
//!
//! An archive is an ordered list of items, each an archived stanza with a unique id (ids
//! increase in byte order in the order items are appended), the time it was archived
//! (microseconds since the Unix epoch, never decreasing) and the JID the user talked with.
//! A storage component keeps it so that an append is O(1) and a page is found through
//! indexes (by id and time, and by the bare JID of `with`), never by scanning.
//!
//! [`select`] is the reference semantics of a query over a list in memory: storage
//! components implement the same answers with their indexes, and test against it.

use bytes::Bytes;
use quick_xml::events::Event;
use quick_xml::Reader;

use jrs_stream::tag::StartTag;
use jrs_stream::xml::escape;
use jrs_stream::StanzaErrorCondition;

use crate::Refusal;

/// Most items one query returns (a storage answer must stay under the link's limit).
pub const MAX_PAGE: usize = 250;

/// One archived stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    /// When it was archived: microseconds since the Unix epoch.
    pub time: u64,
    /// The other party: a full or bare JID, normalised.
    pub with: String,
    /// The stanza as archived (self-contained XML).
    pub payload: Bytes,
}

/// Retention applied by `archive-append` and `archive-trim`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many items (the newest).
    pub max_items: Option<u64>,
    /// Keep items at most this many seconds old.
    pub max_age: Option<u64>,
}

/// Which page of the matching items to return (XEP-0059 result set management).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paging {
    /// Items after the one with this id.
    pub after: Option<String>,
    /// Items before the one with this id.
    pub before: Option<String>,
    /// Take the page from the end of the matching items (`<before/>`, or with `before`).
    pub from_end: bool,
    /// Page size (0: count only). Capped at [`MAX_PAGE`].
    pub max: usize,
    /// Largest answer wanted, in bytes of items (see [`item_cost`]): the page is cut
    /// short to fit (it always holds at least one item).
    pub max_bytes: Option<usize>,
}

/// A query: filters select the matching items, `paging` one page of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// A bare JID matches every item whose `with` has that bare JID; a full JID only
    /// items with exactly that `with`.
    pub with: Option<String>,
    /// Inclusive time bounds (microseconds).
    pub start: Option<u64>,
    pub end: Option<u64>,
    /// Exclusive id bounds.
    pub after_id: Option<String>,
    pub before_id: Option<String>,
    /// When not empty: only these items (an id not in the archive is `item-not-found`,
    /// as XEP-0313 asks).
    pub ids: Vec<String>,
    pub paging: Paging,
}

/// The answer to a query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// How many items match the filters (paging aside).
    pub count: usize,
    /// Position of the page's first item among the matching items.
    pub first_index: Option<usize>,
    /// The page reaches the end of the matching items in its direction (the last one
    /// paging forwards, the first one paging backwards).
    pub complete: bool,
    pub items: Vec<Item>,
    /// The archive's first and last item (id, time), whatever the filters: the archive's
    /// metadata (XEP-0313 #metadata).
    pub oldest: Option<(String, u64)>,
    pub newest: Option<(String, u64)>,
}

fn bad(text: impl Into<String>) -> Refusal {
    Refusal::new(StanzaErrorCondition::BadRequest, text)
}

/// `item-not-found` for an id bound that names no item of the archive (XEP-0313).
pub fn unknown_id(id: &str) -> Refusal {
    Refusal::new(
        StanzaErrorCondition::ItemNotFound,
        format!("no item with id '{id}' in the archive"),
    )
}

/// The bare part of a JID written as text (before any `/`).
pub fn bare(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

/// Whether an item's `with` matches a query's `with` (bare or full, see [`Query::with`]).
pub fn with_matches(query_with: &str, item_with: &str) -> bool {
    if query_with.contains('/') {
        query_with == item_with
    } else {
        query_with == bare(item_with)
    }
}

impl Item {
    /// Writes `<item id time with>payload</item>` (the payload as stored: bytes that were
    /// checked when they were archived, not checked again).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            format!(
                "<item id='{}' time='{}' with='{}'>",
                escape(&self.id),
                self.time,
                escape(&self.with)
            )
            .as_bytes(),
        );
        out.extend_from_slice(&self.payload);
        out.extend_from_slice(b"</item>");
    }
}

/// The content of an `archive-append` request.
pub fn items_to_xml(items: &[Item]) -> String {
    let mut out = vec![];
    for i in items {
        i.write(&mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads `<item id time with>payload</item>` elements (with anything else between them
/// refused); the payloads are the raw bytes between the item tags.
pub fn parse_items(content: &Bytes) -> Result<Vec<Item>, Refusal> {
    Ok(parse_owned_items(content)?
        .into_iter()
        .map(|(_, item)| item)
        .collect())
}

/// An item with the owner it names, if any.
pub type OwnedItem = (Option<String>, Item);

/// The same, with the `owner` each item names (items of a batch for a domain, see
/// [`BatchWriter`]).
pub fn parse_owned_items(content: &Bytes) -> Result<Vec<OwnedItem>, Refusal> {
    if let Some(items) = parse_framed(content) {
        return items;
    }
    let mut out = vec![];
    for (name, attrs, inner) in top_level(content)? {
        if name != "item" {
            return Err(bad(format!("unexpected <{name}> in an archive")));
        }
        let get = |k: &str| attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let id = get("id")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("<item/> without 'id'"))?;
        let time = get("time")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad("<item/> without a numeric 'time'"))?;
        if inner.iter().all(u8::is_ascii_whitespace) {
            return Err(bad(format!("item '{id}' archives nothing")));
        }
        out.push((
            get("owner"),
            Item {
                id,
                time,
                with: get("with").unwrap_or_default(),
                payload: content.slice_ref(inner),
            },
        ));
    }
    Ok(out)
}

/// Items whose start tags give their payload's length in bytes (`len`, as
/// [`BatchWriter`] writes them): read without tokenizing the payloads. `None` when the
/// content is not made that way (the general reader takes it).
fn parse_framed(content: &Bytes) -> Option<Result<Vec<OwnedItem>, Refusal>> {
    // About 300 bytes an item: one allocation for the list in most batches.
    let mut out = Vec::with_capacity(content.len() / 256 + 1);
    let mut pos = 0;
    loop {
        while pos < content.len() && content[pos].is_ascii_whitespace() {
            pos += 1;
        }
        if pos == content.len() {
            return Some(Ok(out));
        }
        let rest = &content[pos..];
        if !rest.starts_with(b"<item ") {
            return None;
        }
        let (mut tag, _) = StartTag::new(rest).ok()?;
        let (mut owner, mut id, mut time, mut with, mut len) = (None, None, None, None, None);
        loop {
            let Ok(attr) = tag.next_attribute() else {
                return Some(Err(bad("bad attribute in <item/>")));
            };
            let Some((key, value)) = attr else { break };
            let key = &rest[key.start as usize..key.end as usize];
            let Ok(value) = std::str::from_utf8(&rest[value.start as usize..value.end as usize])
            else {
                return Some(Err(bad("<item/> not UTF-8")));
            };
            let Ok(value) = quick_xml::escape::unescape(value) else {
                return Some(Err(bad("bad attribute value in <item/>")));
            };
            match key {
                b"owner" => owner = Some(value.into_owned()),
                b"id" => id = Some(value.into_owned()),
                b"time" => time = value.parse::<u64>().ok(),
                b"with" => with = Some(value.into_owned()),
                b"len" => len = value.parse::<usize>().ok(),
                _ => {}
            }
        }
        let (tag_end, empty) = tag.end();
        if empty {
            return None;
        }
        let end = tag_end as usize - 1;
        let len = len?;
        let from = pos + end + 1;
        if content.len() < from + len || !content[from + len..].starts_with(b"</item>") {
            return None;
        }
        let Some(id) = id.filter(|s| !s.is_empty()) else {
            return Some(Err(bad("<item/> without 'id'")));
        };
        let Some(time) = time else {
            return Some(Err(bad("<item/> without a numeric 'time'")));
        };
        out.push((
            owner,
            Item {
                id,
                time,
                with: with.unwrap_or_default(),
                payload: content.slice(from..from + len),
            },
        ));
        pos = from + len + "</item>".len();
    }
}

const LEN_PLACEHOLDER: &str = "0000000000";

/// The content of an `archive-append` for a whole domain: items of many owners, each
/// naming its own (`<item owner='alice@d' id= time= with=>payload</item>`), written as
/// they come so that a payload is copied once.
#[derive(Debug, Default)]
pub struct BatchWriter {
    buf: bytes::BytesMut,
    items: usize,
}

impl BatchWriter {
    /// Adds an item of `owner`; `payload` writes the archived stanza.
    pub fn push(
        &mut self,
        owner: &str,
        id: &str,
        time: u64,
        with: &str,
        payload: impl FnOnce(&mut bytes::BytesMut),
    ) {
        // The payload's length goes in a fixed-width `len`, filled in once it is written,
        // so storage finds the payload's end without reading it.
        let b = &mut self.buf;
        for (part, value) in [("<item owner='", owner), ("' id='", id), ("' with='", with)] {
            b.extend_from_slice(part.as_bytes());
            b.extend_from_slice(escape(value).as_bytes());
        }
        b.extend_from_slice(b"' time='");
        b.extend_from_slice(itoa::Buffer::new().format(time).as_bytes());
        b.extend_from_slice(b"' len='");
        b.extend_from_slice(LEN_PLACEHOLDER.as_bytes());
        b.extend_from_slice(b"'>");
        let len_at = self.buf.len() - LEN_PLACEHOLDER.len() - 2;
        let start = self.buf.len();
        payload(&mut self.buf);
        // Right-aligned digits over the zeros: `len='0000000312'`.
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(self.buf.len() - start).as_bytes();
        let field = &mut self.buf[len_at..len_at + LEN_PLACEHOLDER.len()];
        field[LEN_PLACEHOLDER.len() - digits.len()..].copy_from_slice(digits);
        self.buf.extend_from_slice(b"</item>");
        self.items += 1;
    }

    pub fn len(&self) -> usize {
        self.items
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    pub fn take(&mut self) -> Bytes {
        self.items = 0;
        self.buf.split().freeze()
    }
}

/// The content of an `archive-retract` request: `<item id='..'>STANZA</item>`, the
/// stanza that replaces item `id`'s (its time and `with` are kept).
pub fn retraction_to_xml(id: &str, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + id.len() + 32);
    out.extend_from_slice(format!("<item id='{}'>", escape(id)).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"</item>");
    Bytes::from(out)
}

/// Reads the content of an `archive-retract` request: the item's id and the new stanza.
pub fn parse_retraction(content: &Bytes) -> Result<(String, Bytes), Refusal> {
    let mut nodes = top_level(content)?;
    if nodes.len() != 1 || nodes[0].0 != "item" {
        return Err(bad("an archive retraction carries one <item/>"));
    }
    let (_, attrs, inner) = nodes.remove(0);
    let id = attrs
        .into_iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad("<item/> without 'id'"))?;
    let payload = inner.trim_ascii();
    if !(payload.starts_with(b"<") && payload.ends_with(b">")) {
        return Err(bad(format!("item '{id}': the payload is not an element")));
    }
    Ok((id, content.slice_ref(payload)))
}

/// The reference semantics of `archive-retract` over an archive held as a slice: the
/// item keeps its id, time and `with`; its stanza becomes `payload`. Doing it again
/// changes nothing more; an id that names no item is `item-not-found`.
pub fn retract(archive: &mut [Item], id: &str, payload: Bytes) -> Result<(), Refusal> {
    let item = archive
        .iter_mut()
        .find(|i| i.id == id)
        .ok_or_else(|| unknown_id(id))?;
    item.payload = payload;
    Ok(())
}

impl crate::XdbClient {
    /// `archive-retract`: replaces the stanza of item `id` of the archive `ns` of
    /// `owner` with `payload` (a tombstone). Retried once like other requests: doing it
    /// twice is harmless.
    pub async fn archive_retract(
        &self,
        owner: &str,
        ns: &str,
        id: &str,
        payload: &[u8],
    ) -> Result<(), crate::XdbError> {
        self.request(
            crate::Op::ArchiveRetract,
            owner,
            ns,
            retraction_to_xml(id, payload),
            None,
        )
        .await
        .map(drop)
    }
}

/// What storage reports of a batch: the owners whose items it could not keep, as
/// `<failed owner= condition=>text</failed>` in the (successful) answer.
pub fn failures_to_xml(failures: &[(String, Refusal)]) -> String {
    failures
        .iter()
        .map(|(owner, r)| {
            format!(
                "<failed owner='{}' condition='{}'>{}</failed>",
                escape(owner),
                r.condition.name(),
                escape(&r.text)
            )
        })
        .collect()
}

pub fn parse_failures(content: &[u8]) -> Result<Vec<(String, Refusal)>, Refusal> {
    let mut out = vec![];
    for (name, attrs, text) in top_level(content)? {
        if name != "failed" {
            continue;
        }
        let get = |k: &str| attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let condition = get("condition")
            .and_then(|c| StanzaErrorCondition::parse(&c))
            .unwrap_or(StanzaErrorCondition::UndefinedCondition);
        let text = jrs_stream::xml::unescape(&String::from_utf8_lossy(text))
            .map(|t| t.into_owned())
            .unwrap_or_default();
        out.push((
            get("owner").unwrap_or_default(),
            Refusal::new(condition, text),
        ));
    }
    Ok(out)
}

impl Query {
    /// The content of an `archive-query` request.
    pub fn to_xml(&self) -> String {
        let mut s = String::from("<query");
        let mut attr = |k: &str, v: &str| s.push_str(&format!(" {k}='{}'", escape(v)));
        if let Some(w) = &self.with {
            attr("with", w);
        }
        if let Some(t) = self.start {
            attr("start", &t.to_string());
        }
        if let Some(t) = self.end {
            attr("end", &t.to_string());
        }
        if let Some(i) = &self.after_id {
            attr("after-id", i);
        }
        if let Some(i) = &self.before_id {
            attr("before-id", i);
        }
        if let Some(i) = &self.paging.after {
            attr("page-after", i);
        }
        if let Some(i) = &self.paging.before {
            attr("page-before", i);
        }
        if self.paging.from_end {
            attr("from-end", "true");
        }
        attr("max", &self.paging.max.to_string());
        if let Some(b) = self.paging.max_bytes {
            attr("max-bytes", &b.to_string());
        }
        if self.ids.is_empty() {
            s.push_str("/>");
        } else {
            s.push('>');
            for id in &self.ids {
                s.push_str(&format!("<id>{}</id>", escape(id)));
            }
            s.push_str("</query>");
        }
        s
    }

    pub fn parse(content: &[u8]) -> Result<Query, Refusal> {
        let mut nodes = top_level(content)?;
        if nodes.len() != 1 || nodes[0].0 != "query" {
            return Err(bad("an archive query carries one <query/>"));
        }
        let (_, attrs, inner) = nodes.remove(0);
        let get = |k: &str| attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let time = |k: &str| -> Result<Option<u64>, Refusal> {
            get(k)
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(format!("'{k}' is not a time in microseconds")))
                })
                .transpose()
        };
        let max = match get("max") {
            Some(v) => v.parse().map_err(|_| bad("'max' is not a whole number"))?,
            None => MAX_PAGE,
        };
        let mut ids = vec![];
        for (name, _, text) in top_level(inner)? {
            if name != "id" {
                return Err(bad(format!("unexpected <{name}> in a query")));
            }
            let text = std::str::from_utf8(text).map_err(|_| bad("id is not UTF-8"))?;
            let id = jrs_stream::xml::unescape(text).ok_or_else(|| bad("bad id"))?;
            ids.push(id.into_owned());
        }
        Ok(Query {
            with: get("with"),
            start: time("start")?,
            end: time("end")?,
            after_id: get("after-id"),
            before_id: get("before-id"),
            ids,
            paging: Paging {
                after: get("page-after"),
                before: get("page-before"),
                from_end: get("from-end").is_some_and(|v| v == "true"),
                max: max.min(MAX_PAGE),
                max_bytes: match get("max-bytes") {
                    Some(v) => Some(
                        v.parse()
                            .map_err(|_| bad("'max-bytes' is not a whole number"))?,
                    ),
                    None => None,
                },
            },
        })
    }

    /// Whether an item passes the filters that need only the item itself (`with`,
    /// time, `ids`); the id bounds depend on positions (see [`select`]).
    pub fn admits(&self, item_with: &str, time: u64, id: &str) -> bool {
        self.with
            .as_deref()
            .is_none_or(|w| with_matches(w, item_with))
            && self.start.is_none_or(|s| time >= s)
            && self.end.is_none_or(|e| time <= e)
            && (self.ids.is_empty() || self.ids.iter().any(|i| i == id))
    }
}

impl Page {
    /// The content of the answer to a query.
    pub fn to_bytes(&self) -> Bytes {
        let mut s = format!(
            "<archive count='{}' complete='{}'",
            self.count, self.complete
        );
        if let Some(i) = self.first_index {
            s.push_str(&format!(" first-index='{i}'"));
        }
        for (prefix, bound) in [("oldest", &self.oldest), ("newest", &self.newest)] {
            if let Some((id, time)) = bound {
                s.push_str(&format!(
                    " {prefix}-id='{}' {prefix}-time='{time}'",
                    escape(id)
                ));
            }
        }
        if self.items.is_empty() {
            s.push_str("/>");
            return Bytes::from(s);
        }
        s.push('>');
        let mut out = s.into_bytes();
        for i in &self.items {
            i.write(&mut out);
        }
        out.extend_from_slice(b"</archive>");
        Bytes::from(out)
    }

    /// The same as text.
    pub fn to_xml(&self) -> String {
        String::from_utf8_lossy(&self.to_bytes()).into_owned()
    }

    pub fn parse(content: &Bytes) -> Result<Page, Refusal> {
        let mut nodes = top_level(content)?;
        if nodes.len() != 1 || nodes[0].0 != "archive" {
            return Err(bad("an archive answer carries one <archive/>"));
        }
        let (_, attrs, inner) = nodes.remove(0);
        let get = |k: &str| attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
        let bound = |p: &str| get(&format!("{p}-id")).zip(num(&format!("{p}-time")));
        Ok(Page {
            count: num("count").unwrap_or(0) as usize,
            first_index: num("first-index").map(|i| i as usize),
            complete: get("complete").is_some_and(|v| v == "true"),
            items: parse_items(&content.slice_ref(inner))?,
            oldest: bound("oldest"),
            newest: bound("newest"),
        })
    }
}

impl Retention {
    /// Reads `max-items` and `max-age` attributes.
    pub fn from_attrs(get: impl Fn(&str) -> Option<String>) -> Result<Retention, Refusal> {
        let num = |k: &str| -> Result<Option<u64>, Refusal> {
            get(k)
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(format!("'{k}' is not a whole number")))
                })
                .transpose()
        };
        Ok(Retention {
            max_items: num("max-items")?,
            max_age: num("max-age")?,
        })
    }

    pub fn attrs(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.max_items {
            s.push_str(&format!(" max-items='{n}'"));
        }
        if let Some(n) = self.max_age {
            s.push_str(&format!(" max-age='{n}'"));
        }
        s
    }

    /// The index of the first item to keep among `len` items whose times `time(i)`
    /// never decrease, at `now` (microseconds).
    pub fn first_kept(&self, len: usize, now: u64, time: impl Fn(usize) -> u64) -> usize {
        let mut first = 0;
        if let Some(max) = self.max_items {
            first = len.saturating_sub(max as usize);
        }
        if let Some(age) = self.max_age {
            let cutoff = now.saturating_sub(age.saturating_mul(1_000_000));
            first = first.max(partition_point(first, len, |i| time(i) < cutoff));
        }
        first
    }
}

/// The first index in `lo..hi` for which `pred` is false (`pred` true then false).
pub fn partition_point(mut lo: usize, mut hi: usize, pred: impl Fn(usize) -> bool) -> usize {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The reference semantics of a query over an archive held as a slice in append order.
pub fn select(archive: &[Item], q: &Query) -> Result<Page, Refusal> {
    let position = |id: &str| {
        archive
            .iter()
            .position(|i| i.id == id)
            .ok_or_else(|| unknown_id(id))
    };
    // Positions bounding the filters, then the matching positions.
    let lo = match &q.after_id {
        Some(id) => position(id)? + 1,
        None => 0,
    };
    let hi = match &q.before_id {
        Some(id) => position(id)?,
        None => archive.len(),
    };
    for id in &q.ids {
        position(id)?;
    }
    let matching: Vec<usize> = (lo..hi.max(lo))
        .filter(|&p| {
            let i = &archive[p];
            q.admits(&i.with, i.time, &i.id)
        })
        .collect();
    // The page's window among the matching positions.
    let from = match &q.paging.after {
        Some(id) => {
            let p = position(id)?;
            matching.partition_point(|&m| m <= p)
        }
        None => 0,
    };
    let to = match &q.paging.before {
        Some(id) => {
            let p = position(id)?;
            matching.partition_point(|&m| m < p)
        }
        None => matching.len(),
    };
    let backwards = q.paging.from_end || q.paging.before.is_some();
    let (mut start, mut end) = window(from, to.max(from), q.paging.max.min(MAX_PAGE), backwards);
    if let Some(budget) = q.paging.max_bytes {
        let cost = |m: usize| item_cost(&archive[matching[m]]);
        (start, end) = fit(start, end, budget, backwards, cost);
    }
    Ok(Page {
        count: matching.len(),
        first_index: (start < end).then_some(start),
        complete: if q.paging.from_end || q.paging.before.is_some() {
            start == 0
        } else {
            end == matching.len()
        },
        items: matching[start..end]
            .iter()
            .map(|&p| archive[p].clone())
            .collect(),
        oldest: archive.first().map(|i| (i.id.clone(), i.time)),
        newest: archive.last().map(|i| (i.id.clone(), i.time)),
    })
}

/// What an item counts against [`Paging::max_bytes`]: its payload and its tags.
pub fn item_cost(item: &Item) -> usize {
    item.payload.len() + item.id.len() + item.with.len() + 64
}

/// Shrinks the window `start..end` (from its far end in the paging direction) until the
/// items' costs fit `budget`, keeping at least one item.
pub fn fit(
    start: usize,
    end: usize,
    budget: usize,
    backwards: bool,
    cost: impl Fn(usize) -> usize,
) -> (usize, usize) {
    let mut used = 0;
    let mut taken = 0;
    let len = end - start;
    while taken < len {
        let m = if backwards {
            end - 1 - taken
        } else {
            start + taken
        };
        used += cost(m);
        if used > budget && taken > 0 {
            break;
        }
        taken += 1;
    }
    if backwards {
        (end - taken, end)
    } else {
        (start, start + taken)
    }
}

/// The `max` positions of `from..to` at its start, or at its end when `from_end`.
pub fn window(from: usize, to: usize, max: usize, from_end: bool) -> (usize, usize) {
    if from_end {
        (to.saturating_sub(max).max(from), to)
    } else {
        (from, (from + max).min(to))
    }
}

/// Top-level elements of a fragment: (name, unescaped attributes, raw content).
type Node<'a> = (String, Vec<(String, String)>, &'a [u8]);

fn top_level(content: &[u8]) -> Result<Vec<Node<'_>>, Refusal> {
    let mut reader = Reader::from_reader(content);
    let mut out = vec![];
    let mut depth = 0usize;
    // The element open at depth 1: name, attributes, where its content starts.
    type Open = (String, Vec<(String, String)>, usize);
    let mut open: Option<Open> = None;
    loop {
        let before = reader.buffer_position() as usize;
        let event = reader
            .read_event()
            .map_err(|e| bad(format!("not well-formed: {e}")))?;
        match event {
            Event::Start(e) => {
                if depth == 0 {
                    open = Some((
                        name_of(&e),
                        attrs_of(&e)?,
                        reader.buffer_position() as usize,
                    ));
                }
                depth += 1;
            }
            Event::Empty(e) if depth == 0 => out.push((name_of(&e), attrs_of(&e)?, &content[0..0])),
            Event::End(_) => {
                depth = depth.checked_sub(1).ok_or_else(|| bad("unbalanced tags"))?;
                if depth == 0 {
                    let (name, attrs, start) = open.take().expect("opened at depth 0");
                    out.push((name, attrs, &content[start..before]));
                }
            }
            Event::Text(t) if depth == 0 && !AsRef::<str>::as_ref(&t).trim().is_empty() => {
                return Err(bad("text outside elements"))
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if depth != 0 {
        return Err(bad("element not closed"));
    }
    Ok(out)
}

fn name_of(e: &quick_xml::events::BytesStart) -> String {
    e.local_name().as_ref().to_owned()
}

fn attrs_of(e: &quick_xml::events::BytesStart) -> Result<Vec<(String, String)>, Refusal> {
    let mut out = vec![];
    for a in e.attributes() {
        let a = a.map_err(|e| bad(format!("bad attribute: {e}")))?;
        let value = quick_xml::escape::unescape(&a.value)
            .map_err(|e| bad(format!("bad attribute value: {e}")))?;
        out.push((a.key.as_ref().to_owned(), value.into_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u64, with: &str) -> Item {
        Item {
            id: format!("{n:04}"),
            time: n * 1000,
            with: with.into(),
            payload: Bytes::from(format!(
                "<message xmlns='jabber:client'><body>{n}</body></message>"
            )),
        }
    }

    fn archive() -> Vec<Item> {
        (1..=10)
            .map(|n| item(n, if n % 2 == 0 { "bob@b/phone" } else { "carol@c" }))
            .collect()
    }

    fn ids(p: &Page) -> Vec<&str> {
        p.items.iter().map(|i| i.id.as_str()).collect()
    }

    #[test]
    fn xml_round_trips() {
        let q = Query {
            with: Some("bob@b".into()),
            start: Some(5),
            end: Some(9),
            after_id: Some("a&b".into()),
            before_id: None,
            ids: vec!["x".into(), "y<".into()],
            paging: Paging {
                after: Some("p".into()),
                before: None,
                from_end: true,
                max: 7,
                max_bytes: Some(1000),
            },
        };
        assert_eq!(Query::parse(q.to_xml().as_bytes()).unwrap(), q);
        let page = select(
            &archive(),
            &Query {
                paging: Paging {
                    max: 3,
                    ..Paging::default()
                },
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(Page::parse(&Bytes::from(page.to_xml())).unwrap(), page);
        let items = archive();
        assert_eq!(
            parse_items(&Bytes::from(items_to_xml(&items))).unwrap(),
            items
        );
    }

    #[test]
    fn batches_name_their_owners() {
        let mut b = BatchWriter::default();
        b.push("a@d", "1", 5, "x@y/r", |out| {
            out.extend_from_slice(b"<message xmlns='jabber:client'/>")
        });
        b.push("b@d", "2", 6, "x@y", |out| {
            out.extend_from_slice(b"<message xmlns='jabber:client'><body>&amp;</body></message>")
        });
        b.push("c&'\"@d", "3<", 7, "x'\"@y", |out| {
            out.extend_from_slice(b"<x/>")
        });
        assert_eq!(b.len(), 3);
        let content = b.take();
        assert!(parse_framed(&content).is_some());
        let items = parse_owned_items(&content).unwrap();
        assert!(b.is_empty());
        assert_eq!(items[0].0.as_deref(), Some("a@d"));
        assert_eq!((items[1].1.id.as_str(), items[1].1.time), ("2", 6));
        // Escaped in the tag, read back as written.
        assert_eq!(items[2].0.as_deref(), Some("c&'\"@d"));
        assert_eq!(
            (items[2].1.id.as_str(), items[2].1.with.as_str()),
            ("3<", "x'\"@y")
        );
        assert_eq!(
            &items[1].1.payload[..],
            b"<message xmlns='jabber:client'><body>&amp;</body></message>"
        );
        let f = vec![(
            "a@d".to_owned(),
            Refusal::new(StanzaErrorCondition::Conflict, "ids <"),
        )];
        assert_eq!(parse_failures(failures_to_xml(&f).as_bytes()).unwrap(), f);
    }

    #[test]
    fn pages_forwards_and_backwards() {
        let a = archive();
        let page = |paging: Paging| {
            select(
                &a,
                &Query {
                    paging,
                    ..Query::default()
                },
            )
            .unwrap()
        };
        let first = page(Paging {
            max: 4,
            ..Paging::default()
        });
        assert_eq!(ids(&first), ["0001", "0002", "0003", "0004"]);
        assert_eq!(
            (first.count, first.first_index, first.complete),
            (10, Some(0), false)
        );
        let next = page(Paging {
            after: Some("0008".into()),
            max: 4,
            ..Paging::default()
        });
        assert_eq!(ids(&next), ["0009", "0010"]);
        assert!(next.complete);
        let last = page(Paging {
            from_end: true,
            max: 3,
            ..Paging::default()
        });
        assert_eq!(ids(&last), ["0008", "0009", "0010"]);
        assert_eq!((last.first_index, last.complete), (Some(7), false));
        let before = page(Paging {
            before: Some("0003".into()),
            max: 5,
            ..Paging::default()
        });
        assert_eq!(ids(&before), ["0001", "0002"]);
        assert!(before.complete);
        assert_eq!(page(Paging::default()).items.len(), 0);
        // A byte budget cuts the page short from its far end.
        let two = item_cost(&a[0]) + item_cost(&a[1]);
        let fitted = page(Paging {
            max: 5,
            max_bytes: Some(two),
            ..Paging::default()
        });
        assert_eq!(ids(&fitted), ["0001", "0002"]);
        assert!(!fitted.complete);
        let fitted = page(Paging {
            from_end: true,
            max: 5,
            max_bytes: Some(1),
            ..Paging::default()
        });
        assert_eq!(ids(&fitted), ["0010"]);
    }

    #[test]
    fn filters() {
        let a = archive();
        let q = |q: Query| select(&a, &q);
        let bob = q(Query {
            with: Some("bob@b".into()),
            paging: Paging {
                max: 50,
                ..Paging::default()
            },
            ..Query::default()
        })
        .unwrap();
        assert_eq!(bob.count, 5);
        let full = q(Query {
            with: Some("bob@b/laptop".into()),
            paging: Paging {
                max: 50,
                ..Paging::default()
            },
            ..Query::default()
        })
        .unwrap();
        assert_eq!(full.count, 0);
        let timed = q(Query {
            start: Some(3000),
            end: Some(5000),
            paging: Paging {
                max: 50,
                ..Paging::default()
            },
            ..Query::default()
        })
        .unwrap();
        assert_eq!(ids(&timed), ["0003", "0004", "0005"]);
        let bounded = q(Query {
            after_id: Some("0007".into()),
            paging: Paging {
                max: 50,
                ..Paging::default()
            },
            ..Query::default()
        })
        .unwrap();
        assert_eq!(ids(&bounded), ["0008", "0009", "0010"]);
        let some = q(Query {
            ids: vec!["0009".into(), "0002".into()],
            paging: Paging {
                max: 50,
                ..Paging::default()
            },
            ..Query::default()
        })
        .unwrap();
        assert_eq!(ids(&some), ["0002", "0009"]);
        let unknown = q(Query {
            ids: vec!["0002".into(), "nope".into()],
            ..Query::default()
        })
        .unwrap_err();
        assert_eq!(unknown.condition, StanzaErrorCondition::ItemNotFound);
        let missing = q(Query {
            before_id: Some("nope".into()),
            ..Query::default()
        })
        .unwrap_err();
        assert_eq!(missing.condition, StanzaErrorCondition::ItemNotFound);
    }

    #[test]
    fn retractions_replace_the_stanza_and_keep_the_rest() {
        let mut a = archive();
        let tombstone =
            Bytes::from_static(b"<message xmlns='jabber:client'><retracted/></message>");
        let content = retraction_to_xml("00&3", &tombstone);
        let (id, payload) = parse_retraction(&content).unwrap();
        assert_eq!((id.as_str(), &payload[..]), ("00&3", &tombstone[..]));
        retract(&mut a, "0003", tombstone.clone()).unwrap();
        retract(&mut a, "0003", tombstone.clone()).unwrap();
        assert_eq!(a[2].payload, tombstone);
        assert_eq!((a[2].id.as_str(), a[2].time), ("0003", 3000));
        assert_eq!(a[3], archive()[3]);
        let e = retract(&mut a, "nope", tombstone).unwrap_err();
        assert_eq!(e.condition, StanzaErrorCondition::ItemNotFound);
        for bad in [
            "",
            "<item/>",
            "<item id='x'>text</item>",
            "<item id='a'><m/></item><item id='b'><m/></item>",
        ] {
            assert!(parse_retraction(&Bytes::from(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn retention() {
        let times = [10u64, 20, 30, 40];
        let t = |i: usize| times[i] * 1_000_000;
        let r = Retention {
            max_items: Some(3),
            max_age: None,
        };
        assert_eq!(r.first_kept(4, 0, t), 1);
        let r = Retention {
            max_items: None,
            max_age: Some(15),
        };
        assert_eq!(r.first_kept(4, 40_000_000, t), 2);
        assert_eq!(Retention::default().first_kept(4, 0, t), 0);
    }
}
