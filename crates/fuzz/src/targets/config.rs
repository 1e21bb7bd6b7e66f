//! `config`: a configuration file as an operator may write it (crates/config: the XML
//! tree with FILE:LINE errors and the typed attribute readers; the shared sections:
//! router link, log, limits, listeners, TLS hosts), and the whole files of c2s
//! (c2s/src/config.rs), s2s (s2s/src/config.rs) and xdb-file (storage/src/config.rs)
//! read by their own loaders.

use std::path::PathBuf;
use std::sync::Arc;

use jrs_config::{limits_from_node, Listener, LogConfig, Node, RouterLink, TlsHost};

use crate::support::scratch_dir;

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(root) = Node::parse_str(text, Arc::new(PathBuf::from("fuzz.xml"))) {
        walk(&root, 0);
        let _ = limits_from_node(root.child("limits").ok().flatten(), Default::default());
        let _ = LogConfig::from_node(root.child("log").ok().flatten());
        let _ = Listener::all_from(&root, 5222, 5223);
        let _ = TlsHost::all_from(&root, "");
        if let Ok(Some(router)) = root.child("router") {
            let _ = RouterLink::from_node(router).map(|l| l.for_instance(Some(2)));
        }
    }
    // The loaders take a file.
    let path = scratch_dir("config").join("fuzz.xml");
    std::fs::write(&path, data).expect("writing a scratch file");
    let _ = crate::config::C2sConfig::load(&path);
    let _ = crate::s2s_config::S2sConfig::load(&path);
    let _ = crate::xdb_file::config::StorageConfig::load(&path);
}

/// Every typed reader on every attribute of every element.
fn walk(node: &Node, depth: usize) {
    let _ = (
        node.error("x").to_string(),
        node.file(),
        node.allow(&["a"], &["b"]),
    );
    for (name, _) in &node.attrs {
        let _ = node.attr(name);
        let _ = node.required_attr(name);
        let _ = node.bool_attr(name, false);
        let _ = node.seconds_attr(name);
        let _ = node.positive_seconds_attr(name);
        let _ = node.size_attr(name);
        let _ = node.parse_attr::<u16>(name, "a port");
        let _ = node.parse_attr::<u64>(name, "a number");
    }
    for child in &node.children {
        let _ = node.child(&child.name);
        let _ = node.child_text(&child.name);
        let _ = node.required_child(&child.name);
        let _ = node.children(&child.name).count();
        if depth < 64 {
            walk(child, depth + 1);
        }
    }
}
