//! A small element tree for the payloads sm reads and writes (roster queries, vCards,
//! private XML, stored fragments), built with quick-xml.
//!
//! Input is either a stanza that the router framed (byte and depth limits applied) and
//! c2s validated, or a fragment this program stored; the parser still refuses what a
//! stanza may not contain (comments, PIs, DTDs, unknown entities, undeclared prefixes,
//! duplicate attributes) and caps the depth, and it builds the tree without recursion.
//! Element names keep their prefix as written; `ns` is the resolved namespace. When
//! written out, an element declares its namespace only where it differs from its
//! parent's, so a stanza written in the `jabber:client` context carries no `xmlns`.

use std::fmt::Write as _;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

pub const NS_CLIENT: &str = "jabber:client";
/// Deepest nesting accepted (the framer's limit is lower; this only guards the parser).
const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlError(pub String);

impl std::fmt::Display for XmlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for XmlError {}

fn bad(s: impl Into<String>) -> XmlError {
    XmlError(s.into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Qualified name as written (`query`, `stream:features`).
    pub name: String,
    /// Resolved namespace.
    pub ns: String,
    /// Attributes, values unescaped; `xmlns:p` declarations kept, `xmlns` not.
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

    pub fn local_name(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    fn prefix(&self) -> Option<&str> {
        self.name.split_once(':').map(|(p, _)| p)
    }

    pub fn is(&self, local: &str, ns: &str) -> bool {
        self.local_name() == local && self.ns == ns
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

    pub fn with_child(mut self, child: Element) -> Element {
        self.children.push(Node::Element(child));
        self
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Element {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn push(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// Child elements (text skipped).
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub fn child(&self, local: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(local, ns))
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

    /// Text of the child `local` in the same namespace as this element.
    pub fn child_text(&self, local: &str) -> Option<String> {
        self.child(local, &self.ns).map(Element::text)
    }

    /// Parses one element; `context_ns` is the default namespace in force around it (for
    /// a stanza: `jabber:client`).
    pub fn parse(bytes: &[u8], context_ns: &str) -> Result<Element, XmlError> {
        let mut all = parse_nodes(bytes, context_ns)?;
        let mut found = None;
        for n in all.drain(..) {
            match n {
                Node::Element(e) if found.is_none() => found = Some(e),
                Node::Element(_) => return Err(bad("more than one element")),
                Node::Text(t) if t.trim().is_empty() => {}
                Node::Text(_) => return Err(bad("text outside the element")),
            }
        }
        found.ok_or_else(|| bad("no element"))
    }

    /// Parses a fragment: a sequence of elements (whitespace between them ignored).
    pub fn parse_fragment(bytes: &[u8], context_ns: &str) -> Result<Vec<Element>, XmlError> {
        let mut out = vec![];
        for n in parse_nodes(bytes, context_ns)? {
            match n {
                Node::Element(e) => out.push(e),
                Node::Text(t) if t.trim().is_empty() => {}
                Node::Text(_) => return Err(bad("text between elements")),
            }
        }
        Ok(out)
    }

    /// Writes the element where the default namespace in force is `context_ns`.
    pub fn write_in(&self, out: &mut String, context_ns: &str) {
        // Iterative, like the parser: (element, parent's default ns, children written?)
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
                    // The default namespace in force inside `e`.
                    let mut inside = parent_ns;
                    match e.prefix() {
                        None => {
                            if e.ns != parent_ns {
                                let _ = write!(out, " xmlns='{}'", escape(&e.ns));
                            }
                            inside = &e.ns;
                        }
                        Some(p) => {
                            let decl = format!("xmlns:{p}");
                            if p != "xml" && e.attr(&decl).is_none() {
                                let _ = write!(out, " {decl}='{}'", escape(&e.ns));
                            }
                        }
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
                            Node::Element(c) => Step::Open(c, inside),
                            Node::Text(t) => Step::Text(t),
                        });
                    }
                }
            }
        }
    }

    /// The element as a stanza (default namespace `jabber:client`, not declared).
    pub fn to_stanza(&self) -> String {
        let mut s = String::new();
        self.write_in(&mut s, NS_CLIENT);
        s
    }

    /// The element standing alone: its namespace declared.
    pub fn to_xml(&self) -> String {
        let mut s = String::new();
        self.write_in(&mut s, "");
        s
    }
}

pub use jrs_stream::xml::escape;

struct Scope {
    default_ns: String,
    prefixes: Vec<(String, String)>,
}

fn resolve<'a>(scopes: &'a [Scope], prefix: &str) -> Option<&'a str> {
    if prefix == "xml" {
        return Some("http://www.w3.org/XML/1998/namespace");
    }
    scopes.iter().rev().find_map(|s| {
        s.prefixes
            .iter()
            .find(|(p, _)| p == prefix)
            .map(|(_, ns)| ns.as_str())
    })
}

