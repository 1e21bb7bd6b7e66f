//! `muc.xml`: see docs/muc.md for every element.

use std::path::Path;
use std::time::Duration;

use jrs_config::{limits_from_node, LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

/// Where persistent rooms are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Through the router's storage component (xdb), owner = room JID.
    Xdb,
    /// Nothing is kept: every room is gone after a restart.
    Memory,
}

/// How the process connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// To this project's router, binding `normal` for the service host (shared by instances).
    Router,
    /// As a plain XEP-0114 component named after the service (any server, e.g. Prosody).
    Plain,
}

/// Defaults and limits that apply to every room.
#[derive(Debug, Clone)]
pub struct RoomLimits {
    /// Occupants per room (also the most `maxusers` an owner may set).
    pub max_occupants: usize,
    /// Default `maxusers` of a new room.
    pub default_max_users: usize,
    /// Messages kept for history per room (most an owner may set).
    pub max_history: usize,
    /// Default history length of a new room.
    pub default_history: usize,
    /// Message rate per occupant: tokens per second and bucket size.
    pub rate: f64,
    pub burst: f64,
    /// Rooms may keep a message archive (XEP-0313); new rooms do unless the owner says no.
    pub archive: bool,
    /// Messages kept per room archive (the oldest go first).
    pub archive_max_items: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct MucConfig {
    pub router: RouterLink,
    pub mode: Mode,
    /// The service's domain (`conference.localhost`).
    pub service: String,
    pub storage: Storage,
    /// Rooms in this instance at once.
    pub max_rooms: usize,
    /// Rooms one user may have created and not yet ended (0: no limit).
    pub max_rooms_per_user: usize,
    /// An empty persistent room is unloaded after this long without stanzas.
    pub idle_unload: Duration,
    /// Stanzas queued for one room at most; more are refused (`resource-constraint`).
    pub room_queue: usize,
    /// Who may create rooms: anyone, or users of these domains only (empty: anyone).
    pub create_domains: Vec<String>,
    pub rooms: RoomLimits,
    pub xdb_timeout: Duration,
    pub limits: Limits,
    pub log: LogConfig,
}

impl MucConfig {
    pub fn load(path: &Path) -> Result<MucConfig> {
        let root = Node::load(path, "muc")?;
        MucConfig::from_node(&root)
    }

