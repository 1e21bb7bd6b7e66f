//! `sm.xml`: see `docs/sm.md` for every element.

use std::path::Path;
use std::time::Duration;

use jrs_config::{limits_from_node, LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

#[derive(Debug, Clone)]
pub struct SmConfig {
    pub router: RouterLink,
    /// Domains whose users this instance serves.
    pub hosts: Vec<String>,
    /// XEP-0077 for logged-in users: password change and account removal.
    pub register: bool,
    /// Offline messages kept per user; 0 disables offline storage.
    pub offline_max: usize,
    /// Roster entries per user (contacts plus pending inbound requests).
    pub roster_max: usize,
    /// Sessions (resources) per user.
    pub sessions_max: usize,
    /// Directed-presence targets remembered per session.
    pub directed_max: usize,
    /// Largest stored vCard, in bytes.
    pub vcard_max_bytes: usize,
    /// Largest private XML storage of one user, in bytes.
    pub private_max_bytes: usize,
    /// Account-existence answers kept in memory, and for how long.
    pub accounts_cache: usize,
    pub accounts_ttl: Duration,
    /// Pending events per user before new stanzas are refused with `resource-constraint`.
    pub user_queue: usize,
    /// How long to wait for storage before retrying once.
    pub xdb_timeout: Duration,
    pub limits: Limits,
    pub log: LogConfig,
}

impl SmConfig {
    pub fn load(path: &Path) -> Result<SmConfig> {
        let root = Node::load(path, "sm")?;
        SmConfig::from_node(&root)
    }

    pub fn from_node(root: &Node) -> Result<SmConfig> {
        root.allow(
            &[],
            &[
                "router", "host", "register", "offline", "roster", "sessions", "vcard", "private",
                "cache", "xdb", "limits", "log",
            ],
        )?;
        let hosts: Vec<String> = root
            .children("host")
            .map(|h| h.text.to_ascii_lowercase())
            .collect();
        if hosts.is_empty() || hosts.iter().any(String::is_empty) {
            return Err(root.error("at least one non-empty <host>DOMAIN</host> is required"));
        }
        for h in root.children("host") {
            h.allow(&[], &[])?;
            if h.text == "*"
                || jid::BareJid::new(&h.text)
                    .map(|j| j.node().is_some())
                    .unwrap_or(true)
            {
                return Err(h.error(format!("'{}' is not a domain name", h.text)));
            }
        }
        let mut c = SmConfig {
            router: RouterLink::from_node(root.required_child("router")?)?,
            hosts,
            register: false,
            offline_max: 100,
            roster_max: 1000,
            sessions_max: 10,
            directed_max: 100,
            vcard_max_bytes: 64 * 1024,
            private_max_bytes: 64 * 1024,
            accounts_cache: 10_000,
            accounts_ttl: Duration::from_secs(60),
            user_queue: 1000,
            xdb_timeout: Duration::from_secs(5),
            limits: limits_from_node(root.child("limits")?, Limits::default())?,
            log: LogConfig::from_node(root.child("log")?)?,
        };
        if let Some(n) = root.child("register")? {
            n.allow(&["enabled"], &[])?;
            c.register = n.bool_attr("enabled", false)?;
        }
        if let Some(n) = root.child("offline")? {
            n.allow(&["max-messages"], &[])?;
            c.offline_max = count(n, "max-messages", c.offline_max)?;
        }
        if let Some(n) = root.child("roster")? {
            n.allow(&["max-items"], &[])?;
            c.roster_max = count(n, "max-items", c.roster_max)?;
        }
        if let Some(n) = root.child("sessions")? {
            n.allow(&["max-per-user", "max-directed", "queue"], &[])?;
            c.sessions_max = positive(n, "max-per-user", c.sessions_max)?;
            c.directed_max = count(n, "max-directed", c.directed_max)?;
            c.user_queue = positive(n, "queue", c.user_queue)?;
        }
        if let Some(n) = root.child("vcard")? {
            n.allow(&["max-bytes"], &[])?;
            c.vcard_max_bytes = count(n, "max-bytes", c.vcard_max_bytes)?;
        }
        if let Some(n) = root.child("private")? {
            n.allow(&["max-bytes"], &[])?;
            c.private_max_bytes = count(n, "max-bytes", c.private_max_bytes)?;
        }
        if let Some(n) = root.child("cache")? {
            n.allow(&["accounts", "seconds"], &[])?;
            c.accounts_cache = positive(n, "accounts", c.accounts_cache)?;
            c.accounts_ttl = n.seconds_attr("seconds")?.unwrap_or(c.accounts_ttl);
        }
        if let Some(n) = root.child("xdb")? {
            n.allow(&["timeout"], &[])?;
            let t = n.seconds_attr("timeout")?.unwrap_or(c.xdb_timeout);
            if t.is_zero() {
                return Err(n.error("attribute 'timeout' must be more than 0 seconds"));
            }
            c.xdb_timeout = t;
        }
        Ok(c)
    }

    /// The largest fragment sm stores under one namespace: storage answers carry it back
    /// through the router and sm's own link, whose stanza limit (`<limits>`, the same
    /// 256 KiB as the router's by default) must leave room for the xdb wrapper.
    pub fn fragment_max(&self) -> usize {
        self.limits.max_stanza_bytes.saturating_sub(2048).max(1024)
    }

    pub fn serves(&self, domain: &str) -> bool {
        self.hosts.iter().any(|h| h == domain)
    }
}

fn count(n: &Node, name: &str, default: usize) -> Result<usize> {
    Ok(n.parse_attr(name, "a whole number")?.unwrap_or(default))
}

fn positive(n: &Node, name: &str, default: usize) -> Result<usize> {
    let v = count(n, name, default)?;
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

    fn parse(s: &str) -> Result<SmConfig> {
        SmConfig::from_node(&Node::parse_str(s, Arc::new(PathBuf::from("sm.xml")))?)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(
            "<sm><router name='sm' secret='s'/><host>LocalHost</host>\
             <register enabled='true'/><offline max-messages='3'/></sm>",
        )
        .unwrap();
        assert_eq!(c.hosts, vec!["localhost"]);
        assert!(c.register);
        assert_eq!(c.offline_max, 3);
        assert_eq!(c.roster_max, 1000);
    }

    #[test]
    fn unknown_elements_are_file_line_errors() {
        let e = parse("<sm>\n<router name='sm' secret='s'/>\n<host>a</host>\n<rooster/>\n</sm>")
            .unwrap_err();
        assert_eq!(e.line, 4);
        assert!(
            e.to_string()
                .starts_with("sm.xml:4: <rooster>: unknown element inside <sm>"),
            "{e}"
        );
        let e =
            parse("<sm><router name='sm' secret='s'/><host>a</host><roster max-items='x'/></sm>")
                .unwrap_err();
        assert!(e.to_string().contains("expected a whole number"), "{e}");
        let e = parse("<sm><router name='sm' secret='s'/></sm>").unwrap_err();
        assert!(e.to_string().contains("<host>"), "{e}");
        let e = parse("<sm><router name='sm' secret='s'/><host>u@a</host></sm>").unwrap_err();
        assert!(e.to_string().contains("not a domain"), "{e}");
    }
}
