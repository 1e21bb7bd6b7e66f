//! The delivery tree: packet type -> host -> instances, plus the packets held for routes
//! whose last instance went away (the grace period).
//!
//! Pure data structure: no I/O, no locking. The router keeps it behind one mutex.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use jrs_component::PacketType;

use crate::outbox::Outbox;

/// Identifies one accepted link for its lifetime.
pub type ConnId = u64;

/// One component connection bound on a route.
#[derive(Clone)]
pub struct Instance {
    pub conn: ConnId,
    pub name: Arc<str>,
    pub outbox: Arc<Outbox>,
    /// It takes `<fanout>` packets on this route (it said `fanout='true'` in its bind);
    /// others get one copy of the stanza per recipient.
    pub fanout: bool,
    /// Hash of `name`: rendezvous weights depend on the instance's name, not its
    /// connection, so an instance that reconnects gets back the same users.
    seed: u64,
}

impl Instance {
    pub fn new(conn: ConnId, name: Arc<str>, outbox: Arc<Outbox>, fanout: bool) -> Instance {
        let seed = fnv1a(name.as_bytes());
        Instance {
            conn,
            name,
            outbox,
            fanout,
            seed,
        }
    }
}

/// Packets waiting for a vanished component to come back.
pub struct Held {
    /// The component that held the route last (for logs and error texts).
    pub component: Arc<str>,
    pub deadline: Instant,
    pub packets: VecDeque<Bytes>,
    /// Packets beyond this many are bounced at once.
    pub max_packets: usize,
}

#[derive(Default)]
struct Route {
    instances: Vec<Instance>,
    shared: bool,
    held: Option<Held>,
}

/// Why a bind was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum BindRefusal {
    /// Another component holds the route and it is not shared by both.
    Conflict(String),
}

