//! The components connected to the router, as its link notices tell (see
//! docs/protocol.md "Link notices"): which component holds `normal` routes for which
//! domains. Service discovery lists them as the server's items.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;

#[derive(Default)]
pub struct Components {
    /// Component name -> domains it bound for `normal` packets.
    routes: RwLock<BTreeMap<String, BTreeSet<String>>>,
}

impl Components {
    pub fn bound(&self, name: &str, host: &str) {
        let mut r = self.routes.write().expect("components lock");
        r.entry(name.to_owned())
            .or_default()
            .insert(host.to_ascii_lowercase());
    }

    pub fn unbound(&self, name: &str, host: &str) {
        let mut r = self.routes.write().expect("components lock");
        if let Some(hosts) = r.get_mut(name) {
            hosts.remove(&host.to_ascii_lowercase());
            if hosts.is_empty() {
                r.remove(name);
            }
        }
    }

    pub fn disconnected(&self, name: &str) {
        self.routes.write().expect("components lock").remove(name);
    }

    /// Forgets everything (the link to the router dropped; the router replays what is
    /// bound when we subscribe again).
    pub fn clear(&self) {
        self.routes.write().expect("components lock").clear();
    }

    /// Domains served by components that are subdomains of `domain` (`conference.D`,
    /// `upload.D`), sorted.
    pub fn subdomains_of(&self, domain: &str) -> Vec<String> {
        let suffix = format!(".{domain}");
        let r = self.routes.read().expect("components lock");
        let all: BTreeSet<&String> = r
            .values()
            .flatten()
            .filter(|h| h.ends_with(&suffix))
            .collect();
        all.into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_bound_domains() {
        let c = Components::default();
        c.bound("conference.localhost", "conference.localhost");
        c.bound("muc", "rooms.localhost");
        c.bound("s2s", "*");
        c.bound("irc.example.org", "irc.example.org");
        assert_eq!(
            c.subdomains_of("localhost"),
            ["conference.localhost", "rooms.localhost"]
        );
        c.unbound("muc", "rooms.localhost");
        c.disconnected("conference.localhost");
        assert!(c.subdomains_of("localhost").is_empty());
    }
}