fn start_element(e: &BytesStart, scopes: &[Scope]) -> Result<(Element, Scope), XmlError> {
    let parent_default = scopes.last().map(|s| s.default_ns.as_str()).unwrap_or("");
    let mut default_ns = parent_default.to_owned();
    let mut prefixes = vec![];
    let mut attrs = vec![];
    for a in e.attributes().with_checks(true) {
        let a = a.map_err(|e| bad(format!("bad attribute: {e}")))?;
        let key = a.key.as_ref();
        let value = quick_xml::escape::unescape(&a.value)
            .map_err(|e| bad(format!("bad attribute value: {e}")))?
            .into_owned();
        if key == "xmlns" {
            default_ns = value;
        } else if let Some(p) = key.strip_prefix("xmlns:") {
            prefixes.push((p.to_owned(), value.clone()));
            attrs.push((key.to_owned(), value));
        } else {
            attrs.push((key.to_owned(), value));
        }
    }
    let name = e.name().as_ref().to_owned();
    let scope = Scope {
        default_ns: default_ns.clone(),
        prefixes,
    };
    let ns = match name.split_once(':') {
        None => default_ns,
        Some((p, _)) => {
            let own = scope
                .prefixes
                .iter()
                .find(|(q, _)| q == p)
                .map(|(_, ns)| ns.clone());
            match own.or_else(|| resolve(scopes, p).map(str::to_owned)) {
                Some(ns) if p != "xml" && p != "xmlns" => ns,
                _ => return Err(bad(format!("undeclared namespace prefix '{p}'"))),
            }
        }
    };
    for (k, _) in &attrs {
        if let Some((p, _)) = k.split_once(':') {
            if p != "xmlns"
                && !scope.prefixes.iter().any(|(q, _)| q == p)
                && resolve(scopes, p).is_none()
            {
                return Err(bad(format!("undeclared namespace prefix '{p}'")));
            }
        }
    }
    Ok((
        Element {
            name,
            ns,
            attrs,
            children: vec![],
        },
        scope,
    ))
}

