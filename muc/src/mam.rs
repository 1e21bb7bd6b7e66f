//! The room's message archive (XEP-0313 on a MUC room): the client's query (form and
//! XEP-0059 paging) as a storage query, and the page as result messages and `<fin/>`.
//! Rooms archive through xdb's archive operations, owner = the room's JID.

use bytes::Bytes;
use chrono::DateTime;
use jid::Jid;
use jrs_xdb::archive::{self, Item, Page, Paging, MAX_PAGE};
use minidom::Element;
use xmpp_parsers::mam::Query;

use crate::xml::{self, Condition, NS_DATA};

pub const NS_MAM: &str = "urn:xmpp:mam:2";

/// Items in one page when the client asks for no size.
pub const PAGE: usize = 50;

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

fn bad(text: impl Into<String>) -> Refusal {
    (xml::BAD_REQUEST, text.into())
}

/// The query form (the answer to a form request, XEP-0313 6.1).
pub fn form() -> String {
    let mut f = format!(
        "<query xmlns='{NS_MAM}'><x xmlns='{NS_DATA}' type='form'>\
         <field var='FORM_TYPE' type='hidden'><value>{NS_MAM}</value></field>"
    );
    for (var, kind) in [
        ("with", "jid-single"),
        ("start", "text-single"),
        ("end", "text-single"),
        ("before-id", "text-single"),
        ("after-id", "text-single"),
        ("ids", "list-multi"),
    ] {
        f.push_str(&format!("<field var='{var}' type='{kind}'/>"));
    }
    f.push_str("</x></query>");
    f
}

/// Reads a client's `<query/>` into a storage request.
pub fn request(payload: Element, to: String, id: String) -> Result<Request, Refusal> {
    let q = Query::try_from(payload).map_err(|e| bad(format!("{e}")))?;
    if q.node.is_some() {
        return Err((
            xml::FEATURE_NOT_IMPLEMENTED,
            "this archive has no nodes".into(),
        ));
    }
    let mut out = archive::Query::default();
    if let Some(form) = &q.form {
        for f in &form.fields {
            let var = f.var.as_deref().unwrap_or("");
            let one = || match f.values.as_slice() {
                [v] => Ok(v.as_str()),
                _ => Err(bad(format!("field '{var}' takes one value"))),
            };
            match var {
                "FORM_TYPE" if one()? != NS_MAM => {
                    return Err(bad(format!("FORM_TYPE must be {NS_MAM}")))
                }
                "FORM_TYPE" => {}
                "with" => {
                    let jid = Jid::new(one()?)
                        .map_err(|e| (xml::JID_MALFORMED, format!("'with': {e}")))?;
                    out.with = Some(jid.to_string());
                }
                "start" | "end" => {
                    let v = one()?;
                    let t = DateTime::parse_from_rfc3339(v.trim())
                        .ok()
                        .and_then(|d| u64::try_from(d.timestamp_micros()).ok())
                        .ok_or_else(|| {
                            bad(format!("'{var}' is not a XEP-0082 date and time: {v}"))
                        })?;
                    if var == "start" {
                        out.start = Some(t);
                    } else {
                        out.end = Some(t);
                    }
                }
                "after-id" => out.after_id = Some(one()?.to_owned()),
                "before-id" => out.before_id = Some(one()?.to_owned()),
                "ids" => out.ids = f.values.clone(),
                other => {
                    return Err((
                        xml::FEATURE_NOT_IMPLEMENTED,
                        format!("unknown query field '{other}'"),
                    ))
                }
            }
        }
    }
    let mut paging = Paging {
        max: PAGE,
        // Room for the page on the router link, with the storage answer's wrapping.
        max_bytes: Some(128 * 1024),
        ..Paging::default()
    };
    if let Some(set) = &q.set {
        if set.index.is_some() {
            return Err((
                xml::FEATURE_NOT_IMPLEMENTED,
                "paging by index is not supported; use <after/> or <before/>".into(),
            ));
        }
        if let Some(max) = set.max {
            paging.max = max.min(MAX_PAGE);
        }
        paging.after = set.after.clone().filter(|a| !a.is_empty());
        match set.before.as_deref() {
            Some("") => paging.from_end = true,
            Some(id) => paging.before = Some(id.to_owned()),
            None => {}
        }
    }
    out.paging = paging;
    Ok(Request {
        to,
        id,
        queryid: q.queryid.map(|q| q.0),
        flip: q.flip_page,
        query: out,
    })
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
