//! The file spool: one directory per host, one per user, one file per namespace.
//!
//! ```text
//! SPOOL/localhost/alice/jabber%3Aiq%3Aroster.xml     data of alice@localhost
//! SPOOL/localhost/@host/...                          data of the host itself
//! ```
//! Every write is durable before it is acknowledged, with group commit: a batch of
//! requests writes temporary files, [`Spool::commit`] makes them durable with one
//! `syncfs`, renames them over the old files and makes the renames (and removals and new
//! directories) durable with a second `syncfs`. Only then are the batch's answers sent.
//! Two disk flushes per batch instead of two per write.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lru::LruCache;
use tracing::error;

use jrs_stream::validate::validate_stanza;
use jrs_stream::StanzaErrorCondition;
use jrs_xdb::Refusal;

use crate::sync::Syncer;

/// Directory holding a host's own data; '@' never appears in an escaped user name.
const HOST_DIR: &str = "@host";
const OPEN: &[u8] = b"<stored>";
const CLOSE: &[u8] = b"</stored>";

/// Who data belongs to, normalised (nodeprep / nameprep by the `jid` crate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    pub user: Option<String>,
}

impl Owner {
    pub fn parse(owner: &str) -> Result<Owner, Refusal> {
        let jid = jid::BareJid::new(owner).map_err(|e| {
            Refusal::new(
                StanzaErrorCondition::JidMalformed,
                format!("owner '{owner}': {e}"),
            )
        })?;
        Ok(Owner {
            host: jid.domain().as_str().to_owned(),
            user: jid.node().map(|n| n.as_str().to_owned()),
        })
    }
}

pub struct Spool {
    root: PathBuf,
    /// Fragments by file path (its bytes: `Path`'s own hashing walks the path
    /// component by component, a few per cent of xdb-file's instructions per login);
    /// `None` caches "no file".
    cache: LruCache<Box<[u8]>, Option<Bytes>>,
    /// Writes not yet committed: final path -> temporary file holding the new content.
    pending: HashMap<PathBuf, PathBuf>,
    /// Something not yet committed changed the disk (a write, a removal, a new directory).
    dirty: bool,
    /// Shared by the worker threads: one `syncfs` for the commits of all of them.
    syncer: Arc<Syncer>,
}

fn internal(text: String) -> Refusal {
    error!("{text}");
    Refusal::new(StanzaErrorCondition::InternalServerError, text)
}

impl Spool {
    pub fn new(root: PathBuf, cache_entries: usize, syncer: Arc<Syncer>) -> Spool {
        Spool {
            root,
            syncer,
            cache: LruCache::new(NonZeroUsize::new(cache_entries.max(1)).expect("max(1)")),
            pending: HashMap::new(),
            dirty: false,
        }
    }

    /// Makes every change of the batch durable (see the module documentation). On error
    /// nothing of the batch may be acknowledged, and the cache, which already holds the
    /// batch's values, is dropped.
    pub fn commit(&mut self) -> Result<(), Refusal> {
        if !self.dirty {
            return Ok(());
        }
        let result = (|| -> io::Result<()> {
            self.syncer.sync(&self.root)?;
            if self.pending.is_empty() {
                // Appends in place (archives): nothing to rename.
                return Ok(());
            }
            for (path, tmp) in self.pending.drain() {
                exchange(&tmp, &path)?;
            }
            self.syncer.sync(&self.root)
        })();
        self.dirty = false;
        if let Err(e) = result {
            self.pending.clear();
            self.cache.clear();
            return Err(internal(format!(
                "making writes durable under {}: {e}",
                self.root.display()
            )));
        }
        Ok(())
    }

    /// How many writes wait for the next commit (the commit's size; zero when only
    /// removals or archives changed the disk).
    pub fn uncommitted(&self) -> Option<usize> {
        (self.dirty || !self.pending.is_empty()).then_some(self.pending.len())
    }

    /// Something outside the spool's own files (an archive) changed the disk: the
    /// batch's commit must sync.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// The directory of an owner's archive `ns` (see `crate::archive`).
    pub fn archive_dir(&self, owner: &Owner, ns: &str) -> PathBuf {
        self.owner_dir(owner)
            .join(format!("{}.archive", escape_name(ns)))
    }

