//! `jabberctl dump` and `jabberctl restore`: a copy of everything stored for some hosts,
//! through the storage protocol, so that it moves between xdb-file and xdb-pg (or any
//! store answering the protocol) with nothing left behind (docs/migration.md, "Copying
//! a store").
//!
//! Unlike XEP-0227 (`export`/`import`), the dump knows nothing of what the data means:
//! every fragment of every namespace of every owner (the hosts themselves included) and
//! every item of every archive, as storage answers them. The owners come from `list` on
//! each host, what each owner has from `list` with `ns='*'` (docs/protocol.md).
//!
//! The file is a sequence of the storage requests that recreate the data:
//!
//! ```xml
//! <?xml version='1.0' encoding='UTF-8'?>
//! <jabberd-dump format='urn:jabberd-rs:dump:0' created='2026-12-01T02:00:00Z'>
//! <host name='localhost'/>
//! <set to='localhost' ns='urn:example:host-data'>FRAGMENT</set>
//! <set to='alice@localhost' ns='jabber:iq:roster'>FRAGMENT</set>
//! <archive-append to='alice@localhost' ns='urn:xmpp:mam:2'><item id='..' time='..' with='..'>STANZA</item>...</archive-append>
//! <set to='alice@localhost' ns='urn:jabberd-rs:auth:0'>CREDENTIALS</set>
//! </jabberd-dump>
//! ```
//!
//! - `<host name=.../>` names a host the dump was made for (information only);
//! - `<set to ns>`: the fragment `ns` of owner `to`, exactly the bytes `get` answered
//!   (in the same context as in storage: no default namespace);
//! - `<archive-append to ns>`: items of the archive `ns` of `to`, in order, with their
//!   ids, times and `with` (one page of at most 250 items and 128 KiB each, so that
//!   every request made of it stays under the router's stanza limit).
//!
//! Each owner's records are together; its credentials come last, so an account restored
//! can log in only once all its data is in. The file is written beside its name and
//! renamed when complete, and read as a stream: neither side holds more than one record.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use jrs_auth::NS_AUTH;
use jrs_stream::framer::{Frame, Framer};
use jrs_stream::{Limits, Stanza};
use jrs_xdb::archive::{parse_items, Item, Retention};
use jrs_xdb::{Contents, Op, XdbClient, LIST_CONTENTS};

use crate::xml::escape;

/// The format's name, in the root's `format` attribute.
pub const FORMAT: &str = "urn:jabberd-rs:dump:0";
const ROOT: &str = "jabberd-dump";
/// Owners restored at once.
const PARALLEL: usize = 8;
/// Largest record read: far above any request the router lets through.
const MAX_RECORD: usize = 64 * 1024 * 1024;

/// One record of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Host(String),
    /// A fragment: owner, namespace, content.
    Set(String, String, Bytes),
    /// Archive items: owner, namespace, the `<item/>` elements.
    ArchiveAppend(String, String, Bytes),
}

impl Record {
    pub fn owner(&self) -> Option<&str> {
        match self {
            Record::Host(_) => None,
            Record::Set(o, ..) | Record::ArchiveAppend(o, ..) => Some(o),
        }
    }
}

// -- the file ----------------------------------------------------------------------------

/// Writes a dump's records to `out`.
pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    /// Writes the XML declaration and the root's start tag; `created`: RFC 3339.
    pub fn start(mut out: W, created: &str) -> std::io::Result<Writer<W>> {
        write!(
            out,
            "<?xml version='1.0' encoding='UTF-8'?>\n<{ROOT} format='{FORMAT}' created='{}'>\n",
            escape(created)
        )?;
        Ok(Writer { out })
    }

    pub fn host(&mut self, name: &str) -> std::io::Result<()> {
        writeln!(self.out, "<host name='{}'/>", escape(name))
    }

    pub fn set(&mut self, owner: &str, ns: &str, content: &[u8]) -> std::io::Result<()> {
        self.record("set", owner, ns, content)
    }

    pub fn archive(&mut self, owner: &str, ns: &str, items: &[Item]) -> std::io::Result<()> {
        let mut content = vec![];
        for i in items {
            i.write(&mut content);
        }
        self.record("archive-append", owner, ns, &content)
    }

    fn record(&mut self, name: &str, owner: &str, ns: &str, content: &[u8]) -> std::io::Result<()> {
        write!(
            self.out,
            "<{name} to='{}' ns='{}'>",
            escape(owner),
            escape(ns)
        )?;
        self.out.write_all(content)?;
        writeln!(self.out, "</{name}>")
    }

    /// Closes the root; returns the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        writeln!(self.out, "</{ROOT}>")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a dump's records one by one.
