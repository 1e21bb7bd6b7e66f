//! The components connected to the router, as its link notices tell (see
//! docs/protocol.md "Link notices"): which component holds `normal` routes for which
//! domains. Service discovery lists them as the server's items, and a domain sm serves
//! alone has its stanzas delivered without the router (`host::local`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;

#[derive(Default)]
pub struct Components {
    /// Domain -> names of the components that bound it for `normal` packets (a domain
    /// of sm's has one per sm instance; a component's domain usually one).
    routes: RwLock<BTreeMap<String, BTreeSet<String>>>,
}

impl Components {
    pub fn bound(&self, name: &str, host: &str) {
        let mut r = self.routes.write().expect("components lock");
        r.entry(host.to_ascii_lowercase())
            .or_default()
            .insert(name.to_owned());
    }

    pub fn unbound(&self, name: &str, host: &str) {
        let mut r = self.routes.write().expect("components lock");
        let host = host.to_ascii_lowercase();
        if let Some(names) = r.get_mut(&host) {
            names.remove(name);
            if names.is_empty() {
                r.remove(&host);
            }
        }
    }

    pub fn disconnected(&self, name: &str) {
        let mut r = self.routes.write().expect("components lock");
        r.retain(|_, names| {
            names.remove(name);
            !names.is_empty()
        });
    }

    /// Forgets everything (the link to the router dropped; the router replays what is
    /// bound when we subscribe again).
    pub fn clear(&self) {
        self.routes.write().expect("components lock").clear();
    }

    /// Whether `me` is the only component the router delivers `domain`'s `normal`
    /// packets to (`domain` in lower case, as the router's notices and `Jid` spell it):
    /// then the router would send whatever sm routes there straight back (`host::local`).
    pub fn alone_serves(&self, me: &str, domain: &str) -> bool {
        let r = self.routes.read().expect("components lock");
        r.get(domain)
            .is_some_and(|names| names.len() == 1 && names.contains(me))
    }

    /// Domains served by components that are subdomains of `domain` (`conference.D`,
    /// `upload.D`), sorted.
    pub fn subdomains_of(&self, domain: &str) -> Vec<String> {
        let suffix = format!(".{domain}");
        let r = self.routes.read().expect("components lock");
        r.keys().filter(|h| h.ends_with(&suffix)).cloned().collect()
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

    #[test]
    fn knows_when_one_instance_serves_a_domain_alone() {
        let c = Components::default();
        assert!(!c.alone_serves("sm-1", "localhost"), "nothing known yet");
        c.bound("sm-1", "LocalHost");
        c.bound("s2s", "*");
        assert!(c.alone_serves("sm-1", "localhost"));
        assert!(!c.alone_serves("sm-2", "localhost"));
        assert!(!c.alone_serves("sm-1", "example.org"));
        c.bound("sm-2", "localhost");
        assert!(!c.alone_serves("sm-1", "localhost"), "shared with sm-2");
        c.disconnected("sm-2");
        assert!(c.alone_serves("sm-1", "localhost"));
        c.unbound("sm-1", "localhost");
        assert!(!c.alone_serves("sm-1", "localhost"));
        c.bound("sm-1", "localhost");
        c.clear();
        assert!(!c.alone_serves("sm-1", "localhost"));
    }
}
