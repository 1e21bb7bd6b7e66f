//! XML configuration loading with precise errors.
//!
//! Each process describes its file as typed structs and reads them from a [`Node`] tree.
//! Every error names the file, the line, the element and what was expected, so a broken
//! file stops the process at start with a message an operator can act on:
//!
//! ```text
//! etc/router.xml:12: <listen>: attribute 'port' = 'x': expected a port number (1-65535)
//! ```
//!
//! The tree is built with quick-xml from the operator's own file (trusted input, small);
//! comments are allowed here, unlike on the wire.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quick_xml::events::Event;
use quick_xml::Reader;

mod common;
pub mod service;
pub use common::{
    limits_from_node, Listener, LogConfig, RouterLink, TlsFiles, TlsHost, TlsMode, LINK_KEEPALIVE,
    LINK_TIMEOUT,
};

/// A configuration error, printed as `FILE:LINE: <element>: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: u32,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

impl std::error::Error for ConfigError {}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// One element of a configuration file.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
    /// Concatenated text content, trimmed.
    pub text: String,
    pub line: u32,
    file: Arc<PathBuf>,
}

impl Node {
    /// Reads and parses a configuration file; the root element must be `root`.
    pub fn load(path: &Path, root: &str) -> Result<Node> {
        let file = Arc::new(path.to_path_buf());
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            message: format!("cannot read the file: {e}"),
        })?;
        let node = Node::parse_str(&text, file)?;
        if node.name != root {
            return Err(node.error(format!("the root element must be <{root}>")));
        }
        Ok(node)
    }

    /// Parses configuration text; `file` is used in error messages.
    pub fn parse_str(text: &str, file: Arc<PathBuf>) -> Result<Node> {
        let line_of = |pos: u64| -> u32 {
            let pos = (pos as usize).min(text.len());
            1 + text.as_bytes()[..pos]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u32
        };
        let error_at = |pos: u64, message: String| ConfigError {
            file: file.as_ref().clone(),
            line: line_of(pos),
            message,
        };
        let mut reader = Reader::from_str(text);
        reader.config_mut().check_end_names = true;
        let mut stack: Vec<Node> = vec![];
        let mut root = None;
        loop {
            let pos = reader.buffer_position();
            let event = reader
                .read_event()
                .map_err(|e| error_at(reader.error_position(), format!("malformed XML: {e}")))?;
            match event {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    if root.is_some() {
                        return Err(error_at(pos, "content after the root element".into()));
                    }
                    let mut attrs = vec![];
                    for attr in e.attributes().with_checks(true) {
                        let attr =
                            attr.map_err(|e| error_at(pos, format!("bad attribute: {e}")))?;
                        let value = quick_xml::escape::unescape(&attr.value)
                            .map_err(|e| error_at(pos, format!("bad attribute value: {e}")))?;
                        attrs.push((attr.key.as_ref().to_owned(), value.into_owned()));
                    }
                    let node = Node {
                        name: e.name().as_ref().to_owned(),
                        attrs,
                        children: vec![],
                        text: String::new(),
                        line: line_of(pos + 1),
                        file: file.clone(),
                    };
                    if matches!(event, Event::Start(_)) {
                        stack.push(node);
                    } else {
                        attach(&mut stack, &mut root, node);
                    }
                }
                Event::End(_) => {
                    let mut node = stack.pop().expect("end names are checked");
                    node.text = node.text.trim().to_owned();
                    attach(&mut stack, &mut root, node);
                }
                Event::Text(t) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(t.as_ref());
                    }
                }
                Event::GeneralRef(r) => {
                    if let Some(top) = stack.last_mut() {
                        let raw = format!("&{};", r.as_ref());
                        let value = quick_xml::escape::unescape(&raw)
                            .map_err(|e| error_at(pos, format!("bad entity: {e}")))?;
                        top.text.push_str(&value);
                    }
                }
                Event::CData(t) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(t.as_ref());
                    }
                }
                Event::Eof => break,
                Event::DocType(_) => {
                    return Err(error_at(
                        pos,
                        "DTDs are not allowed in configuration".into(),
                    ))
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
            }
        }
        if !stack.is_empty() {
            return Err(error_at(
                text.len() as u64,
                format!("<{}> is not closed", stack[0].name),
            ));
        }
        root.ok_or_else(|| error_at(0, "the file has no root element".into()))
    }

    /// An error located at this element.
    pub fn error(&self, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.as_ref().clone(),
            line: self.line,
            message: format!("<{}>: {}", self.name, message),
        }
    }

    /// Fails on any attribute or child element not in the lists.
    pub fn allow(&self, attrs: &[&str], children: &[&str]) -> Result<()> {
        for (key, _) in &self.attrs {
            if !attrs.contains(&key.as_str()) && !key.starts_with("xmlns") {
                return Err(self.error(format!(
                    "unknown attribute '{key}' (expected {})",
                    one_of(attrs)
                )));
            }
        }
        for child in &self.children {
            if !children.contains(&child.name.as_str()) {
                return Err(child.error(format!(
                    "unknown element inside <{}> (expected {})",
                    self.name,
                    one_of(
                        &children
                            .iter()
                            .map(|c| format!("<{c}>"))
                            .collect::<Vec<_>>()
                    )
                )));
            }
        }
        Ok(())
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn required_attr(&self, name: &str) -> Result<&str> {
        match self.attr(name) {
            Some(v) if !v.trim().is_empty() => Ok(v),
            _ => Err(self.error(format!("the attribute '{name}' is required"))),
        }
    }

    /// Parses an optional attribute; `expected` describes valid values for the error.
    pub fn parse_attr<T: FromStr>(&self, name: &str, expected: &str) -> Result<Option<T>> {
        match self.attr(name) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| {
                self.error(format!("attribute '{name}' = '{v}': expected {expected}"))
            }),
        }
    }

    pub fn bool_attr(&self, name: &str, default: bool) -> Result<bool> {
        match self.attr(name).map(str::trim) {
            None => Ok(default),
            Some("true" | "yes" | "1") => Ok(true),
            Some("false" | "no" | "0") => Ok(false),
            Some(v) => Err(self.error(format!(
                "attribute '{name}' = '{v}': expected true or false"
            ))),
        }
    }

    /// A duration attribute in seconds (fractions allowed).
    pub fn seconds_attr(&self, name: &str) -> Result<Option<Duration>> {
        let secs: Option<f64> = self.parse_attr(name, "a number of seconds")?;
        match secs {
            Some(s) if !(0.0..=86_400.0 * 365.0).contains(&s) => Err(self.error(format!(
                "attribute '{name}' = '{s}': expected a number of seconds"
            ))),
            other => Ok(other.map(Duration::from_secs_f64)),
        }
    }

    /// A number of bytes: a whole number, or with a K, M or G suffix (powers of 1024).
    pub fn size_attr(&self, name: &str) -> Result<Option<u64>> {
        let Some(v) = self.attr(name) else {
            return Ok(None);
        };
        parse_size(v).map(Some).ok_or_else(|| {
            self.error(format!(
                "attribute '{name}' = '{v}': expected a number of bytes (suffix K, M or G allowed)"
            ))
        })
    }

    /// A number of seconds above zero.
    pub fn positive_seconds_attr(&self, name: &str) -> Result<Option<Duration>> {
        match self.seconds_attr(name)? {
            Some(d) if d.is_zero() => {
                Err(self.error(format!("attribute '{name}' must be more than 0 seconds")))
            }
            other => Ok(other),
        }
    }

    pub fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// An optional child that may appear at most once.
    pub fn child<'a>(&'a self, name: &'a str) -> Result<Option<&'a Node>> {
        let mut found = self.children(name);
        let first = found.next();
        if let Some(second) = found.next() {
            return Err(second.error(format!("<{name}> may appear only once here")));
        }
        Ok(first)
    }

    pub fn required_child<'a>(&'a self, name: &'a str) -> Result<&'a Node> {
        self.child(name)?
            .ok_or_else(|| self.error(format!("the element <{name}> is required inside")))
    }

    /// Text of an optional child element such as `<id>sm</id>`.
    pub fn child_text<'a>(&'a self, name: &'a str) -> Result<Option<&'a str>> {
        Ok(self.child(name)?.map(|c| c.text.as_str()))
    }

    pub fn file(&self) -> &Path {
        &self.file
    }
}

