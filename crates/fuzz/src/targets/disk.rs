//! What xdb-file reads back from disk, through its own code (storage/src):
//!
//! `spool`: a spool file (`<stored>` document) as `Spool` reads it, then the requests
//! that read and rewrite it (get, append with a limit, set, take, list).
//!
//! `archive`: the files of one message archive (`meta`, segment logs and indexes, the
//! with-index; docs/storage.md, "Message archives"), opened by `Archives` (recovery of
//! a torn tail included) and queried, appended to, trimmed and retracted in.
//!
//! Neither commits (no `syncfs`); both run in a scratch directory on tmpfs.

use std::path::Path;
use std::sync::Arc;

use jrs_auth::Credentials;
use jrs_xdb::archive::Retention;

use crate::archive::Archives;
use crate::spool::{escape_name, Owner, Spool};
use crate::support::{scratch_dir, sections};
use crate::sync::Syncer;

const NS: &str = "jabber:iq:roster";
const NOW: u64 = 1_700_000_000_000_000;

pub fn spool(data: &[u8]) {
    let root = scratch_dir("spool");
    let owner = Owner::parse("alice@localhost").expect("a valid owner");
    let mut spool = Spool::new(root.clone(), 4, Arc::new(Syncer::default()));
    let file = spool
        .owner_dir(&owner)
        .join(format!("{}.xml", escape_name(NS)));
    std::fs::create_dir_all(file.parent().expect("a parent")).expect("a scratch directory");
    std::fs::write(&file, data).expect("writing a scratch file");
    if let Ok(fragment) = spool.get(&owner, NS) {
        let _ = Credentials::parse(&fragment);
    }
    let _ = spool.append(&owner, NS, b"<item jid='b@localhost'/>", Some(3));
    let _ = spool.get(&owner, NS);
    let _ = spool.list("localhost");
    if let Some(content) = data
        .strip_prefix(b"<stored>".as_slice())
        .and_then(|d| d.strip_suffix(b"</stored>".as_slice()))
    {
        let _ = spool.set(&owner, NS, content);
    }
    let _ = spool.take(&owner, NS);
    let _ = spool.delete(&owner, "*");
}

/// Input: sections (see [`sections`]). Files: `@@meta`, `@@0000000000000000.log`,
/// `@@0000000000000000.idx` (any 16 hex digits), `@@with/NAME`. `@@fix` rewrites the
/// CRC-32s of every index entry and log record first, so that the fuzzer's changes get
/// past the checksums. Then requests, in order: `@@query` (content of an
/// `archive-query`), `@@append` (of an `archive-append`), `@@trim` (`max-items=N
/// max-age=N`), `@@retract` (of an `archive-retract`), `@@reopen` (state dropped, read
/// again from disk), `@@delete`. Whatever the requests, every item is queried before and
/// after them.
pub fn archive(data: &[u8]) {
    let root = scratch_dir("archive");
    let spool_owner = Owner::parse("alice@localhost").expect("a valid owner");
    let mut spool = Spool::new(root.clone(), 4, Arc::new(Syncer::default()));
    let dir = spool.archive_dir(&spool_owner, "urn:xmpp:mam:2");
    let parts = sections(data);
    let fix = parts.iter().any(|(name, _)| *name == b"fix");
    std::fs::create_dir_all(dir.join("with")).expect("a scratch directory");
    for (name, body) in &parts {
        let Some(name) = file_name(name) else {
            continue;
        };
        let mut body = body.to_vec();
        if fix && name.ends_with(".idx") {
            fix_index(&mut body);
        } else if fix && name.ends_with(".log") {
            fix_log(&mut body);
        }
        std::fs::write(dir.join(name), body).expect("writing a scratch file");
    }
    let mut archives = Archives::new(2, 8, 4);
    let all = b"<query max='250'/>";
    let _ = archives.query(&mut spool, &dir, all);
    for (name, body) in &parts {
        run_request(&mut archives, &mut spool, &dir, name, body);
    }
    let _ = archives.query(&mut spool, &dir, all);
    archives.clear();
    let _ = archives.query(&mut spool, &dir, all);
    let _ = archives.query(
        &mut spool,
        &dir,
        b"<query with='bob@example.net' max='3' from-end='true'/>",
    );
}

