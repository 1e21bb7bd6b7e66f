use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::archive::{items_to_xml, select, Item, Page, Paging, Query, Retention};

use super::format::{idx_name, log_name, with_file_name, IdxEntry, WITH_DIR};
use super::Archives;
use crate::spool::{Owner, Spool};

/// xorshift64*: a small deterministic generator, so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

struct Fixture {
    root: PathBuf,
    spool: Spool,
    archives: Archives,
    dir: PathBuf,
}

impl Fixture {
    fn new(segment_items: u64) -> Fixture {
        Fixture::with_files(segment_items, 64)
    }

    fn with_files(segment_items: u64, open_files: usize) -> Fixture {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "jrs-archive-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        let spool = Spool::new(root.clone(), 16, Default::default());
        let dir = spool.archive_dir(&Owner::parse("alice@localhost").unwrap(), "urn:xmpp:mam:2");
        Fixture {
            root,
            spool,
            archives: Archives::new(4, open_files, segment_items),
            dir,
        }
    }

    fn append_with(
        &mut self,
        items: &[Item],
        retention: Retention,
        now: u64,
    ) -> Result<(), jrs_xdb::Refusal> {
        let r = self.archives.append(
            &mut self.spool,
            &self.dir.clone(),
            items_to_xml(items).as_bytes(),
            retention,
            now,
        );
        self.spool.commit().unwrap();
        r
    }

    fn append(&mut self, items: &[Item]) {
        self.append_with(items, Retention::default(), 0).unwrap();
    }

    fn query(&mut self, q: &Query) -> Result<Page, jrs_xdb::Refusal> {
        let dir = self.dir.clone();
        let r = self
            .archives
            .query(&mut self.spool, &dir, q.to_xml().as_bytes())
            .map(|b| Page::parse(&b).unwrap());
        self.spool.commit().unwrap();
        r
    }

    fn trim(&mut self, retention: Retention, now: u64) {
        let dir = self.dir.clone();
        self.archives
            .trim(&mut self.spool, &dir, retention, now)
            .unwrap();
        self.spool.commit().unwrap();
    }

    fn retract(&mut self, id: &str, payload: &Bytes) -> Result<(), jrs_xdb::Refusal> {
        let dir = self.dir.clone();
        let content = jrs_xdb::archive::retraction_to_xml(id, payload);
        let r = self.archives.retract(&mut self.spool, &dir, &content);
        self.spool.commit().unwrap();
        r
    }

