//! `router.xml` and `router-users.xml`, loaded into typed structs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jrs_component::PacketType;
use jrs_config::{LogConfig, Node, Result, TlsFiles};
use jrs_stream::Limits;

/// Where the router accepts component links.
#[derive(Debug, Clone, PartialEq)]
pub enum Listen {
    Tcp {
        address: String,
        port: u16,
        tls: bool,
    },
    Unix {
        path: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub id: String,
    pub listen: Vec<Listen>,
    pub tls: Option<TlsFiles>,
    /// `<tls client-ca=..>`: components on TLS listeners must present a certificate
    /// signed by this CA (PEM), or the TLS handshake fails.
    pub client_ca: Option<PathBuf>,
    pub users_file: PathBuf,
    pub limits: Limits,
    /// Bytes queued for one link before it counts as stuck and is disconnected.
    pub max_queue_bytes: usize,
    /// How long a stream may take to authenticate.
    pub handshake_timeout: Duration,
    /// How long packets for a vanished component are held for its return.
    pub grace: Duration,
    /// How many packets are held per route during the grace period.
    pub grace_max_packets: usize,
    /// Idle time after which a whitespace keepalive is sent.
    pub keepalive: Duration,
    /// How long written data may stay unacknowledged by a component's host before its
    /// link counts as dead (TCP_USER_TIMEOUT; docs/router.md).
    pub link_timeout: Duration,
    /// Components the router dials (`<connect>`).
    pub connect: Vec<jrs_config::RouterLink>,
    /// Programs the router runs as components (`<exec>`).
    pub exec: Vec<Exec>,
    pub log: LogConfig,
}

/// `<exec name=".." command=".." secret=".." log=".."/>`: a program whose standard
/// input and output are its component link.
#[derive(Debug, Clone, PartialEq)]
pub struct Exec {
    /// The component name it must connect as (its router-users.xml entry).
    pub name: String,
    /// Run with `sh -c`.
    pub command: String,
    /// Given to the program as `JABBERD_SECRET` (with `JABBERD_NAME`), so that it needs
    /// no configuration of its own.
    pub secret: Option<String>,
    /// Where its standard error goes (appended).
    pub log: PathBuf,
}

impl RouterConfig {
    pub fn load(path: &Path) -> Result<RouterConfig> {
        let root = Node::load(path, "router")?;
        root.allow(
            &[],
            &[
                "id",
                "listen",
                "tls",
                "users",
                "limits",
                "grace",
                "keepalive",
                "connect",
                "exec",
                "log",
                "metrics",
            ],
        )?;
        let mut connect = vec![];
        for node in root.children("connect") {
            // The attributes of a component's <router/>, from the other side.
            connect.push(jrs_config::RouterLink::from_node(node)?);
        }
        let mut exec = vec![];
        for node in root.children("exec") {
            node.allow(&["name", "command", "secret", "log"], &[])?;
            let name = node.required_attr("name")?.to_ascii_lowercase();
            exec.push(Exec {
                log: PathBuf::from(
                    node.attr("log")
                        .map_or_else(|| format!("log/{name}.log"), str::to_owned),
                ),
                command: node.required_attr("command")?.to_owned(),
                secret: node.attr("secret").map(str::to_owned),
                name,
            });
        }
        let mut listen = vec![];
        for node in root.children("listen") {
            node.allow(&["address", "port", "tls", "unix"], &[])?;
            listen.push(match node.attr("unix") {
                Some(path) => Listen::Unix {
                    path: PathBuf::from(path),
                },
                None => Listen::Tcp {
                    address: node.attr("address").unwrap_or("127.0.0.1").to_owned(),
                    port: node
                        .parse_attr("port", "a port number (0-65535)")?
                        .unwrap_or(5347),
                    tls: node.bool_attr("tls", false)?,
                },
            });
        }
        if listen.is_empty() {
            return Err(root.error("at least one <listen/> is required"));
        }
        let (tls, client_ca) = match root.child("tls")? {
            Some(node) => {
                node.allow(&["cert", "key", "client-ca"], &[])?;
                let files = TlsFiles {
                    cert: PathBuf::from(node.required_attr("cert")?),
                    key: PathBuf::from(node.required_attr("key")?),
                };
                (Some(files), node.attr("client-ca").map(PathBuf::from))
            }
            None => (None, None),
        };
        if tls.is_none()
            && listen
                .iter()
                .any(|l| matches!(l, Listen::Tcp { tls: true, .. }))
        {
            return Err(root.error("a <listen tls='true'/> needs <tls cert='...' key='...'/>"));
        }
        let users = root.required_child("users")?;
        users.allow(&["file"], &[])?;
        let mut limits = Limits::default();
        let mut max_queue_bytes = 8 * 1024 * 1024;
        let mut handshake_timeout = Duration::from_secs(10);
        if let Some(node) = root.child("limits")? {
            node.allow(
                &[
                    "max-stanza-bytes",
                    "max-depth",
                    "max-queue-bytes",
                    "handshake-timeout",
                ],
                &[],
            )?;
            limits.max_stanza_bytes = node
                .parse_attr("max-stanza-bytes", "a number of bytes")?
                .unwrap_or(limits.max_stanza_bytes);
            limits.max_depth = node
                .parse_attr("max-depth", "a nesting depth (a whole number)")?
                .unwrap_or(limits.max_depth);
            max_queue_bytes = node
                .parse_attr("max-queue-bytes", "a number of bytes")?
                .unwrap_or(max_queue_bytes);
            handshake_timeout = node
                .seconds_attr("handshake-timeout")?
                .unwrap_or(handshake_timeout);
        }
        let (mut grace, mut grace_max_packets) = (Duration::from_secs(5), 10_000);
        if let Some(node) = root.child("grace")? {
            node.allow(&["seconds", "max-packets"], &[])?;
            grace = node.seconds_attr("seconds")?.unwrap_or(grace);
            grace_max_packets = node
                .parse_attr("max-packets", "a number of packets")?
                .unwrap_or(grace_max_packets);
        }
        let (mut keepalive, mut link_timeout) =
            (jrs_config::LINK_KEEPALIVE, jrs_config::LINK_TIMEOUT);
        if let Some(node) = root.child("keepalive")? {
            node.allow(&["seconds", "timeout"], &[])?;
            keepalive = node.seconds_attr("seconds")?.unwrap_or(keepalive);
            link_timeout = node.seconds_attr("timeout")?.unwrap_or(link_timeout);
        }
        Ok(RouterConfig {
            id: root.child_text("id")?.unwrap_or("router").to_owned(),
            connect,
            exec,
            listen,
            tls,
            client_ca,
            users_file: PathBuf::from(users.required_attr("file")?),
            limits,
            max_queue_bytes,
            handshake_timeout,
            grace,
            grace_max_packets,
            keepalive,
            link_timeout,
            log: LogConfig::from_node(root.child("log")?)?,
        })
    }
}

/// One `<component>` of `router-users.xml`: a name, its secret and what it may bind.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentUser {
    pub name: String,
    pub secret: String,
    /// The component validates its own input; the router only frames its stanzas.
    pub trusted: bool,
    /// The routes it may bind.
    pub allow: Vec<Allow>,
}

