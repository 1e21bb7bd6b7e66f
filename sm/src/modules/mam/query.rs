//! Archive queries (XEP-0313 sections 4 and 5), read as `jrs_xdb::mam` reads them for
//! every archive: the query form and XEP-0059 paging turned into a storage query, and
//! its page turned into result messages and `<fin/>`. Errors become sm's [`Reply`].

use jrs_xdb::mam::{ClientQuery, QueryOptions};

use crate::host::Reply;

pub use jrs_xdb::mam::{fin, result_message};

/// Reads a client's `<query/>` (see [`jrs_xdb::mam::read_query`]): `page_size` items
/// when it asks for no size, pages of at most `max_bytes`.
pub fn read(
    payload: &minidom::Element,
    page_size: usize,
    max_bytes: usize,
) -> Result<ClientQuery, Reply> {
    let options = QueryOptions {
        page_size,
        max_bytes: Some(max_bytes),
    };
    jrs_xdb::mam::read_query(payload.clone(), &options).map_err(|e| {
        let r = jrs_xdb::Refusal::from(e);
        Reply::error(r.condition, r.text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jrs_stream::StanzaErrorCondition;

    fn query(xml: &str) -> minidom::Element {
        xml.parse().unwrap()
    }

    fn translate(
        q: &minidom::Element,
        page_size: usize,
        max_bytes: usize,
    ) -> Result<jrs_xdb::archive::Query, Reply> {
        read(q, page_size, max_bytes).map(|c| c.query)
    }

    #[test]
    fn form_and_paging_become_a_storage_query() {
        let q = query(
            "<query xmlns='urn:xmpp:mam:2' queryid='q1'>\
             <x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
             <field var='with'><value>Juliet@Capulet.lit</value></field>\
             <field var='start'><value>2010-06-07T00:00:00Z</value></field>\
             <field var='after-id'><value>a1</value></field></x>\
             <set xmlns='http://jabber.org/protocol/rsm'><max>10</max><before/></set></query>",
        );
        let c = read(&q, 50, 1000).unwrap();
        assert_eq!(c.queryid.as_deref(), Some("q1"));
        let t = c.query;
        assert_eq!(t.with.as_deref(), Some("juliet@capulet.lit"));
        assert_eq!(t.start, Some(1_275_868_800_000_000));
        assert_eq!(t.after_id.as_deref(), Some("a1"));
        assert_eq!(t.paging.max, 10);
        assert!(t.paging.from_end);
        let t = translate(&query("<query xmlns='urn:xmpp:mam:2'/>"), 50, 1000).unwrap();
        assert_eq!((t.paging.max, t.paging.from_end), (50, false));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let q = query(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
             <field var='{urn:example}search'><value>x</value></field></x></query>",
        );
        assert!(matches!(
            translate(&q, 50, 1000),
            Err(Reply::Error {
                condition: StanzaErrorCondition::FeatureNotImplemented,
                ..
            })
        ));
        let q = query(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='start'><value>yesterday</value></field></x></query>",
        );
        assert!(matches!(
            translate(&q, 50, 1000),
            Err(Reply::Error {
                condition: StanzaErrorCondition::BadRequest,
                ..
            })
        ));
    }
}
