//! Configuration sections shared by several processes.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Node, Result};

/// How a component reaches the router: `<router .../>` in every component's file.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterLink {
    /// TCP address of the router, when `unix` is not set.
    pub address: String,
    pub port: u16,
    /// Unix socket path; used instead of TCP when set.
    pub unix: Option<PathBuf>,
    /// Component name used in the handshake (the stream's `to`). With `--instance N` the
    /// process connects as `NAME-N`.
    pub name: String,
    pub secret: String,
    /// Wrap the link in TLS (for routers on other hosts).
    pub tls: bool,
    /// PEM file with the CA (or self-signed certificate) that signs the router's certificate;
    /// the system roots are not used for router links.
    pub ca_file: Option<PathBuf>,
    /// Name to verify in the router's certificate (default: `address`).
    pub server_name: Option<String>,
    /// Certificate chain and key this component presents to a router that verifies
    /// its components (`<tls client-ca=..>` in router.xml).
    pub client_cert: Option<TlsFiles>,
    /// Delay before reconnecting after the link drops; doubles up to 10 s.
    pub reconnect: Duration,
    /// A whitespace keepalive goes to the router after this much silence.
    pub keepalive: Duration,
    /// How long written data may stay unacknowledged by the router's host before the
    /// link counts as dead (TCP_USER_TIMEOUT): a router behind a cut network is noticed
    /// within `keepalive` + `timeout`, not after TCP's 15 minutes of retries.
    pub timeout: Duration,
}

/// Default of `keepalive` on router links, both ways.
pub const LINK_KEEPALIVE: Duration = Duration::from_secs(60);
/// Default of `timeout` on router links, both ways.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(60);

impl RouterLink {
    pub fn from_node(node: &Node) -> Result<RouterLink> {
        node.allow(
            &[
                "address",
                "port",
                "unix",
                "name",
                "secret",
                "tls",
                "ca-file",
                "server-name",
                "cert",
                "key",
                "reconnect",
                "keepalive",
                "timeout",
            ],
            &[],
        )?;
        let client_cert = match (node.attr("cert"), node.attr("key")) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            _ => return Err(node.error("cert and key go together (a client certificate)")),
        };
        let tls = node.bool_attr("tls", false)?;
        if client_cert.is_some() && !tls {
            return Err(node.error("cert and key need tls='true'"));
        }
        let ca_file: Option<PathBuf> = node.attr("ca-file").map(PathBuf::from);
        if tls && ca_file.is_none() {
            return Err(
                node.error("tls='true' needs ca-file: the certificate that signs the router's")
            );
        }
        Ok(RouterLink {
            address: node.attr("address").unwrap_or("127.0.0.1").to_owned(),
            port: node
                .parse_attr("port", "a port number (1-65535)")?
                .unwrap_or(5347),
            unix: node.attr("unix").map(PathBuf::from),
            name: node.required_attr("name")?.to_owned(),
            secret: node.required_attr("secret")?.to_owned(),
            tls,
            ca_file,
            server_name: node.attr("server-name").map(str::to_owned),
            client_cert,
            reconnect: node
                .seconds_attr("reconnect")?
                .unwrap_or(Duration::from_millis(200)),
            keepalive: node.seconds_attr("keepalive")?.unwrap_or(LINK_KEEPALIVE),
            timeout: node.seconds_attr("timeout")?.unwrap_or(LINK_TIMEOUT),
        })
    }

    /// The link for instance `n` of a program that runs several: name `NAME-n`.
    pub fn for_instance(mut self, instance: Option<u32>) -> RouterLink {
        if let Some(n) = instance {
            self.name = format!("{}-{n}", self.name);
        }
        self
    }
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn from_node(node: &Node) -> Result<TlsFiles> {
        node.allow(&["cert", "key"], &[])?;
        Ok(TlsFiles {
            cert: PathBuf::from(node.required_attr("cert")?),
            key: PathBuf::from(node.required_attr("key")?),
        })
    }
}

/// `<log level="info" route-level="warn"/>`: the default log filter for stderr (RUST_LOG
/// overrides it), and the level from which records are also sent to the router as `log`
/// packets (docs/protocol.md, "Log packets"; `off` sends none).
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    /// error, warn, info, debug, trace or off.
    pub route_level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            route_level: "warn".into(),
        }
    }
}

const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

