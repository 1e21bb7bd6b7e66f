//! The check as it was before it kept the namespace prefixes itself: with quick-xml's
//! `NsReader` keeping them (the other checks are shared). Kept as the tests' reference:
//! `validate::tests` compares the two on the fuzzing corpus and on mutations of it.
//! Test code only.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

use super::{attribute_value, bad, check_content, check_start_tag, checked_text};
use crate::errors::StreamError;

/// Checks that `stanza` is one well-formed, self-contained element that obeys RFC 6120's
/// XML restrictions. Prefixes must be declared inside the stanza itself, except `xml:`.
pub fn validate_stanza(stanza: &[u8]) -> Result<(), StreamError> {
    let mut reader = NsReader::from_str(checked_text(stanza)?);
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
                    let value = attribute_value(&attr)?;
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
            other => check_content(&other)?,
        }
    }
}

fn expect_eof(reader: &mut NsReader<&[u8]>) -> Result<(), StreamError> {
    match reader.read_event() {
        Ok(Event::Eof) => Ok(()),
        _ => Err(bad("content after the end of the element")),
    }
}