/// Where a packet goes.
pub enum Target<'a> {
    Deliver(&'a Instance),
    /// The route's last instance left less than the grace period ago.
    Hold(&'a mut Held),
    NoRoute,
}

pub struct Tree {
    /// One map per packet type (indexed by [`slot`]), keyed by host: lookups by `&str`
    /// need no allocation. foldhash, not SipHash: a host is hashed for every packet (a
    /// tenth of the router's instructions per lone message went to SipHash with the
    /// `links` map, docs/benchmarks.md "Addresses parsed once"); keys come from
    /// authenticated components' binds, and the seed is random per process.
    routes: [foldhash::HashMap<Box<str>, Route>; 4],
    /// How many `xdb` routes are a namespace's (`HOST NS`, `* NS`): with none, as in most
    /// installations, a storage request goes to its host's route without building and
    /// looking up the two namespace keys (4 000 instructions a request).
    xdb_namespaces: usize,
    grace: Duration,
    max_held: usize,
    /// The first grace period after the router starts.
    settling: Option<Settling>,
}

/// After a router restart the components come back one by one: packets that components
/// coming back send again (or anew) for a route not bound yet wait here, for one grace
/// period from the router's start, instead of being bounced at once.
struct Settling {
    until: Instant,
    /// Each with the link it came from.
    packets: VecDeque<(PacketType, Bytes, Option<ConnId>)>,
}

impl Tree {
    pub fn new(grace: Duration, max_held: usize) -> Tree {
        Tree {
            routes: Default::default(),
            xdb_namespaces: 0,
            grace,
            max_held,
            settling: None,
        }
    }

    /// Starts the settling period of a router that just started (`now`): one grace
    /// period, if there is one.
    pub fn start_settling(&mut self, now: Instant) {
        if !self.grace.is_zero() {
            self.settling = Some(Settling {
                until: now + self.grace,
                packets: VecDeque::new(),
            });
        }
    }

    /// Whether packets without a route may still wait for their component.
    pub fn is_settling(&self) -> bool {
        self.settling.is_some()
    }

    /// Keeps a packet without a route while settling; hands it back when not settling
    /// or when as many as a route may hold are waiting.
    pub fn settle(
        &mut self,
        route: PacketType,
        packet: Bytes,
        sender: Option<ConnId>,
    ) -> Result<(), Bytes> {
        match &mut self.settling {
            Some(s) if s.packets.len() < self.max_held => {
                s.packets.push_back((route, packet, sender));
                Ok(())
            }
            _ => Err(packet),
        }
    }

    /// The packets waiting while settling, to route again (a route was bound); with
    /// `now` past the settling period, it ends (what is returned then is routed, or
    /// bounced, for good).
    pub fn take_settled(
        &mut self,
        now: Option<Instant>,
    ) -> Vec<(PacketType, Bytes, Option<ConnId>)> {
        let Some(s) = &mut self.settling else {
            return vec![];
        };
        let packets = s.packets.drain(..).collect();
        if now.is_some_and(|now| now >= s.until) {
            self.settling = None;
        }
        packets
    }

    /// Adds `instance` to the route. Returns the packets held for the route, which the
    /// caller must deliver to the instance before anything else.
    pub fn bind(
        &mut self,
        route: PacketType,
        host: &str,
        instance: Instance,
        shared: bool,
    ) -> Result<VecDeque<Bytes>, BindRefusal> {
        let r = self.routes[slot(route)].entry(host.into()).or_default();
        if r.instances.iter().any(|i| i.conn == instance.conn) {
            return Ok(VecDeque::new());
        }
        // Log routes copy to every instance, so any number may bind them.
        let shared = shared || route == PacketType::Log;
        if let Some(holder) = r.instances.first() {
            if !(r.shared && shared) {
                return Err(BindRefusal::Conflict(holder.name.to_string()));
            }
        }
        r.shared = shared;
        r.instances.push(instance);
        let held = r.held.take().map(|h| h.packets).unwrap_or_default();
        self.count_xdb_namespaces();
        Ok(held)
    }

    /// Removes a connection from one route. When it was the last instance, the route
    /// starts holding packets for `grace`.
    pub fn unbind(&mut self, route: PacketType, host: &str, conn: ConnId, now: Instant) -> bool {
        let routes = &mut self.routes[slot(route)];
        let Some(r) = routes.get_mut(host) else {
            return false;
        };
        let Some(pos) = r.instances.iter().position(|i| i.conn == conn) else {
            return false;
        };
        let gone = r.instances.remove(pos);
        if r.instances.is_empty() {
            if self.grace.is_zero() || route == PacketType::Log {
                routes.remove(host);
                self.count_xdb_namespaces();
            } else {
                r.held = Some(Held {
                    component: gone.name,
                    deadline: now + self.grace,
                    packets: VecDeque::new(),
                    max_packets: self.max_held,
                });
            }
        }
        true
    }

    /// Finds where a `route` packet for `host` goes: the exact host first, then `*`;
    /// among several instances, the one `key` (the bare JID) hashes to.
    pub fn target(&mut self, route: PacketType, host: &str, key: &str) -> Target<'_> {
        let routes = &mut self.routes[slot(route)];
        let exact_live = routes
            .get(host)
            .is_some_and(|r| !r.instances.is_empty() || r.held.is_some());
        match routes.get_mut(if exact_live { host } else { "*" }) {
            Some(r) if !r.instances.is_empty() => Target::Deliver(pick(&r.instances, key)),
            Some(Route { held: Some(h), .. }) => Target::Hold(h),
            _ => Target::NoRoute,
        }
    }

    /// Every instance bound for `log` at `host` or `*`, each once.
    pub fn log_targets(&self, host: &str) -> Vec<Instance> {
        let mut out: Vec<Instance> = vec![];
        for h in [host, "*"] {
            if let Some(r) = self.routes[slot(PacketType::Log)].get(h) {
                for i in &r.instances {
                    if !out.iter().any(|o| o.conn == i.conn) {
                        out.push(i.clone());
                    }
                }
            }
        }
        out
    }

    /// The `xdb` route key for namespace `ns` at `host`: the namespace's own route at
    /// the host (`HOST NS`), else the namespace's wildcard route (`* NS`), else the
    /// host's (docs/protocol.md, "Storage routed by namespace").
    pub fn xdb_route<'a>(&self, host: &'a str, ns: &str) -> std::borrow::Cow<'a, str> {
        if self.xdb_namespaces == 0 {
            return host.into();
        }
        let routes = &self.routes[slot(PacketType::Xdb)];
        let live = |k: &str| {
            routes
                .get(k)
                .is_some_and(|r| !r.instances.is_empty() || r.held.is_some())
        };
        for candidate in [format!("{host} {ns}"), format!("* {ns}")] {
            if live(&candidate) {
                return candidate.into();
            }
        }
        host.into()
    }

    /// The namespace routes (`HOST NS` and `* NS` keys) that may hold data of `host`.
    pub fn xdb_namespace_routes(&self, host: &str) -> Vec<String> {
        let prefix = format!("{host} ");
        self.routes[slot(PacketType::Xdb)]
            .keys()
            .filter(|k| k.starts_with(&prefix) || k.starts_with("* "))
            .map(|k| k.to_string())
            .collect()
    }

    /// Whether some component serves `host` for normal traffic (or is held for it).
    pub fn serves(&self, route: PacketType, host: &str) -> bool {
        host != "*" && self.routes[slot(route)].contains_key(host)
    }

    /// Packets held now, per packet type (in [`PacketType`] order: normal, session, xdb,
    /// log), for the metrics.
    pub fn held_counts(&self) -> [usize; 4] {
        let mut counts = self.routes.each_ref().map(|routes| {
            routes
                .values()
                .filter_map(|r| r.held.as_ref())
                .map(|h| h.packets.len())
                .sum()
        });
        for (route, _, _) in self.settling.iter().flat_map(|s| &s.packets) {
            counts[slot(*route)] += 1;
        }
        counts
    }

    /// Ends the grace period of every route whose deadline passed; returns what they held.
    pub fn expire(&mut self, now: Instant) -> Vec<Held> {
        let mut out = vec![];
        for routes in &mut self.routes {
            let expired: Vec<Box<str>> = routes
                .iter()
                .filter(|(_, r)| {
                    r.instances.is_empty() && r.held.as_ref().is_some_and(|h| h.deadline <= now)
                })
                .map(|(k, _)| k.clone())
                .collect();
            out.extend(
                expired
                    .iter()
                    .filter_map(|k| routes.remove(k).and_then(|r| r.held)),
            );
        }
        if !out.is_empty() {
            self.count_xdb_namespaces();
        }
        out
    }

    /// Whether any `xdb` route is a namespace's (else [`Tree::xdb_route`] is the host).
    pub fn has_xdb_namespaces(&self) -> bool {
        self.xdb_namespaces > 0
    }

    /// Counts the namespace routes again (routes were added or removed: rare).
    fn count_xdb_namespaces(&mut self) {
        self.xdb_namespaces = self.routes[slot(PacketType::Xdb)]
            .keys()
            .filter(|k| k.contains(' '))
            .count();
    }
}

