//! `s2s.xml`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jrs_config::{LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

pub use jrs_config::{Listener as Listen, TlsHost as Host, TlsMode};

/// Where to connect for a remote domain: from the static map or from DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub mode: TlsMode,
}

#[derive(Debug, Clone)]
pub struct S2sConfig {
    pub router: RouterLink,
    pub hosts: Vec<Host>,
    pub listen: Vec<Listen>,
    /// Static map: remote domain -> targets, tried in order; overrides DNS.
    pub routes: HashMap<String, Vec<Target>>,
    /// DNS servers to ask instead of the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Streams must be encrypted (both directions).
    pub require_encryption: bool,
    /// Accept a remote certificate that does not verify, and authenticate with dialback.
    pub accept_unverified: bool,
    /// PEM file of trusted CAs (default: the system's bundle).
    pub ca_file: Option<PathBuf>,
    pub dialback: bool,
    /// XEP-0185 secret; made up at start when not configured.
    pub dialback_secret: Option<String>,
    pub sasl_external: bool,
    /// Stanzas waiting for one (local, remote) pair at most.
    pub queue_max: usize,
    /// A stanza waiting longer than this for its connection is bounced
    /// (`remote-server-timeout`); also the limit for connecting and authenticating.
    pub queue_timeout: Duration,
    /// TCP connect timeout per address.
    pub connect_timeout: Duration,
    /// Connections (both directions) with no traffic for this long are closed.
    pub idle_timeout: Duration,
    pub limits: Limits,
    pub rate_bytes: u32,
    pub log: LogConfig,
}

impl S2sConfig {
    pub fn load(path: &Path) -> Result<S2sConfig> {
        let root = Node::load(path, "s2s")?;
        root.allow(
            &[],
            &[
                "router", "host", "listen", "tls", "dialback", "sasl", "dns", "route", "queue",
                "timeouts", "limits", "log", "metrics",
            ],
        )?;
        // Default certificate files differ from c2s's, so the two never write the same.
        let hosts = Host::all_from(&root, "s2s-")?;
        let listen = Listen::all_from(&root, 5269, 5270)?;
        let (mut require_encryption, mut accept_unverified, mut ca_file) = (true, true, None);
        if let Some(t) = root.child("tls")? {
            t.allow(&["require-encryption", "accept-unverified", "ca-file"], &[])?;
            require_encryption = t.bool_attr("require-encryption", true)?;
            accept_unverified = t.bool_attr("accept-unverified", true)?;
            ca_file = t.attr("ca-file").map(PathBuf::from);
        }
        let (mut dialback, mut dialback_secret) = (true, None);
        if let Some(d) = root.child("dialback")? {
            d.allow(&["enabled", "secret"], &[])?;
            dialback = d.bool_attr("enabled", true)?;
            dialback_secret = d.attr("secret").map(str::to_owned);
        }
        let mut sasl_external = true;
        if let Some(s) = root.child("sasl")? {
            s.allow(&["external"], &[])?;
            sasl_external = s.bool_attr("external", true)?;
        }
        let mut nameservers = vec![];
        if let Some(d) = root.child("dns")? {
            d.allow(&[], &["nameserver"])?;
            for n in d.children("nameserver") {
                n.allow(&["address", "port"], &[])?;
                let ip: std::net::IpAddr = n
                    .parse_attr("address", "an IP address")?
                    .ok_or_else(|| n.error("attribute 'address' is required"))?;
                let port: u16 = n.parse_attr("port", "a port number")?.unwrap_or(53);
                nameservers.push(SocketAddr::new(ip, port));
            }
        }
        let mut routes: HashMap<String, Vec<Target>> = HashMap::new();
        for r in root.children("route") {
            r.allow(&["domain", "address", "port", "mode"], &[])?;
            let domain = r.required_attr("domain")?.to_ascii_lowercase();
            let mode = TlsMode::from_attr(r)?;
            routes.entry(domain).or_default().push(Target {
                host: r.required_attr("address")?.to_owned(),
                port: r.parse_attr("port", "a port number")?.unwrap_or(5269),
                mode,
            });
        }
        let (mut queue_max, mut queue_timeout) = (1000usize, Duration::from_secs(30));
        if let Some(q) = root.child("queue")? {
            q.allow(&["max-stanzas", "timeout"], &[])?;
            queue_max = q
                .parse_attr("max-stanzas", "a number of stanzas")?
                .unwrap_or(queue_max);
            queue_timeout = q.seconds_attr("timeout")?.unwrap_or(queue_timeout);
        }
        let (mut connect_timeout, mut idle_timeout) =
            (Duration::from_secs(10), Duration::from_secs(600));
        if let Some(t) = root.child("timeouts")? {
            t.allow(&["connect", "idle"], &[])?;
            connect_timeout = t.seconds_attr("connect")?.unwrap_or(connect_timeout);
            idle_timeout = t.seconds_attr("idle")?.unwrap_or(idle_timeout);
        }
        let mut limits = Limits {
            max_stanza_bytes: 262_144,
            max_depth: 64,
        };
        let mut rate_bytes = 262_144u32;
        if let Some(l) = root.child("limits")? {
            l.allow(&["max-stanza-bytes", "max-depth", "rate-bytes"], &[])?;
            limits.max_stanza_bytes = l
                .parse_attr("max-stanza-bytes", "a number of bytes")?
                .unwrap_or(limits.max_stanza_bytes);
            limits.max_depth = l
                .parse_attr("max-depth", "a nesting depth")?
                .unwrap_or(limits.max_depth);
            rate_bytes = l
                .parse_attr("rate-bytes", "bytes per second")?
                .unwrap_or(rate_bytes);
        }
        Ok(S2sConfig {
            router: RouterLink::from_node(root.required_child("router")?)?,
            hosts,
            listen,
            routes,
            nameservers,
            require_encryption,
            accept_unverified,
            ca_file,
            dialback,
            dialback_secret,
            sasl_external,
            queue_max,
            queue_timeout,
            connect_timeout,
            idle_timeout,
            limits,
            rate_bytes,
            log: LogConfig::from_node(root.child("log")?)?,
        })
    }