    /// Replaces a small file (not a `<stored>` document) at commit, through a temporary
    /// file and a rename, like every spool write: a crash leaves the old or the new
    /// content.
    pub fn write_small(&mut self, path: &Path, data: &[u8]) -> Result<(), Refusal> {
        let tmp = write_temporary(path, data)
            .map_err(|e| internal(format!("writing {}: {e}", path.display())))?;
        self.pending.insert(path.to_owned(), tmp);
        self.dirty = true;
        Ok(())
    }

    /// A small file's content, including a write of this batch not yet renamed into
    /// place; `None` when there is none.
    pub fn read_small(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let source = self.pending.get(path).map_or(path, |tmp| tmp.as_path());
        match fs::read(source) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets writes of this batch under `dir` (about to be removed).
    pub fn discard_pending_under(&mut self, dir: &Path) {
        self.pending.retain(|path, _| !path.starts_with(dir));
    }

    /// Removes a directory tree so that a crash midway leaves it whole or gone: it is
    /// renamed to a hidden name first (what a crash leaves there is removed by the next
    /// removal, and never listed).
    pub fn remove_tree(&mut self, dir: &Path) -> Result<(), Refusal> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let trash = dir.with_file_name(format!(".{name}.deleted"));
        let gone = |r: io::Result<()>| match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        let result = (|| -> io::Result<bool> {
            gone(fs::remove_dir_all(&trash))?;
            match fs::rename(dir, &trash) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
            fs::remove_dir_all(&trash)?;
            Ok(true)
        })();
        match result {
            Ok(removed) => {
                self.dirty |= removed;
                Ok(())
            }
            Err(e) => Err(internal(format!("removing {}: {e}", dir.display()))),
        }
    }

    pub fn owner_dir(&self, owner: &Owner) -> PathBuf {
        use std::os::unix::ffi::OsStringExt;
        PathBuf::from(std::ffi::OsString::from_vec(self.owner_dir_bytes(owner, 0)))
    }

