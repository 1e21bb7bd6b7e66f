//! `jabberctl import` and `jabberctl export`: XEP-0227 files in and out of a running
//! server, through the storage protocol (so xdb-file and xdb-pg alike), writing and
//! reading the same records sm does (docs/migration.md).

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use tokio::task::JoinSet;

use jrs_auth::{Credentials, NS_AUTH};
use jrs_xdb::archive::{Item, Retention};
use jrs_xdb::{Op, XdbClient};

use crate::pie::export::{self, Stored};
use crate::pie::import::{self, Account};
use crate::pie::records::{
    blocklist_parse, pep_index_parse, pep_items_ns, pep_items_parse, PepNode, Roster, NS_ARCHIVE,
    NS_BLOCKING, NS_OFFLINE, NS_PEP, NS_PRIVATE, NS_ROSTER, NS_VCARD,
};
use crate::pie::{self, Found, NS_PIE, NS_PIE_MAM};
use crate::xml::{Element, NS_CLIENT};

/// Accounts written at once (storage overlaps the disk waits of different owners).
const PARALLEL: usize = 8;
/// Archive items per `archive-append`, and bytes of them at most (the request must
/// stay well under the router's 256 KiB stanza limit).
const APPEND_ITEMS: usize = 250;
const APPEND_BYTES: usize = 128 * 1024;

const TWICE: &str = "the account appears more than once in the files: only the first is imported";

pub struct ImportOptions {
    /// Replace accounts that exist (everything stored for them is removed first).
    pub replace: bool,
    /// Only these domains of the file (all when empty).
    pub hosts: Vec<String>,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Reads the file in a thread of its own and hands over the accounts one by one.
fn read_accounts(
    paths: &[PathBuf],
    hosts: Vec<String>,
) -> tokio::sync::mpsc::Receiver<Result<Result<Account, String>, String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(PARALLEL);
    let paths = paths.to_vec();
    std::thread::spawn(move || {
        let now = now_micros();
        let mut each = |found| {
            let item = match found {
                Found::User { host, .. }
                    if !hosts.is_empty()
                        && !hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) =>
                {
                    return Ok(());
                }
                Found::User { host, user } => import::account(&host, &user, now),
                Found::Note(n) => {
                    eprintln!("jabberctl: note: {n}");
                    return Ok(());
                }
            };
            tx.blocking_send(Ok(item)).map_err(|_| "stopped".to_owned())
        };
        for path in &paths {
            if let Err(e) = pie::read(path, &mut each) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    });
    rx
}

fn summary(a: &Account) -> String {
    let mut s = format!("{}: {}", a.bare, a.carried.join(", "));
    for n in &a.notes {
        s.push_str(&format!("\n  not carried over: {n}"));
    }
    s
}

/// `jabberctl import --dry-run`: what would be imported, without a server.
pub async fn import_dry_run(paths: &[PathBuf], opts: &ImportOptions) -> anyhow::Result<()> {
    let mut rx = read_accounts(paths, opts.hosts.clone());
    let (mut ok, mut bad) = (0, 0);
    let mut seen = HashSet::new();
    while let Some(found) = rx.recv().await {
        match found.map_err(anyhow::Error::msg)? {
            Ok(a) if !seen.insert(a.bare.clone()) => {
                eprintln!("jabberctl: {}: {TWICE}", a.bare);
                bad += 1;
            }
            Ok(a) => {
                println!("{}", summary(&a));
                ok += 1;
            }
            Err(e) => {
                eprintln!("jabberctl: {e}");
                bad += 1;
            }
        }
    }
    eprintln!("{ok} account(s) would be imported, {bad} could not be read");
    if bad > 0 {
        bail!("{bad} account(s) could not be read");
    }
    Ok(())
}

