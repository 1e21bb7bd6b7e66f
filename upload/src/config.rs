//! `upload.xml`: see `docs/upload.md` for every element.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jrs_config::service::{check_service_name, ServiceUsers};
use jrs_config::{limits_from_node, LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

#[derive(Debug, Clone)]
pub struct UploadConfig {
    /// The router link; its `name` is the service's JID (`upload.localhost`).
    pub router: RouterLink,
    /// Who may use it (`<host>`, `<allow domain=.. | jid=..>`).
    pub users: ServiceUsers,
    pub http: HttpConfig,
    /// Where the HMAC secret comes from.
    pub secret: SecretSource,
    /// Completed files live under `spool/`.
    pub spool: PathBuf,
    pub max_file_size: u64,
    /// Bytes one user may be granted per `quota_window` (0: no quota).
    pub quota_bytes: u64,
    pub quota_window: Duration,
    /// All the files together (0: no budget).
    pub disk_budget: u64,
    /// How long a PUT URL stays valid.
    pub slot_lifetime: Duration,
    /// How long a file is kept after its upload.
    pub file_lifetime: Duration,
    /// How often expired files and abandoned parts are removed.
    pub sweep_interval: Duration,
    /// Connection limits and the pace of uploads (`<connections>`).
    pub connections: ConnectionLimits,
    pub limits: Limits,
    pub log: LogConfig,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub address: String,
    pub port: u16,
    /// Where clients reach the listener (a reverse proxy's address), without a final `/`.
    pub base_url: String,
    pub tls: Option<HttpTls>,
    /// A request's headers, and each read of a body, must arrive within this.
    pub timeout: Duration,
}

/// `<connections max per-address min-rate max-duration>`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    /// HTTP connections at once; more are answered 503 (plain HTTP) or closed (TLS).
    pub max: usize,
    /// Connections at once from one client address (0: no limit).
    pub per_address: usize,
    /// After its first `timeout`, an upload must have averaged this many bytes per second
    /// (0: no minimum).
    pub min_rate: u64,
    /// The longest an upload's body may take.
    pub max_duration: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: 1024,
            per_address: 16,
            min_rate: 4 * 1024,
            max_duration: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub self_signed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SecretSource {
    /// Given in the file.
    Inline(String),
    /// Read from a file; made (random, mode 0600) when it does not exist.
    File(PathBuf),
}

const MIB: u64 = 1024 * 1024;

impl UploadConfig {
    pub fn load(path: &Path) -> Result<UploadConfig> {
        UploadConfig::from_node(&Node::load(path, "upload")?)
    }

    pub fn from_node(root: &Node) -> Result<UploadConfig> {
        root.allow(
            &[],
            &[
                "router",
                "host",
                "allow",
                "http",
                "secret",
                "spool",
                "files",
                "quota",
                "connections",
                "limits",
                "log",
                "metrics",
            ],
        )?;
        let router_node = root.required_child("router")?;
        let router = RouterLink::from_node(router_node)?;
        check_service_name(router_node, &router.name, "upload.localhost")?;
        let users = ServiceUsers::from_root(root, "upload")?;
        let http = http(root.required_child("http")?)?;
        let secret = match root.required_child("secret")? {
            s if !s.text.is_empty() => {
                s.allow(&[], &[])?;
                if s.text.len() < 16 {
                    return Err(s.error("the secret must be at least 16 characters"));
                }
                SecretSource::Inline(s.text.clone())
            }
            s => {
                s.allow(&["file"], &[])?;
                SecretSource::File(PathBuf::from(s.required_attr("file")?))
            }
        };
        let spool = root.required_child("spool")?;
        spool.allow(&["dir"], &[])?;
        let mut c = UploadConfig {
            router,
            users,
            http,
            secret,
            spool: PathBuf::from(spool.required_attr("dir")?),
            max_file_size: 100 * MIB,
            quota_bytes: 1024 * MIB,
            quota_window: Duration::from_secs(86_400),
            disk_budget: 10 * 1024 * MIB,
            slot_lifetime: Duration::from_secs(300),
            file_lifetime: Duration::from_secs(30 * 86_400),
            sweep_interval: Duration::from_secs(600),
            connections: ConnectionLimits::default(),
            limits: limits_from_node(root.child("limits")?, Limits::default())?,
            log: LogConfig::from_node(root.child("log")?)?,
        };
        if let Some(f) = root.child("files")? {
            f.allow(
                &[
                    "max-size",
                    "disk-budget",
                    "slot-lifetime",
                    "lifetime",
                    "sweep",
                ],
                &[],
            )?;
            c.max_file_size = f.size_attr("max-size")?.unwrap_or(c.max_file_size);
            if c.max_file_size == 0 {
                return Err(f.error("attribute 'max-size' must be more than 0"));
            }
            c.disk_budget = f.size_attr("disk-budget")?.unwrap_or(c.disk_budget);
            c.slot_lifetime = f
                .positive_seconds_attr("slot-lifetime")?
                .unwrap_or(c.slot_lifetime);
            c.file_lifetime = f
                .positive_seconds_attr("lifetime")?
                .unwrap_or(c.file_lifetime);
            c.sweep_interval = f
                .positive_seconds_attr("sweep")?
                .unwrap_or(c.sweep_interval);
        }
        if let Some(q) = root.child("quota")? {
            q.allow(&["bytes", "window"], &[])?;
            c.quota_bytes = q.size_attr("bytes")?.unwrap_or(c.quota_bytes);
            c.quota_window = q.positive_seconds_attr("window")?.unwrap_or(c.quota_window);
        }
        if let Some(n) = root.child("connections")? {
            n.allow(&["max", "per-address", "min-rate", "max-duration"], &[])?;
            let l = &mut c.connections;
            l.max = n.parse_attr("max", "a whole number")?.unwrap_or(l.max);
            if l.max == 0 {
                return Err(n.error("attribute 'max' must be at least 1"));
            }
            l.per_address = n
                .parse_attr("per-address", "a whole number")?
                .unwrap_or(l.per_address);
            l.min_rate = n.size_attr("min-rate")?.unwrap_or(l.min_rate);
            l.max_duration = n
                .positive_seconds_attr("max-duration")?
                .unwrap_or(l.max_duration);
        }
        Ok(c)
    }

    /// Whether `user` (a bare JID) may ask for slots.
    pub fn allows(&self, user: &jid::BareJid) -> bool {
        self.users.allows(user)
    }
}

fn http(n: &Node) -> Result<HttpConfig> {
    n.allow(
        &[
            "address",
            "port",
            "base-url",
            "tls",
            "cert",
            "key",
            "self-signed",
            "timeout",
        ],
        &[],
    )?;
    let address = n.attr("address").unwrap_or("127.0.0.1").to_owned();
    let port: u16 = n
        .parse_attr("port", "a port number (0-65535)")?
        .unwrap_or(5282);
    let tls = if n.bool_attr("tls", false)? {
        Some(HttpTls {
            cert: PathBuf::from(n.required_attr("cert")?),
            key: PathBuf::from(n.required_attr("key")?),
            self_signed: n.bool_attr("self-signed", false)?,
        })
    } else {
        for a in ["cert", "key", "self-signed"] {
            if n.attr(a).is_some() {
                return Err(n.error(format!("attribute '{a}' needs tls='true'")));
            }
        }
        None
    };
    let base_url = match n.attr("base-url") {
        Some(u) => {
            let u = u.trim().trim_end_matches('/');
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.len() <= "https://".len()
                || u.contains(['?', '#', ' '])
            {
                return Err(n.error(format!(
                    "attribute 'base-url' = '{u}': expected an http:// or https:// URL without query"
                )));
            }
            u.to_owned()
        }
        None => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.clone()
            };
            format!("{scheme}://{host}:{port}")
        }
    };
    Ok(HttpConfig {
        address,
        port,
        base_url,
        tls,
        timeout: n
            .positive_seconds_attr("timeout")?
            .unwrap_or(Duration::from_secs(30)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn parse(s: &str) -> Result<UploadConfig> {
        UploadConfig::from_node(&Node::parse_str(s, Arc::new(PathBuf::from("upload.xml")))?)
    }

    const BASE: &str = "<router name='upload.localhost' secret='s'/><host>localhost</host>\
        <secret file='var/upload.secret'/><spool dir='var/upload'/>";

    #[test]
    fn defaults() {
        let c = parse(&format!("<upload>{BASE}<http/></upload>")).unwrap();
        assert_eq!(c.http.base_url, "http://127.0.0.1:5282");
        assert_eq!(c.max_file_size, 100 * MIB);
        assert!(c.allows(&jid::BareJid::new("a@localhost").unwrap()));
        assert!(!c.allows(&jid::BareJid::new("localhost").unwrap()));
        assert!(!c.allows(&jid::BareJid::new("a@example.net").unwrap()));
        let c = parse(&format!(
            "<upload>{BASE}<http tls='true' cert='c' key='k' port='5281' base-url='https://up.example/x/'/>\
             <files max-size='10M' disk-budget='1G'/><quota bytes='512K' window='60'/>\
             <allow jid='bob@example.net'/></upload>"
        ))
        .unwrap();
        assert_eq!(c.http.base_url, "https://up.example/x");
        assert_eq!(c.max_file_size, 10 * MIB);
        assert_eq!(c.quota_bytes, 512 * 1024);
        assert!(c.allows(&jid::BareJid::new("bob@example.net").unwrap()));
        assert_eq!(c.connections, ConnectionLimits::default());
        let c = parse(&format!(
            "<upload>{BASE}<http/><connections max='10' per-address='0' min-rate='1K' \
             max-duration='60'/></upload>"
        ))
        .unwrap();
        assert_eq!(
            c.connections,
            ConnectionLimits {
                max: 10,
                per_address: 0,
                min_rate: 1024,
                max_duration: Duration::from_secs(60)
            }
        );
        let e = parse(&format!(
            "<upload>{BASE}<http/><connections max='0'/></upload>"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("'max'"), "{e}");
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse(&format!(
            "<upload>{BASE}\n<http/>\n<files max-size='big'/></upload>"
        ))
        .unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("max-size"), "{e}");
        let e = parse(&format!("<upload>{BASE}<http cert='x'/></upload>")).unwrap_err();
        assert!(e.to_string().contains("tls='true'"), "{e}");
        let e = parse(&format!(
            "<upload>{BASE}<http base-url='ftp://x'/></upload>"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("base-url"), "{e}");
        assert_eq!(jrs_config::parse_size("2k"), Some(2048));
        assert_eq!(jrs_config::parse_size("x"), None);
    }
}
