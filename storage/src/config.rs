//! `xdb-file.xml`.

use std::path::{Path, PathBuf};

use jrs_config::{limits_from_node, LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

/// One thread by default: its batches grow while it waits for the disk, so logins and
/// archive writes cost up to half less of xdb-file's CPU than spread over eight
/// threads, which mostly woke up for one request each (docs/benchmarks.md, "Writes
/// nothing waits for").
const DEFAULT_WORKERS: usize = 1;

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub router: RouterLink,
    /// Domains whose data this instance stores; `*` takes every domain nobody else binds.
    pub hosts: Vec<String>,
    /// Only these namespaces of the hosts (`<namespace>`, docs/protocol.md "Storage
    /// routed by namespace"); empty: the hosts' default storage.
    pub namespaces: Vec<String>,
    pub spool: PathBuf,
    pub cache_entries: usize,
    /// Threads doing file operations (each owner always on the same one).
    pub workers: usize,
    /// Items per segment of new message archives.
    pub archive_segment_items: u64,
    /// Archive files kept open, in all (split between the worker threads).
    pub archive_open_files: usize,
    pub limits: Limits,
    pub log: LogConfig,
}

impl StorageConfig {
    pub fn load(path: &Path) -> Result<StorageConfig> {
        let root = Node::load(path, "xdb-file")?;
        root.allow(
            &[],
            &[
                "router",
                "host",
                "namespace",
                "spool",
                "cache",
                "archive",
                "limits",
                "log",
                "metrics",
            ],
        )?;
        let hosts: Vec<String> = root
            .children("host")
            .map(|h| h.text.to_ascii_lowercase())
            .collect();
        if hosts.is_empty() || hosts.iter().any(String::is_empty) {
            return Err(root.error(
                "at least one non-empty <host>DOMAIN</host> is required (or <host>*</host>)",
            ));
        }
        let namespaces: Vec<String> = root
            .children("namespace")
            .map(|n| n.text.trim().to_owned())
            .collect();
        if namespaces
            .iter()
            .any(|n| n.is_empty() || n.contains(char::is_whitespace) || n == "*")
        {
            return Err(root.error("a <namespace> is one storage namespace (no spaces, not '*')"));
        }
        let spool = root.required_child("spool")?;
        spool.allow(&["dir", "workers"], &[])?;
        let workers: usize = spool
            .parse_attr("workers", "a number of threads (1-256)")?
            .unwrap_or(DEFAULT_WORKERS);
        if !(1..=256).contains(&workers) {
            return Err(spool.error(format!(
                "attribute 'workers' = '{workers}': expected a number of threads (1-256)"
            )));
        }
        let mut cache_entries = 10_000;
        if let Some(cache) = root.child("cache")? {
            cache.allow(&["max-entries"], &[])?;
            cache_entries = cache
                .parse_attr("max-entries", "a number of entries")?
                .unwrap_or(cache_entries);
        }
        let mut archive_segment_items = crate::archive::SEGMENT_ITEMS;
        let mut archive_open_files = 4096;
        if let Some(archive) = root.child("archive")? {
            archive.allow(&["segment-items", "open-files"], &[])?;
            archive_segment_items = archive
                .parse_attr("segment-items", "a number of items (at least 1)")?
                .unwrap_or(archive_segment_items);
            archive_open_files = archive
                .parse_attr("open-files", "a number of files")?
                .unwrap_or(archive_open_files);
            if archive_segment_items == 0 {
                return Err(archive.error("attribute 'segment-items' must be at least 1"));
            }
        }
        Ok(StorageConfig {
            router: RouterLink::from_node(root.required_child("router")?)?,
            hosts,
            namespaces,
            spool: PathBuf::from(spool.required_attr("dir")?),
            cache_entries,
            workers,
            archive_segment_items,
            archive_open_files,
            // Storage requests carry whole rosters and offline lists: allow more than a
            // client stanza.
            limits: limits_from_node(
                root.child("limits")?,
                Limits {
                    max_stanza_bytes: 4 << 20,
                    max_depth: 64,
                },
            )?,
            log: LogConfig::from_node(root.child("log")?)?,
        })
    }
}