fn attach(stack: &mut [Node], root: &mut Option<Node>, node: Node) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(node),
        None => *root = Some(node),
    }
}

fn one_of<S: AsRef<str>>(items: &[S]) -> String {
    match items.len() {
        0 => "nothing here".into(),
        _ => items
            .iter()
            .map(|s| s.as_ref().to_owned())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A whole number of bytes, or with a K, M or G suffix (powers of 1024).
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (digits, unit) = match v.char_indices().last()? {
        (i, 'K' | 'k') => (&v[..i], 1024),
        (i, 'M' | 'm') => (&v[..i], 1024 * 1024),
        (i, 'G' | 'g') => (&v[..i], 1024 * 1024 * 1024),
        _ => (v, 1),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Node> {
        Node::parse_str(s, Arc::new(PathBuf::from("t.xml")))
    }

    #[test]
    fn reports_lines() {
        let n = parse("<a>\n  <!-- c -->\n  <b x='1'/>\n  <c>text &amp; more</c>\n</a>").unwrap();
        assert_eq!(n.children[0].line, 3);
        assert_eq!(n.children[1].text, "text & more");
        let e = n.allow(&[], &["b"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.xml:4: <c>: unknown element inside <a> (expected <b>)"
        );
        let e = n.children[0].parse_attr::<u16>("x", "a port").unwrap();
        assert_eq!(e, Some(1));
    }

    #[test]
    fn reports_malformed_xml_with_line() {
        let e = parse("<a>\n<b>\n</c>\n</a>").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn bad_values_name_what_was_expected() {
        let n = parse("<a>\n<listen port='x'/></a>").unwrap();
        let e = n.children[0]
            .parse_attr::<u16>("port", "a port number (1-65535)")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.xml:2: <listen>: attribute 'port' = 'x': expected a port number (1-65535)"
        );
    }
}
