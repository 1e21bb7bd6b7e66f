//! Full well-formedness check of one complete stanza, for input from untrusted peers.
//!
//! The framer already bounded size and depth and refused comments, PIs and DTDs at the
//! markup level; this pass checks what it cannot: UTF-8, characters XML forbids (raw or
//! as character references, in text and in attribute values), `]]>` in text, matching
//! end tags, element and attribute names (XML names, at most one colon), attribute
//! syntax (white space between attributes) and uniqueness (by expanded name too), entity
//! references (only the five predefined ones and character references, RFC 6120 11.1),
//! declared namespace prefixes and no empty prefixed namespace declaration. quick-xml
//! alone lets several of these through; a relayed stanza that breaks one of them makes a
//! strict recipient's parser reject the whole stream.

use std::borrow::Cow;

use quick_xml::events::attributes::Attribute;
use quick_xml::events::Event;
use quick_xml::Reader;

use crate::errors::{StreamError, StreamErrorCondition};

fn bad(text: impl Into<String>) -> StreamError {
    StreamError::new(StreamErrorCondition::NotWellFormed, text)
}

/// Checks that `stanza` is one well-formed, self-contained element that obeys RFC 6120's
/// XML restrictions. Prefixes must be declared inside the stanza itself, except `xml:`.
pub fn validate_stanza(stanza: &[u8]) -> Result<(), StreamError> {
    let mut reader = Reader::from_str(checked_text(stanza)?);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.check_comments = true;
    let mut depth = 0usize;
    let mut prefixes = Prefixes::default();
    loop {
        let event = reader
            .read_event()
            .map_err(|e| bad(format!("at byte {}: {e}", reader.error_position())))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                check_start_tag(e.as_ref())?;
                // The element's own declarations are in scope for its name and its
                // attributes: prefixed attributes are resolved after all are read.
                // Rarely more than one, so a list.
                let level = depth + 1;
                let mut prefixed: Vec<(&str, &str)> = vec![];
                for attr in e.attributes().with_checks(true) {
                    let attr = attr.map_err(|e| bad(format!("bad attribute: {e}")))?;
                    let value = attribute_value(&attr)?;
                    let key = attr.key.into_inner();
                    match key.split_once(':') {
                        None if key == "xmlns" => prefixes.declare_default(level)?,
                        None => {}
                        Some(("xmlns", prefix)) if value.is_empty() => {
                            return Err(bad(format!(
                                "empty namespace declared for prefix '{prefix}'"
                            )));
                        }
                        Some(("xmlns", prefix)) => prefixes.declare(prefix, &attr.value, level)?,
                        Some(name) => prefixed.push(name),
                    }
                }
                if let Some((prefix, _)) = e.name().into_inner().split_once(':') {
                    prefixes.resolve(prefix)?;
                }
                // Two attributes may not be the same under different prefixes: by
                // (namespace, local name).
                let mut expanded: Vec<(&str, &str)> = Vec::with_capacity(prefixed.len());
                for (prefix, local) in prefixed {
                    let ns = prefixes.resolve(prefix)?;
                    if expanded.contains(&(ns, local)) {
                        return Err(bad(format!("attribute '{local}' twice in one namespace")));
                    }
                    expanded.push((ns, local));
                }
                if matches!(event, Event::Start(_)) {
                    depth += 1;
                } else {
                    prefixes.leave(level);
                    if depth == 0 {
                        return expect_eof(&mut reader);
                    }
                }
            }
            Event::End(_) => {
                prefixes.leave(depth);
                depth -= 1;
                if depth == 0 {
                    return expect_eof(&mut reader);
                }
            }
            other => check_content(&other)?,
        }
    }
}

/// `stanza` as text, if it is UTF-8 without the characters XML forbids (before any
/// parsing: quick-xml lets them through).
fn checked_text(stanza: &[u8]) -> Result<&str, StreamError> {
    let text = std::str::from_utf8(stanza).map_err(|_| bad("invalid UTF-8"))?;
    if let Some(b) = stanza
        .iter()
        .find(|&&b| b < 0x20 && b != b'\t' && b != b'\n' && b != b'\r')
    {
        return Err(bad(format!("character 0x{b:02x} is not allowed in XML")));
    }
    if let Some(c) = excluded_noncharacter(stanza) {
        return Err(bad(format!(
            "character U+{:04X} is not allowed in XML",
            c as u32
        )));
    }
    Ok(text)
}

