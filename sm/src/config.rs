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
    /// The modules that run, in order (`<modules>`, or the default set).
    pub modules: Vec<String>,
    /// The whole file: each module reads its own element (`<roster max-items=..>`).
    pub root: Node,
    /// Sessions (resources) per user.
    pub sessions_max: usize,
    /// Directed-presence targets remembered per session.
    pub directed_max: usize,
    /// Account-existence answers kept in memory, and for how long.
    pub accounts_cache: usize,
    pub accounts_ttl: Duration,
    /// Pending events per user before new stanzas are refused with `resource-constraint`.
    pub user_queue: usize,
    /// XEP-0198: hibernating sessions kept per user (the oldest ends first) and in all.
    pub hibernated_per_user: usize,
    pub hibernated_total: usize,
    /// How long sessions wait for c2s to restore them after sm's router link came up
    /// (sm restarted, or its link dropped): docs/sm.md.
    pub restore_wait: Duration,
    /// How long to wait for storage before retrying once.
    pub xdb_timeout: Duration,
    /// `<delivery local>`: stanzas for users of a domain this instance alone serves go
    /// straight to their tasks, not through the router (`host::local`).
    pub local_delivery: bool,
    pub limits: Limits,
    pub log: LogConfig,
}

/// Elements of sm.xml that are not a module's.
const CORE: [&str; 10] = [
    "router", "host", "modules", "sessions", "cache", "xdb", "delivery", "limits", "log", "metrics",
];

impl SmConfig {
    /// Reads sm.xml. `known` are the modules sm has (each may have an element of its
    /// name), `default` those that run when there is no `<modules>`.
    pub fn load(path: &Path, known: &[&str], default: &[&str]) -> Result<SmConfig> {
        let root = Node::load(path, "sm")?;
        SmConfig::from_node(&root, known, default)
    }

