//! A small namespace-aware element tree for `jabberctl import`/`export`: read from
//! XEP-0227 files (streamed: one `<user>` at a time, see [`Source`]) and from stored
//! records, written back as self-contained XML.
//!
//! Elements keep their local name and resolved namespace; prefixes of element names are
//! not kept (the writer declares a default namespace wherever it changes). Attributes
//! keep their names as written; a prefixed attribute gets its prefix declared on its own
//! element, so every element can be written out alone. Nothing here recurses over the
//! tree, and input nesting is capped, so a hostile file cannot exhaust the stack.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::BufRead;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

pub const NS_CLIENT: &str = "jabber:client";
const NS_XML: &str = "http://www.w3.org/XML/1998/namespace";
/// Deepest nesting accepted below the element being read.
const MAX_DEPTH: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Local name.
    pub name: String,
    /// Resolved namespace ("" for none).
    pub ns: String,
    /// Attributes as written (values unescaped), `xmlns` not included; `xmlns:p`
    /// declarations are kept for prefixed attributes.
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

impl Element {
    pub fn new(name: &str, ns: &str) -> Element {
        Element {
            name: name.to_owned(),
            ns: ns.to_owned(),
            attrs: vec![],
            children: vec![],
        }
    }

    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_attr(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.attrs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.attrs.push((key.to_owned(), value)),
        }
    }

    pub fn remove_attr(&mut self, key: &str) {
        self.attrs.retain(|(k, _)| k != key);
    }

    pub fn with_attr(mut self, key: &str, value: impl Into<String>) -> Element {
        self.set_attr(key, value);
        self
    }

    /// Sets the attribute when there is a value.
    pub fn with_opt(self, key: &str, value: Option<&str>) -> Element {
        match value {
            Some(v) => self.with_attr(key, v),
            None => self,
        }
    }

    pub fn with_child(mut self, child: Element) -> Element {
        self.push(child);
        self
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Element {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn push(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// A child `<name>` in this element's namespace with `text` in it.
    pub fn text_child(mut self, name: &str, text: &str) -> Element {
        let ns = self.ns.clone();
        self.push(Element::new(name, &ns).with_text(text));
        self
    }

    /// Child elements (text skipped).
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub fn elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub fn child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    /// The text directly inside this element.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s
    }

    /// Removes whitespace-only text between child elements of elements that have
    /// element children (the indentation of a pretty-printed file), everywhere below.
    pub fn strip_indentation(&mut self) {
        let mut stack = vec![self];
        while let Some(e) = stack.pop() {
            if e.elements().next().is_some() {
                e.children
                    .retain(|n| !matches!(n, Node::Text(t) if t.trim().is_empty()));
            }
            stack.extend(e.elements_mut());
        }
    }

    /// Writes the element where the default namespace in force is `context_ns`.
    pub fn write_in(&self, out: &mut String, context_ns: &str) {
        enum Step<'a> {
            Open(&'a Element, &'a str),
            Close(&'a Element),
            Text(&'a str),
        }
        let mut stack = vec![Step::Open(self, context_ns)];
        while let Some(step) = stack.pop() {
            match step {
                Step::Text(t) => out.push_str(&escape(t)),
                Step::Close(e) => {
                    let _ = write!(out, "</{}>", e.name);
                }
                Step::Open(e, parent_ns) => {
                    out.push('<');
                    out.push_str(&e.name);
                    if e.ns != parent_ns {
                        let _ = write!(out, " xmlns='{}'", escape(&e.ns));
                    }
                    for (k, v) in &e.attrs {
                        let _ = write!(out, " {k}='{}'", escape(v));
                    }
                    if e.children.is_empty() {
                        out.push_str("/>");
                        continue;
                    }
                    out.push('>');
                    stack.push(Step::Close(e));
                    for child in e.children.iter().rev() {
                        stack.push(match child {
                            Node::Element(c) => Step::Open(c, &e.ns),
                            Node::Text(t) => Step::Text(t),
                        });
                    }
                }
            }
        }
    }

    /// The element standing alone: its namespace declared.
    pub fn to_xml(&self) -> String {
        let mut s = String::new();
        self.write_in(&mut s, "");
        s
    }

    /// The element in the `jabber:client` context (a stanza as sm stores it).
    pub fn to_stanza(&self) -> String {
        let mut s = String::new();
        self.write_in(&mut s, NS_CLIENT);
        s
    }

    /// Parses one element (a stored record); `context_ns` is the default namespace in
    /// force around it.
    pub fn parse(bytes: &[u8], context_ns: &str) -> Result<Element, String> {
        let mut all = Element::parse_fragment(bytes, context_ns)?;
        match all.len() {
            1 => Ok(all.remove(0)),
            0 => Err("no element".into()),
            _ => Err("more than one element".into()),
        }
    }

    /// Parses a sequence of elements (whitespace between them ignored).
    pub fn parse_fragment(bytes: &[u8], context_ns: &str) -> Result<Vec<Element>, String> {
        let mut src = Source::new(bytes, "stored record", context_ns);
        let mut out = vec![];
        loop {
            match src.next()? {
                Ev::Start(e, empty) => out.push(if empty { e } else { src.finish(e)? }),
                Ev::Text(t) if t.trim().is_empty() => {}
                Ev::Text(_) => return Err("text outside the elements".into()),
                Ev::End => return Err("unexpected end tag".into()),
                Ev::Eof => return Ok(out),
            }
        }
    }
}

pub fn escape(s: &str) -> Cow<'_, str> {
    quick_xml::escape::escape(s)
}

struct Scope {
    default_ns: String,
    prefixes: Vec<(String, String)>,
}

/// What [`Source::next`] read.
pub enum Ev {
    /// An element's start tag (no children yet), and whether it was `<empty/>`.
    Start(Element, bool),
    End,
    Text(String),
    Eof,
}

/// A namespace-aware pull reader over a document or fragment, from which whole
/// subtrees can be read ([`Source::finish`]) or skipped.
pub struct Source<R: BufRead> {
    reader: Reader<R>,
    buf: Vec<u8>,
    scopes: Vec<Scope>,
    what: String,
}

impl<R: BufRead> Source<R> {
    /// `what` names the input in errors (a file name).
    pub fn new(input: R, what: &str, context_ns: &str) -> Source<R> {
        let mut reader = Reader::from_reader(input);
        reader.config_mut().check_end_names = true;
        Source {
            reader,
            buf: vec![],
            scopes: vec![Scope {
                default_ns: context_ns.to_owned(),
                prefixes: vec![],
            }],
            what: what.to_owned(),
        }
    }

    fn error(&self, text: impl std::fmt::Display) -> String {
        format!(
            "{} (byte {}): {text}",
            self.what,
            self.reader.buffer_position()
        )
    }

    fn resolve(&self, prefix: &str, own: &[(String, String)]) -> Option<String> {
        if prefix == "xml" {
            return Some(NS_XML.to_owned());
        }
        own.iter()
            .chain(self.scopes.iter().rev().flat_map(|s| s.prefixes.iter()))
            .find(|(p, _)| p == prefix)
            .map(|(_, ns)| ns.clone())
    }

    fn start(&self, e: &BytesStart) -> Result<(Element, Scope), String> {
        let mut default_ns = self
            .scopes
            .last()
            .map(|s| s.default_ns.clone())
            .unwrap_or_default();
        let mut prefixes: Vec<(String, String)> = vec![];
        let mut attrs = vec![];
        for a in e.attributes().with_checks(true) {
            let a = a.map_err(|err| self.error(format!("bad attribute: {err}")))?;
            let key: &str = a.key.as_ref();
            let value = quick_xml::escape::unescape(&a.value)
                .map_err(|err| self.error(format!("bad attribute value: {err}")))?
                .into_owned();
            if key == "xmlns" {
                default_ns = value;
            } else if let Some(p) = key.strip_prefix("xmlns:") {
                prefixes.push((p.to_owned(), value));
            } else {
                attrs.push((key.to_owned(), value));
            }
        }
        let qname = e.name();
        let qname: &str = qname.as_ref();
        let (name, ns) = match qname.split_once(':') {
            None => (qname.to_owned(), default_ns.clone()),
            Some((p, local)) => match self.resolve(p, &prefixes) {
                Some(ns) if p != "xmlns" => (local.to_owned(), ns),
                _ => return Err(self.error(format!("undeclared namespace prefix '{p}'"))),
            },
        };
        // Prefixed attributes carry their declaration with them.
        let mut declared = vec![];
        for (k, _) in &attrs {
            if let Some((p, _)) = k.split_once(':') {
                if p == "xml" || declared.iter().any(|(q, _): &(String, String)| q == p) {
                    continue;
                }
                match self.resolve(p, &prefixes) {
                    Some(ns) => declared.push((p.to_owned(), ns)),
                    None => return Err(self.error(format!("undeclared namespace prefix '{p}'"))),
                }
            }
        }
        for (p, ns) in declared {
            attrs.insert(0, (format!("xmlns:{p}"), ns));
        }
        Ok((
            Element {
                name,
                ns,
                attrs,
                children: vec![],
            },
            Scope {
                default_ns,
                prefixes,
            },
        ))
    }

    /// The next event at the current level.
    pub fn next(&mut self) -> Result<Ev, String> {
        loop {
            self.buf.clear();
            let event = match self.reader.read_event_into(&mut self.buf) {
                Ok(e) => e.into_owned(),
                Err(e) => return Err(self.error(format!("not well-formed: {e}"))),
            };
            return match event {
                Event::Start(e) => {
                    let (el, scope) = self.start(&e)?;
                    self.scopes.push(scope);
                    Ok(Ev::Start(el, false))
                }
                Event::Empty(e) => Ok(Ev::Start(self.start(&e)?.0, true)),
                Event::End(_) => {
                    if self.scopes.len() <= 1 {
                        return Err(self.error("unexpected end tag"));
                    }
                    self.scopes.pop();
                    Ok(Ev::End)
                }
                Event::Text(t) => {
                    let s = t.xml10_content();
                    if s.is_empty() {
                        continue;
                    }
                    Ok(Ev::Text(s.into_owned()))
                }
                Event::CData(t) => {
                    let s: &str = t.as_ref();
                    Ok(Ev::Text(s.to_owned()))
                }
                Event::GeneralRef(r) => {
                    let text = match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        Ok(None) => {
                            let name: &str = r.as_ref();
                            match name {
                                "lt" => "<".into(),
                                "gt" => ">".into(),
                                "amp" => "&".into(),
                                "apos" => "'".into(),
                                "quot" => "\"".into(),
                                _ => return Err(self.error(format!("unknown entity '&{name};'"))),
                            }
                        }
                        Err(e) => return Err(self.error(format!("bad character reference: {e}"))),
                    };
                    Ok(Ev::Text(text))
                }
                Event::Eof => {
                    if self.scopes.len() > 1 {
                        return Err(self.error("the document ends inside an element"));
                    }
                    Ok(Ev::Eof)
                }
                Event::Comment(_) | Event::PI(_) | Event::Decl(_) => continue,
                Event::DocType(_) => Err(self.error("DTDs are not allowed")),
            };
        }
    }

    /// Reads the children of `top` (whose start tag [`Source::next`] just returned, not
    /// empty) up to its end tag.
    pub fn finish(&mut self, top: Element) -> Result<Element, String> {
        let mut stack = vec![top];
        loop {
            match self.next()? {
                Ev::Start(e, true) => push_node(&mut stack, Node::Element(e)),
                Ev::Start(e, false) => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(self.error("nested too deeply"));
                    }
                    stack.push(e);
                }
                Ev::Text(t) => push_node(&mut stack, Node::Text(t)),
                Ev::End => {
                    let done = stack.pop().expect("never empty here");
                    if stack.is_empty() {
                        return Ok(done);
                    }
                    push_node(&mut stack, Node::Element(done));
                }
                Ev::Eof => return Err(self.error("the document ends inside an element")),
            }
        }
    }

    /// Skips the rest of an element whose (non-empty) start tag was just read.
    pub fn skip(&mut self) -> Result<(), String> {
        let mut depth = 1usize;
        while depth > 0 {
            match self.next()? {
                Ev::Start(_, false) => depth += 1,
                Ev::End => depth -= 1,
                Ev::Eof => return Err(self.error("the document ends inside an element")),
                _ => {}
            }
        }
        Ok(())
    }
}