/// An attribute's value unescaped, after the checks quick-xml leaves out: no `<`, no
/// character reference to a character XML forbids.
fn attribute_value<'a>(attr: &'a Attribute<'a>) -> Result<Cow<'a, str>, StreamError> {
    if attr.value.contains('<') {
        return Err(bad("'<' in an attribute value"));
    }
    let value = quick_xml::escape::unescape(&attr.value)
        .map_err(|e| bad(format!("bad attribute value: {e}")))?;
    if attr.value.contains("&#") && !value.chars().all(is_xml_char) {
        return Err(bad("character reference to a character XML forbids"));
    }
    Ok(value)
}

/// What an event other than a tag must satisfy: no `]]>` in text, only the predefined
/// entities and character references to allowed characters, no comment, processing
/// instruction or DTD, and the element closed before the end.
fn check_content(event: &Event) -> Result<(), StreamError> {
    match event {
        Event::Text(t) => {
            let raw: &str = t.as_ref();
            if raw.contains("]]>") {
                return Err(bad("']]>' in character data"));
            }
        }
        Event::GeneralRef(r) => {
            let known =
                r.is_char_ref() || matches!(r.as_ref(), "lt" | "gt" | "amp" | "apos" | "quot");
            if !known {
                return Err(StreamError::new(
                    StreamErrorCondition::RestrictedXml,
                    "entity references other than the predefined ones are not allowed",
                ));
            }
            if r.is_char_ref() && !matches!(r.resolve_char_ref(), Ok(Some(c)) if is_xml_char(c)) {
                return Err(bad("character reference to a character XML forbids"));
            }
        }
        Event::Comment(_) | Event::PI(_) | Event::DocType(_) | Event::Decl(_) => {
            return Err(StreamError::new(
                StreamErrorCondition::RestrictedXml,
                "comments, processing instructions and DTDs are not allowed",
            ))
        }
        Event::Eof => return Err(bad("element not closed")),
        Event::Start(_) | Event::Empty(_) | Event::End(_) | Event::CData(_) => {}
    }
    Ok(())
}

/// The namespace prefixes the open elements bind (`xmlns:p='…'`), kept the way
/// quick-xml's `NsReader` keeps them (raw values; `xml` and `xmlns` reserved; at most
/// [`MOST_BINDINGS`] in scope) but only when a stanza binds any: its resolver set itself up
/// for every stanza and read every start tag's attributes a second time, a quarter of
/// the check's instructions for a chat message (docs/benchmarks.md, "Addresses parsed
/// once"). The tests compare the two over the fuzzing corpus.
#[derive(Default)]
struct Prefixes {
    /// (prefix, namespace as written, nesting level of the element binding it).
    bound: Vec<(String, String, usize)>,
    /// Nesting levels of the elements declaring a default namespace (only counted).
    defaults: Vec<usize>,
}

/// What quick-xml allows in scope at once (`DEFAULT_MAX_NAMESPACE_BINDINGS`): it bounds the
/// search of each prefix.
const MOST_BINDINGS: usize = 128;
const NS_XML: &str = "http://www.w3.org/XML/1998/namespace";
const NS_XMLNS: &str = "http://www.w3.org/2000/xmlns/";

impl Prefixes {
    fn room(&self) -> Result<(), StreamError> {
        if self.bound.len() + self.defaults.len() >= MOST_BINDINGS {
            return Err(bad(format!(
                "more than {MOST_BINDINGS} namespace bindings in scope"
            )));
        }
        Ok(())
    }

    fn declare_default(&mut self, level: usize) -> Result<(), StreamError> {
        self.room()?;
        self.defaults.push(level);
        Ok(())
    }

    fn declare(&mut self, prefix: &str, namespace: &str, level: usize) -> Result<(), StreamError> {
        match prefix {
            "xml" if namespace == NS_XML => return Ok(()),
            "xml" => return Err(bad(format!("prefix 'xml' bound to '{namespace}'"))),
            "xmlns" => return Err(bad("prefix 'xmlns' bound")),
            _ if namespace == NS_XML || namespace == NS_XMLNS => {
                return Err(bad(format!("prefix '{prefix}' bound to '{namespace}'")))
            }
            _ => {}
        }
        self.room()?;
        self.bound.push((prefix.into(), namespace.into(), level));
        Ok(())
    }

