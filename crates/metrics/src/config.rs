//! `<metrics address="127.0.0.1" port="9101"/>` in any process's configuration file:
//! where its `/metrics` listener binds. Absent, there is no listener.

use std::path::Path;
use std::sync::Arc;

use jrs_config::{Node, Result};

/// Where the `/metrics` listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Default `127.0.0.1`: metrics tell a lot about the server; expose them wider only
    /// on purpose.
    pub address: String,
    pub port: u16,
}

impl MetricsConfig {
    /// The `<metrics/>` child of `root`, if any.
    pub fn from_root(root: &Node) -> Result<Option<MetricsConfig>> {
        root.child("metrics")?
            .map(MetricsConfig::from_node)
            .transpose()
    }

    /// One `<metrics address=".." port=".."/>`; the port is required.
    pub fn from_node(node: &Node) -> Result<MetricsConfig> {
        node.allow(&["address", "port"], &[])?;
        let address = node.attr("address").unwrap_or("127.0.0.1").trim();
        if address.is_empty() {
            return Err(node.error("attribute 'address' is empty"));
        }
        let port: u16 = node
            .parse_attr("port", "a port number (1-65535)")?
            .ok_or_else(|| node.error("the attribute 'port' is required"))?;
        if port == 0 {
            return Err(node.error("attribute 'port' = '0': expected a port number (1-65535)"));
        }
        Ok(MetricsConfig {
            address: address.to_owned(),
            port,
        })
    }

    /// The `<metrics/>` element of a configuration file, whatever its root (the
    /// process's own loader has checked the rest of the file).
    pub fn from_file(path: &Path) -> Result<Option<MetricsConfig>> {
        let text = std::fs::read_to_string(path).map_err(|e| jrs_config::ConfigError {
            file: path.to_path_buf(),
            line: 0,
            message: format!("cannot read the file: {e}"),
        })?;
        let root = Node::parse_str(&text, Arc::new(path.to_path_buf()))?;
        MetricsConfig::from_root(&root)
    }

    /// Instance `n` of a program that runs several from one file listens on `port + n`.
    pub fn for_instance(mut self, instance: Option<u32>) -> anyhow::Result<MetricsConfig> {
        if let Some(n) = instance {
            self.port = u16::try_from(n)
                .ok()
                .and_then(|n| self.port.checked_add(n))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "<metrics port='{}'/> plus the instance number {n} is past 65535",
                        self.port
                    )
                })?;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn parse(xml: &str) -> Result<Option<MetricsConfig>> {
        let root = Node::parse_str(xml, Arc::new(PathBuf::from("t.xml"))).unwrap();
        MetricsConfig::from_root(&root)
    }

    #[test]
    fn absent_is_off() {
        assert_eq!(parse("<c2s><log/></c2s>").unwrap(), None);
    }

    #[test]
    fn address_defaults_to_loopback() {
        let m = parse("<sm>\n<metrics port='9102'/></sm>").unwrap().unwrap();
        assert_eq!(
            m,
            MetricsConfig {
                address: "127.0.0.1".into(),
                port: 9102
            }
        );
        let m = parse("<sm><metrics address='::1' port='9102'/></sm>")
            .unwrap()
            .unwrap();
        assert_eq!(m.address, "::1");
    }

    #[test]
    fn errors_name_the_line_and_what_is_wrong() {
        let e = |xml: &str| parse(xml).unwrap_err().to_string();
        assert_eq!(
            e("<sm>\n<metrics/></sm>"),
            "t.xml:2: <metrics>: the attribute 'port' is required"
        );
        assert!(e("<sm><metrics port='x'/></sm>").contains("expected a port number"));
        assert!(e("<sm><metrics port='0'/></sm>").contains("expected a port number"));
        assert!(e("<sm><metrics port='70000'/></sm>").contains("expected a port number"));
        assert!(e("<sm><metrics port='1' path='/m'/></sm>").contains("unknown attribute 'path'"));
        assert!(e("<sm><metrics port='1'><x/></metrics></sm>").contains("unknown element"));
        assert!(e("<sm><metrics port='1' address=''/></sm>").contains("empty"));
        assert!(e("<sm><metrics port='1'/><metrics port='2'/></sm>").contains("only once"));
    }

    #[test]
    fn instances_add_their_number_to_the_port() {
        let m = MetricsConfig {
            address: "127.0.0.1".into(),
            port: 9102,
        };
        assert_eq!(m.clone().for_instance(None).unwrap().port, 9102);
        assert_eq!(m.clone().for_instance(Some(2)).unwrap().port, 9104);
        let high = MetricsConfig { port: 65535, ..m };
        assert!(high.for_instance(Some(1)).is_err());
    }

    #[test]
    fn reads_a_file_whatever_its_root() {
        let dir = std::env::temp_dir().join(format!("jrs-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.xml");
        std::fs::write(&path, "<xdb-file><metrics port='9105'/></xdb-file>").unwrap();
        assert_eq!(MetricsConfig::from_file(&path).unwrap().unwrap().port, 9105);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