pub struct Reader<R: Read> {
    input: R,
    framer: Framer,
    buf: BytesMut,
    eof: bool,
    closed: bool,
}

impl<R: Read> Reader<R> {
    /// Reads up to the root's start tag, refusing what is not a dump.
    pub fn open(input: R) -> anyhow::Result<Reader<R>> {
        let mut r = Reader {
            input,
            framer: Framer::new(Limits {
                max_stanza_bytes: MAX_RECORD,
                max_depth: 4096,
            }),
            buf: BytesMut::new(),
            eof: false,
            closed: false,
        };
        match r.frame()? {
            Some(Frame::StreamOpen(head)) => check_root(&head)?,
            _ => bail!("not a jabberctl dump: no <{ROOT}> element"),
        }
        Ok(r)
    }

    fn frame(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(f) = self
                .framer
                .next_frame(&mut self.buf)
                .map_err(|e| anyhow::anyhow!("the dump is not well-formed: {}", e.text))?
            {
                return Ok(Some(f));
            }
            if self.eof {
                return Ok(None);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.input.read(&mut chunk)?;
            if n == 0 {
                self.eof = true;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next record; `None` at the root's end tag. A file that ends before it (a
    /// copy cut short) is an error.
    pub fn next(&mut self) -> anyhow::Result<Option<Record>> {
        if self.closed {
            return Ok(None);
        }
        let bytes = match self.frame()? {
            Some(Frame::Element(b)) => b,
            Some(Frame::StreamClose) => {
                self.closed = true;
                return Ok(None);
            }
            Some(Frame::StreamOpen(_)) => bail!("the dump is not well-formed"),
            None => bail!("the dump ends before </{ROOT}>: it is incomplete"),
        };
        let s = Stanza::parse(bytes)
            .map_err(|e| anyhow::anyhow!("a record of the dump is not well-formed: {e}"))?;
        let attr = |k: &str| {
            s.attr(k)
                .filter(|v| !v.is_empty())
                .with_context(|| format!("a <{}> record without '{k}'", s.name()))
        };
        Ok(Some(match s.name() {
            "host" => Record::Host(attr("name")?),
            "set" => Record::Set(attr("to")?, attr("ns")?, s.bytes().slice_ref(s.inner())),
            "archive-append" => {
                Record::ArchiveAppend(attr("to")?, attr("ns")?, s.bytes().slice_ref(s.inner()))
            }
            other => bail!("unknown record <{other}> in the dump (made by a newer jabberctl?)"),
        }))
    }
}

fn check_root(head: &[u8]) -> anyhow::Result<()> {
    let mut reader = quick_xml::Reader::from_reader(head);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(e)) => {
                if e.name().as_ref() != ROOT {
                    let name = e.name().as_ref().to_owned();
                    bail!("not a jabberctl dump: the document is <{name}>");
                }
                let format = e
                    .attributes()
                    .flatten()
                    .find(|a| a.key.as_ref() == "format")
                    .map(|a| a.value.into_owned());
                if format.as_deref() != Some(FORMAT) {
                    bail!("a dump of another format than {FORMAT} (made by a newer jabberctl?)");
                }
                return Ok(());
            }
            Ok(quick_xml::events::Event::Decl(_) | quick_xml::events::Event::Text(_)) => {}
            _ => bail!("not a jabberctl dump"),
        }
    }
}

// -- dump --------------------------------------------------------------------------------

/// What a dump or a restore handled.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub owners: usize,
    pub fragments: usize,
    pub items: usize,
}

async fn contents(xdb: &XdbClient, owner: &str) -> anyhow::Result<Contents> {
    let answer = xdb
        .request(Op::List, owner, LIST_CONTENTS, Bytes::new(), None)
        .await
        .with_context(|| format!("{owner}: listing what is stored"))?;
    Contents::parse(&answer).map_err(|r| anyhow::anyhow!("{owner}: {}", r.text))
}