    /// The namespace `prefix` stands for.
    fn resolve(&self, prefix: &str) -> Result<&str, StreamError> {
        match prefix {
            "xml" => Ok(NS_XML),
            "xmlns" => Ok(NS_XMLNS),
            _ => self
                .bound
                .iter()
                .rev()
                .find(|(p, ..)| p == prefix)
                .map(|(_, ns, _)| ns.as_str())
                .ok_or_else(|| bad(format!("undeclared namespace prefix '{prefix}'"))),
        }
    }

    /// The element at nesting level `level` ends: its bindings go out of scope.
    fn leave(&mut self, level: usize) {
        while self.bound.last().is_some_and(|b| b.2 >= level) {
            self.bound.pop();
        }
        while self.defaults.last().is_some_and(|&l| l >= level) {
            self.defaults.pop();
        }
    }
}

/// The first raw U+FFFE or U+FFFF in valid UTF-8: with the control characters checked
/// above, the only code points XML 1.0 excludes (2.2 "Char") that UTF-8 can carry
/// (surrogates cannot be encoded). Relayed, they would make a recipient's parser reject
/// the whole stream. Both are encoded EF BF BE / EF BF BF; other text skips by memchr.
fn excluded_noncharacter(utf8: &[u8]) -> Option<char> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(0xEF, &utf8[from..]) {
        let at = from + i;
        match utf8.get(at + 1..at + 3) {
            Some([0xBF, 0xBE]) => return Some('\u{FFFE}'),
            Some([0xBF, 0xBF]) => return Some('\u{FFFF}'),
            _ => from = at + 1,
        }
    }
    None
}

/// Checks what quick-xml does not in a start tag (`tag`: its bytes between `<` and `>`,
/// without the `/` of an empty element): the element's and attributes' names
/// are XML names with at most one colon, not at either end (a QName of XML
/// namespaces), and white space separates the attributes. The rest of the attribute
/// syntax quick-xml checks.
fn check_start_tag(tag: &str) -> Result<(), StreamError> {
    let bytes = tag.as_bytes();
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let mut pos = bytes
        .iter()
        .position(|&b| is_space(b))
        .unwrap_or(bytes.len());
    check_qname(&tag[..pos], "element")?;
    loop {
        let spaced = pos;
        while pos < bytes.len() && is_space(bytes[pos]) {
            pos += 1;
        }
        if pos == bytes.len() {
            return Ok(());
        }
        if pos == spaced {
            return Err(bad("attributes must be separated by white space"));
        }
        let name_end = bytes[pos..]
            .iter()
            .position(|&b| b == b'=' || is_space(b))
            .map_or(bytes.len(), |i| pos + i);
        check_qname(&tag[pos..name_end], "attribute")?;
        pos = name_end;
        while pos < bytes.len() && is_space(bytes[pos]) {
            pos += 1;
        }
        if bytes.get(pos) != Some(&b'=') {
            return Err(bad("an attribute without a value"));
        }
        pos += 1;
        while pos < bytes.len() && is_space(bytes[pos]) {
            pos += 1;
        }
        let quote = match bytes.get(pos) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(bad("an attribute value without quotes")),
        };
        let Some(len) = memchr::memchr(quote, &bytes[pos + 1..]) else {
            return Err(bad("an attribute value not closed"));
        };
        pos += len + 2;
    }
}

/// A QName: an XML name with at most one colon, neither first nor last.
fn check_qname(name: &str, what: &str) -> Result<(), StreamError> {
    let ok = match name.split_once(':') {
        Some((prefix, local)) => is_ncname(prefix) && is_ncname(local),
        None => is_ncname(name),
    };
    if ok {
        Ok(())
    } else {
        Err(bad(format!("'{name}' is not an {what} name")))
    }
}

/// An XML name without colons (XML 1.0 fifth edition, 2.3, and XML namespaces).
fn is_ncname(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(is_name_start_char) && chars.all(is_name_char)
}

fn is_name_start_char(c: char) -> bool {
    matches!(c, 'A'..='Z' | '_' | 'a'..='z')
        || (c > '\u{7F}'
            && matches!(c, '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}' | '\u{F8}'..='\u{2FF}'
                | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}' | '\u{200C}'..='\u{200D}'
                | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}' | '\u{3001}'..='\u{D7FF}'
                | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}' | '\u{10000}'..='\u{EFFFF}'))
}

fn is_name_char(c: char) -> bool {
    is_name_start_char(c)
        || matches!(c, '-' | '.' | '0'..='9')
        || (c > '\u{7F}' && matches!(c, '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}'))
}