    /// `ROOT/HOST/USER` (or `ROOT/HOST/@host`), with room for `more` bytes. Written into
    /// one buffer: every request names its file, and `Path::join` three times over cost
    /// xdb-file a tenth of its instructions per login in reallocations.
    fn owner_dir_bytes(&self, owner: &Owner, more: usize) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let root = self.root.as_os_str().as_bytes();
        let user = owner.user.as_deref();
        let parts = owner.host.len() + user.map_or(HOST_DIR.len(), str::len);
        let mut dir = Vec::with_capacity(root.len() + 3 * parts + 2 + more);
        dir.extend_from_slice(root);
        if !dir.ends_with(b"/") {
            dir.push(b'/');
        }
        escape_name_into(&owner.host, &mut dir);
        dir.push(b'/');
        match user {
            Some(user) => escape_name_into(user, &mut dir),
            None => dir.extend_from_slice(HOST_DIR.as_bytes()),
        }
        dir
    }

    fn file(&self, owner: &Owner, ns: &str) -> PathBuf {
        use std::os::unix::ffi::OsStringExt;
        let mut file = self.owner_dir_bytes(owner, 3 * ns.len() + 5);
        file.push(b'/');
        escape_name_into(ns, &mut file);
        file.extend_from_slice(b".xml");
        PathBuf::from(std::ffi::OsString::from_vec(file))
    }

    /// The stored fragment (empty when nothing is stored). A file that is not what this
    /// program writes is reported and left untouched.
    pub fn get(&mut self, owner: &Owner, ns: &str) -> Result<Bytes, Refusal> {
        let path = self.file(owner, ns);
        Ok(self.read(&path)?.unwrap_or_default())
    }

    fn read(&mut self, path: &Path) -> Result<Option<Bytes>, Refusal> {
        if let Some(hit) = self.cache.get(cache_key(path)) {
            return Ok(hit.clone());
        }
        // Written earlier in this batch but evicted from the cache: read the new content.
        let source = self
            .pending
            .get(path)
            .cloned()
            .unwrap_or_else(|| path.to_owned());
        let data = match fs::read(&source) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.cache.put(cache_key(path).into(), None);
                return Ok(None);
            }
            Err(e) => return Err(internal(format!("reading {}: {e}", path.display()))),
        };
        let fragment = parse_file(&data).ok_or_else(|| {
            internal(format!(
                "{} is corrupt (not a <stored> document); left in place for the operator",
                path.display()
            ))
        })?;
        let fragment = Bytes::copy_from_slice(fragment);
        self.cache
            .put(cache_key(path).into(), Some(fragment.clone()));
        Ok(Some(fragment))
    }

    /// Replaces the fragment; an empty fragment removes the file.
    pub fn set(&mut self, owner: &Owner, ns: &str, content: &[u8]) -> Result<(), Refusal> {
        let path = self.file(owner, ns);
        // Refuse to replace a file we cannot read: it may hold data the operator wants.
        self.read(&path)?;
        self.write(&path, content)
    }

    fn write(&mut self, path: &Path, content: &[u8]) -> Result<(), Refusal> {
        if content.iter().all(u8::is_ascii_whitespace) {
            return self.remove(path);
        }
        let mut doc = Vec::with_capacity(OPEN.len() + content.len() + CLOSE.len());
        doc.extend_from_slice(OPEN);
        doc.extend_from_slice(content);
        doc.extend_from_slice(CLOSE);
        if let Err(e) = validate_stanza(&doc) {
            return Err(Refusal::new(
                StanzaErrorCondition::BadRequest,
                format!("content is not well-formed XML: {}", e.text),
            ));
        }
        let tmp = write_temporary(path, &doc)
            .map_err(|e| internal(format!("writing {}: {e}", path.display())))?;
        self.pending.insert(path.to_owned(), tmp);
        self.dirty = true;
        self.cache.put(
            cache_key(path).into(),
            Some(Bytes::copy_from_slice(content)),
        );
        Ok(())
    }

    fn remove(&mut self, path: &Path) -> Result<(), Refusal> {
        // A write of this batch, or the spare left by the last one (see `exchange`).
        self.pending.remove(path);
        let _ = fs::remove_file(temporary_path(path));
        match fs::remove_file(path) {
            Ok(()) => self.dirty = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal(format!("removing {}: {e}", path.display()))),
        }
        self.cache.put(cache_key(path).into(), None);
        Ok(())
    }

    pub fn delete(&mut self, owner: &Owner, ns: &str) -> Result<(), Refusal> {
        if ns == "*" {
            return self.delete_owner(owner);
        }
        let path = self.file(owner, ns);
        self.read(&path)?;
        self.remove(&path)
    }

    /// Removes everything stored for an owner (account removal).
    fn delete_owner(&mut self, owner: &Owner) -> Result<(), Refusal> {
        let dir = self.owner_dir(owner);
        self.discard_pending_under(&dir);
        self.cache.clear();
        self.remove_tree(&dir)
    }

    /// Adds `items` after the stored fragment. With `max_items`, refuses when the list
    /// would grow past it.
    pub fn append(
        &mut self,
        owner: &Owner,
        ns: &str,
        items: &[u8],
        max_items: Option<usize>,
    ) -> Result<(), Refusal> {
        let path = self.file(owner, ns);
        let old = self.read(&path)?.unwrap_or_default();
        if let Some(max) = max_items {
            if count_elements(&old) + count_elements(items) > max {
                return Err(Refusal::new(
                    StanzaErrorCondition::ResourceConstraint,
                    format!("the list holds at most {max} items"),
                ));
            }
        }
        let mut content = Vec::with_capacity(old.len() + items.len());
        content.extend_from_slice(&old);
        content.extend_from_slice(items);
        self.write(&path, &content)
    }

    /// Returns the fragment and removes it.
    pub fn take(&mut self, owner: &Owner, ns: &str) -> Result<Bytes, Refusal> {
        let path = self.file(owner, ns);
        let data = self.read(&path)?.unwrap_or_default();
        self.remove(&path)?;
        Ok(data)
    }

    /// Bare JIDs with data on `host`: user directories holding a stored fragment or an
    /// archive (not the host's own directory, nor hidden names: temporary files and
    /// removals a crash interrupted).
    pub fn list(&self, host: &str) -> Result<Vec<String>, Refusal> {
        let dir = self.root.join(escape_name(host));
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(internal(format!("listing {}: {e}", dir.display()))),
        };
        let mut users: Vec<String> = entries
            .flatten()
            .filter(|e| has_data(&e.path()))
            .filter_map(|e| e.file_name().to_str().and_then(unescape_name))
            .filter(|u| u != HOST_DIR && !u.starts_with('.'))
            .map(|u| format!("{u}@{host}"))
            .collect();
        users.sort();
        Ok(users)
    }
}