fn run_request(archives: &mut Archives, spool: &mut Spool, dir: &Path, name: &[u8], body: &[u8]) {
    match name {
        b"query" => {
            let _ = archives.query(spool, dir, body);
        }
        b"append" => {
            let _ = archives.append(spool, dir, body, Retention::default(), NOW);
        }
        b"trim" => {
            let text = String::from_utf8_lossy(body);
            let get = |key: &str| {
                text.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            if let Ok(retention) = Retention::from_attrs(get) {
                let _ = archives.trim(spool, dir, retention, NOW);
            }
        }
        b"retract" => {
            let _ = archives.retract(spool, dir, body);
        }
        b"reopen" => archives.clear(),
        b"delete" => {
            let _ = archives.delete(spool, dir);
        }
        _ => {}
    }
}

/// The archive file a section names, if it names one.
fn file_name(name: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(name).ok()?;
    let safe = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"%._~@-".contains(&b))
    };
    if name == "meta" {
        return Some(name.to_owned());
    }
    if let Some(with) = name.strip_prefix("with/") {
        return safe(with).then(|| name.to_owned());
    }
    let (stem, ext) = name.split_once('.')?;
    (stem.len() == 16
        && stem.bytes().all(|b| b.is_ascii_hexdigit())
        && matches!(ext, "log" | "idx"))
    .then(|| name.to_owned())
}

/// Index entries: 64 bytes, the last 4 the CRC-32 of the 60 before.
fn fix_index(idx: &mut [u8]) {
    for entry in idx.chunks_exact_mut(64) {
        let crc = crc32fast::hash(&entry[..60]);
        entry[60..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Log records: `body_len u32 | crc32(body) u32 | body`, back to back.
fn fix_log(log: &mut [u8]) {
    let mut pos = 0usize;
    while pos + 8 <= log.len() {
        let len = u32::from_le_bytes(log[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let Some(end) = (pos + 8).checked_add(len).filter(|&e| e <= log.len()) else {
            break;
        };
        let crc = crc32fast::hash(&log[pos + 8..end]);
        log[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

/// An archive's files after appending `content` (items of `archive-append` requests,
/// one request per element of `batches`), in the input format of [`archive`], followed
/// by `requests` (already in that format): seeds for the fuzzer, from the real writer
/// (`cargo run -p jrs-fuzz --example seeds`).
pub fn archive_image(segment_items: u64, batches: &[&[u8]], requests: &[u8]) -> Vec<u8> {
    let root = scratch_dir("archive-image");
    let owner = Owner::parse("alice@localhost").expect("a valid owner");
    let mut spool = Spool::new(root.clone(), 4, Arc::new(Syncer::default()));
    let dir = spool.archive_dir(&owner, "urn:xmpp:mam:2");
    let mut archives = Archives::new(2, 8, segment_items);
    for batch in batches {
        archives
            .append(&mut spool, &dir, batch, Retention::default(), NOW)
            .expect("appending seed items");
        spool.commit().expect("committing seed items");
    }
    let mut out = vec![];
    let mut files = vec![];
    for sub in ["", "with/"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_file() {
                files.push(format!("{sub}{}", e.file_name().to_string_lossy()));
            }
        }
    }
    files.sort();
    for name in files {
        out.extend_from_slice(format!("@@{name}\n").as_bytes());
        out.extend_from_slice(&std::fs::read(dir.join(&name)).expect("reading a seed file"));
        out.push(b'\n');
    }
    out.extend_from_slice(requests);
    let _ = std::fs::remove_dir_all(&root);
    out
}
