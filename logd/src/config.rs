//! `logd.xml`: see `docs/logd.md` for every element.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jrs_component::log_record::{Filter, Level};
use jrs_config::{limits_from_node, LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

#[derive(Debug, Clone)]
pub struct LogdConfig {
    pub router: RouterLink,
    /// Hosts to bind `log` for (`*`: every record).
    pub binds: Vec<String>,
    pub files: Vec<FileOutput>,
    pub admins: Vec<AdminOutput>,
    pub stdout: Vec<Filter>,
    pub limits: Limits,
    pub log: LogConfig,
}

#[derive(Debug, Clone)]
pub struct FileOutput {
    /// `{host}` in it makes one file per host.
    pub path: String,
    pub max_bytes: u64,
    /// Rotated files kept: PATH.1 (newest) .. PATH.KEEP.
    pub keep: u32,
    pub filter: Filter,
}

#[derive(Debug, Clone)]
pub struct AdminOutput {
    pub jid: String,
    /// Messages per `window` at most; the rest are counted and reported.
    pub per_minute: u32,
    pub window: Duration,
    pub filter: Filter,
}

fn filter(node: &Node, default_level: Level) -> Result<Filter> {
    let level = match node.attr("level") {
        None => default_level,
        Some(l) => Level::parse(l).ok_or_else(|| {
            node.error(format!(
                "attribute 'level' = '{l}': expected error, warn, info, debug or trace"
            ))
        })?,
    };
    let list = |name: &str| -> Vec<String> {
        node.attr(name)
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    Ok(Filter {
        level,
        hosts: list("host")
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        processes: list("process"),
        matches: node
            .attr("match")
            .filter(|m| !m.is_empty())
            .map(str::to_owned),
    })
}

const FILTER_ATTRS: [&str; 4] = ["level", "host", "process", "match"];

impl LogdConfig {
    pub fn load(path: &Path) -> Result<LogdConfig> {
        LogdConfig::from_node(&Node::load(path, "logd")?)
    }

    pub fn from_node(root: &Node) -> Result<LogdConfig> {
        root.allow(
            &[],
            &[
                "router", "bind", "file", "admin", "stdout", "limits", "log", "metrics",
            ],
        )?;
        let mut binds = vec![];
        for b in root.children("bind") {
            b.allow(&["host"], &[])?;
            let host = b.required_attr("host")?.to_ascii_lowercase();
            if host.is_empty() {
                return Err(b.error("attribute 'host' is empty: a domain or *"));
            }
            binds.push(host);
        }
        if binds.is_empty() {
            binds.push("*".into());
        }
        let mut files = vec![];
        for f in root.children("file") {
            let mut attrs = vec!["path", "max-bytes", "keep"];
            attrs.extend(FILTER_ATTRS);
            f.allow(&attrs, &[])?;
            let path = f.required_attr("path")?.to_owned();
            if path.is_empty() {
                return Err(f.error("attribute 'path' is empty"));
            }
            files.push(FileOutput {
                path,
                max_bytes: f
                    .size_attr("max-bytes")?
                    .unwrap_or(10 * 1024 * 1024)
                    .max(1024),
                keep: f.parse_attr("keep", "a number of files")?.unwrap_or(5),
                filter: filter(f, Level::Info)?,
            });
        }
        let mut admins = vec![];
        for a in root.children("admin") {
            let mut attrs = vec!["jid", "per-minute"];
            attrs.extend(FILTER_ATTRS);
            a.allow(&attrs, &[])?;
            let jid = a.required_attr("jid")?.to_owned();
            if !jid.contains('@') || jid.contains(['\'', '"', '<', '>', '&']) {
                return Err(a.error(format!("attribute 'jid' = '{jid}': expected user@domain")));
            }
            admins.push(AdminOutput {
                jid,
                per_minute: a
                    .parse_attr("per-minute", "a number of messages")?
                    .unwrap_or(20),
                window: Duration::from_secs(60),
                filter: filter(a, Level::Error)?,
            });
        }
        let mut stdout = vec![];
        for s in root.children("stdout") {
            s.allow(&FILTER_ATTRS, &[])?;
            stdout.push(filter(s, Level::Info)?);
        }
        Ok(LogdConfig {
            router: RouterLink::from_node(root.required_child("router")?)?,
            binds,
            files,
            admins,
            stdout,
            limits: limits_from_node(root.child("limits")?, Limits::default())?,
            log: LogConfig::from_node(root.child("log")?)?,
        })
    }
}

/// The file for `host` of a path template: `{host}` replaced by a name safe as one path
/// component.
pub fn file_for(template: &str, host: &str) -> PathBuf {
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let safe = safe.trim_start_matches('.');
    let safe = if safe.is_empty() { "_" } else { safe };
    PathBuf::from(template.replace("{host}", safe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn parse(xml: &str) -> Result<LogdConfig> {
        LogdConfig::from_node(&Node::parse_str(xml, Arc::new(PathBuf::from("logd.xml")))?)
    }

    #[test]
    fn defaults_and_filters() {
        let c = parse(
            "<logd><router address='127.0.0.1' port='5347' name='logd' secret='s'/>\
             <file path='log/{host}.log' level='warn' host='localhost example.org' max-bytes='1M' keep='2'/>\
             <admin jid='admin@localhost' process='sm c2s' match='refused'/>\
             <stdout/></logd>",
        )
        .unwrap();
        assert_eq!(c.binds, vec!["*"]);
        let f = &c.files[0];
        assert_eq!(
            (f.max_bytes, f.keep, f.filter.level),
            (1024 * 1024, 2, Level::Warn)
        );
        assert_eq!(f.filter.hosts, vec!["localhost", "example.org"]);
        let a = &c.admins[0];
        assert_eq!((a.per_minute, a.filter.level), (20, Level::Error));
        assert_eq!(a.filter.processes, vec!["sm", "c2s"]);
        assert_eq!(a.filter.matches.as_deref(), Some("refused"));
        assert_eq!(c.stdout[0].level, Level::Info);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse(
            "<logd><router address='127.0.0.1' port='5347' name='logd' secret='s'/>\
             <file path='x' level='loud'/></logd>",
        )
        .unwrap_err();
        assert!(e.to_string().contains("'level' = 'loud'"), "{e}");
        let e = parse(
            "<logd><router address='127.0.0.1' port='5347' name='logd' secret='s'/>\
             <admin jid='localhost'/></logd>",
        )
        .unwrap_err();
        assert!(e.to_string().contains("user@domain"), "{e}");
    }

    #[test]
    fn route_level_of_every_process() {
        let c = parse(
            "<logd><router address='127.0.0.1' port='5347' name='logd' secret='s'/>\
             <log level='debug' route-level='off'/></logd>",
        )
        .unwrap();
        assert_eq!(
            (c.log.level.as_str(), c.log.route_level.as_str()),
            ("debug", "off")
        );
        let c =
            parse("<logd><router address='127.0.0.1' port='5347' name='logd' secret='s'/></logd>")
                .unwrap();
        assert_eq!(c.log.route_level, "warn");
        let e = parse(
            "<logd><router address='127.0.0.1' port='5347' name='logd' secret='s'/>\
             <log route-level='loud'/></logd>",
        )
        .unwrap_err();
        assert!(e.to_string().contains("'route-level' = 'loud'"), "{e}");
    }

    #[test]
    fn host_file_names_are_safe() {
        assert_eq!(
            file_for("log/{host}.log", "localhost"),
            PathBuf::from("log/localhost.log")
        );
        assert_eq!(
            file_for("log/{host}.log", "../../etc"),
            PathBuf::from("log/_.._etc.log")
        );
        assert_eq!(file_for("log/all.log", "x"), PathBuf::from("log/all.log"));
    }
}