fn expect_eof(reader: &mut Reader<&[u8]>) -> Result<(), StreamError> {
    match reader.read_event() {
        Ok(Event::Eof) => Ok(()),
        _ => Err(bad("content after the end of the element")),
    }
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

#[cfg(test)]
#[path = "validate_reference.rs"]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;

    /// Stanzas that bind, use, reuse and misuse namespace prefixes, for the comparison
    /// with the reference below.
    const NAMESPACED: &[&str] = &[
        "<message xmlns='jabber:client' to='a@b' xml:lang='en'><body>hi</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
        "<x xmlns:p='urn:p'><p:y p:a='1' xml:lang='en'/><p:z/></x>",
        "<x xmlns:p='urn:p'><y xmlns:p='urn:q' p:a='1'/><p:z p:a='2'/></x>",
        "<x><y xmlns:p='urn:p'/><p:z/></x>",
        "<x xmlns:p='u' xmlns:q='u' p:a='1' q:a='2'/>",
        "<x xmlns:p='u' xmlns:q='v' p:a='1' q:a='2' a='3'/>",
        "<p:x xmlns:p='u'><p:y/></p:x>",
        "<x xmlns:xml='http://www.w3.org/XML/1998/namespace' xml:lang='en'/>",
        "<x xmlns:xml='urn:other'/>",
        "<x xmlns:xmlns='urn:other'/>",
        "<x xmlns:p='http://www.w3.org/XML/1998/namespace'/>",
        "<x xmlns:p='http://www.w3.org/2000/xmlns/'/>",
        "<xmlns:x/>",
        "<x xmlns:a='&amp;' a:b='1'/>",
        "<x xmlns:p='urn:&#x70;' p:a='1' xmlns:q='urn:p' q:a='2'/>",
        "<x xmlns='' xmlns:p='urn:p'><p:y xmlns=''/></x>",
        "<x><y xmlns:p='u' p:a='1'></y><z p:a='1'/></x>",
    ];

    /// A seed changed at one place by one of XML's significant pieces.
    fn mutate(seed: &[u8], rng: &mut u64) -> Vec<u8> {
        const PIECES: &[&str] = &[
            "<",
            ">",
            "/",
            "'",
            "\"",
            "=",
            ":",
            " ",
            "&",
            ";",
            "&#x1;",
            "&amp;",
            "xmlns",
            "xmlns:",
            "xml:",
            "p:",
            "q:",
            "a",
            "<p:y/>",
            "</x>",
            "]]>",
            "<![CDATA[",
            "\u{FFFF}",
            "é",
            "xmlns:p='u' ",
            "p:a='1' ",
            "xmlns=''",
            "xmlns:p=''",
            "<!--",
            "?",
            "\u{1}",
        ];
        let mut next = |n: usize| {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % n as u64) as usize
        };
        let mut out = seed.to_vec();
        for _ in 0..1 + next(3) {
            let at = next(out.len() + 1);
            let piece = PIECES[next(PIECES.len())].as_bytes();
            match next(3) {
                0 => {
                    out.splice(at..at, piece.iter().copied());
                }
                1 if at < out.len() => {
                    let end = (at + 1 + next(4)).min(out.len());
                    out.drain(at..end);
                }
                _ => {
                    let end = (at + piece.len()).min(out.len());
                    out.splice(at..end, piece.iter().copied());
                }
            }
        }
        out
    }

    /// The prefixes kept here answer as quick-xml's `NsReader` did: the same stanzas are
    /// accepted and refused, over the fuzzing corpus, the stanzas of these tests and
    /// 200 000 mutations of them.
    #[test]
    fn agrees_with_the_ns_reader() {
        let mut seeds: Vec<Vec<u8>> = NAMESPACED.iter().map(|s| s.as_bytes().to_vec()).collect();
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus");
        for dir in [
            "stanza",
            "stream",
            "component",
            "xdb",
            "spool",
            "archive",
            "mam",
        ] {
            let Ok(files) = std::fs::read_dir(format!("{corpus}/{dir}")) else {
                continue;
            };
            for f in files.flatten() {
                let bytes = std::fs::read(f.path()).unwrap();
                // Whole files, and each line of them (the corpora hold streams too).
                seeds.extend(
                    bytes
                        .split(|&b| b == b'\n')
                        .map(|l| l.trim_ascii().to_vec()),
                );
                seeds.push(bytes);
            }
        }
        seeds.retain(|s| !s.is_empty());
        let check = |s: &[u8]| {
            let (new, old) = (validate_stanza(s), reference::validate_stanza(s));
            assert_eq!(
                new.is_ok(),
                old.is_ok(),
                "{:?}: now {new:?}, with NsReader {old:?}",
                String::from_utf8_lossy(s)
            );
        };
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut accepted = 0;
        for seed in &seeds {
            check(seed);
        }
        for i in 0..200_000 {
            let s = mutate(&seeds[i % seeds.len()], &mut rng);
            check(&s);
            accepted += usize::from(validate_stanza(&s).is_ok());
        }
        // Enough of the mutations stay well-formed for the comparison to mean something.
        assert!(accepted > 10_000, "only {accepted} mutations accepted");
    }

    #[test]
    fn accepts_ordinary_stanzas() {
        for s in [
            "<message to='a' from='b'><body>a &amp; b &#x263A; &lt;</body></message>",
            "<iq type='get'><query xmlns='jabber:iq:version'/></iq>",
            "<x xmlns:p='urn:p'><p:y p:a='1' xml:lang='en'/></x>",
            "<m><![CDATA[<not markup>]]></m>",
            "<presence/>",
        ] {
            validate_stanza(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[test]
    fn rejects_bad_xml() {
        for s in [
            "<message><body>x</bod></message>",
            "<message a='1' a='2'/>",
            "<message>&foo;</message>",
            "<message>&#0;</message>",
            "<message>a & b</message>",
            "<p:message/>",
            "<m a='<'/>",
            "<m>\u{1}</m>",
            "<m><!-- c --></m>",
            "<m><?pi x?></m>",
            "<m>",
        ] {
            assert!(validate_stanza(s.as_bytes()).is_err(), "accepted {s}");
        }
        assert!(validate_stanza(b"<m>\xff</m>").is_err());
        // What quick-xml lets through and strict parsers refuse (found by fuzzing, see
        // docs/fuzzing.md): attributes without white space between them, names that are
        // not XML names, character references to forbidden characters in attribute
        // values, ']]>' in text, an attribute twice under two prefixes of one
        // namespace, an empty prefixed namespace declaration.
        for s in [
            "<m a='1'b='2'/>",
            "<m a=\"1\"b='2'><body/></m>",
            "<iq xmlns = \"jabber:server\"&to='a'/>",
            "<m a='1'\u{FEFF}b='2'/>",
            "<a=b/>",
            "<1a/>",
            "<-a/>",
            "<a:b:c xmlns:a='x'/>",
            "<m><b:=c xmlns:b='x'/></m>",
            "<m 1a='x'/>",
            "<m a='&#x1;'/>",
            "<m a='&#xFFFE;'/>",
            "<m>]]></m>",
            "<m>a]]>b</m>",
            "<m p:y='1' q:y='2' xmlns:p='u' xmlns:q='u'/>",
            "<m xmlns:b=''/>",
            "<m//>",
            "<m a='1'//>",
            "<m/ a='1'/>",
        ] {
            assert!(validate_stanza(s.as_bytes()).is_err(), "accepted {s:?}");
        }
        for s in [
            "<m a = '1'\tb=\"2\"\n/>",
            "<m\u{FEFF}\u{B7}/>",
            "<\u{E9}t\u{E9} a.b-c_d='1'/>",
            "<m a='&#x263A;&amp;'>]] ]&gt; ]]&gt;</m>",
            "<m p:y='1' q:y='2' xmlns:p='u' xmlns:q='v'/>",
            "<m y='1' p:y='2' xmlns:p='u'/>",
            "<m xml:lang='en' xmlns=''/>",
        ] {
            validate_stanza(s.as_bytes()).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        }
        // Raw noncharacters XML excludes, in text and in attribute values; as character
        // references they were refused already.
        for s in [
            "<message><body>ok \u{FFFF} ok</body></message>",
            "<message><body>\u{FFFE}</body></message>",
            "<message to='a\u{FFFF}'/>",
            "<message>&#xFFFF;</message>",
        ] {
            assert!(validate_stanza(s.as_bytes()).is_err(), "accepted {s:?}");
        }
        // Their neighbours are fine.
        for s in [
            "<m>\u{FFFD} \u{EFFF} \u{10000} \u{FEFF}</m>",
            "<m>\u{F8FF}\u{FFEF}</m>",
        ] {
            validate_stanza(s.as_bytes()).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        }
    }
}