pub async fn import(
    xdb: Arc<XdbClient>,
    paths: &[PathBuf],
    opts: &ImportOptions,
) -> anyhow::Result<()> {
    let mut rx = read_accounts(paths, opts.hosts.clone());
    let mut running: JoinSet<Written> = JoinSet::new();
    let (mut ok, mut failed, mut no_login) = (0usize, 0usize, 0usize);
    let mut finished = |r: (Option<String>, Result<Account, String>)| match r {
        (_, Ok(a)) => {
            println!("{}", summary(&a));
            ok += 1;
            if a.credentials.is_none() {
                no_login += 1;
            }
        }
        (who, Err(e)) => {
            match who {
                Some(who) => eprintln!("jabberctl: {who}: not imported: {e}"),
                None => eprintln!("jabberctl: not imported: {e}"),
            }
            failed += 1;
        }
    };
    let mut read_error = None;
    let mut seen = HashSet::new();
    while let Some(found) = rx.recv().await {
        let account = match found {
            Err(e) => {
                read_error = Some(e);
                break;
            }
            Ok(Err(e)) => {
                finished((None, Err(e)));
                continue;
            }
            Ok(Ok(a)) => a,
        };
        if !seen.insert(account.bare.clone()) {
            finished((Some(account.bare), Err(TWICE.into())));
            continue;
        }
        while running.len() >= PARALLEL {
            if let Some(r) = running.join_next().await {
                finished(joined(r));
            }
        }
        let (xdb, replace) = (xdb.clone(), opts.replace);
        running.spawn(async move {
            let bare = account.bare.clone();
            let r = write_account(&xdb, &account, replace).await;
            (
                Some(bare),
                r.map(|()| account).map_err(|e| format!("{e:#}")),
            )
        });
    }
    while let Some(r) = running.join_next().await {
        finished(joined(r));
    }
    eprintln!(
        "{ok} account(s) imported{}, {failed} not imported",
        if no_login > 0 {
            format!(" ({no_login} without a password or keys: no login until `jabberctl adduser`)")
        } else {
            String::new()
        }
    );
    if let Some(e) = read_error {
        bail!("reading the file stopped: {e}");
    }
    if failed > 0 {
        bail!("{failed} account(s) not imported");
    }
    Ok(())
}

/// An account written (or not, and why), by name.
type Written = (Option<String>, Result<Account, String>);

fn joined(r: Result<Written, tokio::task::JoinError>) -> Written {
    r.unwrap_or_else(|e| (None, Err(format!("an import task failed: {e}"))))
}

/// Writes one account: its records, its archive, and its credentials last, so that it
/// can log in (and is listed) only once everything else is stored.
async fn write_account(xdb: &XdbClient, a: &Account, replace: bool) -> anyhow::Result<()> {
    let bare = &a.bare;
    if !xdb.get(bare, NS_AUTH).await?.is_empty() {
        if !replace {
            bail!("the account exists already (--replace replaces it with the file's)");
        }
        xdb.delete(bare, "*").await?;
    }
    for (ns, data) in &a.records {
        xdb.set(bare, ns, data.clone())
            .await
            .with_context(|| format!("storing {ns}"))?;
    }
    let mut chunk: Vec<Item> = vec![];
    let mut bytes = 0;
    for item in &a.archive {
        if chunk.len() >= APPEND_ITEMS || bytes + item.payload.len() > APPEND_BYTES {
            append(xdb, bare, &std::mem::take(&mut chunk)).await?;
            bytes = 0;
        }
        bytes += item.payload.len() + item.id.len() + item.with.len() + 64;
        chunk.push(item.clone());
    }
    if !chunk.is_empty() {
        append(xdb, bare, &chunk).await?;
    }
    if let Some(c) = &a.credentials {
        xdb.set(bare, NS_AUTH, c.to_xml())
            .await
            .context("storing the credentials")?;
    }
    Ok(())
}

async fn append(xdb: &XdbClient, bare: &str, items: &[Item]) -> anyhow::Result<()> {
    let sent = xdb.archive_append(bare, NS_ARCHIVE, items, Retention::default())?;
    xdb.finish(sent)
        .await
        .context("storing archived messages")?;
    Ok(())
}

// -- export ------------------------------------------------------------------------------

/// The bare JIDs of `<owner/>` elements in a `list` answer.
pub fn owners(listing: &[u8]) -> Vec<String> {
    let Ok(all) = Element::parse_fragment(listing, "") else {
        return vec![];
    };
    all.iter()
        .filter(|e| e.name == "owner")
        .filter_map(|e| e.attr("jid").map(str::to_owned))
        .collect()
}

