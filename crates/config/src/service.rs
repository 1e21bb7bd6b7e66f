//! What the service components (upload, proxy65) read alike: their router name, which is
//! their service domain, and who may use them.

use crate::{Node, Result};

/// Who may use a service: the users of the `<host>` domains (the served ones), of
/// `<allow domain='..'/>` domains, and the `<allow jid='..'/>` users.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceUsers {
    pub hosts: Vec<String>,
    pub allow_domains: Vec<String>,
    pub allow_jids: Vec<String>,
}

impl ServiceUsers {
    /// Reads the `<host>` and `<allow>` children of `root`; at least one is required.
    /// `what` completes "whose users may ..." in the error.
    pub fn from_root(root: &Node, what: &str) -> Result<ServiceUsers> {
        let mut users = ServiceUsers::default();
        for h in root.children("host") {
            h.allow(&[], &[])?;
            users.hosts.push(domain(h, &h.text)?);
        }
        for a in root.children("allow") {
            a.allow(&["domain", "jid"], &[])?;
            match (a.attr("domain"), a.attr("jid")) {
                (Some(d), None) => users.allow_domains.push(domain(a, d)?),
                (None, Some(j)) => match jid::BareJid::new(j) {
                    Ok(b) if b.node().is_some() => users.allow_jids.push(b.to_string()),
                    _ => return Err(a.error(format!("'{j}' is not a bare JID user@domain"))),
                },
                _ => return Err(a.error("give either domain='..' or jid='..'")),
            }
        }
        if users == ServiceUsers::default() {
            return Err(root.error(format!(
                "at least one <host>DOMAIN</host> (whose users may {what}) is required"
            )));
        }
        Ok(users)
    }

    /// Whether `user` (a bare JID) may use the service.
    pub fn allows(&self, user: &jid::BareJid) -> bool {
        let d = user.domain().as_str();
        user.node().is_some()
            && (self.hosts.iter().any(|h| h == d)
                || self.allow_domains.iter().any(|h| h == d)
                || self.allow_jids.iter().any(|j| j == user.as_str()))
    }
}

/// A service component's router name must be its domain (`example`: a sample one).
pub fn check_service_name(router: &Node, name: &str, example: &str) -> Result<()> {
    match jid::BareJid::new(name) {
        Ok(j) if j.node().is_none() => Ok(()),
        _ => Err(router.error(format!(
            "name '{name}' must be the service's domain, e.g. {example}"
        ))),
    }
}

/// A domain name, lowercased.
pub fn domain(n: &Node, text: &str) -> Result<String> {
    let d = text.trim().to_ascii_lowercase();
    match jid::BareJid::new(&d) {
        Ok(j) if j.node().is_none() && !d.is_empty() && d != "*" => Ok(d),
        _ => Err(n.error(format!("'{text}' is not a domain name"))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;

    fn root(xml: &str) -> Node {
        Node::parse_str(xml, Arc::new(PathBuf::from("x.xml"))).unwrap()
    }

    #[test]
    fn users_of_hosts_allowed_domains_and_jids() {
        let r = root("<x><host>Localhost</host><allow domain='example.org'/><allow jid='bob@example.net'/></x>");
        let users = ServiceUsers::from_root(&r, "upload").unwrap();
        let allows = |j: &str| users.allows(&jid::BareJid::new(j).unwrap());
        assert!(allows("a@localhost") && allows("a@example.org") && allows("bob@example.net"));
        assert!(!allows("localhost") && !allows("eve@example.net"));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = |xml: &str| {
            ServiceUsers::from_root(&root(xml), "upload")
                .unwrap_err()
                .to_string()
        };
        assert!(e("<x/>").contains("whose users may upload"));
        assert!(e("<x><host>a@b</host></x>").contains("not a domain name"));
        assert!(e("<x><allow jid='example.org'/></x>").contains("not a bare JID"));
        assert!(e("<x><allow/></x>").contains("either domain"));
        let r = root("<x><router/></x>");
        let router = r.children("router").next().unwrap();
        assert!(check_service_name(router, "upload@localhost", "upload.localhost").is_err());
        assert!(check_service_name(router, "upload.localhost", "upload.localhost").is_ok());
    }
}