fn parse_nodes(bytes: &[u8], context_ns: &str) -> Result<Vec<Node>, XmlError> {
    let text = std::str::from_utf8(bytes).map_err(|_| bad("invalid UTF-8"))?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut scopes = vec![Scope {
        default_ns: context_ns.to_owned(),
        prefixes: vec![],
    }];
    let mut stack: Vec<Element> = vec![];
    let mut top: Vec<Node> = vec![];
    fn attach(stack: &mut [Element], top: &mut Vec<Node>, node: Node) {
        let list = match stack.last_mut() {
            Some(parent) => &mut parent.children,
            None => top,
        };
        // Merge adjacent text (entity references arrive as separate events).
        if let (Node::Text(t), Some(Node::Text(prev))) = (&node, list.last_mut()) {
            prev.push_str(t);
            return;
        }
        list.push(node);
    }
    loop {
        let event = reader
            .read_event()
            .map_err(|e| bad(format!("not well-formed: {e}")))?;
        match event {
            Event::Start(e) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(bad("nested too deeply"));
                }
                let (el, scope) = start_element(&e, &scopes)?;
                stack.push(el);
                scopes.push(scope);
            }
            Event::Empty(e) => {
                let (el, _) = start_element(&e, &scopes)?;
                attach(&mut stack, &mut top, Node::Element(el));
            }
            Event::End(_) => {
                let el = stack.pop().ok_or_else(|| bad("unexpected end tag"))?;
                scopes.pop();
                attach(&mut stack, &mut top, Node::Element(el));
            }
            Event::Text(t) => {
                let s: &str = t.as_ref();
                if !s.is_empty() {
                    attach(
                        &mut stack,
                        &mut top,
                        Node::Text(t.xml10_content().into_owned()),
                    );
                }
            }
            Event::CData(t) => {
                let s: &str = t.as_ref();
                attach(&mut stack, &mut top, Node::Text(s.to_owned()));
            }
            Event::GeneralRef(r) => {
                let ch = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => {
                        let name: &str = r.as_ref();
                        match name {
                            "lt" => "<".into(),
                            "gt" => ">".into(),
                            "amp" => "&".into(),
                            "apos" => "'".into(),
                            "quot" => "\"".into(),
                            _ => return Err(bad(format!("unknown entity '&{name};'"))),
                        }
                    }
                    Err(e) => return Err(bad(format!("bad character reference: {e}"))),
                };
                attach(&mut stack, &mut top, Node::Text(ch));
            }
            Event::Eof => break,
            Event::Comment(_) | Event::PI(_) | Event::DocType(_) | Event::Decl(_) => {
                return Err(bad(
                    "comments, processing instructions and DTDs are not allowed",
                ))
            }
        }
    }
    if !stack.is_empty() {
        return Err(bad("element not closed"));
    }
    Ok(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespaces_and_writes_them_back_minimally() {
        let e = Element::parse(
            b"<iq type='set' id='1'><query xmlns='jabber:iq:roster' ver='3'><item jid='a@b' name='A &amp; B'><group>G&#x31;</group></item></query></iq>",
            NS_CLIENT,
        )
        .unwrap();
        assert_eq!(e.ns, NS_CLIENT);
        let q = e.child("query", "jabber:iq:roster").unwrap();
        let item = q.child("item", "jabber:iq:roster").unwrap();
        assert_eq!(item.attr("name"), Some("A & B"));
        assert_eq!(item.child_text("group").as_deref(), Some("G1"));
        assert_eq!(
            e.to_stanza(),
            "<iq type='set' id='1'><query xmlns='jabber:iq:roster' ver='3'><item jid='a@b' name='A &amp; B'><group>G1</group></item></query></iq>"
        );
        assert!(q.to_xml().starts_with("<query xmlns='jabber:iq:roster'"));
    }

    #[test]
    fn prefixes_resolve_and_survive_detaching() {
        let e = Element::parse(b"<x xmlns='a' xmlns:p='urn:p'><p:y p:k='v'/></x>", "").unwrap();
        let y = e.elements().next().unwrap();
        assert_eq!((y.local_name(), y.ns.as_str()), ("y", "urn:p"));
        assert_eq!(y.to_xml(), "<p:y xmlns:p='urn:p' p:k='v'/>");
        assert!(Element::parse(b"<q:x/>", "").is_err());
    }

    #[test]
    fn refuses_what_stanzas_may_not_contain() {
        assert!(Element::parse(b"<a><!-- c --></a>", "").is_err());
        assert!(Element::parse(b"<a>&foo;</a>", "").is_err());
        assert!(Element::parse(b"<a x='1' x='2'/>", "").is_err());
        assert!(Element::parse(b"<a><b></a>", "").is_err());
        let deep = "<a>".repeat(200) + &"</a>".repeat(200);
        assert!(Element::parse(deep.as_bytes(), "").is_err());
    }

    #[test]
    fn fragments() {
        let v = Element::parse_fragment(
            b" <message id='1'/>\n<message id='2'><body>x</body></message>",
            NS_CLIENT,
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].to_stanza(), "<message id='2'><body>x</body></message>");
    }
}
