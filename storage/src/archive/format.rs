//! The bytes of an archive on disk: log records, index entries, with-index entries, the
//! `meta` file and file names (see docs/storage.md, "Message archives").
//!
//! Every integer is little-endian. Checksums are CRC-32 (IEEE) from `crc32fast`: a torn
//! or bit-flipped record or index entry is told from a good one.

use std::cmp::Ordering;

use bytes::Bytes;

use jrs_xdb::archive::Item;

use crate::spool::escape_name;

/// Size of an index entry: `time u64 | offset u64 | len u32 | id_len u16 | id prefix
/// [38] | crc32 u32` (the CRC covers the 60 bytes before it).
pub const IDX_ENTRY: u64 = 64;
/// Bytes of an id kept in its index entry: ids compare from the index alone unless two
/// share this many leading bytes (then the record is read). 38 fits a UUID.
pub const ID_PREFIX: usize = 38;
/// Size of a with-index entry: `seq u64 | hash of the full with u64`.
pub const WITH_ENTRY: u64 = 16;
/// A log record: `body_len u32 | crc32(body) u32 | body`, the body being
/// `seq u64 | time u64 | id_len u16 | id | with_len u16 | with | payload`.
pub const RECORD_HEADER: usize = 8;
const BODY_FIXED: usize = 8 + 8 + 2 + 2;

/// One entry of a segment's index: where item `seq` is and what it is ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdxEntry {
    pub time: u64,
    /// Offset of the record in the segment's log.
    pub offset: u64,
    /// Length of the whole record (header and body).
    pub len: u32,
    pub id_len: u16,
    pub id_prefix: [u8; ID_PREFIX],
}

impl IdxEntry {
    pub fn new(time: u64, offset: u64, len: u32, id: &str) -> IdxEntry {
        let mut id_prefix = [0u8; ID_PREFIX];
        let n = id.len().min(ID_PREFIX);
        id_prefix[..n].copy_from_slice(&id.as_bytes()[..n]);
        IdxEntry {
            time,
            offset,
            len,
            id_len: id.len() as u16,
            id_prefix,
        }
    }

