//! `c2s.xml`.

use std::path::Path;
use std::time::Duration;

use jrs_config::{LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

pub use jrs_config::{Listener as Listen, TlsHost as Host, TlsMode};

#[derive(Debug, Clone)]
pub struct C2sConfig {
    pub router: RouterLink,
    pub hosts: Vec<Host>,
    pub listen: Vec<Listen>,
    /// HTTP listeners and what they serve (WebSocket, host-meta).
    pub web: WebConfig,
    /// STARTTLS must happen before authentication.
    pub require_tls: bool,
    /// After a TLS 1.3 handshake, c2s runs the records itself (`record-layer='compact'`,
    /// crates/sx/src/tls_records.rs) instead of rustls (`'rustls'`).
    pub compact_tls_records: bool,
    /// SASL mechanisms offered (when usable: PLAIN only over TLS, -PLUS only over TLS).
    pub mechanisms: Vec<String>,
    /// XEP-0077 account creation before login.
    pub register: bool,
    pub limits: Limits,
    /// Bytes per second a client may send (sustained); bursts up to 4 times that.
    pub rate_bytes: u32,
    /// A connection with no traffic this long is closed.
    pub idle_timeout: Duration,
    /// Whitespace keepalive after this much silence towards the client.
    pub keepalive: Duration,
    /// Failed authentications allowed per address within `auth_window`.
    pub auth_failures: u32,
    pub auth_window: Duration,
    /// Failed authentications allowed on one stream before it is closed.
    pub auth_attempts: u32,
    pub stream_management: StreamManagement,
    pub csi: Csi,
    /// XEP-0388 SASL2 with XEP-0386 Bind 2 (`<sasl2/>`).
    pub sasl2: bool,
    /// XEP-0484 FAST (`<fast/>`).
    pub fast: Fast,
    /// On SIGTERM, how long sessions get to end or be handed to sm.
    pub shutdown_timeout: Duration,
    pub log: LogConfig,
}

/// The web edge: `<listen mode="http|https">` and `<web/>`.
#[derive(Debug, Clone, Default)]
pub struct WebConfig {
    pub listen: Vec<WebListener>,
    /// The public URL of the web listeners (`https://xmpp.example.org:5281`), for
    /// host-meta; by default the request's `Host` header on the listener's scheme.
    pub base_url: Option<String>,
    /// `Origin`s whose pages may open WebSocket connections; empty: any.
    pub allowed_origins: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-For` names the client (the client's address
    /// then counts for per-address limits and logs).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// HTTP connections (WebSocket ones included) one address may hold at once.
    pub max_connections_per_address: usize,
}

/// One HTTP listener.
#[derive(Debug, Clone)]
pub struct WebListener {
    pub address: String,
    pub port: u16,
    /// HTTPS with the hosts' certificates.
    pub tls: bool,
    /// Plain HTTP that a TLS-terminating reverse proxy fronts: clients count as
    /// encrypted (no STARTTLS, PLAIN allowed). True for `https`.
    pub secure: bool,
}

impl WebConfig {
    fn load(root: &Node) -> Result<WebConfig> {
        let mut web = WebConfig {
            max_connections_per_address: 64,
            ..WebConfig::default()
        };
        for l in root.children("listen") {
            let tls = match l.attr("mode") {
                Some("http") => false,
                Some("https") => true,
                _ => continue,
            };
            l.allow(&["address", "port", "mode", "secure"], &[])?;
            web.listen.push(WebListener {
                address: l.attr("address").unwrap_or("::").to_owned(),
                port: l
                    .parse_attr("port", "a port number (0-65535)")?
                    .unwrap_or(if tls { 5281 } else { 5280 }),
                tls,
                secure: tls || l.bool_attr("secure", false)?,
            });
        }
        if let Some(w) = root.child("web")? {
            w.allow(
                &[
                    "base-url",
                    "allowed-origins",
                    "trusted-proxies",
                    "max-connections-per-address",
                ],
                &[],
            )?;
            if let Some(list) = w.attr("trusted-proxies") {
                for p in list.split_whitespace() {
                    web.trusted_proxies.push(p.parse().map_err(|_| {
                        w.error(format!("trusted-proxies: '{p}' is not an IP address"))
                    })?);
                }
            }
            web.max_connections_per_address = w
                .parse_attr("max-connections-per-address", "a number of connections")?
                .unwrap_or(web.max_connections_per_address);
            web.base_url = w
                .attr("base-url")
                .filter(|b| !b.is_empty())
                .map(str::to_owned);
            if let Some(b) = &web.base_url {
                if !b.starts_with("https://") && !b.starts_with("http://") {
                    return Err(w.error("base-url must start with https:// or http://"));
                }
            }
            web.allowed_origins = w
                .attr("allowed-origins")
                .map(|o| o.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
        }
        Ok(web)
    }
}

/// XEP-0198 (`<stream-management/>`).
#[derive(Debug, Clone)]
pub struct StreamManagement {
    pub enabled: bool,
    /// Sessions may be resumed (they hibernate when their connection drops).
    pub resume: bool,
    /// How long a session waits for its client to resume.
    pub hibernate: Duration,
    /// Stanzas a session may hold unacknowledged (or queued while hibernating).
    pub max_queue: usize,
    /// The server asks for an acknowledgement after this many stanzas...
    pub ack_every: u32,
    /// ...or when the oldest unacknowledged one is this old.
    pub ack_after: Duration,
}

/// XEP-0352 (`<csi/>`).
#[derive(Debug, Clone)]
pub struct Csi {
    pub enabled: bool,
    /// Stanzas held for an inactive client at most (then they all go out).
    pub max_held: usize,
}

/// XEP-0484 (`<fast/>`), offered with SASL2 only.
#[derive(Debug, Clone)]
pub struct Fast {
    pub enabled: bool,
    /// How long an issued token is valid.
    pub token_lifetime: Duration,
}

pub const ALL_MECHANISMS: &[&str] = &[
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "PLAIN",
];

impl C2sConfig {
    pub fn load(path: &Path) -> Result<C2sConfig> {
        let root = Node::load(path, "c2s")?;
        root.allow(
            &[],
            &[
                "router",
                "host",
                "listen",
                "web",
                "tls",
                "sasl",
                "register",
                "limits",
                "timeouts",
                "auth-failures",
                "stream-management",
                "csi",
                "sasl2",
                "fast",
                "log",
                "metrics",
            ],
        )?;
        let hosts = Host::all_from(&root, "")?;
        let web = WebConfig::load(&root)?;
        let listen = root
            .children("listen")
            .filter(|l| !matches!(l.attr("mode"), Some("http" | "https")))
            .map(|l| Listen::from_node(l, 5222, 5223))
            .collect::<Result<Vec<_>>>()?;
        if listen.is_empty() && web.listen.is_empty() {
            return Err(root.error("at least one <listen/> is required"));
        }
        let mut require_tls = true;
        let mut compact_tls_records = true;
        if let Some(t) = root.child("tls")? {
            t.allow(&["required", "record-layer"], &[])?;
            require_tls = t.bool_attr("required", true)?;
            compact_tls_records = match t.attr("record-layer") {
                None | Some("compact") => true,
                Some("rustls") => false,
                Some(other) => {
                    return Err(t.error(format!(
                        "record-layer='{other}': expected 'compact' or 'rustls'"
                    )))
                }
            };
        }
        let mut mechanisms: Vec<String> = ALL_MECHANISMS.iter().map(|m| m.to_string()).collect();
        if let Some(s) = root.child("sasl")? {
            s.allow(&["mechanisms"], &[])?;
            if let Some(list) = s.attr("mechanisms") {
                mechanisms = list.split_whitespace().map(str::to_owned).collect();
                if let Some(bad) = mechanisms
                    .iter()
                    .find(|m| !ALL_MECHANISMS.contains(&m.as_str()))
                {
                    return Err(s.error(format!(
                        "unknown mechanism '{bad}' (expected some of: {})",
                        ALL_MECHANISMS.join(" ")
                    )));
                }
            }
        }
        let mut register = false;
        if let Some(r) = root.child("register")? {
            r.allow(&["enabled"], &[])?;
            register = r.bool_attr("enabled", false)?;
        }
        let (mut rate_bytes, mut idle_timeout, mut keepalive, mut shutdown_timeout) = (
            65_536u32,
            Duration::from_secs(300),
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        if let Some(t) = root.child("timeouts")? {
            t.allow(&["idle", "keepalive", "shutdown"], &[])?;
            idle_timeout = t.seconds_attr("idle")?.unwrap_or(idle_timeout);
            keepalive = t.seconds_attr("keepalive")?.unwrap_or(keepalive);
            shutdown_timeout = t.seconds_attr("shutdown")?.unwrap_or(shutdown_timeout);
        }
        let mut stream_management = StreamManagement {
            enabled: true,
            resume: true,
            hibernate: Duration::from_secs(300),
            max_queue: 500,
            ack_every: 10,
            ack_after: Duration::from_secs(30),
        };
        if let Some(n) = root.child("stream-management")? {
            n.allow(
                &[
                    "enabled",
                    "resume",
                    "hibernate",
                    "max-queue",
                    "ack-every",
                    "ack-after",
                ],
                &[],
            )?;
            let sm = &mut stream_management;
            sm.enabled = n.bool_attr("enabled", sm.enabled)?;
            sm.resume = n.bool_attr("resume", sm.resume)?;
            sm.hibernate = n.seconds_attr("hibernate")?.unwrap_or(sm.hibernate);
            sm.max_queue = n
                .parse_attr("max-queue", "a number of stanzas")?
                .unwrap_or(sm.max_queue);
            sm.ack_every = n
                .parse_attr("ack-every", "a number of stanzas")?
                .unwrap_or(sm.ack_every);
            sm.ack_after = n.seconds_attr("ack-after")?.unwrap_or(sm.ack_after);
            if sm.max_queue == 0 || sm.ack_every == 0 {
                return Err(n.error("max-queue and ack-every must be at least 1"));
            }
        }
        let mut csi = Csi {
            enabled: true,
            max_held: 100,
        };
        if let Some(n) = root.child("csi")? {
            n.allow(&["enabled", "max-held"], &[])?;
            csi.enabled = n.bool_attr("enabled", csi.enabled)?;
            csi.max_held = n
                .parse_attr("max-held", "a number of stanzas")?
                .unwrap_or(csi.max_held)
                .max(1);
        }
        let mut sasl2 = true;
        if let Some(n) = root.child("sasl2")? {
            n.allow(&["enabled"], &[])?;
            sasl2 = n.bool_attr("enabled", sasl2)?;
        }
        let mut fast = Fast {
            enabled: true,
            token_lifetime: Duration::from_secs(14 * 24 * 3600),
        };
        if let Some(n) = root.child("fast")? {
            n.allow(&["enabled", "token-lifetime"], &[])?;
            fast.enabled = n.bool_attr("enabled", fast.enabled)?;
            fast.token_lifetime = n
                .seconds_attr("token-lifetime")?
                .unwrap_or(fast.token_lifetime);
            if fast.token_lifetime < Duration::from_secs(60) {
                return Err(n.error("token-lifetime must be at least 60 seconds"));
            }
        }
        let limits_node = root.child("limits")?;
        if let Some(l) = limits_node {
            l.allow(&["max-stanza-bytes", "max-depth", "rate-bytes"], &[])?;
            rate_bytes = l
                .parse_attr("rate-bytes", "bytes per second")?
                .unwrap_or(rate_bytes);
        }
        // The framing limits (checked before anything is parsed) for client streams.
        let limits = match limits_node {
            Some(l) => Limits {
                max_stanza_bytes: l
                    .parse_attr("max-stanza-bytes", "a number of bytes")?
                    .unwrap_or(65_536),
                max_depth: l.parse_attr("max-depth", "a nesting depth")?.unwrap_or(32),
            },
            None => Limits {
                max_stanza_bytes: 65_536,
                max_depth: 32,
            },
        };
        let (mut auth_failures, mut auth_window, mut auth_attempts) =
            (5, Duration::from_secs(60), 3);
        if let Some(a) = root.child("auth-failures")? {
            a.allow(&["max", "window", "per-stream"], &[])?;
            auth_failures = a
                .parse_attr("max", "a number of failures")?
                .unwrap_or(auth_failures);
            auth_window = a.seconds_attr("window")?.unwrap_or(auth_window);
            auth_attempts = a
                .parse_attr("per-stream", "a number of attempts")?
                .unwrap_or(auth_attempts);
            // RFC 6120 6.4.5: a reasonable number of retries, at least 2 and no more than 5.
            if !(2..=5).contains(&auth_attempts) {
                return Err(a.error("per-stream must be between 2 and 5 (RFC 6120 6.4.5)"));
            }
        }
        Ok(C2sConfig {
            router: RouterLink::from_node(root.required_child("router")?)?,
            hosts,
            listen,
            web,
            require_tls,
            compact_tls_records,
            mechanisms,
            register,
            limits,
            rate_bytes,
            idle_timeout,
            keepalive,
            auth_failures,
            auth_window,
            auth_attempts,
            stream_management,
            csi,
            sasl2,
            fast,
            shutdown_timeout,
            log: LogConfig::from_node(root.child("log")?)?,
        })
    }
}
