//! The check as it was before it kept namespace prefixes itself (with quick-xml's
//! `NsReader`), kept as the tests' reference: `validate::tests` compares the two on the
//! fuzzing corpus and on mutations of it. Test code only.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

use super::{bad, check_start_tag, excluded_noncharacter, is_xml_char};
use crate::errors::{StreamError, StreamErrorCondition};

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

fn expect_eof(reader: &mut NsReader<&[u8]>) -> Result<(), StreamError> {
    match reader.read_event() {
        Ok(Event::Eof) => Ok(()),
        _ => Err(bad("content after the end of the element")),
    }
}