    /// Forgets everything in memory: the next request opens the archive from disk, as
    /// after a restart.
    fn reopen(&mut self) {
        self.archives.clear();
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

fn item(n: u64, with: &str) -> Item {
    Item {
        id: format!("{n:06}"),
        time: 1_000_000 * n,
        with: with.into(),
        payload: Bytes::from(format!(
            "<message xmlns='jabber:client' type='chat'><body>message {n}</body></message>"
        )),
    }
}

fn items(range: std::ops::Range<u64>) -> Vec<Item> {
    range
        .map(|n| {
            item(
                n,
                ["bob@b/phone", "carol@c", "bob@b/laptop"][n as usize % 3],
            )
        })
        .collect()
}

fn page(max: usize) -> Query {
    Query {
        paging: Paging {
            max,
            ..Paging::default()
        },
        ..Query::default()
    }
}

fn ids(p: &Page) -> Vec<String> {
    p.items.iter().map(|i| i.id.clone()).collect()
}

fn all(f: &mut Fixture) -> Vec<Item> {
    let mut out: Vec<Item> = vec![];
    loop {
        let mut q = page(250);
        q.paging.after = out.last().map(|i| i.id.clone());
        let p = f.query(&q).unwrap();
        out.extend(p.items.iter().cloned());
        if p.complete {
            return out;
        }
    }
}

#[test]
fn append_query_and_page() {
    let mut f = Fixture::new(8);
    let empty = f.query(&page(10)).unwrap();
    assert_eq!(
        (empty.count, empty.complete, empty.oldest.clone()),
        (0, true, None)
    );
    assert!(!f.dir.exists(), "a query creates nothing");
    let a = items(1..31);
    f.append(&a[..10]);
    f.append(&a[10..]);
    let first = f.query(&page(5)).unwrap();
    assert_eq!(
        ids(&first),
        ["000001", "000002", "000003", "000004", "000005"]
    );
    assert_eq!(
        (first.count, first.first_index, first.complete),
        (30, Some(0), false)
    );
    assert_eq!(first.oldest, Some(("000001".into(), 1_000_000)));
    assert_eq!(first.newest, Some(("000030".into(), 30_000_000)));
    let mut last = page(4);
    last.paging.from_end = true;
    let last = f.query(&last).unwrap();
    assert_eq!(ids(&last), ["000027", "000028", "000029", "000030"]);
    assert_eq!(last.first_index, Some(26));
    let mut before = page(3);
    before.paging.before = Some("000010".into());
    assert_eq!(
        ids(&f.query(&before).unwrap()),
        ["000007", "000008", "000009"]
    );
    f.reopen();
    assert_eq!(all(&mut f), a);
    // Segments of 8 items: 0..8 (items 1-8), 8..16, 16..24, 24..30.
    for s in [0u64, 8, 16, 24] {
        assert!(f.file(&log_name(s)).exists() && f.file(&idx_name(s)).exists());
    }
    assert!(!f.file(&log_name(32)).exists());
}

#[test]
fn filters_by_with_time_and_ids() {
    let mut f = Fixture::new(4);
    let a = items(1..40);
    f.append(&a);
    for with in ["bob@b", "bob@b/phone", "carol@c", "nobody@x", "bob@b/other"] {
        let mut q = page(250);
        q.with = Some(with.into());
        assert_eq!(f.query(&q), select(&a, &q), "{with}");
    }
    let mut q = page(3);
    q.with = Some("bob@b".into());
    q.paging.from_end = true;
    q.start = Some(5_000_000);
    q.end = Some(30_000_000);
    let p = f.query(&q).unwrap();
    assert_eq!(ids(&p), ["000027", "000029", "000030"]);
    assert_eq!(Ok(p), select(&a, &q));
    let mut q = page(10);
    q.ids = vec!["000007".into(), "000003".into(), "000008".into()];
    q.after_id = Some("000004".into());
    q.with = Some("bob@b".into());
    assert_eq!(ids(&f.query(&q).unwrap()), ["000008"]);
    q.ids.push("nope".into());
    assert_eq!(
        f.query(&q).unwrap_err().condition,
        StanzaErrorCondition::ItemNotFound
    );
    let mut q = page(10);
    q.before_id = Some("nope".into());
    assert_eq!(
        f.query(&q).unwrap_err().condition,
        StanzaErrorCondition::ItemNotFound
    );
}

#[test]
fn retried_appends_are_skipped_and_smaller_new_ids_conflict() {
    let mut f = Fixture::new(4);
    let a = items(1..11);
    f.append(&a[..6]);
    f.append(&a[..6]); // the same request again
    f.append(&a[3..10]); // overlapping
    assert_eq!(all(&mut f), a);
    let mut stranger = item(5, "eve@e");
    stranger.id = "000005x".into(); // between two items, not in the archive
    let e = f
        .append_with(&[item(11, "bob@b"), stranger], Retention::default(), 0)
        .unwrap_err();
    assert_eq!(e.condition, StanzaErrorCondition::Conflict);
    assert_eq!(all(&mut f), a, "a refused request writes nothing");
    let mut early = item(12, "bob@b");
    early.time = 1;
    assert_eq!(
        f.append_with(&[early], Retention::default(), 0)
            .unwrap_err()
            .condition,
        StanzaErrorCondition::BadRequest
    );
}

#[test]
fn refuses_items_it_cannot_keep() {
    let mut f = Fixture::new(4);
    let dir = f.dir.clone();
    for content in [
        "<item time='1' with='a@b'><message/></item>",
        "<item id='' time='1'><message/></item>",
        "<item id='1' with='a@b'><message/></item>",
        "<item id='1' time='1'><message><body></message></item>",
        "<item id='1' time='1'>text, not an element</item>",
    ] {
        let e = f
            .archives
            .append(
                &mut f.spool,
                &dir,
                content.as_bytes(),
                Retention::default(),
                0,
            )
            .unwrap_err();
        assert_eq!(e.condition, StanzaErrorCondition::BadRequest, "{content}");
    }
    assert!(!dir.exists());
}

#[test]
fn retention_moves_the_low_water_mark_and_removes_segments() {
    let mut f = Fixture::new(4);
    let a = items(1..31);
    f.append(&a);
    f.trim(
        Retention {
            max_items: Some(10),
            max_age: None,
        },
        0,
    );
    assert_eq!(all(&mut f), a[20..]);
    // Items 0..20 are gone; segments wholly below 20 removed, the rest kept.
    for s in [0u64, 4, 8, 12, 16] {
        assert!(!f.file(&log_name(s)).exists(), "segment {s}");
    }
    assert!(f.file(&log_name(20)).exists());
    f.reopen();
    let p = f.query(&page(1)).unwrap();
    assert_eq!(
        (p.count, p.oldest.clone()),
        (10, Some(("000021".into(), 21_000_000)))
    );
    // By age: at time 35 s, keep 8 seconds.
    f.trim(
        Retention {
            max_items: None,
            max_age: Some(8),
        },
        35_000_000,
    );
    assert_eq!(all(&mut f), a[26..]);
    // Appending with retention; an id below the mark is unknown.
    f.append_with(
        &items(31..33),
        Retention {
            max_items: Some(3),
            max_age: None,
        },
        0,
    )
    .unwrap();
    assert_eq!(
        all(&mut f),
        [a[29].clone(), item(31, "carol@c"), item(32, "bob@b/laptop")]
    );
    let mut q = page(5);
    q.paging.after = Some("000010".into());
    assert_eq!(
        f.query(&q).unwrap_err().condition,
        StanzaErrorCondition::ItemNotFound
    );
    // With-index entries of removed items are dropped with their segments.
    let mut q = page(50);
    q.with = Some("bob@b".into());
    assert_eq!(ids(&f.query(&q).unwrap()), ["000030", "000032"]);
    let bob = f.dir.join(WITH_DIR).join(with_file_name("bob@b"));
    assert_eq!(fs::metadata(bob).unwrap().len(), 2 * 16);
    // Everything removed: the archive is empty, and ids still have to increase.
    f.trim(
        Retention {
            max_items: Some(0),
            max_age: None,
        },
        0,
    );
    let p = f.query(&page(5)).unwrap();
    assert_eq!((p.count, p.oldest, p.newest), (0, None, None));
    f.reopen();
    assert_eq!(f.query(&page(5)).unwrap().count, 0);
    assert_eq!(
        f.append_with(&[item(2, "x@y")], Retention::default(), 0)
            .unwrap_err()
            .condition,
        StanzaErrorCondition::Conflict
    );
    f.append(&items(40..42));
    assert_eq!(ids(&f.query(&page(5)).unwrap()), ["000040", "000041"]);
}

#[test]
fn torn_tails_are_cut_back() {
    let mut f = Fixture::new(8);
    let a = items(1..13); // segments 0 (8 items) and 8 (4 items)
    f.append(&a);
    let idx = f.file(&idx_name(8));
    let log = f.file(&log_name(8));
    let bob = f.dir.join(WITH_DIR).join(with_file_name("bob@b"));
    let append_to = |path: &PathBuf, data: &[u8]| {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(data)
            .unwrap();
    };
    // An entry pointing past the end of the log, then half an entry.
    let log_len = fs::metadata(&log).unwrap().len();
    append_to(
        &idx,
        &IdxEntry::new(99_000_000, log_len + 10, 120, "000099").encode(),
    );
    append_to(&idx, &[7; 20]);
    // Log bytes no entry covers; with-index entries of items that do not exist.
    append_to(&log, &[1; 300]);
    append_to(
        &bob,
        &super::format::encode_with(12, super::format::with_hash("bob@b/phone")),
    );
    append_to(&bob, &[0; 16]);
    f.reopen();
    assert_eq!(all(&mut f), a);
    assert_eq!(fs::metadata(&idx).unwrap().len(), 4 * 64);
    assert_eq!(fs::metadata(&log).unwrap().len(), log_len);
    let mut q = page(50);
    q.with = Some("bob@b".into());
    assert_eq!(f.query(&q), select(&a, &q));
    // A last record whose checksum fails is a torn write too: cut with its entry.
    let mut data = fs::read(&log).unwrap();
    let n = data.len();
    data[n - 5] ^= 0x55;
    fs::write(&log, &data).unwrap();
    f.reopen();
    assert_eq!(all(&mut f), a[..11]);
    // Appending goes on from there, and the retried item comes back.
    f.append(&a[10..]);
    f.append(&items(13..15));
    assert_eq!(all(&mut f), items(1..15));
    assert_eq!(f.query(&q), select(&items(1..15), &q));
}

fn tombstone(n: u64) -> Bytes {
    Bytes::from(format!(
        "<message xmlns='jabber:client' type='groupchat'><retracted xmlns='urn:xmpp:message-retract:1' stamp='{n}'/></message>"
    ))
}

/// `archive-retract` against the reference semantics, in old and head segments, across
/// reopening and later appends; the original bytes are gone from the log.
#[test]
fn retracted_items_keep_their_place_and_lose_their_stanza() {
    let mut f = Fixture::new(4);
    let mut a = items(1..11); // segments 0, 4 and 8 (the head: 3 items)
    f.append(&a);
    for (id, n) in [("000002", 2), ("000009", 9), ("000010", 10), ("000009", 90)] {
        f.retract(id, &tombstone(n)).unwrap();
        jrs_xdb::archive::retract(&mut a, id, tombstone(n)).unwrap();
        assert_eq!(all(&mut f), a);
    }
    // Again: nothing changes.
    f.retract("000002", &tombstone(2)).unwrap();
    let log0 = fs::read(f.file(&log_name(0))).unwrap();
    f.reopen();
    assert_eq!(all(&mut f), a);
    assert_eq!(fs::read(f.file(&log_name(0))).unwrap(), log0);
    let text = |name: &str| String::from_utf8_lossy(&fs::read(f.file(name)).unwrap()).into_owned();
    for (name, gone) in [(log_name(0), "message 2<"), (log_name(8), "message 9<")] {
        assert!(!text(&name).contains(gone), "{name} still holds {gone}");
    }
    let mut q = page(50);
    q.with = Some("carol@c".into());
    assert_eq!(f.query(&q), select(&a, &q));
    q.with = Some("bob@b/laptop".into());
    assert_eq!(f.query(&q), select(&a, &q));
    // Appends go on after the replacement records, and survive reopening.
    f.append(&items(11..14));
    a.extend(items(11..14));
    f.retract("000011", &tombstone(11)).unwrap();
    jrs_xdb::archive::retract(&mut a, "000011", tombstone(11)).unwrap();
    f.reopen();
    assert_eq!(all(&mut f), a);
    // Unknown ids, and items retention removed.
    let e = f.retract("000099", &tombstone(0)).unwrap_err();
    assert_eq!(e.condition, StanzaErrorCondition::ItemNotFound);
    f.trim(
        Retention {
            max_items: Some(10),
            max_age: None,
        },
        0,
    );
    let e = f.retract("000001", &tombstone(0)).unwrap_err();
    assert_eq!(e.condition, StanzaErrorCondition::ItemNotFound);
    let e = f
        .archives
        .retract(
            &mut f.spool,
            &f.dir.clone(),
            b"<item id='000012'>text</item>",
        )
        .unwrap_err();
    assert_eq!(e.condition, StanzaErrorCondition::BadRequest);
    // An empty archive has nothing to retract.
    let mut empty = Fixture::new(4);
    let e = empty.retract("000001", &tombstone(0)).unwrap_err();
    assert_eq!(e.condition, StanzaErrorCondition::ItemNotFound);
}

/// A retraction whose index entry never reached the disk: the replacement record at the
/// end of the head log is cut when the archive is opened, and the item is as it was.
#[test]
fn an_unacknowledged_retraction_is_cut_back() {
    let mut f = Fixture::new(8);
    let a = items(1..5);
    f.append(&a);
    let log = f.file(&log_name(0));
    let before = fs::read(&log).unwrap();
    let mut record = vec![];
    let replaced = Item {
        payload: tombstone(2),
        ..a[1].clone()
    };
    super::format::encode_record(1, &replaced, &mut record);
    OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(&record)
        .unwrap();
    f.reopen();
    assert_eq!(all(&mut f), a);
    assert_eq!(fs::read(&log).unwrap(), before);
    // The retraction done again works.
    f.retract("000002", &tombstone(2)).unwrap();
    f.reopen();
    assert_eq!(all(&mut f)[1].payload, tombstone(2));
}

#[test]
fn a_crash_before_the_first_commit_leaves_an_archive_that_works() {
    let mut f = Fixture::new(4);
    f.append(&items(1..6));
    // As if the process died before the batch's commit renamed `meta` into place, and
    // the with-index entries of an append were written but nothing else.
    fs::remove_file(f.file(super::format::META_FILE)).unwrap();
    let carol = f.dir.join(WITH_DIR).join(with_file_name("carol@c"));
    let mut data = fs::read(&carol).unwrap();
    data.extend_from_slice(&super::format::encode_with(
        5,
        super::format::with_hash("carol@c"),
    ));
    fs::write(&carol, &data).unwrap();
    f.reopen();
    assert_eq!(all(&mut f), items(1..6));
    f.append(&[item(6, "dave@d")]);
    assert!(f.file(super::format::META_FILE).exists());
    let mut q = page(50);
    q.with = Some("carol@c".into());
    let mut expected = items(1..6);
    expected.push(item(6, "dave@d"));
    assert_eq!(f.query(&q), select(&expected, &q));
}

#[test]
fn a_retried_append_restores_lost_with_entries() {
    let mut f = Fixture::new(8);
    let a = items(1..10);
    f.append(&a);
    // A crash kept the records but lost the with-index's last entries.
    let bob = f.dir.join(WITH_DIR).join(with_file_name("bob@b"));
    let len = fs::metadata(&bob).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&bob)
        .unwrap()
        .set_len(len - 32)
        .unwrap();
    f.reopen();
    let mut q = page(50);
    q.with = Some("bob@b".into());
    assert_eq!(f.query(&q).unwrap().count, 4);
    f.append(&a[3..]);
    assert_eq!(f.query(&q), select(&a, &q));
    // One lost in the middle too.
    let mut data = fs::read(&bob).unwrap();
    data.drain(16..32);
    fs::write(&bob, &data).unwrap();
    f.reopen();
    f.append(&a);
    assert_eq!(f.query(&q), select(&a, &q));
}

#[test]
fn corrupt_records_are_reported_skipped_and_kept() {
    let mut f = Fixture::new(8);
    let a = items(1..21);
    f.append(&a);
    // Flip a byte inside item 5's record (segment 0) and item 11's index entry.
    let log = f.file(&log_name(0));
    let mut data = fs::read(&log).unwrap();
    let entry = IdxEntry::decode(&fs::read(f.file(&idx_name(0))).unwrap()[4 * 64..5 * 64]).unwrap();
    data[entry.offset as usize + 40] ^= 0x20;
    fs::write(&log, &data).unwrap();
    let idx = f.file(&idx_name(8));
    let mut idx_data = fs::read(&idx).unwrap();
    idx_data[2 * 64 + 3] ^= 1;
    fs::write(&idx, &idx_data).unwrap();
    f.reopen();
    let got = all(&mut f);
    let expected: Vec<Item> = a
        .iter()
        .filter(|i| i.id != "000005" && i.id != "000011")
        .cloned()
        .collect();
    assert_eq!(got, expected);
    assert_eq!(f.query(&page(0)).unwrap().count, 20, "counted by position");
    // Searches step over them.
    let mut q = page(2);
    q.paging.after = Some("000010".into());
    assert_eq!(ids(&f.query(&q).unwrap()), ["000012"]);
    // Appends go on; the files are left as they were.
    f.append(&items(21..23));
    assert_eq!(fs::read(&log).unwrap(), data);
    assert_eq!(fs::read(&idx).unwrap(), idx_data);
    // A missing middle segment is skipped too.
    fs::remove_file(f.file(&idx_name(8))).unwrap();
    fs::remove_file(f.file(&log_name(8))).unwrap();
    f.reopen();
    let got = all(&mut f);
    assert_eq!(got.len(), 8 - 1 + 4 + 2);
}

#[test]
fn index_entries_that_point_past_the_log_are_skipped() {
    // Found by fuzzing (docs/fuzzing.md): an index entry whose checksum holds but whose
    // record would end past the end of the log (or past u64::MAX) made a query allocate
    // the record's length (up to 4 GiB) before reading, or overflow.
    let mut f = Fixture::new(4);
    let a = items(1..11);
    f.append(&a);
    let idx = f.file(&idx_name(4));
    let mut data = fs::read(&idx).unwrap();
    let log_len = fs::metadata(f.file(&log_name(4))).unwrap().len();
    let e = IdxEntry::decode(&data[64..128]).unwrap();
    let huge = IdxEntry { len: u32::MAX, ..e };
    data[64..128].copy_from_slice(&huge.encode());
    let past = IdxEntry {
        offset: log_len,
        ..e
    };
    data[128..192].copy_from_slice(&past.encode());
    fs::write(&idx, &data).unwrap();
    let overflow = IdxEntry {
        offset: u64::MAX - 10,
        ..e
    }
    .encode();
    assert_eq!(IdxEntry::decode(&overflow), None);
    f.reopen();
    let got = all(&mut f);
    let expected: Vec<Item> = a
        .iter()
        .filter(|i| i.id != "000006" && i.id != "000007")
        .cloned()
        .collect();
    assert_eq!(got, expected);
    // A segment file named past the last sequence number is ignored.
    fs::write(f.file(&idx_name(u64::MAX - 3)), &data[..64]).unwrap();
    fs::write(f.file(&log_name(u64::MAX - 3)), b"").unwrap();
    f.reopen();
    assert_eq!(all(&mut f), expected);
}

#[test]
fn a_long_gap_of_missing_segments_is_crossed_at_once() {
    // Found by fuzzing (docs/fuzzing.md): one bit flipped in a segment file's name put
    // the head segment 2^34 segments away, and every search walked the gap segment by
    // segment (a worker stuck for ever).
    let mut f = Fixture::new(4);
    f.append(&items(1..7));
    fs::write(f.file(&log_name(1 << 36)), b"").unwrap();
    f.reopen();
    assert_eq!(ids(&f.query(&page(10)).unwrap()).len(), 6);
    assert!(f.retract("000003", &tombstone(3)).is_ok());
    assert!(f.retract("000099", &tombstone(99)).is_err());
}

#[test]
fn delete_removes_the_archive() {
    let mut f = Fixture::new(4);
    f.append(&items(1..10));
    let dir = f.dir.clone();
    f.archives.delete(&mut f.spool, &dir).unwrap();
    f.spool.commit().unwrap();
    assert!(!dir.exists());
    assert_eq!(f.query(&page(5)).unwrap().count, 0);
    f.append(&items(1..3));
    assert_eq!(all(&mut f), items(1..3));
    // Account removal: the whole owner goes, and nothing stale is kept in memory.
    let alice = Owner::parse("alice@localhost").unwrap();
    f.spool
        .set(&alice, "jabber:iq:roster", b"<query/>")
        .unwrap();
    f.spool.commit().unwrap();
    assert_eq!(f.spool.list("localhost").unwrap(), ["alice@localhost"]);
    f.archives.forget_under(&f.spool.owner_dir(&alice));
    f.spool.delete(&alice, "*").unwrap();
    f.spool.commit().unwrap();
    assert_eq!(f.query(&page(5)).unwrap().count, 0);
    assert!(f.spool.list("localhost").unwrap().is_empty());
    f.append(&items(5..6));
    assert_eq!(all(&mut f), items(5..6));
    // An owner with only an archive is listed; leftovers of removals are not.
    fs::create_dir_all(f.root.join("localhost/.bob.deleted/x.archive")).unwrap();
    assert_eq!(f.spool.list("localhost").unwrap(), ["alice@localhost"]);
}

#[test]
fn few_open_files_for_many_archives() {
    let mut f = Fixture::with_files(4, 4);
    let owners: Vec<PathBuf> = (0..6)
        .map(|n| {
            f.spool
                .archive_dir(&Owner::parse(&format!("u{n}@localhost")).unwrap(), "mam")
        })
        .collect();
    for round in 0..3u64 {
        for dir in &owners {
            let batch = items(round * 10 + 1..round * 10 + 11);
            f.archives
                .append(
                    &mut f.spool,
                    dir,
                    items_to_xml(&batch).as_bytes(),
                    Retention::default(),
                    0,
                )
                .unwrap();
        }
        f.spool.commit().unwrap();
    }
    for dir in &owners {
        let p = f
            .archives
            .query(&mut f.spool, dir, page(250).to_xml().as_bytes())
            .unwrap();
        assert_eq!(Page::parse(&p).unwrap().items, items(1..31));
    }
}

/// Random archives and queries, every answer compared with `select`.
#[test]
fn random_queries_match_select() {
    for (seed, segment_items, long_ids) in [
        (1u64, 7, false),
        (2, 64, true),
        (3, 65536, false),
        (4, 3, true),
        (5, 1, false),
        (6, 16, false),
    ] {
        random_run(seed, segment_items, long_ids);
    }
}

fn random_run(seed: u64, segment_items: u64, long_ids: bool) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
    let mut f = Fixture::with_files(segment_items, 6);
    let contacts = ["bob@b", "carol@c", "dave@d", "eve@e"];
    let resources = ["", "/phone", "/laptop", "/x"];
    let prefix = if long_ids {
        "x".repeat(40)
    } else {
        String::new()
    };
    let mut made: Vec<Item> = vec![];
    let mut n = 0u64;
    let mut time = 1_000_000_000u64;
    let total = 300 + rng.below(200);
    for _ in 0..total {
        n += 1 + rng.below(3);
        time += rng.below(3) * 500_000;
        let with = if rng.chance(3) {
            String::new()
        } else {
            format!("{}{}", rng.pick(&contacts), rng.pick(&resources))
        };
        made.push(Item {
            id: format!("{prefix}{n:08}"),
            time,
            with,
            payload: Bytes::from(format!(
                "<message xmlns='jabber:client'><body>{}</body></message>",
                "w".repeat(rng.below(200) as usize)
            )),
        });
    }
    let mut live: Vec<Item> = vec![];
    let mut stats = Stats::default();
    let mut appended = 0;
    while appended < made.len() {
        let size = 1 + rng.below(25) as usize;
        let batch = &made[appended..(appended + size).min(made.len())];
        let mut retention = Retention::default();
        if rng.chance(10) {
            retention.max_items = Some(100 + rng.below(300));
        }
        if rng.chance(5) {
            retention.max_age = Some(60 + rng.below(200));
        }
        let now = batch.last().unwrap().time + rng.below(10_000_000);
        f.append_with(batch, retention, now).unwrap();
        live.extend(batch.iter().cloned());
        let keep = retention.first_kept(live.len(), now, |i| live[i].time);
        live.drain(..keep);
        appended += batch.len();
        if rng.chance(15) {
            // A retried request (some of its items may be trimmed already).
            let from = appended.saturating_sub(1 + rng.below(30) as usize);
            f.append_with(&made[from..appended], Retention::default(), 0)
                .unwrap();
        }
        if rng.chance(10) {
            f.reopen();
        }
        for _ in 0..3 {
            check_query(
                &mut f, &mut rng, &mut stats, &live, &made, &contacts, &resources,
            );
        }
    }
    for _ in 0..400 {
        check_query(
            &mut f, &mut rng, &mut stats, &live, &made, &contacts, &resources,
        );
        if rng.chance(2) {
            f.reopen();
        }
    }
    println!(
        "seed {seed}: {} items, {} live, {stats:?}",
        made.len(),
        live.len()
    );
    let total = stats.pages + stats.empty + stats.refused;
    assert!(
        stats.pages * 2 > total && stats.refused * 50 > total,
        "{stats:?}"
    );
}

