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

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

use crate::errors::{StreamError, StreamErrorCondition};

fn bad(text: impl Into<String>) -> StreamError {
    StreamError::new(StreamErrorCondition::NotWellFormed, text)
}

/// Checks that `stanza` is one well-formed, self-contained element that obeys RFC 6120's
/// XML restrictions. Prefixes must be declared inside the stanza itself, except `xml:`.
pub fn validate_stanza(stanza: &[u8]) -> Result<(), StreamError> {
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
    let mut reader = NsReader::from_str(text);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.check_comments = true;
    let mut depth = 0usize;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| bad(format!("at byte {}: {e}", reader.error_position())))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                check_start_tag(e.as_ref())?;
                if let (ResolveResult::Unknown(prefix), _) =
                    reader.resolver().resolve_element(e.name())
                {
                    return Err(bad(format!("undeclared namespace prefix '{}'", prefix)));
                }
                // Prefixed attributes by expanded name (namespace, local name): two may
                // not be the same attribute under different prefixes. Rarely more than
                // one, so a list.
                let mut qualified: Vec<(String, String)> = vec![];
                for attr in e.attributes().with_checks(true) {
                    let attr = attr.map_err(|e| bad(format!("bad attribute: {e}")))?;
                    if attr.value.contains('<') {
                        return Err(bad("'<' in an attribute value"));
                    }
                    let value = quick_xml::escape::unescape(&attr.value)
                        .map_err(|e| bad(format!("bad attribute value: {e}")))?;
                    if attr.value.contains("&#") && !value.chars().all(is_xml_char) {
                        return Err(bad("character reference to a character XML forbids"));
                    }
                    let key = attr.key;
                    match key.prefix().map(|p| p.into_inner()) {
                        None => {}
                        Some("xmlns") if value.is_empty() => {
                            return Err(bad(format!(
                                "empty namespace declared for prefix '{}'",
                                key.local_name().into_inner()
                            )));
                        }
                        Some("xmlns") => {}
                        Some(_) => match reader.resolver().resolve_attribute(key) {
                            (ResolveResult::Unknown(prefix), _) => {
                                return Err(bad(format!(
                                    "undeclared namespace prefix '{}'",
                                    prefix
                                )));
                            }
                            (ns, local) => {
                                let ns = match ns {
                                    ResolveResult::Bound(ns) => ns.into_inner().to_owned(),
                                    _ => String::new(),
                                };
                                let local = local.into_inner().to_owned();
                                if qualified.iter().any(|(n, l)| *n == ns && *l == local) {
                                    return Err(bad(format!(
                                        "attribute '{local}' twice in one namespace"
                                    )));
                                }
                                qualified.push((ns, local));
                            }
                        },
                    }
                }
                if matches!(event, Event::Start(_)) {
                    depth += 1;
                } else if depth == 0 {
                    return expect_eof(&mut reader);
                }
            }
            Event::End(_) => {
                depth -= 1;
                if depth == 0 {
                    return expect_eof(&mut reader);
                }
            }
            Event::Text(ref t) => {
                let raw: &str = t.as_ref();
                if raw.contains("]]>") {
                    return Err(bad("']]>' in character data"));
                }
            }
            Event::CData(_) => {}
            Event::GeneralRef(r) => {
                let known =
                    r.is_char_ref() || matches!(r.as_ref(), "lt" | "gt" | "amp" | "apos" | "quot");
                if !known {
                    return Err(StreamError::new(
                        StreamErrorCondition::RestrictedXml,
                        "entity references other than the predefined ones are not allowed",
                    ));
                }
                if r.is_char_ref() && !matches!(r.resolve_char_ref(), Ok(Some(c)) if is_xml_char(c))
                {
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

fn expect_eof(reader: &mut NsReader<&[u8]>) -> Result<(), StreamError> {
    match reader.read_event() {
        Ok(Event::Eof) => Ok(()),
        _ => Err(bad("content after the end of the element")),
    }
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

#[cfg(test)]
mod tests {
    use super::*;

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