fn slot(route: PacketType) -> usize {
    match route {
        PacketType::Normal => 0,
        PacketType::Session => 1,
        PacketType::Xdb => 2,
        PacketType::Log => 3,
    }
}

/// Rendezvous (highest random weight) hashing: each key goes to the instance with the
/// highest hash of (key, instance). Adding an instance moves only the keys it now wins,
/// about 1/(n+1) of them; removing one moves only its own keys.
fn pick<'a>(instances: &'a [Instance], key: &str) -> &'a Instance {
    if instances.len() == 1 {
        return &instances[0];
    }
    let k = fnv1a(key.as_bytes());
    instances
        .iter()
        .max_by_key(|i| weight(k, i.seed))
        .expect("routes with no instance are never picked")
}

/// The choice [`pick`] makes, over names: for tests that measure the distribution.
#[cfg(test)]
fn rendezvous_owner<'a>(names: &'a [&'a str], key: &str) -> &'a str {
    let k = fnv1a(key.as_bytes());
    names
        .iter()
        .max_by_key(|n| weight(k, fnv1a(n.as_bytes())))
        .expect("at least one name")
}

/// The weight of an instance (by its name's hash) for a key (by its hash); the seed breaks
/// ties so the choice never depends on the order of instances.
fn weight(key_hash: u64, seed: u64) -> (u64, u64) {
    (mix(key_hash ^ seed), seed)
}

/// FNV-1a: a fixed, documented hash so routing is stable across builds and restarts
/// (std's hashers are randomly keyed or unspecified).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b.to_ascii_lowercase() as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The splitmix64 finaliser: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn inst(conn: ConnId, name: &str) -> Instance {
        Instance::new(conn, name.into(), Arc::new(Outbox::new(1 << 20)), false)
    }

    #[test]
    fn storage_goes_to_a_namespace_route_while_there_is_one() {
        let mut t = Tree::new(Duration::from_secs(5), 100);
        t.bind(PacketType::Xdb, "a.example", inst(1, "files"), false)
            .unwrap();
        assert!(!t.has_xdb_namespaces());
        assert_eq!(t.xdb_route("a.example", "urn:x"), "a.example");
        t.bind(PacketType::Xdb, "a.example urn:x", inst(2, "creds"), false)
            .unwrap();
        assert!(t.has_xdb_namespaces());
        assert_eq!(t.xdb_route("a.example", "urn:x"), "a.example urn:x");
        assert_eq!(t.xdb_route("a.example", "urn:y"), "a.example");
        // Gone: held for the grace period, then expired.
        let now = Instant::now();
        assert!(t.unbind(PacketType::Xdb, "a.example urn:x", 2, now));
        assert_eq!(t.xdb_route("a.example", "urn:x"), "a.example urn:x");
        t.expire(now + Duration::from_secs(6));
        assert!(!t.has_xdb_namespaces());
        assert_eq!(t.xdb_route("a.example", "urn:x"), "a.example");
        // Without a grace period it goes at once.
        let mut t = Tree::new(Duration::ZERO, 100);
        t.bind(PacketType::Xdb, "* urn:x", inst(3, "creds"), false)
            .unwrap();
        assert_eq!(t.xdb_route("b.example", "urn:x"), "* urn:x");
        assert!(t.unbind(PacketType::Xdb, "* urn:x", 3, Instant::now()));
        assert!(!t.has_xdb_namespaces());
    }

    #[test]
    fn exact_host_then_wildcard() {
        let mut t = Tree::new(Duration::from_secs(5), 100);
        t.bind(PacketType::Normal, "a.example", inst(1, "a"), false)
            .unwrap();
        t.bind(PacketType::Normal, "*", inst(2, "s2s"), false)
            .unwrap();
        assert!(
            matches!(t.target(PacketType::Normal, "a.example", "x@a.example"), Target::Deliver(i) if i.conn == 1)
        );
        assert!(
            matches!(t.target(PacketType::Normal, "remote.example", "x@remote.example"), Target::Deliver(i) if i.conn == 2)
        );
        assert!(matches!(
            t.target(PacketType::Xdb, "a.example", "x@a.example"),
            Target::NoRoute
        ));
    }

    #[test]
    fn exclusive_routes_conflict() {
        let mut t = Tree::new(Duration::from_secs(5), 100);
        t.bind(PacketType::Xdb, "h", inst(1, "a"), false).unwrap();
        assert_eq!(
            t.bind(PacketType::Xdb, "h", inst(2, "b"), true)
                .unwrap_err(),
            BindRefusal::Conflict("a".into())
        );
        t.bind(PacketType::Session, "h", inst(1, "sm-1"), true)
            .unwrap();
        t.bind(PacketType::Session, "h", inst(2, "sm-2"), true)
            .unwrap();
    }

    #[test]
    fn holds_then_flushes_on_rebind() {
        let now = Instant::now();
        let mut t = Tree::new(Duration::from_secs(5), 100);
        t.bind(PacketType::Normal, "c", inst(1, "c"), false)
            .unwrap();
        t.bind(PacketType::Normal, "*", inst(9, "s2s"), false)
            .unwrap();
        t.unbind(PacketType::Normal, "c", 1, now);
        match t.target(PacketType::Normal, "c", "c") {
            Target::Hold(h) => h.packets.push_back(Bytes::from_static(b"<message/>")),
            _ => panic!("a held route must not fall through to *"),
        }
        let held = t
            .bind(PacketType::Normal, "c", inst(2, "c"), false)
            .unwrap();
        assert_eq!(held.len(), 1);
        t.unbind(PacketType::Normal, "c", 2, now);
        assert!(t.expire(now + Duration::from_secs(1)).is_empty());
        assert_eq!(t.expire(now + Duration::from_secs(6)).len(), 1);
        assert!(
            matches!(t.target(PacketType::Normal, "c", "c"), Target::Deliver(i) if i.conn == 9)
        );
    }

    #[test]
    fn rendezvous_moves_few_keys_when_an_instance_is_added() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("user{i}@localhost")).collect();
        let three = ["sm-1", "sm-2", "sm-3"];
        let four = ["sm-1", "sm-2", "sm-3", "sm-4"];
        let mut per = HashMap::new();
        let mut moved = 0;
        for k in &keys {
            let a = rendezvous_owner(&three, k);
            let b = rendezvous_owner(&four, k);
            *per.entry(b).or_insert(0) += 1;
            if a != b {
                assert_eq!(b, "sm-4", "keys only move to the new instance");
                moved += 1;
            }
        }
        // Ideal: 1/4 of the keys move. Allow sampling noise.
        assert!((2000..3000).contains(&moved), "moved {moved}");
        for n in four {
            assert!((2000..3000).contains(&per[n]), "{n} got {}", per[n]);
        }
    }
}