fn parse_one(data: &Bytes, what: &str) -> anyhow::Result<Option<Element>> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Element::parse(data, "")
        .map(Some)
        .map_err(|e| anyhow::anyhow!("the stored {what} is unreadable: {e}"))
}

async fn read_stored(
    xdb: &XdbClient,
    bare: &str,
    credentials: Credentials,
) -> anyhow::Result<Stored> {
    let get = |ns: &'static str| xdb.get(bare, ns);
    let roster = Roster::parse(&get(NS_ROSTER).await?)
        .map_err(|e| anyhow::anyhow!("the stored roster is unreadable: {e}"))?;
    let vcard = parse_one(&get(NS_VCARD).await?, "vCard")?;
    let private = parse_one(&get(NS_PRIVATE).await?, "private XML")?;
    let offline = Element::parse_fragment(&get(NS_OFFLINE).await?, NS_CLIENT)
        .map_err(|e| anyhow::anyhow!("the stored offline messages are unreadable: {e}"))?;
    let blocklist = blocklist_parse(&get(NS_BLOCKING).await?)
        .map_err(|e| anyhow::anyhow!("the stored blocklist is unreadable: {e}"))?;
    let mut pep = vec![];
    for (name, config) in pep_index_parse(&get(NS_PEP).await?)
        .map_err(|e| anyhow::anyhow!("the stored PEP nodes are unreadable: {e}"))?
    {
        let items = pep_items_parse(&xdb.get(bare, &pep_items_ns(&name)).await?).map_err(|e| {
            anyhow::anyhow!("the stored items of PEP node '{name}' are unreadable: {e}")
        })?;
        pep.push(PepNode {
            name,
            config,
            items,
        });
    }
    Ok(Stored {
        credentials,
        roster,
        vcard,
        private,
        offline,
        blocklist,
        pep,
    })
}

/// Writes the accounts of `domains` (only `only` when not empty) as one XEP-0227
/// document to `out`. Returns how many accounts were written.
pub async fn export(
    xdb: &XdbClient,
    domains: &[String],
    only: &[String],
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    writeln!(out, "<?xml version='1.0' encoding='UTF-8'?>")?;
    writeln!(out, "<server-data xmlns='{NS_PIE}'>")?;
    let mut written = 0;
    for domain in domains {
        let listing = xdb
            .request(Op::List, domain, "", Bytes::new(), None)
            .await
            .with_context(|| format!("listing the users of {domain}"))?;
        let mut users: Vec<String> = owners(&listing)
            .into_iter()
            .filter(|u| only.is_empty() || only.contains(u))
            .collect();
        users.sort();
        writeln!(out, "<host jid='{}'>", crate::xml::escape(domain))?;
        for bare in users {
            let record = xdb.get(&bare, NS_AUTH).await?;
            let Some(credentials) = Credentials::parse(&record)
                .with_context(|| format!("{bare}: the stored credentials are unreadable"))?
            else {
                continue; // data without an account
            };
            let stored = read_stored(xdb, &bare, credentials)
                .await
                .with_context(|| bare.clone())?;
            let name = bare.split_once('@').map_or(bare.as_str(), |(n, _)| n);
            let mut text = export::user_start(name);
            for child in export::user_children(&bare, &stored) {
                child.write_in(&mut text, NS_PIE);
            }
            out.write_all(text.as_bytes())?;
            export_archive(xdb, &bare, out)
                .await
                .with_context(|| format!("{bare}: reading the archive"))?;
            writeln!(out, "</user>")?;
            written += 1;
        }
        writeln!(out, "</host>")?;
    }
    writeln!(out, "</server-data>")?;
    out.flush()?;
    Ok(written)
}

async fn export_archive(xdb: &XdbClient, bare: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut started = false;
    crate::archive_pages::for_each_page(xdb, bare, NS_ARCHIVE, |items| {
        let mut buf = vec![];
        if !started {
            buf.extend_from_slice(format!("<archive xmlns='{NS_PIE_MAM}'>").as_bytes());
            started = true;
        }
        for item in items {
            export::archive_result(item, &mut buf);
        }
        Ok(out.write_all(&buf)?)
    })
    .await?;
    if started {
        out.write_all(b"</archive>")?;
    }
    Ok(())
}