fn push_node(stack: &mut [Element], node: Node) {
    let parent = stack.last_mut().expect("never empty here");
    // Merge adjacent text (entity references arrive as separate events).
    if let (Node::Text(t), Some(Node::Text(prev))) = (&node, parent.children.last_mut()) {
        prev.push_str(t);
        return;
    }
    parent.children.push(node);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_namespaces_and_writes_self_contained_elements() {
        let e = Element::parse(
            b"<p:a xmlns:p='urn:a' xmlns:x='urn:x'><b x:k='1' xml:lang='en'>t &amp; &#x31;</b><c xmlns=''/></p:a>",
            "",
        )
        .unwrap();
        assert_eq!((e.name.as_str(), e.ns.as_str()), ("a", "urn:a"));
        let b = e.child("b", "").unwrap();
        assert_eq!(b.text(), "t & 1");
        assert_eq!(b.attr("x:k"), Some("1"));
        // The prefixed attribute brought its declaration along.
        assert_eq!(
            b.to_xml(),
            "<b xmlns:x='urn:x' x:k='1' xml:lang='en'>t &amp; 1</b>"
        );
        assert_eq!(
            e.to_xml(),
            "<a xmlns='urn:a'><b xmlns='' xmlns:x='urn:x' x:k='1' xml:lang='en'>t &amp; 1</b><c xmlns=''/></a>"
        );
        let m = Element::parse(
            b"<message xmlns='jabber:client'><body>x</body></message>",
            "",
        )
        .unwrap();
        assert_eq!(m.to_stanza(), "<message><body>x</body></message>");
        assert!(Element::parse(b"<a><b></a>", "").is_err());
        assert!(Element::parse(b"<q:a/>", "").is_err());
    }

    #[test]
    fn nesting_is_capped() {
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert!(Element::parse(deep.as_bytes(), "").is_err());
    }
}
