//! `proxy65.xml`: see `docs/proxy65.md` for every element.

use std::path::Path;
use std::time::Duration;

use jrs_config::service::{check_service_name, ServiceUsers};
use jrs_config::{limits_from_node, LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The router link; its `name` is the proxy's JID (`proxy.localhost`).
    pub router: RouterLink,
    /// Who may use it (`<host>`, `<allow domain=.. | jid=..>`).
    pub users: ServiceUsers,
    /// Where the SOCKS5 listener binds.
    pub listen_address: String,
    pub listen_port: u16,
    /// What clients are told to connect to (`<streamhost host port>`).
    pub streamhost_host: String,
    pub streamhost_port: u16,
    /// Bytes per second one user's streams may relay together (0: no limit).
    pub bandwidth: u64,
    /// Active streams per user (by the initiator who activates them).
    pub streams_per_user: usize,
    /// SOCKS5 connections at once in the handshake or waiting for activation.
    pub max_waiting: usize,
    /// Of those, from one client address.
    pub per_address: usize,
    /// Streams relayed at once (two connections each).
    pub max_streams: usize,
    /// The SOCKS5 handshake must be done within this.
    pub handshake: Duration,
    /// A relayed stream with no byte either way for this long is closed.
    pub idle: Duration,
    /// A connection not activated within this is closed.
    pub pending: Duration,
    pub limits: Limits,
    pub log: LogConfig,
}

impl ProxyConfig {
    pub fn load(path: &Path) -> Result<ProxyConfig> {
        ProxyConfig::from_node(&Node::load(path, "proxy65")?)
    }

    pub fn from_node(root: &Node) -> Result<ProxyConfig> {
        root.allow(
            &[],
            &[
                "router",
                "host",
                "allow",
                "listen",
                "streamhost",
                "relay",
                "limits",
                "log",
                "metrics",
            ],
        )?;
        let router_node = root.required_child("router")?;
        let router = RouterLink::from_node(router_node)?;
        check_service_name(router_node, &router.name, "proxy.localhost")?;
        let users = ServiceUsers::from_root(root, "use the proxy")?;
        let listen = root.required_child("listen")?;
        listen.allow(&["address", "port"], &[])?;
        let listen_address = listen.attr("address").unwrap_or("127.0.0.1").to_owned();
        let listen_port: u16 = listen
            .parse_attr("port", "a port number (1-65535)")?
            .unwrap_or(7777);
        if listen_port == 0 {
            return Err(listen.error("attribute 'port' must be a port number (1-65535)"));
        }
        let (streamhost_host, streamhost_port) = match root.child("streamhost")? {
            Some(s) => {
                s.allow(&["host", "port"], &[])?;
                (
                    s.required_attr("host")?.trim().to_owned(),
                    s.parse_attr("port", "a port number (1-65535)")?
                        .unwrap_or(listen_port),
                )
            }
            None => {
                let unspecified = listen_address
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_unspecified());
                if unspecified {
                    return Err(listen.error(
                        "listening on every address: say what clients connect to with \
                         <streamhost host='..' port='..'/>",
                    ));
                }
                (listen_address.clone(), listen_port)
            }
        };
        let mut c = ProxyConfig {
            router,
            users,
            listen_address,
            listen_port,
            streamhost_host,
            streamhost_port,
            bandwidth: 10 * 1024 * 1024,
            streams_per_user: 10,
            max_waiting: 256,
            per_address: 8,
            max_streams: 500,
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            pending: Duration::from_secs(60),
            limits: limits_from_node(root.child("limits")?, Limits::default())?,
            log: LogConfig::from_node(root.child("log")?)?,
        };
        if let Some(r) = root.child("relay")? {
            r.allow(
                &[
                    "bandwidth",
                    "streams-per-user",
                    "max-waiting",
                    "per-address",
                    "max-streams",
                    "handshake",
                    "idle",
                    "pending",
                ],
                &[],
            )?;
            if let Some(v) = r.attr("bandwidth") {
                c.bandwidth = jrs_config::parse_size(v).ok_or_else(|| {
                    r.error(format!(
                        "attribute 'bandwidth' = '{v}': expected bytes per second (suffix K, M or G allowed)"
                    ))
                })?;
            }
            c.streams_per_user = positive(r, "streams-per-user", c.streams_per_user)?;
            c.max_waiting = positive(r, "max-waiting", c.max_waiting)?;
            c.per_address = positive(r, "per-address", c.per_address)?;
            c.max_streams = positive(r, "max-streams", c.max_streams)?;
            c.handshake = r.positive_seconds_attr("handshake")?.unwrap_or(c.handshake);
            c.idle = r.positive_seconds_attr("idle")?.unwrap_or(c.idle);
            c.pending = r.positive_seconds_attr("pending")?.unwrap_or(c.pending);
        }
        Ok(c)
    }

    /// Whether `user` (a bare JID) may use the proxy.
    pub fn allows(&self, user: &jid::BareJid) -> bool {
        self.users.allows(user)
    }
}

fn positive(n: &Node, name: &str, default: usize) -> Result<usize> {
    let v: usize = n.parse_attr(name, "a whole number")?.unwrap_or(default);
    if v == 0 {
        return Err(n.error(format!("attribute '{name}' must be at least 1")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn parse(s: &str) -> Result<ProxyConfig> {
        ProxyConfig::from_node(&Node::parse_str(s, Arc::new(PathBuf::from("proxy65.xml")))?)
    }

    const BASE: &str = "<router name='proxy.localhost' secret='s'/><host>localhost</host>";

    #[test]
    fn defaults_and_errors() {
        let c = parse(&format!("<proxy65>{BASE}<listen/></proxy65>")).unwrap();
        assert_eq!(
            (c.streamhost_host.as_str(), c.streamhost_port),
            ("127.0.0.1", 7777)
        );
        assert_eq!(c.bandwidth, 10 * 1024 * 1024);
        assert_eq!(
            (c.max_waiting, c.per_address, c.max_streams, c.handshake),
            (256, 8, 500, Duration::from_secs(10))
        );
        assert!(c.allows(&jid::BareJid::new("a@localhost").unwrap()));
        assert!(!c.allows(&jid::BareJid::new("a@example.net").unwrap()));
        let c = parse(&format!(
            "<proxy65>{BASE}<listen address='::' port='7000'/>\
             <streamhost host='proxy.example.net'/><relay bandwidth='0' idle='5' max-waiting='20' \
             per-address='2' max-streams='5' handshake='3'/></proxy65>"
        ))
        .unwrap();
        assert_eq!(
            (c.streamhost_host.as_str(), c.streamhost_port),
            ("proxy.example.net", 7000)
        );
        assert_eq!(c.bandwidth, 0);
        assert_eq!(
            (c.max_waiting, c.per_address, c.max_streams, c.handshake),
            (20, 2, 5, Duration::from_secs(3))
        );
        let e = parse(&format!(
            "<proxy65>{BASE}\n<listen address='0.0.0.0'/></proxy65>"
        ))
        .unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("<streamhost"), "{e}");
        let e = parse(&format!(
            "<proxy65>{BASE}<listen/>\n<relay bandwidth='fast'/></proxy65>"
        ))
        .unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse("<proxy65><router name='proxy.localhost' secret='s'/><listen/></proxy65>")
            .unwrap_err();
        assert!(e.to_string().contains("<host>"), "{e}");
    }
}