impl Spool {
    /// What `owner` has stored (`list` with `ns='*'`): its fragment files (those
    /// written in this batch included) and its archive directories. Hidden names
    /// (temporary files, interrupted removals) are not data.
    pub fn contents(&self, owner: &Owner) -> Result<jrs_xdb::Contents, Refusal> {
        let dir = self.owner_dir(owner);
        let mut namespaces = std::collections::BTreeSet::new();
        let mut archives = std::collections::BTreeSet::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let name = e.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if name.starts_with('.') {
                        continue;
                    }
                    let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                    if let Some(stem) = name.strip_suffix(".xml").filter(|_| !is_dir) {
                        namespaces.extend(unescape_name(stem));
                    } else if let Some(stem) = name.strip_suffix(".archive").filter(|_| is_dir) {
                        archives.extend(unescape_name(stem));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal(format!("listing {}: {e}", dir.display()))),
        }
        for path in self.pending.keys() {
            if path.parent() != Some(dir.as_path()) {
                continue;
            }
            let stem = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".xml"));
            namespaces.extend(stem.and_then(unescape_name));
        }
        Ok(jrs_xdb::Contents {
            namespaces: namespaces.into_iter().collect(),
            archives: archives.into_iter().collect(),
        })
    }
}

/// Whether a user directory holds data: a `.xml` file or an `.archive` directory.
fn has_data(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && (name.ends_with(".xml") || name.ends_with(".archive"))
        })
    })
}

/// The fragment inside a spool file, or `None` if the file is not a valid `<stored>`
/// document.
fn parse_file(data: &[u8]) -> Option<&[u8]> {
    let inner = data.strip_prefix(OPEN)?.strip_suffix(CLOSE)?;
    validate_stanza(data).ok()?;
    Some(inner)
}

/// Counts top-level elements of a fragment.
fn count_elements(fragment: &[u8]) -> usize {
    let mut reader = quick_xml::Reader::from_reader(fragment);
    let mut depth = 0usize;
    let mut count = 0;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(_)) => {
                if depth == 0 {
                    count += 1;
                }
                depth += 1;
            }
            Ok(quick_xml::events::Event::Empty(_)) if depth == 0 => count += 1,
            Ok(quick_xml::events::Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(quick_xml::events::Event::Eof) | Err(_) => return count,
            _ => {}
        }
    }
}

/// Writes `data` next to `path` in a temporary file (creating directories on the way)
/// and returns its name; [`Spool::commit`] makes it durable and swaps it into place.
/// The temporary file usually exists already, as the spare the last write of `path` left
/// (see [`exchange`]): it is overwritten in place, not truncated first, so its blocks
/// are reused. (Emptying it freed them, which on a disk mounted with `discard` waited
/// for the discard, and made ext4 flush the file again when it was closed: a sixth of
/// xdb-file's CPU per login; docs/benchmarks.md.)
fn write_temporary(path: &Path, data: &[u8]) -> io::Result<PathBuf> {
    let tmp = temporary_path(path);
    let open = || {
        File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)
    };
    let mut f = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(path.parent().expect("spool files have a parent"))?;
            open()?
        }
        other => other?,
    };
    f.write_all(data)?;
    if f.metadata()?.len() > data.len() as u64 {
        f.set_len(data.len() as u64)?;
    }
    Ok(tmp)
}

/// The key of `path` in the spool's cache.
fn cache_key(path: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes()
}

/// `.NAME.tmp` beside `path`: where its next content is written before the commit.
fn temporary_path(path: &Path) -> PathBuf {
    path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("data")
    ))
}

/// Puts `tmp` in place of `path` atomically. Where `path` exists, the two are swapped
/// (`renameat2` with `RENAME_EXCHANGE`): `tmp` then holds the old content and stays as
/// the spare the next write of `path` overwrites (so a file's previous version stays
/// beside it, hidden, until its next write; removing the file removes it too). Replacing by a plain
/// rename instead made every write create an inode and delete one, and in ext4 that
/// creation (`__ext4_new_inode`, scanning for recently deleted inodes) was two thirds of
/// xdb-file's CPU per login (docs/benchmarks.md). Where `path` does not exist yet, or
/// the file system cannot swap, a plain rename.
fn exchange(tmp: &Path, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(tmp)?, c(path)?);
    // SAFETY: both are NUL-terminated paths that outlive the call; no memory is shared.
    let swapped = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    } == 0;
    if swapped {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // ENOENT: the first write of `path`; EINVAL, ENOSYS: no exchange here.
        Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS) => fs::rename(tmp, path),
        _ => Err(e),
    }
}