impl LogConfig {
    pub fn from_node(node: Option<&Node>) -> Result<LogConfig> {
        let Some(node) = node else {
            return Ok(LogConfig::default());
        };
        node.allow(&["level", "route-level"], &[])?;
        let level = node.attr("level").unwrap_or("info");
        if !LEVELS.contains(&level) {
            return Err(node.error(format!(
                "attribute 'level' = '{level}': expected error, warn, info, debug or trace"
            )));
        }
        let route_level = node.attr("route-level").unwrap_or("warn");
        if !LEVELS.contains(&route_level) && route_level != "off" {
            return Err(node.error(format!(
                "attribute 'route-level' = '{route_level}': expected error, warn, info, debug, trace or off"
            )));
        }
        Ok(LogConfig {
            level: level.to_owned(),
            route_level: route_level.to_owned(),
        })
    }
}

/// `<limits max-stanza-bytes=".." max-depth=".."/>`: limits on what a process parses.
pub fn limits_from_node(
    node: Option<&Node>,
    default: jrs_stream::Limits,
) -> Result<jrs_stream::Limits> {
    let Some(node) = node else {
        return Ok(default);
    };
    node.allow(&["max-stanza-bytes", "max-depth"], &[])?;
    Ok(jrs_stream::Limits {
        max_stanza_bytes: node
            .parse_attr("max-stanza-bytes", "a number of bytes")?
            .unwrap_or(default.max_stanza_bytes),
        max_depth: node
            .parse_attr("max-depth", "a nesting depth (a whole number)")?
            .unwrap_or(default.max_depth),
    })
}

/// How a listener or an outgoing connection starts TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP upgraded with STARTTLS (5222 for clients, 5269 for servers).
    StartTls,
    /// TLS from the first byte (XEP-0368: 5223, 5270).
    Direct,
}

impl TlsMode {
    /// Reads `mode="starttls|tls"` (default starttls).
    pub fn from_attr(node: &Node) -> Result<TlsMode> {
        match node.attr("mode").unwrap_or("starttls") {
            "starttls" => Ok(TlsMode::StartTls),
            "tls" => Ok(TlsMode::Direct),
            other => Err(node.error(format!(
                "attribute 'mode' = '{other}': expected starttls or tls"
            ))),
        }
    }
}

/// `<listen address=".." port=".." mode="starttls|tls"/>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub address: String,
    pub port: u16,
    pub mode: TlsMode,
}

impl Listener {
    /// Every `<listen/>` of `root`; the port defaults by mode.
    pub fn all_from(root: &Node, starttls_port: u16, direct_port: u16) -> Result<Vec<Listener>> {
        root.children("listen")
            .map(|l| Listener::from_node(l, starttls_port, direct_port))
            .collect()
    }

    /// One `<listen/>`; the port defaults by mode.
    pub fn from_node(l: &Node, starttls_port: u16, direct_port: u16) -> Result<Listener> {
        l.allow(&["address", "port", "mode"], &[])?;
        let mode = TlsMode::from_attr(l)?;
        let default_port = if mode == TlsMode::StartTls {
            starttls_port
        } else {
            direct_port
        };
        Ok(Listener {
            address: l.attr("address").unwrap_or("::").to_owned(),
            port: l
                .parse_attr("port", "a port number (0-65535)")?
                .unwrap_or(default_port),
            mode,
        })
    }
}

/// `<host name=".." cert=".." key=".." self-signed=".."/>`: a served domain and its
/// certificate chain and key (PEM).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsHost {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Make a self-signed certificate at start when the files do not exist.
    pub self_signed: bool,
}

impl TlsHost {
    /// Every `<host/>` of `root` (at least one); files default to `var/certs/{prefix}NAME`.
    pub fn all_from(root: &Node, file_prefix: &str) -> Result<Vec<TlsHost>> {
        let mut hosts = vec![];
        for h in root.children("host") {
            h.allow(&["name", "cert", "key", "self-signed"], &[])?;
            let name = h.required_attr("name")?.to_ascii_lowercase();
            let default = |ext: &str| format!("var/certs/{file_prefix}{name}.{ext}");
            hosts.push(TlsHost {
                cert: PathBuf::from(
                    h.attr("cert")
                        .map(str::to_owned)
                        .unwrap_or_else(|| default("crt")),
                ),
                key: PathBuf::from(
                    h.attr("key")
                        .map(str::to_owned)
                        .unwrap_or_else(|| default("key")),
                ),
                self_signed: h.bool_attr("self-signed", false)?,
                name,
            });
        }
        if hosts.is_empty() {
            return Err(root.error("at least one <host name='DOMAIN'/> is required"));
        }
        Ok(hosts)
    }
}
