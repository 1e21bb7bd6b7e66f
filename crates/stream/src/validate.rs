//! Full well-formedness check of one complete stanza, for input from untrusted peers.
//!
//! The framer already bounded size and depth and refused comments, PIs and DTDs at the
//! markup level; this pass checks what it cannot: UTF-8, characters XML forbids, matching
//! end tags, attribute syntax and uniqueness, entity references (only the five predefined
//! ones and character references, RFC 6120 11.1) and declared namespace prefixes.

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
                if let (ResolveResult::Unknown(prefix), _) =
                    reader.resolver().resolve_element(e.name())
                {
                    return Err(bad(format!("undeclared namespace prefix '{}'", prefix)));
                }
                for attr in e.attributes().with_checks(true) {
                    let attr = attr.map_err(|e| bad(format!("bad attribute: {e}")))?;
                    if attr.value.contains('<') {
                        return Err(bad("'<' in an attribute value"));
                    }
                    quick_xml::escape::unescape(&attr.value)
                        .map_err(|e| bad(format!("bad attribute value: {e}")))?;
                    let key = attr.key;
                    if key.prefix().is_some_and(|p| p.into_inner() != "xmlns") {
                        if let (ResolveResult::Unknown(prefix), _) =
                            reader.resolver().resolve_attribute(key)
                        {
                            return Err(bad(format!("undeclared namespace prefix '{}'", prefix)));
                        }
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
            Event::Text(_) | Event::CData(_) => {}
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