/// Escapes a JID part or namespace into one safe file name: ASCII letters, digits, `-`,
/// `_` and non-leading `.` stay; every other byte becomes `%XX`. So no name can be `.`,
/// `..`, contain `/`, or start with `@` (reserved for [`HOST_DIR`]).
pub fn escape_name(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 8);
    escape_name_into(s, &mut out);
    String::from_utf8(out).expect("escaped names are ASCII")
}

/// [`escape_name`], appended to `out`.
fn escape_name_into(s: &str, out: &mut Vec<u8>) {
    // By hand, not `format!` per byte: every request names its file, and namespaces are
    // full of `:` (the formatting was a fifth of xdb-file's instructions per login).
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for (i, b) in s.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
    }
}

fn unescape_name(s: &str) -> Option<String> {
    let mut bytes = vec![];
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b == b'%' {
            let hex = [it.next()?, it.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool() -> (Spool, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "jrs-spool-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        (Spool::new(dir.clone(), 16, Default::default()), dir)
    }

    fn rand_suffix() -> u64 {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn escaping_blocks_traversal() {
        for evil in ["..", ".", "../../etc", "a/b", "@host", "x\0y"] {
            let e = escape_name(evil);
            assert!(
                !e.contains('/')
                    && e != "."
                    && e != ".."
                    && !e.starts_with('@')
                    && !e.starts_with('.'),
                "{evil} -> {e}"
            );
            assert_eq!(unescape_name(&e).as_deref(), Some(evil));
        }
        assert_eq!(escape_name("john.doe"), "john.doe");
        // The names on disk do not change: existing spools stay readable.
        assert_eq!(
            escape_name("urn:jabberd-rs:offline:0"),
            "urn%3Ajabberd-rs%3Aoffline%3A0"
        );
        assert_eq!(escape_name("é/\u{ff}"), "%C3%A9%2F%C3%BF");
    }

    #[test]
    fn files_are_where_they_always_were() {
        let (s, dir) = spool();
        let alice = Owner::parse("alice@localhost").unwrap();
        let host = Owner::parse("localhost").unwrap();
        assert_eq!(
            s.file(&alice, "jabber:iq:roster"),
            dir.join("localhost/alice/jabber%3Aiq%3Aroster.xml")
        );
        assert_eq!(s.owner_dir(&alice), dir.join("localhost/alice"));
        assert_eq!(s.file(&host, "x"), dir.join("localhost/@host/x.xml"));
        let odd = Owner::parse("josé+1@example.org").unwrap();
        assert_eq!(
            s.file(&odd, "ns"),
            dir.join("example.org/jos%C3%A9%2B1/ns.xml")
        );
        // A root given with a trailing slash.
        let slash = Spool::new(PathBuf::from("/srv/spool/"), 4, Default::default());
        assert_eq!(
            slash.file(&alice, "n"),
            PathBuf::from("/srv/spool/localhost/alice/n.xml")
        );
    }

    #[test]
    fn set_get_append_take_delete() {
        let (mut s, dir) = spool();
        let alice = Owner::parse("Alice@LocalHost").unwrap();
        assert_eq!(alice.user.as_deref(), Some("alice"));
        assert!(s.get(&alice, "jabber:iq:roster").unwrap().is_empty());
        s.set(
            &alice,
            "jabber:iq:roster",
            b"<query xmlns='jabber:iq:roster'/>",
        )
        .unwrap();
        s.cache.clear();
        assert_eq!(
            &s.get(&alice, "jabber:iq:roster").unwrap()[..],
            b"<query xmlns='jabber:iq:roster'/>"
        );
        s.append(&alice, "offline", b"<message id='1'/>", Some(2))
            .unwrap();
        s.append(
            &alice,
            "offline",
            b"<message id='2'><body>x</body></message>",
            Some(2),
        )
        .unwrap();
        assert_eq!(
            s.append(&alice, "offline", b"<message id='3'/>", Some(2))
                .unwrap_err()
                .condition,
            StanzaErrorCondition::ResourceConstraint
        );
        s.commit().unwrap();
        assert_eq!(count_elements(&s.take(&alice, "offline").unwrap()), 2);
        s.commit().unwrap();
        assert!(s.get(&alice, "offline").unwrap().is_empty());
        assert_eq!(
            s.list("localhost").unwrap(),
            vec!["alice@localhost".to_owned()]
        );
        // What alice has: written in this batch (not yet renamed) or before.
        s.set(&alice, "urn:x:a/b c", b"<x/>").unwrap();
        let contents = s.contents(&alice).unwrap();
        assert_eq!(contents.namespaces, vec!["jabber:iq:roster", "urn:x:a/b c"]);
        assert!(contents.archives.is_empty());
        s.commit().unwrap();
        assert_eq!(s.contents(&alice).unwrap(), contents);
        fs::create_dir_all(s.archive_dir(&alice, "urn:xmpp:mam:2")).unwrap();
        assert_eq!(
            s.contents(&alice).unwrap().archives,
            vec!["urn:xmpp:mam:2".to_owned()]
        );
        let host = Owner::parse("localhost").unwrap();
        assert!(s.contents(&host).unwrap().is_empty());
        s.delete(&alice, "*").unwrap();
        assert!(s.get(&alice, "jabber:iq:roster").unwrap().is_empty());
        assert!(s.set(&alice, "x", b"<a><b></a>").is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rewrites_swap_with_the_spare_and_keep_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let (mut s, dir) = spool();
        let bob = Owner::parse("bob@localhost").unwrap();
        let file = s.file(&bob, "jabber:iq:last");
        let spare = temporary_path(&file);
        s.set(&bob, "jabber:iq:last", b"<query seconds='1'/>")
            .unwrap();
        s.commit().unwrap();
        // The first write renames: no spare yet.
        assert!(!spare.exists());
        let read_back = |s: &mut Spool| {
            s.cache.clear();
            s.get(&bob, "jabber:iq:last").unwrap()
        };
        assert_eq!(&read_back(&mut s)[..], b"<query seconds='1'/>");
        let mut previous = "<query seconds='1'/>".to_owned();
        // Longer and shorter contents: the spare is overwritten in place and cut.
        for content in [
            "<query seconds='22'/>",
            "<query seconds='3'/>",
            "<query seconds='4444'/>",
        ] {
            s.set(&bob, "jabber:iq:last", content.as_bytes()).unwrap();
            s.commit().unwrap();
            assert_eq!(read_back(&mut s), content.as_bytes());
            // The spare holds the previous version until the next write.
            assert_eq!(
                fs::read(&spare).unwrap(),
                format!("<stored>{previous}</stored>").as_bytes()
            );
            previous = content.to_owned();
        }
        // Later rewrites reuse the same two inodes.
        let inodes = |a: &Path, b: &Path| {
            let mut v = [
                fs::metadata(a).unwrap().ino(),
                fs::metadata(b).unwrap().ino(),
            ];
            v.sort();
            v
        };
        let before = inodes(&file, &spare);
        s.set(&bob, "jabber:iq:last", b"<query seconds='9'/>")
            .unwrap();
        s.commit().unwrap();
        assert_eq!(inodes(&file, &spare), before);
        assert_eq!(s.contents(&bob).unwrap().namespaces, vec!["jabber:iq:last"]);
        // Removing the data removes its spare.
        s.set(&bob, "jabber:iq:last", b"").unwrap();
        s.commit().unwrap();
        assert!(!file.exists() && !spare.exists());
        assert!(read_back(&mut s).is_empty());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_files_are_reported_and_kept() {
        let (mut s, dir) = spool();
        let bob = Owner::parse("bob@localhost").unwrap();
        let path = s.file(&bob, "vcard-temp");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"<stored><vCard>trunc").unwrap();
        assert_eq!(
            s.get(&bob, "vcard-temp").unwrap_err().condition,
            StanzaErrorCondition::InternalServerError
        );
        assert!(s.set(&bob, "vcard-temp", b"<vCard/>").is_err());
        assert!(s.append(&bob, "vcard-temp", b"<x/>", None).is_err());
        assert_eq!(fs::read(&path).unwrap(), b"<stored><vCard>trunc");
        fs::remove_dir_all(dir).unwrap();
    }
}
