//! The room's message archive (XEP-0313 on a MUC room): the client's query (form and
//! XEP-0059 paging) as a storage query, and the page as result messages and `<fin/>`.
//! Rooms archive through xdb's archive operations, owner = the room's JID.

use bytes::Bytes;
use jrs_stream::StanzaErrorCondition;
use jrs_xdb::archive::{self, Item, Page};
use jrs_xdb::mam::{QueryError, QueryOptions};
use minidom::Element;

use crate::xml::{self, Condition};

pub use jrs_xdb::mam::NS_MAM;

/// How a room reads a query: pages of 50 when the client asks for no size, and room
/// for the page on the router link, with the storage answer's wrapping.
const QUERY: QueryOptions = QueryOptions {
    page_size: 50,
    max_bytes: Some(128 * 1024),
};

/// A query a room accepted, run by its task after the batch.
#[derive(Debug)]
pub struct Request {
    /// The requesting session and the IQ's id.
    pub to: String,
    pub id: String,
    pub queryid: Option<String>,
    pub flip: bool,
    pub query: archive::Query,
}

type Refusal = (Condition, String);

/// The query form (the answer to a form request, XEP-0313 4.1.5).
pub fn form() -> String {
    String::from(&Element::from(jrs_xdb::mam::form_query()))
}

/// Reads a client's `<query/>` into a storage request.
pub fn request(payload: Element, to: String, id: String) -> Result<Request, Refusal> {
    let q = jrs_xdb::mam::read_query(payload, &QUERY).map_err(refusal)?;
    Ok(Request {
        to,
        id,
        queryid: q.queryid,
        flip: q.flip_page,
        query: q.query,
    })
}

/// The room's error for a query it cannot read.
fn refusal(e: QueryError) -> Refusal {
    let c = match e.condition() {
        StanzaErrorCondition::JidMalformed => xml::JID_MALFORMED,
        StanzaErrorCondition::FeatureNotImplemented => xml::FEATURE_NOT_IMPLEMENTED,
        _ => xml::BAD_REQUEST,
    };
    (c, e.to_string())
}

/// The archived form of a room message: self-contained, `xmlns` first (see
/// [`history_template`]).
pub fn payload(attrs: &str, content: &str) -> Bytes {
    Bytes::from(format!(
        "<message xmlns='jabber:client'{attrs}>{content}</message>"
    ))
}

/// A history template from an archived payload (the inverse of [`payload`]).
pub fn history_template(payload: &[u8]) -> Option<xml::Template> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix("<message xmlns='jabber:client'")?;
    let gt = rest.find('>')?;
    Some(xml::Template {
        head: format!("<message{} to='", &rest[..gt]),
        tail: format!("'{}", &rest[gt..]),
    })
}

/// The result messages and the IQ result for a page.
pub fn answer(room: &str, r: &Request, page: &Page) -> Vec<u8> {
    let mut out = Vec::new();
    let mut items: Vec<&Item> = page.items.iter().collect();
    if r.flip {
        items.reverse();
    }
    for item in items {
        out.extend_from_slice(&jrs_xdb::mam::result_message(
            room,
            &r.to,
            r.queryid.as_deref(),
            item,
        ));
    }
    let fin = String::from(&Element::from(jrs_xdb::mam::fin(page)));
    out.extend_from_slice(
        format!(
            "<iq type='result'{}{}{}>{fin}</iq>",
            xml::attr("from", room),
            xml::attr("to", &r.to),
            xml::attr("id", &r.id)
        )
        .as_bytes(),
    );
    out
}

/// An error answer to a query that storage refused.
pub fn error(room: &str, r: &Request, c: Condition, text: &str) -> Vec<u8> {
    format!(
        "<iq type='error'{}{}{}>{}</iq>",
        xml::attr("from", room),
        xml::attr("to", &r.to),
        xml::attr("id", &r.id),
        xml::error_element(c, text)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_become_storage_requests() {
        let q: Element = "<query xmlns='urn:xmpp:mam:2' queryid='q1'>\
             <x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
             <field var='start'><value>2010-06-07T00:00:00Z</value></field></x>\
             <set xmlns='http://jabber.org/protocol/rsm'><max>10</max><before/></set></query>"
            .parse()
            .unwrap();
        let r = request(q, "a@b/c".into(), "i".into()).unwrap();
        assert_eq!(r.queryid.as_deref(), Some("q1"));
        assert_eq!(r.query.start, Some(1_275_868_800_000_000));
        assert_eq!((r.query.paging.max, r.query.paging.from_end), (10, true));
        let q: Element = "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='search'><value>x</value></field></x></query>"
            .parse()
            .unwrap();
        assert_eq!(
            request(q, "a".into(), "i".into()).unwrap_err().0,
            xml::FEATURE_NOT_IMPLEMENTED
        );
        let q: Element = "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='with'><value>@c</value></field></x></query>"
            .parse()
            .unwrap();
        assert_eq!(
            request(q, "a".into(), "i".into()).unwrap_err().0,
            xml::JID_MALFORMED
        );
        let q: Element = "<query xmlns='urn:xmpp:mam:2'/>".parse().unwrap();
        let r = request(q, "a".into(), "i".into()).unwrap();
        assert_eq!(
            (r.query.paging.max, r.query.paging.max_bytes),
            (50, Some(128 * 1024))
        );
    }

    #[test]
    fn the_form_lists_the_fields() {
        let f = form();
        assert!(f.starts_with("<query xmlns='urn:xmpp:mam:2'"), "{f}");
        for var in ["with", "start", "end", "before-id", "after-id", "ids"] {
            assert!(f.contains(&format!("var='{var}'")), "{f}");
        }
        assert!(
            f.contains("http://jabber.org/protocol/xdata-validate"),
            "{f}"
        );
    }

    #[test]
    fn payloads_become_history_templates() {
        let p = payload(" from='r@c/n' type='groupchat'", "<body>x</body>");
        let t = history_template(&p).unwrap();
        assert_eq!(
            t.to("a@b/c"),
            "<message from='r@c/n' type='groupchat' to='a@b/c'><body>x</body></message>"
        );
    }
}