fn check_query(
    f: &mut Fixture,
    rng: &mut Rng,
    stats: &mut Stats,
    live: &[Item],
    made: &[Item],
    contacts: &[&str],
    resources: &[&str],
) {
    let some_id = |rng: &mut Rng| -> String {
        match rng.below(10) {
            0 => "nope".into(),
            1 | 2 if !made.is_empty() => rng.pick(made).id.clone(),
            _ if !live.is_empty() => rng.pick(live).id.clone(),
            _ => "none".into(),
        }
    };
    let some_time = |rng: &mut Rng| -> u64 {
        let base = if live.is_empty() {
            1_000_000_000
        } else {
            rng.pick(live).time
        };
        (base + rng.below(2_000_000)).saturating_sub(1_000_000)
    };
    let mut q = Query {
        with: match rng.below(20) {
            0..=7 => None,
            8..=12 => Some(rng.pick(contacts).to_string()),
            13..=17 => Some(format!(
                "{}{}",
                rng.pick(contacts),
                rng.pick(&resources[1..])
            )),
            18 => Some("stranger@s".into()),
            _ => Some(String::new()),
        },
        ..Query::default()
    };
    if rng.chance(20) {
        q.start = Some(some_time(rng));
    }
    if rng.chance(20) {
        q.end = Some(some_time(rng));
    }
    if rng.chance(8) {
        q.after_id = Some(some_id(rng));
    }
    if rng.chance(8) {
        q.before_id = Some(some_id(rng));
    }
    if rng.chance(8) {
        q.ids = (0..1 + rng.below(6))
            .map(|_| match live.is_empty() || rng.chance(5) {
                true => some_id(rng),
                false => rng.pick(live).id.clone(),
            })
            .collect();
    }
    if rng.chance(20) {
        q.paging.after = Some(some_id(rng));
    }
    if rng.chance(20) {
        q.paging.before = Some(some_id(rng));
    }
    q.paging.from_end = rng.chance(40);
    q.paging.max = match rng.below(10) {
        0 => 0,
        1 => 400,
        _ => rng.below(60) as usize,
    };
    if rng.chance(20) {
        q.paging.max_bytes = Some(rng.below(3000) as usize);
    }
    // What the wire carries (max capped at MAX_PAGE).
    let q = Query::parse(q.to_xml().as_bytes()).unwrap();
    let expected = select(live, &q);
    assert_eq!(f.query(&q), expected, "query {q:?}");
    match expected {
        Ok(p) if !p.items.is_empty() => stats.pages += 1,
        Ok(_) => stats.empty += 1,
        Err(_) => stats.refused += 1,
    }
}

/// What the random queries exercised, so the test cannot pass by asking nothing.
#[derive(Default, Debug)]
struct Stats {
    pages: u32,
    empty: u32,
    refused: u32,
}
