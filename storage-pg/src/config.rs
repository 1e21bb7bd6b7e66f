//! `xdb-pg.xml`.

use std::path::Path;
use std::str::FromStr;

use jrs_config::{limits_from_node, LogConfig, Node, Result, RouterLink};
use jrs_stream::Limits;

#[derive(Debug, Clone)]
pub struct PgStorageConfig {
    pub router: RouterLink,
    /// Domains whose data this instance stores; `*` takes every domain nobody else binds.
    pub hosts: Vec<String>,
    /// Only these namespaces of the hosts (as xdb-file's `<namespace>`); empty: the
    /// hosts' default storage.
    pub namespaces: Vec<String>,
    pub postgres: tokio_postgres::Config,
    /// Database connections, each serving its own share of the owners.
    pub connections: usize,
    pub limits: Limits,
    pub log: LogConfig,
}

impl PgStorageConfig {
    pub fn load(path: &Path) -> Result<PgStorageConfig> {
        let root = Node::load(path, "xdb-pg")?;
        Self::from_root(&root)
    }

    pub fn from_root(root: &Node) -> Result<PgStorageConfig> {
        root.allow(
            &[],
            &[
                "router",
                "host",
                "namespace",
                "postgresql",
                "limits",
                "log",
                "metrics",
            ],
        )?;
        let hosts: Vec<String> = root
            .children("host")
            .map(|h| h.text.to_ascii_lowercase())
            .collect();
        if hosts.is_empty() || hosts.iter().any(String::is_empty) {
            return Err(root.error(
                "at least one non-empty <host>DOMAIN</host> is required (or <host>*</host>)",
            ));
        }
        let namespaces: Vec<String> = root
            .children("namespace")
            .map(|n| n.text.trim().to_owned())
            .collect();
        if namespaces
            .iter()
            .any(|n| n.is_empty() || n.contains(char::is_whitespace) || n == "*")
        {
            return Err(root.error("a <namespace> is one storage namespace (no spaces, not '*')"));
        }
        let pg = root.required_child("postgresql")?;
        pg.allow(
            &[
                "url",
                "host",
                "port",
                "user",
                "password",
                "dbname",
                "pool-size",
                "connect-timeout",
            ],
            &[],
        )?;
        let mut postgres = match pg.attr("url") {
            Some(url) => tokio_postgres::Config::from_str(url)
                .map_err(|e| pg.error(format!("attribute 'url': {e}")))?,
            None => tokio_postgres::Config::new(),
        };
        // Attributes complete (or override) the URL.
        if let Some(host) = pg.attr("host") {
            postgres.host(host);
        }
        if let Some(port) = pg.parse_attr::<u16>("port", "a TCP port")? {
            postgres.port(port);
        }
        if let Some(user) = pg.attr("user") {
            postgres.user(user);
        }
        if let Some(password) = pg.attr("password") {
            postgres.password(password);
        }
        if let Some(dbname) = pg.attr("dbname") {
            postgres.dbname(dbname);
        }
        if postgres.get_hosts().is_empty() {
            return Err(pg.error(
                "no database server: give url='postgresql://USER@/DB?host=/var/run/postgresql' or host='..'",
            ));
        }
        if postgres.get_user().is_none() {
            return Err(pg.error("no database user: in the url or as user='..'"));
        }
        let timeout = pg.positive_seconds_attr("connect-timeout")?;
        postgres.connect_timeout(timeout.unwrap_or(std::time::Duration::from_secs(5)));
        postgres.application_name("xdb-pg");
        let connections: usize = pg
            .parse_attr("pool-size", "a number of connections (1-64)")?
            .unwrap_or(4);
        if !(1..=64).contains(&connections) {
            return Err(pg.error(format!(
                "attribute 'pool-size' = '{connections}': expected a number of connections (1-64)"
            )));
        }
        Ok(PgStorageConfig {
            router: RouterLink::from_node(root.required_child("router")?)?,
            hosts,
            namespaces,
            postgres,
            connections,
            // Storage requests carry whole rosters and offline lists, as for xdb-file.
            limits: limits_from_node(
                root.child("limits")?,
                Limits {
                    max_stanza_bytes: 4 << 20,
                    max_depth: 64,
                },
            )?,
            log: LogConfig::from_node(root.child("log")?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn parse(xml: &str) -> Result<PgStorageConfig> {
        let root = Node::parse_str(xml, Arc::new(PathBuf::from("xdb-pg.xml")))?;
        PgStorageConfig::from_root(&root)
    }

    const ROUTER: &str = "<router address='127.0.0.1' port='5347' name='xdb-pg' secret='s'/>";

    #[test]
    fn url_with_a_socket_directory() {
        let c = parse(&format!(
            "<xdb-pg>{ROUTER}<host>LocalHost</host>\
             <postgresql url='postgresql://jabberd@/jabberd?host=/var/run/postgresql' pool-size='2'/></xdb-pg>"
        ))
        .unwrap();
        assert_eq!(c.hosts, vec!["localhost".to_owned()]);
        assert_eq!(c.connections, 2);
        assert_eq!(c.postgres.get_user(), Some("jabberd"));
        assert_eq!(c.postgres.get_dbname(), Some("jabberd"));
        assert!(matches!(
            &c.postgres.get_hosts()[0],
            tokio_postgres::config::Host::Unix(p) if p == Path::new("/var/run/postgresql")
        ));
    }

    #[test]
    fn attributes_and_refusals() {
        let c = parse(&format!(
            "<xdb-pg>{ROUTER}<host>localhost</host><namespace>urn:jabberd-rs:auth:0</namespace>\
             <postgresql host='db.example' port='5433' user='u' password='p' dbname='d'/></xdb-pg>"
        ))
        .unwrap();
        assert_eq!(c.postgres.get_ports(), &[5433]);
        assert_eq!(c.namespaces, vec!["urn:jabberd-rs:auth:0".to_owned()]);
        assert_eq!(c.connections, 4);
        // No server, no user, a bad pool size, a bad namespace.
        for bad in [
            "<postgresql user='u'/>",
            "<postgresql host='h'/>",
            "<postgresql host='h' user='u' pool-size='0'/>",
            "<postgresql url='mysql://x'/>",
        ] {
            assert!(
                parse(&format!(
                    "<xdb-pg>{ROUTER}<host>localhost</host>{bad}</xdb-pg>"
                ))
                .is_err(),
                "{bad}"
            );
        }
        assert!(parse(&format!(
            "<xdb-pg>{ROUTER}<host>localhost</host><namespace>*</namespace>\
             <postgresql host='h' user='u'/></xdb-pg>"
        ))
        .is_err());
    }
}