/// `<allow type=".." host=".." ns=".."/>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Allow {
    pub route: PacketType,
    /// A host name, `any` (every host name) or `*` (the wildcard route).
    pub host: String,
    /// For `xdb`: only these namespaces (binds with `ns`), not the host's default
    /// storage; `None`: any namespace, and the default.
    pub ns: Option<Vec<String>>,
}

impl ComponentUser {
    /// The namespaces a store is limited to: `Some` when it may bind `xdb` and every
    /// such `allow` names namespaces.
    pub fn xdb_namespaces(&self) -> Option<Vec<&str>> {
        let xdb: Vec<&Allow> = self
            .allow
            .iter()
            .filter(|a| a.route == PacketType::Xdb)
            .collect();
        if xdb.is_empty() || xdb.iter().any(|a| a.ns.is_none()) {
            return None;
        }
        Some(
            xdb.iter()
                .flat_map(|a| a.ns.iter().flatten().map(String::as_str))
                .collect(),
        )
    }

    /// Whether it may bind `route` for `host`, for the namespace `ns` (`xdb` only).
    pub fn may_bind(&self, route: PacketType, host: &str, ns: Option<&str>) -> bool {
        self.allow.iter().any(|a| {
            a.route == route
                && (a.host == host || (a.host == "any" && host != "*"))
                && match (&a.ns, ns) {
                    (None, _) => true,
                    (Some(list), Some(ns)) => list.iter().any(|n| n == ns),
                    (Some(_), None) => false,
                }
        })
    }
}