    pub fn from_node(root: &Node, known: &[&str], default: &[&str]) -> Result<SmConfig> {
        let allowed: Vec<&str> = CORE.iter().chain(known).copied().collect();
        root.allow(&[], &allowed)?;
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
        let modules = match root.child("modules")? {
            None => default.iter().map(|m| m.to_string()).collect(),
            Some(list) => {
                list.allow(&["defaults"], &["module"])?;
                // `defaults='true'`: the default set, changed by the entries below.
                let mut names: Vec<String> = if list.bool_attr("defaults", false)? {
                    default.iter().map(|m| m.to_string()).collect()
                } else {
                    vec![]
                };
                let mut seen: Vec<&str> = vec![];
                for m in list.children("module") {
                    m.allow(&["name", "enabled"], &[])?;
                    let name = m.required_attr("name")?;
                    if !known.contains(&name) {
                        return Err(
                            m.error(format!("no module '{name}'; sm has: {}", known.join(", ")))
                        );
                    }
                    if seen.contains(&name) {
                        return Err(m.error(format!("module '{name}' is listed twice")));
                    }
                    seen.push(name);
                    names.retain(|n| n != name);
                    if m.bool_attr("enabled", true)? {
                        names.push(name.to_owned());
                    }
                }
                names
            }
        };
        for m in known {
            if let Some(n) = root.child(m)? {
                if !modules.iter().any(|x| x == m) {
                    return Err(n.error(format!(
                        "<{m}> configures module '{m}', which <modules> does not load"
                    )));
                }
            }
        }
        let mut c = SmConfig {
            router: RouterLink::from_node(root.required_child("router")?)?,
            hosts,
            modules,
            root: root.clone(),
            sessions_max: 10,
            directed_max: 100,
            accounts_cache: 10_000,
            accounts_ttl: Duration::from_secs(60),
            user_queue: 10_000,
            hibernated_per_user: 5,
            hibernated_total: 10_000,
            restore_wait: Duration::from_secs(30),
            xdb_timeout: Duration::from_secs(5),
            local_delivery: true,
            limits: limits_from_node(root.child("limits")?, Limits::default())?,
            log: LogConfig::from_node(root.child("log")?)?,
        };
        if let Some(n) = root.child("sessions")? {
            n.allow(
                &[
                    "max-per-user",
                    "max-directed",
                    "queue",
                    "hibernated-per-user",
                    "hibernated-total",
                    "restore-wait",
                ],
                &[],
            )?;
            c.sessions_max = positive(n, "max-per-user", c.sessions_max)?;
            c.directed_max = count(n, "max-directed", c.directed_max)?;
            c.user_queue = positive(n, "queue", c.user_queue)?;
            c.hibernated_per_user = count(n, "hibernated-per-user", c.hibernated_per_user)?;
            c.hibernated_total = count(n, "hibernated-total", c.hibernated_total)?;
            c.restore_wait = n.seconds_attr("restore-wait")?.unwrap_or(c.restore_wait);
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
        if let Some(n) = root.child("delivery")? {
            n.allow(&["local"], &[])?;
            c.local_delivery = n.bool_attr("local", c.local_delivery)?;
        }
        Ok(c)
    }

    /// The element configuring module `name`, if the file has one.
    pub fn module_settings(&self, name: &'static str) -> Result<Option<&Node>> {
        self.root.child(name)
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

/// A whole-number attribute (`default` when absent).
pub fn count(n: &Node, name: &str, default: usize) -> Result<usize> {
    Ok(n.parse_attr(name, "a whole number")?.unwrap_or(default))
}

/// A whole-number attribute that must be at least 1.
pub fn positive(n: &Node, name: &str, default: usize) -> Result<usize> {
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

    const KNOWN: [&str; 3] = ["roster", "offline", "register"];

    fn parse(s: &str) -> Result<SmConfig> {
        SmConfig::from_node(
            &Node::parse_str(s, Arc::new(PathBuf::from("sm.xml")))?,
            &KNOWN,
            &["roster", "offline"],
        )
    }

    #[test]
    fn defaults_and_module_lists() {
        let c = parse("<sm><router name='sm' secret='s'/><host>LocalHost</host><offline max-messages='3'/></sm>")
            .unwrap();
        assert_eq!(c.hosts, vec!["localhost"]);
        assert_eq!(c.modules, ["roster", "offline"]);
        assert_eq!(
            c.module_settings("offline")
                .unwrap()
                .unwrap()
                .attr("max-messages"),
            Some("3")
        );
        let c = parse(
            "<sm><router name='sm' secret='s'/><host>a</host>\
             <modules><module name='register'/><module name='roster'/></modules></sm>",
        )
        .unwrap();
        assert_eq!(c.modules, ["register", "roster"]);
        let c = parse(
            "<sm><router name='sm' secret='s'/><host>a</host>\
             <modules defaults='true'><module name='register'/>\
             <module name='offline' enabled='false'/></modules></sm>",
        )
        .unwrap();
        assert_eq!(c.modules, ["roster", "register"]);
    }

    #[test]
    fn local_delivery_is_on_unless_turned_off() {
        let c = parse("<sm><router name='sm' secret='s'/><host>a</host></sm>").unwrap();
        assert!(c.local_delivery);
        let c =
            parse("<sm><router name='sm' secret='s'/><host>a</host><delivery local='false'/></sm>")
                .unwrap();
        assert!(!c.local_delivery);
        let e =
            parse("<sm><router name='sm' secret='s'/><host>a</host><delivery local='maybe'/></sm>")
                .unwrap_err();
        assert!(e.to_string().contains("local"), "{e}");
        let e =
            parse("<sm><router name='sm' secret='s'/><host>a</host><delivery remote='x'/></sm>")
                .unwrap_err();
        assert!(e.to_string().contains("remote"), "{e}");
    }

    #[test]
    fn unknown_elements_and_modules_are_file_line_errors() {
        let e = parse("<sm>\n<router name='sm' secret='s'/>\n<host>a</host>\n<rooster/>\n</sm>")
            .unwrap_err();
        assert_eq!(e.line, 4);
        assert!(
            e.to_string()
                .starts_with("sm.xml:4: <rooster>: unknown element inside <sm>"),
            "{e}"
        );
        let e = parse("<sm><router name='sm' secret='s'/></sm>").unwrap_err();
        assert!(e.to_string().contains("<host>"), "{e}");
        let e = parse("<sm><router name='sm' secret='s'/><host>u@a</host></sm>").unwrap_err();
        assert!(e.to_string().contains("not a domain"), "{e}");
        let e = parse(
            "<sm><router name='sm' secret='s'/><host>a</host>\n<modules>\n<module name='mam'/></modules></sm>",
        )
        .unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("no module 'mam'"), "{e}");
        let e = parse(
            "<sm><router name='sm' secret='s'/><host>a</host><modules><module name='roster'/></modules><offline/></sm>",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("which <modules> does not load"),
            "{e}"
        );
    }
}
