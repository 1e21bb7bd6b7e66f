//! Reading small client elements (bind and registration forms).

use quick_xml::events::Event;
use quick_xml::Reader;

/// The text of the first element named `name` (local name) in `content`, unescaped.
pub fn child_text(content: &[u8], name: &str) -> Option<String> {
    let mut reader = Reader::from_reader(content);
    let mut inside = false;
    let mut text = String::new();
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) if !inside && e.local_name().as_ref() == name => inside = true,
            Event::Empty(e) if !inside && e.local_name().as_ref() == name => {
                return Some(String::new())
            }
            Event::Text(t) if inside => text.push_str(t.as_ref()),
            Event::GeneralRef(r) if inside => {
                let raw = format!("&{};", r.as_ref());
                text.push_str(&quick_xml::escape::unescape(&raw).ok()?);
            }
            Event::End(e) if inside && e.local_name().as_ref() == name => return Some(text),
            Event::Eof => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_text() {
        let c = b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>phone &amp; co</resource></bind>";
        assert_eq!(child_text(c, "resource").as_deref(), Some("phone & co"));
        assert_eq!(child_text(b"<bind/>", "resource"), None);
    }
}