/// All component accounts, by name.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, ComponentUser>,
}

impl Users {
    pub fn load(path: &Path) -> Result<Users> {
        let root = Node::load(path, "users")?;
        root.allow(&[], &["component"])?;
        let mut by_name = HashMap::new();
        for node in root.children("component") {
            node.allow(&["name", "secret", "trusted"], &["allow"])?;
            let name = node.required_attr("name")?.to_ascii_lowercase();
            let mut allow = vec![];
            for a in node.children("allow") {
                a.allow(&["type", "host", "ns"], &[])?;
                let t = a.required_attr("type")?;
                let route = PacketType::parse(t).ok_or_else(|| {
                    a.error(format!(
                        "attribute 'type' = '{t}': expected normal, session, xdb or log"
                    ))
                })?;
                let ns: Option<Vec<String>> = a
                    .attr("ns")
                    .map(|list| list.split_whitespace().map(str::to_owned).collect());
                if ns.is_some() && route != PacketType::Xdb {
                    return Err(a.error("'ns' is for type xdb only"));
                }
                allow.push(Allow {
                    route,
                    host: a.required_attr("host")?.to_ascii_lowercase(),
                    ns,
                });
            }
            let user = ComponentUser {
                name: name.clone(),
                secret: node.required_attr("secret")?.to_owned(),
                trusted: node.bool_attr("trusted", false)?,
                allow,
            };
            if by_name.insert(name.clone(), user).is_some() {
                return Err(node.error(format!("component '{name}' is listed twice")));
            }
        }
        Ok(Users { by_name })
    }

    /// The account a handshake name authenticates against: the exact name, or for an
    /// instance name `NAME-N` (N a number) the account `NAME`.
    pub fn find(&self, name: &str) -> Option<&ComponentUser> {
        self.by_name.get(name).or_else(|| {
            let (base, n) = name.rsplit_once('-')?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            self.by_name.get(base)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let c = RouterConfig::load(&root.join("etc/router.xml")).unwrap();
        assert_eq!(c.users_file, PathBuf::from("etc/router-users.xml"));
        let users = Users::load(&root.join(&c.users_file)).unwrap();
        assert!(users.find("sm-2").is_some());
        assert!(users
            .find("s2s")
            .unwrap()
            .may_bind(PacketType::Normal, "*", None));
        assert!(users.find("nobody").is_none());
    }

    #[test]
    fn namespaces_in_the_acl() {
        let user = ComponentUser {
            name: "accounts".into(),
            secret: "s".into(),
            trusted: true,
            allow: vec![Allow {
                route: PacketType::Xdb,
                host: "any".into(),
                ns: Some(vec!["urn:jabberd-rs:auth:0".into()]),
            }],
        };
        assert!(user.may_bind(PacketType::Xdb, "localhost", Some("urn:jabberd-rs:auth:0")));
        assert!(!user.may_bind(PacketType::Xdb, "localhost", Some("jabber:iq:roster")));
        // Not the host's default storage.
        assert!(!user.may_bind(PacketType::Xdb, "localhost", None));
        assert!(!user.may_bind(PacketType::Xdb, "*", Some("urn:jabberd-rs:auth:0")));
    }
}
