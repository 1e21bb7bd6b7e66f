//! Who data belongs to: a host and a user ('' for the host's own data), normalised as
//! xdb-file does (nodeprep/nameprep by the `jid` crate), so the same JID written
//! differently finds the same rows.

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::Refusal;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    /// The user's node; empty for the host itself.
    pub node: String,
}

impl Owner {
    pub fn parse(owner: &str) -> Result<Owner, Refusal> {
        let jid = jid::BareJid::new(owner).map_err(|e| {
            Refusal::new(
                StanzaErrorCondition::JidMalformed,
                format!("owner '{owner}': {e}"),
            )
        })?;
        Ok(Owner {
            host: jid.domain().as_str().to_owned(),
            node: jid
                .node()
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default(),
        })
    }

    pub fn is_user(&self) -> bool {
        !self.node.is_empty()
    }

    /// Refuses an owner of a domain this storage does not serve.
    pub fn check_served(&self, hosts: &[String]) -> Result<(), Refusal> {
        if hosts.iter().any(|h| h == "*" || *h == self.host) {
            Ok(())
        } else {
            Err(Refusal::new(
                StanzaErrorCondition::NotAllowed,
                format!("this storage does not serve '{}'", self.host),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_and_checked() {
        let o = Owner::parse("Alice@LocalHost").unwrap();
        assert_eq!((o.host.as_str(), o.node.as_str()), ("localhost", "alice"));
        let h = Owner::parse("localhost").unwrap();
        assert!(!h.is_user());
        assert!(o.check_served(&["localhost".into()]).is_ok());
        assert!(o.check_served(&["*".into()]).is_ok());
        assert_eq!(
            o.check_served(&["example.net".into()])
                .unwrap_err()
                .condition,
            StanzaErrorCondition::NotAllowed
        );
        assert_eq!(
            Owner::parse("a@b@c").unwrap_err().condition,
            StanzaErrorCondition::JidMalformed
        );
    }
}