    pub fn serves(&self, domain: &str) -> bool {
        self.hosts.iter().any(|h| h.name == domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<S2sConfig> {
        let dir = std::env::temp_dir().join(format!("s2s-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.xml", rand::random::<u64>()));
        std::fs::write(&path, text).unwrap();
        let r = S2sConfig::load(&path);
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn reads_everything() {
        let c = load(
            "<s2s><router name='s2s' secret='x'/><host name='A.test'/>\
             <listen port='5999'/><listen mode='tls'/>\
             <tls require-encryption='false' accept-unverified='false' ca-file='ca.pem'/>\
             <dialback secret='sec'/><dns><nameserver address='127.0.0.1' port='5353'/></dns>\
             <route domain='b.test' address='127.0.0.1' port='6000'/>\
             <route domain='b.test' address='::1' port='6001' mode='tls'/>\
             <queue max-stanzas='5' timeout='1.5'/><timeouts connect='2' idle='3'/></s2s>",
        )
        .unwrap();
        assert_eq!(c.hosts[0].name, "a.test");
        assert_eq!(c.listen[1].port, 5270);
        assert!(!c.require_encryption && !c.accept_unverified);
        assert_eq!(c.dialback_secret.as_deref(), Some("sec"));
        assert_eq!(c.nameservers[0].port(), 5353);
        assert_eq!(c.routes["b.test"].len(), 2);
        assert_eq!(c.routes["b.test"][1].mode, TlsMode::Direct);
        assert_eq!(c.queue_timeout, Duration::from_millis(1500));
        assert_eq!(c.queue_max, 5);
    }

    #[test]
    fn refuses_unknown_mode() {
        let e =
            load("<s2s><router name='s2s' secret='x'/><host name='a'/><listen mode='x'/></s2s>")
                .unwrap_err();
        assert!(e.message.contains("expected starttls or tls"), "{e}");
    }
}
