//! The components connected to the router, as its link notices tell (see
//! docs/protocol.md "Link notices"): which component holds `normal` routes for which
//! domains. Service discovery lists them as the server's items, and a domain sm serves
//! alone has its stanzas delivered without the router (`host::local`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;

use tracing::info;

#[derive(Default)]
pub struct Components {
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// Domain -> names of the components that bound it for `normal` packets (a domain
    /// of sm's has one per sm instance; a component's domain usually one).
    routes: BTreeMap<String, BTreeSet<String>>,
    /// Counts the changes to `routes`: a confirmation (`host::local`) holds only if none
    /// came while it was on its way.
    epoch: u64,
    /// Domains this instance serves alone and has confirmed so since the last change of
    /// their holders: their stanzas are delivered without the router.
    settled: BTreeSet<String>,
    /// Domains it serves alone whose confirmation is under way.
    confirming: BTreeSet<String>,
}

impl State {
    fn alone(&self, me: &str, domain: &str) -> bool {
        self.routes
            .get(domain)
            .is_some_and(|names| names.len() == 1 && names.contains(me))
    }

    /// `name` no longer holds `domain`.
    fn drop_holder(&mut self, domain: &str, name: &str) {
        self.changed(domain);
        if let Some(names) = self.routes.get_mut(domain) {
            names.remove(name);
            if names.is_empty() {
                self.routes.remove(domain);
            }
        }
    }

    /// The holders of `domain` changed: local delivery stops until confirmed again.
    fn changed(&mut self, domain: &str) {
        self.epoch += 1;
        if self.settled.remove(domain) {
            info!(%domain, "another component serves the domain now: stanzas between its users go through the router");
        }
    }
}

impl Components {
    pub fn bound(&self, name: &str, host: &str) {
        let mut st = self.state.write().expect("components lock");
        let host = host.to_ascii_lowercase();
        st.changed(&host);
        st.routes.entry(host).or_default().insert(name.to_owned());
    }

    pub fn unbound(&self, name: &str, host: &str) {
        let mut st = self.state.write().expect("components lock");
        st.drop_holder(&host.to_ascii_lowercase(), name);
    }

    pub fn disconnected(&self, name: &str) {
        let mut st = self.state.write().expect("components lock");
        let held: Vec<String> = st
            .routes
            .iter()
            .filter(|(_, names)| names.contains(name))
            .map(|(domain, _)| domain.clone())
            .collect();
        for domain in held {
            st.drop_holder(&domain, name);
        }
    }

    /// Forgets everything (the link to the router dropped; the router replays what is
    /// bound when we subscribe again).
    pub fn clear(&self) {
        let mut st = self.state.write().expect("components lock");
        st.epoch += 1;
        st.routes.clear();
        st.settled.clear();
    }

    /// Whether stanzas for users of `domain` (in lower case, as the router's notices and
    /// `Jid` spell it) go straight to their tasks: `me` is the only component the router
    /// delivers the domain's `normal` packets to, and has confirmed it (`host::local`).
    pub fn delivers_locally(&self, me: &str, domain: &str) -> bool {
        let st = self.state.read().expect("components lock");
        st.settled.contains(domain) && st.alone(me, domain)
    }

    /// Whether any domain is delivered locally: when none is, a task's packets need not
    /// be read to find their recipients' domains.
    pub fn delivers_any_locally(&self) -> bool {
        !self
            .state
            .read()
            .expect("components lock")
            .settled
            .is_empty()
    }

    /// Domains `me` serves alone that are neither confirmed nor being confirmed: the
    /// caller confirms each (they are marked as under way).
    pub fn to_confirm(&self, me: &str) -> Vec<String> {
        let mut st = self.state.write().expect("components lock");
        let due: Vec<String> = st
            .routes
            .keys()
            .filter(|d| st.alone(me, d) && !st.settled.contains(*d) && !st.confirming.contains(*d))
            .cloned()
            .collect();
        st.confirming.extend(due.iter().cloned());
        due
    }

    /// The count of changes so far, to pass to [`Components::settle`].
    pub fn epoch(&self) -> u64 {
        self.state.read().expect("components lock").epoch
    }

    /// Whether the confirmation of `domain` should go on: `me` still serves it alone.
    /// If not, it is no longer under way (a later change starts another).
    pub fn still_confirming(&self, me: &str, domain: &str) -> bool {
        let mut st = self.state.write().expect("components lock");
        if st.alone(me, domain) {
            return true;
        }
        st.confirming.remove(domain);
        false
    }

    /// A confirmation sent at `epoch` came back: `domain` is delivered locally from now
    /// on, unless its holders changed meanwhile (false: confirm again).
    pub fn settle(&self, me: &str, domain: &str, epoch: u64) -> bool {
        let mut st = self.state.write().expect("components lock");
        if st.epoch != epoch || !st.alone(me, domain) {
            return false;
        }
        st.confirming.remove(domain);
        st.settled.insert(domain.to_owned());
        true
    }

    /// Domains served by components that are subdomains of `domain` (`conference.D`,
    /// `upload.D`), sorted.
    pub fn subdomains_of(&self, domain: &str) -> Vec<String> {
        let suffix = format!(".{domain}");
        let st = self.state.read().expect("components lock");
        st.routes
            .keys()
            .filter(|h| h.ends_with(&suffix))
            .cloned()
            .collect()
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
    fn delivers_locally_once_confirmed_alone() {
        let c = Components::default();
        assert!(c.to_confirm("sm-1").is_empty(), "nothing known yet");
        c.bound("sm-1", "LocalHost");
        c.bound("s2s", "*");
        assert!(
            !c.delivers_locally("sm-1", "localhost"),
            "not confirmed yet"
        );
        assert_eq!(c.to_confirm("sm-1"), ["localhost"]);
        assert!(c.to_confirm("sm-1").is_empty(), "under way already");
        let epoch = c.epoch();
        assert!(c.settle("sm-1", "localhost", epoch));
        assert!(c.delivers_locally("sm-1", "localhost"));
        assert!(!c.delivers_locally("sm-2", "localhost"));
        assert!(!c.delivers_locally("sm-1", "example.org"));

        // A second instance: through the router until confirmed alone again.
        c.bound("sm-2", "localhost");
        assert!(!c.delivers_locally("sm-1", "localhost"));
        assert!(c.to_confirm("sm-1").is_empty(), "shared");
        c.disconnected("sm-2");
        assert!(
            !c.delivers_locally("sm-1", "localhost"),
            "needs a new confirmation"
        );
        assert_eq!(c.to_confirm("sm-1"), ["localhost"]);
        let epoch = c.epoch();
        // A change while the confirmation is on its way voids it.
        c.bound("muc", "conference.localhost");
        assert!(!c.settle("sm-1", "localhost", epoch));
        assert!(c.still_confirming("sm-1", "localhost"));
        assert!(c.settle("sm-1", "localhost", c.epoch()));
        assert!(c.delivers_locally("sm-1", "localhost"));
        // An unrelated domain's change leaves the settled one alone.
        c.unbound("muc", "conference.localhost");
        assert!(c.delivers_locally("sm-1", "localhost"));

        c.unbound("sm-1", "localhost");
        assert!(!c.delivers_locally("sm-1", "localhost"));
        c.bound("sm-1", "localhost");
        c.clear();
        assert!(!c.delivers_locally("sm-1", "localhost"));
        assert!(!c.still_confirming("sm-1", "localhost"));
    }
}