/// Writes everything stored for `hosts` to `path` (through `path.partial`, renamed when
/// complete).
pub async fn dump(xdb: &XdbClient, hosts: &[String], path: &Path) -> anyhow::Result<Counts> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = std::fs::File::create(&partial).with_context(|| format!("{}", partial.display()))?;
    let created = chrono::DateTime::from_timestamp_micros(now_micros() as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let result = async {
        let mut w = Writer::start(std::io::BufWriter::new(file), &created)?;
        let counts = dump_to(xdb, hosts, &mut w).await?;
        let out = w.finish()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        anyhow::Ok(counts)
    }
    .await;
    match result {
        Ok(counts) => {
            std::fs::rename(&partial, path).with_context(|| format!("{}", path.display()))?;
            Ok(counts)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

pub async fn dump_to<W: Write>(
    xdb: &XdbClient,
    hosts: &[String],
    w: &mut Writer<W>,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    for host in hosts {
        w.host(host)?;
    }
    for host in hosts {
        let listing = xdb
            .request(Op::List, host, "", Bytes::new(), None)
            .await
            .with_context(|| format!("listing the owners of {host}"))?;
        let mut users = crate::migrate::owners(&listing);
        users.sort();
        users.dedup();
        // The host's own data first, then its users'.
        for owner in std::iter::once(host.clone()).chain(users) {
            let c = dump_owner(xdb, &owner, w).await?;
            if c.fragments + c.items > 0 {
                counts.owners += 1;
            }
            counts.fragments += c.fragments;
            counts.items += c.items;
        }
    }
    Ok(counts)
}

async fn dump_owner<W: Write>(
    xdb: &XdbClient,
    owner: &str,
    w: &mut Writer<W>,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let what = contents(xdb, owner).await?;
    let mut credentials = None;
    for ns in &what.namespaces {
        let data = xdb
            .get(owner, ns)
            .await
            .with_context(|| format!("{owner}: reading {ns}"))?;
        if data.iter().all(u8::is_ascii_whitespace) {
            continue; // removed since the listing
        }
        if ns == NS_AUTH {
            credentials = Some(data);
            continue;
        }
        w.set(owner, ns, &data)?;
        counts.fragments += 1;
    }
    for ns in &what.archives {
        crate::archive_pages::for_each_page(xdb, owner, ns, |items| {
            w.archive(owner, ns, items)?;
            counts.items += items.len();
            Ok(())
        })
        .await?;
    }
    if let Some(data) = credentials {
        w.set(owner, NS_AUTH, &data)?;
        counts.fragments += 1;
    }
    Ok(counts)
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// -- restore -----------------------------------------------------------------------------

pub struct RestoreOptions {
    /// Replace owners that have data (everything stored for them is removed first).
    pub replace: bool,
    /// Only the owners of these domains (all when empty).
    pub hosts: Vec<String>,
}

/// An owner restored (its counts) or not (why).
type Restored = (String, Result<Counts, String>);

/// Replays the dump at `path` into the running server's storage.
pub async fn restore(
    xdb: Arc<XdbClient>,
    path: &Path,
    opts: &RestoreOptions,
) -> anyhow::Result<Counts> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut reader = Reader::open(std::io::BufReader::new(file))
        .with_context(|| format!("{}", path.display()))?;
    let mut running: JoinSet<Restored> = JoinSet::new();
    let mut total = Counts::default();
    let mut failed = 0usize;
    let mut finished = |r: Result<Restored, tokio::task::JoinError>| match r {
        Ok((owner, Ok(c))) => {
            total.owners += 1;
            total.fragments += c.fragments;
            total.items += c.items;
            println!(
                "{owner}: {} fragment(s), {} archived item(s)",
                c.fragments, c.items
            );
        }
        Ok((owner, Err(e))) => {
            eprintln!("jabberctl: {owner}: not restored: {e}");
            failed += 1;
        }
        Err(e) => {
            eprintln!("jabberctl: a restore task failed: {e}");
            failed += 1;
        }
    };
    // The owner being read, and where its records go (then `None`: they are complete;
    // an owner whose records are cut short by a read error never gets its credentials).
    let mut current: Option<(String, mpsc::Sender<Option<Record>>)> = None;
    // Owners seen: an owner's records must be together (its credentials go last).
    let mut seen: HashSet<String> = HashSet::new();
    let mut read_error = None;
    loop {
        let record = match reader.next() {
            Ok(Some(r)) => r,
            Ok(None) => {
                if let Some((_, tx)) = current.take() {
                    let _ = tx.send(None).await;
                }
                break;
            }
            Err(e) => {
                read_error = Some(e);
                break;
            }
        };
        let Some(owner) = record.owner().map(str::to_owned) else {
            continue;
        };
        let domain = owner.rsplit_once('@').map_or(owner.as_str(), |(_, d)| d);
        if !opts.hosts.is_empty() && !opts.hosts.iter().any(|h| h.eq_ignore_ascii_case(domain)) {
            continue;
        }
        if current.as_ref().is_none_or(|(o, _)| *o != owner) {
            if let Some((_, tx)) = current.take() {
                let _ = tx.send(None).await;
            }
            if !seen.insert(owner.clone()) {
                read_error = Some(anyhow::anyhow!(
                    "the records of {owner} are not together in the dump"
                ));
                break;
            }
            while running.len() >= PARALLEL {
                if let Some(r) = running.join_next().await {
                    finished(r);
                }
            }
            let (tx, rx) = mpsc::channel(4);
            let (xdb, replace, who) = (xdb.clone(), opts.replace, owner.clone());
            running.spawn(async move {
                let r = restore_owner(&xdb, &who, rx, replace).await;
                (who, r.map_err(|e| format!("{e:#}")))
            });
            current = Some((owner.clone(), tx));
        }
        let (_, tx) = current.as_ref().expect("set above");
        // A send fails when the owner's task stopped (refused): its records are skipped.
        let _ = tx.send(Some(record)).await;
    }
    drop(current);
    while let Some(r) = running.join_next().await {
        finished(r);
    }
    if let Some(e) = read_error {
        return Err(e.context(format!("reading {} stopped", path.display())));
    }
    if failed > 0 {
        bail!("{failed} owner(s) not restored ({} restored)", total.owners);
    }
    Ok(total)
}

/// Restores one owner from its records: refused (or, with `replace`, emptied first)
/// when it has data; its credentials stored last.
async fn restore_owner(
    xdb: &XdbClient,
    owner: &str,
    mut records: mpsc::Receiver<Option<Record>>,
    replace: bool,
) -> anyhow::Result<Counts> {
    if !contents(xdb, owner).await?.is_empty() {
        if !replace {
            bail!("it has data already (--replace replaces it with the dump's)");
        }
        xdb.delete(owner, "*").await?;
    }
    let mut counts = Counts::default();
    let mut credentials = None;
    let is_domain = !owner.contains('@');
    loop {
        let Some(record) = records.recv().await else {
            bail!("the dump could not be read to the end of its records");
        };
        let Some(record) = record else { break };
        match record {
            Record::Host(_) => {}
            Record::Set(_, ns, content) if ns == NS_AUTH => credentials = Some(content),
            Record::Set(_, ns, content) => {
                xdb.set(owner, &ns, content)
                    .await
                    .with_context(|| format!("storing {ns}"))?;
                counts.fragments += 1;
            }
            Record::ArchiveAppend(_, ns, _) if is_domain => {
                // An archive-append to a domain is a batch of its users' items: a host
                // owns no archive through the storage protocol.
                bail!("an archive ({ns}) of a host: a host cannot own one");
            }
            Record::ArchiveAppend(_, ns, content) => {
                let items = parse_items(&content)
                    .map_err(|r| anyhow::anyhow!("archive {ns}: {}", r.text))?;
                let sent = xdb.archive_append(owner, &ns, &items, Retention::default())?;
                xdb.finish(sent)
                    .await
                    .with_context(|| format!("storing items of the archive {ns}"))?;
                counts.items += items.len();
            }
        }
    }
    if let Some(c) = credentials {
        xdb.set(owner, NS_AUTH, c)
            .await
            .context("storing the credentials")?;
        counts.fragments += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u64, with: &str, body: &str) -> Item {
        Item {
            id: format!("{n:016x}"),
            time: 1_700_000_000_000_000 + n,
            with: with.into(),
            payload: Bytes::from(format!(
                "<message xmlns='jabber:client' type='chat'><body>{body}</body></message>"
            )),
        }
    }

    fn read_all(bytes: &[u8]) -> anyhow::Result<Vec<Record>> {
        let mut r = Reader::open(bytes)?;
        let mut out = vec![];
        while let Some(rec) = r.next()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn written_records_read_back_byte_for_byte() {
        let mut w = Writer::start(vec![], "2026-12-01T00:00:00Z").unwrap();
        w.host("localhost").unwrap();
        // Fragments as storage answers them: several elements, no namespace of their
        // own, text with entities, CDATA, a quote in the owner and namespace.
        let roster = b"<query xmlns='jabber:iq:roster'><item jid='bob@localhost'/></query>";
        let log = b"<room jid='r@conference.localhost' t='1'/><gone jid='s@c' t='2'/>";
        let odd = b"<x>a &amp; b &lt;c&gt; <![CDATA[<not/> a tag]]>\n</x>";
        w.set("localhost", "urn:x:host", log).unwrap();
        w.set("o'brien@localhost", "urn:a'b", odd).unwrap();
        w.set("alice@localhost", "jabber:iq:roster", roster)
            .unwrap();
        let items = vec![item(1, "bob@localhost/pc", "hi"), item(2, "", "a &lt; b")];
        w.archive("alice@localhost", "urn:xmpp:mam:2", &items)
            .unwrap();
        let bytes = w.finish().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(
            "<?xml version='1.0' encoding='UTF-8'?>\n<jabberd-dump format='urn:jabberd-rs:dump:0' created='2026-12-01T00:00:00Z'>\n<host name='localhost'/>\n"
        ), "{text}");
        let records = read_all(&bytes).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[0], Record::Host("localhost".into()));
        assert_eq!(
            records[1],
            Record::Set(
                "localhost".into(),
                "urn:x:host".into(),
                Bytes::from_static(log)
            )
        );
        assert_eq!(
            records[2],
            Record::Set(
                "o'brien@localhost".into(),
                "urn:a'b".into(),
                Bytes::from_static(odd)
            )
        );
        assert_eq!(records[2].owner(), Some("o'brien@localhost"));
        assert_eq!(
            records[3],
            Record::Set(
                "alice@localhost".into(),
                "jabber:iq:roster".into(),
                Bytes::from_static(roster)
            )
        );
        let Record::ArchiveAppend(owner, ns, content) = &records[4] else {
            panic!("{:?}", records[4]);
        };
        assert_eq!(
            (owner.as_str(), ns.as_str()),
            ("alice@localhost", "urn:xmpp:mam:2")
        );
        assert_eq!(parse_items(content).unwrap(), items);
    }

    #[test]
    fn read_in_small_pieces() {
        // Records cut across reads are put together.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(3).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut w = Writer::start(vec![], "now").unwrap();
        for n in 0..20 {
            w.set(
                &format!("u{n}@localhost"),
                "ns",
                format!("<v n='{n}'/>").as_bytes(),
            )
            .unwrap();
        }
        let bytes = w.finish().unwrap();
        let mut r = Reader::open(Trickle(&bytes)).unwrap();
        let mut n = 0;
        while let Some(rec) = r.next().unwrap() {
            assert_eq!(
                rec,
                Record::Set(
                    format!("u{n}@localhost"),
                    "ns".into(),
                    Bytes::from(format!("<v n='{n}'/>"))
                )
            );
            n += 1;
        }
        assert_eq!(n, 20);
    }

    #[test]
    fn refuses_what_is_not_a_whole_dump() {
        let err = |b: &[u8]| format!("{:#}", read_all(b).unwrap_err());
        assert!(err(b"<server-data xmlns='urn:xmpp:pie:0'></server-data>")
            .contains("not a jabberctl dump"));
        assert!(
            err(b"<jabberd-dump format='urn:jabberd-rs:dump:9'></jabberd-dump>")
                .contains("another format")
        );
        assert!(err(b"").contains("not a jabberctl dump"));
        // Cut short: the end tag is missing.
        let mut w = Writer::start(vec![], "now").unwrap();
        w.set("a@localhost", "ns", b"<v/>").unwrap();
        let whole = w.finish().unwrap();
        let cut = &whole[..whole.len() - "</jabberd-dump>\n".len()];
        assert!(err(cut).contains("incomplete"));
        let cut = &whole[..whole.len() - "v/></set>\n</jabberd-dump>\n".len()];
        assert!(err(cut).contains("incomplete"));
        // Unknown records and records without their attributes.
        let head = "<jabberd-dump format='urn:jabberd-rs:dump:0'>";
        assert!(
            err(format!("{head}<frob to='a@b' ns='x'/></jabberd-dump>").as_bytes())
                .contains("unknown record <frob>")
        );
        assert!(
            err(format!("{head}<set ns='x'><a/></set></jabberd-dump>").as_bytes())
                .contains("without 'to'")
        );
        assert!(
            err(format!("{head}<set to='a@b' ns='x'><a></set></jabberd-dump>").as_bytes())
                .contains("not well-formed")
        );
        // An empty dump is fine.
        assert!(read_all(format!("{head}\n</jabberd-dump>").as_bytes())
            .unwrap()
            .is_empty());
    }
}
