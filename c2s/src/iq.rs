//! The few IQs c2s answers itself (binding, the legacy session request, registration
//! before login, and errors), and reading an IQ's payload.

use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StanzaErrorCondition};

/// The payload (first child element) of an IQ, parsed; `None` when it has none or it is
/// not well-formed. For the rare IQs c2s reads itself, never on the relay path.
pub fn payload(iq: &Stanza) -> Option<minidom::Element> {
    // The payload's unqualified names are in the stream's namespace, which a fragment
    // parsed alone would not know: parse it inside an element that declares it.
    let mut xml = String::from("<iq xmlns='jabber:client'>");
    xml.push_str(std::str::from_utf8(iq.inner()).ok()?);
    xml.push_str("</iq>");
    let root: minidom::Element = xml.parse().ok()?;
    root.children().next().cloned()
}

pub fn result_iq(id: &str) -> String {
    format!("<iq type='result' id='{}'/>", escape(id))
}

/// An error answer; an IQ without id (RFC 6120 8.1.3 requires one) gets one without.
pub fn error_iq(id: &str, condition: StanzaErrorCondition, text: &str) -> String {
    let id = if id.is_empty() {
        String::new()
    } else {
        format!(" id='{}'", escape(id))
    };
    format!("<iq type='error'{id}>{}</iq>", condition.to_xml(text))
}