    pub fn encode(&self) -> [u8; IDX_ENTRY as usize] {
        let mut b = [0u8; IDX_ENTRY as usize];
        b[0..8].copy_from_slice(&self.time.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..22].copy_from_slice(&self.id_len.to_le_bytes());
        b[22..60].copy_from_slice(&self.id_prefix);
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` when the checksum fails or the entry cannot describe a record (a zeroed
    /// or torn entry).
    pub fn decode(b: &[u8]) -> Option<IdxEntry> {
        if b.len() != IDX_ENTRY as usize || crc32fast::hash(&b[0..60]) != le32(&b[60..64]) {
            return None;
        }
        let entry = IdxEntry {
            time: le64(&b[0..8]),
            offset: le64(&b[8..16]),
            len: le32(&b[16..20]),
            id_len: u16::from_le_bytes([b[20], b[21]]),
            id_prefix: b[22..60].try_into().expect("38 bytes"),
        };
        (entry.len as usize > RECORD_HEADER + BODY_FIXED
            && entry.id_len > 0
            && entry.offset.checked_add(entry.len as u64).is_some())
        .then_some(entry)
    }

    fn prefix(&self) -> &[u8] {
        &self.id_prefix[..(self.id_len as usize).min(ID_PREFIX)]
    }

    /// The whole id, when it fits the entry.
    pub fn full_id(&self) -> Option<&[u8]> {
        (self.id_len as usize <= ID_PREFIX).then(|| self.prefix())
    }

    /// How this entry's id compares with `id`; `None` when only the record can tell
    /// (both share the first [`ID_PREFIX`] bytes and this id is longer).
    pub fn cmp_id(&self, id: &[u8]) -> Option<Ordering> {
        if let Some(full) = self.full_id() {
            return Some(full.cmp(id));
        }
        // This id is the 38-byte prefix followed by more bytes.
        let q = &id[..id.len().min(ID_PREFIX)];
        match self.prefix()[..q.len()].cmp(q) {
            Ordering::Equal if id.len() < ID_PREFIX => Some(Ordering::Greater),
            Ordering::Equal => None,
            other => Some(other),
        }
    }

    /// One past the record's last byte in the log (cannot overflow: [`IdxEntry::decode`]
    /// refuses an entry whose record would end past `u64::MAX`).
    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }

    /// [`jrs_xdb::archive::item_cost`] of the item, from the record's length.
    pub fn item_cost(&self) -> usize {
        self.len as usize - RECORD_HEADER - BODY_FIXED + 64
    }
}

/// The length of an item's record.
pub fn record_len(item: &Item) -> usize {
    RECORD_HEADER + BODY_FIXED + item.id.len() + item.with.len() + item.payload.len()
}

/// Appends the record of item `seq` to `out`; returns its length.
pub fn encode_record(seq: u64, item: &Item, out: &mut Vec<u8>) -> u32 {
    let body_len = record_len(item) - RECORD_HEADER;
    out.reserve(RECORD_HEADER + body_len);
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&item.time.to_le_bytes());
    out.extend_from_slice(&(item.id.len() as u16).to_le_bytes());
    out.extend_from_slice(item.id.as_bytes());
    out.extend_from_slice(&(item.with.len() as u16).to_le_bytes());
    out.extend_from_slice(item.with.as_bytes());
    out.extend_from_slice(&item.payload);
    let crc = crc32fast::hash(&out[start + RECORD_HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    (RECORD_HEADER + body_len) as u32
}

/// Reads the record of item `seq` (exactly the record's bytes); the error says why it
/// is not a good record.
pub fn decode_record(b: &[u8], seq: u64) -> Result<Item, &'static str> {
    if b.len() < RECORD_HEADER + BODY_FIXED {
        return Err("short record");
    }
    let body = &b[RECORD_HEADER..];
    if le32(&b[0..4]) as usize != body.len() {
        return Err("record length does not match the index");
    }
    if crc32fast::hash(body) != le32(&b[4..8]) {
        return Err("record checksum mismatch");
    }
    if le64(&body[0..8]) != seq {
        return Err("record of another sequence number");
    }
    let time = le64(&body[8..16]);
    let id_len = u16::from_le_bytes([body[16], body[17]]) as usize;
    let rest = &body[18..];
    let id = rest.get(..id_len).ok_or("id past the record")?;
    let rest = &rest[id_len..];
    let with_len = u16::from_le_bytes([
        *rest.first().ok_or("short record")?,
        *rest.get(1).ok_or("short record")?,
    ]) as usize;
    let with = rest.get(2..2 + with_len).ok_or("with past the record")?;
    let payload = &rest[2 + with_len..];
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| "not UTF-8")
    };
    Ok(Item {
        id: text(id)?,
        time,
        with: text(with)?,
        payload: Bytes::copy_from_slice(payload),
    })
}

/// The hash stored in with-index entries to tell full JIDs apart without reading
/// records: FNV-1a 64, never 0 (a zeroed entry is torn, not a hash).
pub fn with_hash(with: &str) -> u64 {
    let h = with.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    h | 1
}

pub fn encode_with(seq: u64, hash: u64) -> [u8; WITH_ENTRY as usize] {
    let mut b = [0u8; WITH_ENTRY as usize];
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&hash.to_le_bytes());
    b
}

/// (seq, hash); the hash is 0 for a zeroed (torn) entry.
pub fn decode_with(b: &[u8]) -> (u64, u64) {
    (le64(&b[0..8]), le64(&b[8..16]))
}

/// The small `meta` file of an archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Items per segment, fixed when the archive is created.
    pub segment_items: u64,
    /// The low-water mark: items below this sequence number were removed by retention.
    pub low_water: u64,
}

impl Meta {
    pub fn encode(&self) -> String {
        format!(
            "jrs-archive 1\nsegment-items {}\nlow-water {}\n",
            self.segment_items, self.low_water
        )
    }

    pub fn parse(data: &[u8]) -> Option<Meta> {
        let text = std::str::from_utf8(data).ok()?;
        let mut lines = text.lines();
        if lines.next()? != "jrs-archive 1" {
            return None;
        }
        let mut field = |name: &str| -> Option<u64> {
            lines
                .next()?
                .strip_prefix(name)?
                .strip_prefix(' ')?
                .parse()
                .ok()
        };
        let segment_items = field("segment-items").filter(|&n| n > 0)?;
        let low_water = field("low-water")?;
        Some(Meta {
            segment_items,
            low_water,
        })
    }
}

pub const META_FILE: &str = "meta";
pub const WITH_DIR: &str = "with";

/// Segment files are named by their first sequence number in 16 hex digits, so they
/// sort in order.
pub fn log_name(start: u64) -> String {
    format!("{start:016x}.log")
}

pub fn idx_name(start: u64) -> String {
    format!("{start:016x}.idx")
}

/// The first sequence number of a segment file's name (`.log` or `.idx`).
pub fn segment_of(name: &str) -> Option<u64> {
    let stem = name
        .strip_suffix(".log")
        .or_else(|| name.strip_suffix(".idx"))?;
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16).ok()
}

/// The with-index file of a bare JID: its escaped name, or for a name too long for the
/// file system a prefix of it, `~` (which escaping never produces) and a hash. Items
/// without a `with` go to `@none` (escaped names never start with `@`).
pub fn with_file_name(bare: &str) -> String {
    if bare.is_empty() {
        return "@none".to_owned();
    }
    let escaped = escape_name(bare);
    if escaped.len() <= 200 {
        return escaped;
    }
    format!("{}~{:016x}", &escaped[..120], with_hash(bare))
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_entries_round_trip() {
        let item = Item {
            id: "0001".into(),
            time: 42,
            with: "bob@b/r".into(),
            payload: Bytes::from_static(b"<message><body>hi</body></message>"),
        };
        let mut log = vec![];
        let len = encode_record(7, &item, &mut log);
        assert_eq!(len as usize, log.len());
        assert_eq!(decode_record(&log, 7).unwrap(), item);
        assert!(decode_record(&log, 8).is_err());
        let entry = IdxEntry::new(42, 0, len, &item.id);
        assert_eq!(entry.item_cost(), jrs_xdb::archive::item_cost(&item));
        assert_eq!(IdxEntry::decode(&entry.encode()), Some(entry));
        let mut bad = entry.encode();
        bad[3] ^= 1;
        assert_eq!(IdxEntry::decode(&bad), None);
        assert_eq!(IdxEntry::decode(&[0; 64]), None);
        log[20] ^= 1;
        assert!(decode_record(&log, 7).is_err());
        let meta = Meta {
            segment_items: 16,
            low_water: 3,
        };
        assert_eq!(Meta::parse(meta.encode().as_bytes()), Some(meta));
        assert_eq!(segment_of(&log_name(65536)), Some(65536));
        assert_eq!(segment_of("meta"), None);
    }

    #[test]
    fn long_ids_compare_through_the_prefix() {
        let long = "x".repeat(40) + "5";
        let e = IdxEntry::new(0, 0, 100, &long);
        assert_eq!(e.full_id(), None);
        assert_eq!(e.cmp_id(b"y"), Some(Ordering::Less));
        assert_eq!(e.cmp_id(b"xxx"), Some(Ordering::Greater));
        assert_eq!(e.cmp_id(("x".repeat(40) + "4").as_bytes()), None);
        let short = IdxEntry::new(0, 0, 100, "abc");
        assert_eq!(short.cmp_id(b"abc"), Some(Ordering::Equal));
        assert_eq!(short.cmp_id(b"abd"), Some(Ordering::Less));
    }

    #[test]
    fn with_names_stay_short() {
        assert_eq!(with_file_name("bob@example.net"), "bob%40example.net");
        assert_eq!(with_file_name(""), "@none");
        let long = with_file_name(&"a".repeat(3000));
        assert!(long.len() < 255 && long.contains('~'));
        assert_ne!(long, with_file_name(&("a".repeat(2999) + "b")));
    }
}