    pub fn from_node(root: &Node) -> Result<MucConfig> {
        root.allow(
            &[],
            &[
                "router", "service", "plain", "storage", "create", "rooms", "archive", "xdb",
                "limits", "log", "metrics",
            ],
        )?;
        let service_node = root.required_child("service")?;
        service_node.allow(&[], &[])?;
        let service = service_node.text.to_ascii_lowercase();
        let valid = jid::BareJid::new(&service).is_ok_and(|j| j.node().is_none());
        if service.is_empty() || !valid {
            return Err(service_node.error(format!("'{service}' is not a domain name")));
        }
        let router = RouterLink::from_node(root.required_child("router")?)?;
        let mode = match root.child("plain")? {
            Some(p) => {
                p.allow(&[], &[])?;
                if router.name != service {
                    return Err(p.error(format!(
                        "a plain XEP-0114 component connects under the service's name: \
                         <router name='{service}'> expected, not '{}'",
                        router.name
                    )));
                }
                Mode::Plain
            }
            None => Mode::Router,
        };
        let storage = match root.child("storage")? {
            None => Storage::Xdb,
            Some(s) => {
                s.allow(&[], &[])?;
                match s.text.as_str() {
                    "xdb" => Storage::Xdb,
                    "memory" => Storage::Memory,
                    other => return Err(s.error(format!("'{other}': expected 'xdb' or 'memory'"))),
                }
            }
        };
        if mode == Mode::Plain && storage == Storage::Xdb {
            return Err(root.error(
                "<plain/> (another server's component) has no jabberd-rs storage: \
                 add <storage>memory</storage>",
            ));
        }
        let mut c = MucConfig {
            router,
            mode,
            service,
            storage,
            max_rooms: 10_000,
            max_rooms_per_user: 10,
            idle_unload: Duration::from_secs(600),
            room_queue: 1000,
            create_domains: vec![],
            rooms: RoomLimits {
                max_occupants: 200,
                default_max_users: 100,
                max_history: 50,
                default_history: 20,
                rate: 2.0,
                burst: 10.0,
                archive: storage == Storage::Xdb,
                archive_max_items: Some(10_000),
            },
            xdb_timeout: Duration::from_secs(5),
            limits: limits_from_node(root.child("limits")?, Limits::default())?,
            log: LogConfig::from_node(root.child("log")?)?,
        };
        if let Some(n) = root.child("create")? {
            n.allow(&[], &["domain"])?;
            c.create_domains = n
                .children("domain")
                .map(|d| d.text.to_ascii_lowercase())
                .collect();
        }
        if let Some(n) = root.child("rooms")? {
            n.allow(
                &[
                    "max-rooms",
                    "max-occupants",
                    "default-max-users",
                    "max-history",
                    "default-history",
                    "message-rate",
                    "message-burst",
                    "max-rooms-per-user",
                    "idle-unload",
                    "room-queue",
                ],
                &[],
            )?;
            c.idle_unload = n.seconds_attr("idle-unload")?.unwrap_or(c.idle_unload);
            if c.idle_unload.is_zero() {
                return Err(n.error("attribute 'idle-unload' must be more than 0 seconds"));
            }
            let count = |name: &str, default: usize| -> Result<usize> {
                Ok(n.parse_attr(name, "a number")?.unwrap_or(default))
            };
            c.max_rooms = count("max-rooms", c.max_rooms)?;
            c.max_rooms_per_user = count("max-rooms-per-user", c.max_rooms_per_user)?;
            c.room_queue = count("room-queue", c.room_queue)?;
            if c.room_queue == 0 {
                return Err(n.error("attribute 'room-queue' must be more than 0"));
            }
            c.rooms.max_occupants = count("max-occupants", c.rooms.max_occupants)?;
            c.rooms.default_max_users = count("default-max-users", c.rooms.default_max_users)?;
            c.rooms.max_history = count("max-history", c.rooms.max_history)?;
            c.rooms.default_history = count("default-history", c.rooms.default_history)?;
            let rate = |name: &str, default: f64| -> Result<f64> {
                let v: f64 = n.parse_attr(name, "a number")?.unwrap_or(default);
                if !v.is_finite() || v <= 0.0 {
                    return Err(n.error(format!("attribute '{name}' must be more than 0")));
                }
                Ok(v)
            };
            c.rooms.rate = rate("message-rate", c.rooms.rate)?;
            c.rooms.burst = rate("message-burst", c.rooms.burst)?;
            if c.rooms.default_max_users > c.rooms.max_occupants {
                return Err(n.error("default-max-users is more than max-occupants"));
            }
            if c.rooms.default_history > c.rooms.max_history {
                return Err(n.error("default-history is more than max-history"));
            }
        }
        if let Some(n) = root.child("archive")? {
            n.allow(&["enabled", "max-items"], &[])?;
            c.rooms.archive = n.bool_attr("enabled", c.rooms.archive)?;
            if c.rooms.archive && storage == Storage::Memory {
                return Err(n.error("room archives need <storage>xdb</storage>"));
            }
            let max: Option<u64> = n.parse_attr("max-items", "a number")?;
            c.rooms.archive_max_items = match max {
                Some(0) => None,
                Some(m) => Some(m),
                None => c.rooms.archive_max_items,
            };
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn parse(text: &str) -> Result<MucConfig> {
        MucConfig::from_node(&Node::parse_str(text, Arc::new(PathBuf::from("muc.xml")))?)
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse(
            "<muc><router name='muc' secret='s'/><service>Conference.localhost</service></muc>",
        )
        .unwrap();
        assert_eq!(c.service, "conference.localhost");
        assert_eq!(c.mode, Mode::Router);
        assert_eq!(c.storage, Storage::Xdb);

        let e = parse("<muc><router name='muc' secret='s'/>\n<service>a@b</service></muc>")
            .unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("not a domain"), "{e}");

        let e = parse("<muc><router name='muc' secret='s'/><service>c.l</service><plain/></muc>")
            .unwrap_err();
        assert!(e.to_string().contains("service's name"), "{e}");
        let c = parse(
            "<muc><router name='c.l' secret='s'/><service>c.l</service><plain/>\
             <storage>memory</storage></muc>",
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Plain);
        let e = parse(
            "<muc><router name='c.l' secret='s'/><service>c.l</service>\n\
             <rooms message-rate='0'/></muc>",
        )
        .unwrap_err();
        assert!(e.to_string().contains("message-rate"), "{e}");
        let e = parse(
            "<muc><router name='c.l' secret='s'/><service>c.l</service>\n\
             <storage>memory</storage>\n<archive enabled='true'/></muc>",
        )
        .unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("need <storage>xdb"), "{e}");
        let c = parse("<muc><router name='c.l' secret='s'/><service>c.l</service><storage>memory</storage></muc>").unwrap();
        assert!(!c.rooms.archive, "no archives without xdb");
        assert_eq!(
            (c.max_rooms_per_user, c.idle_unload, c.room_queue),
            (10, Duration::from_secs(600), 1000)
        );
        let c = parse(
            "<muc><router name='muc' secret='s'/><service>c.l</service>\
             <rooms max-rooms-per-user='2' idle-unload='30' room-queue='5'/></muc>",
        )
        .unwrap();
        assert_eq!(
            (c.max_rooms_per_user, c.idle_unload, c.room_queue),
            (2, Duration::from_secs(30), 5)
        );
    }
}
