//! Archive queries (XEP-0313 sections 4 and 5): the query form and XEP-0059 paging
//! turned into a storage query, and its page turned into result messages and `<fin/>`.

use jid::Jid;
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use xmpp_parsers::mam::Query;
use xmpp_parsers::ns::MAM as NS_MAM;

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::archive::{self, Paging, MAX_PAGE};

use crate::clock::parse_stamp;
use crate::host::Reply;

fn bad(text: impl Into<String>) -> Reply {
    Reply::error(StanzaErrorCondition::BadRequest, text)
}

/// The fields this server understands (the answer to a form request).
pub fn form() -> DataForm {
    let mut ids = Field::new("ids", FieldType::ListMulti);
    ids.validate = Some(xmpp_parsers::data_forms_validate::Validate {
        datatype: Some(xmpp_parsers::data_forms_validate::Datatype::String),
        method: Some(xmpp_parsers::data_forms_validate::Method::Open),
        list_range: None,
    });
    DataForm::new(
        DataFormType::Form,
        NS_MAM,
        vec![
            Field::new("with", FieldType::JidSingle),
            Field::new("start", FieldType::TextSingle),
            Field::new("end", FieldType::TextSingle),
            Field::new("before-id", FieldType::TextSingle),
            Field::new("after-id", FieldType::TextSingle),
            ids,
        ],
    )
}

/// The storage query for a client's query; `page_size` when it asks for no size.
pub fn translate(q: &Query, page_size: usize, max_bytes: usize) -> Result<archive::Query, Reply> {
    if q.node.is_some() {
        return Err(Reply::error(
            StanzaErrorCondition::FeatureNotImplemented,
            "this archive has no nodes",
        ));
    }
    let mut out = archive::Query::default();
    if let Some(form) = &q.form {
        for f in &form.fields {
            let var = f.var.as_deref().unwrap_or("");
            let one = || -> Result<&str, Reply> {
                match f.values.as_slice() {
                    [v] => Ok(v.as_str()),
                    _ => Err(bad(format!("field '{var}' takes one value"))),
                }
            };
            match var {
                "FORM_TYPE" => {
                    if one()? != NS_MAM {
                        return Err(bad(format!("FORM_TYPE must be {NS_MAM}")));
                    }
                }
                "with" => {
                    let v = one()?;
                    let jid = Jid::new(v).map_err(|e| {
                        Reply::error(StanzaErrorCondition::JidMalformed, format!("'with': {e}"))
                    })?;
                    out.with = Some(jid.to_string());
                }
                "start" | "end" => {
                    let v = one()?;
                    let t = parse_stamp(v).ok_or_else(|| {
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
                    return Err(Reply::error(
                        StanzaErrorCondition::FeatureNotImplemented,
                        format!("unknown query field '{other}'"),
                    ))
                }
            }
        }
    }
    let mut paging = Paging {
        max: page_size,
        max_bytes: Some(max_bytes),
        ..Paging::default()
    };
    if let Some(set) = &q.set {
        if set.index.is_some() {
            return Err(Reply::error(
                StanzaErrorCondition::FeatureNotImplemented,
                "paging by index is not supported; use <after/> or <before/>",
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
    Ok(out)
}

pub use jrs_xdb::mam::{fin, result_message};

#[cfg(test)]
mod tests {
    use super::*;

    fn query(xml: &str) -> Query {
        Query::try_from(xml.parse::<minidom::Element>().unwrap()).unwrap()
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
        let t = translate(&q, 50, 1000).unwrap();
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
