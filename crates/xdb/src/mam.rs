//! XEP-0313 for every archive owner (sm's user archives, muc's room archives): the
//! client's query (its form and XEP-0059 paging) read into a storage [`Query`], the
//! form a client asks for, and the answer built from an archive page (one result
//! message per item, and the `<fin/>`).

use bytes::Bytes;
use chrono::DateTime;
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use xmpp_parsers::data_forms_validate::{Datatype, Method, Validate};
use xmpp_parsers::jid::Jid;
use xmpp_parsers::mam::{self as parsers, Fin};
use xmpp_parsers::minidom::Element;
use xmpp_parsers::rsm::{First, SetResult};

use jrs_stream::xml::escape;
use jrs_stream::StanzaErrorCondition;

use crate::archive::{Item, Page, Paging, Query, MAX_PAGE};
use crate::Refusal;

pub const NS_MAM: &str = "urn:xmpp:mam:2";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";

/// What differs between archive owners when reading a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryOptions {
    /// Items in a page when the client asks for no size (`<max/>`); capped at
    /// [`MAX_PAGE`], as a client's `<max/>` is.
    pub page_size: usize,
    /// Largest page wanted, in bytes of items (see [`Paging::max_bytes`]): room for the
    /// answer on the owner's link.
    pub max_bytes: Option<usize>,
}

/// A client's query as read: the storage query (filters and paging) and what the
/// answer needs from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientQuery {
    /// Repeated in every result message.
    pub queryid: Option<String>,
    /// The page's items in reverse order (`<flip-page/>`).
    pub flip_page: bool,
    pub query: Query,
}

/// Why a client's query cannot be run: [`QueryError::condition`] is the stanza error
/// to answer, the `Display` text its `<text/>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Not a `<query xmlns='urn:xmpp:mam:2'/>` (with a readable form and `<set/>`).
    #[error("unreadable payload: {0}")]
    Unreadable(String),
    /// A query of a pubsub node's archive (XEP-0413); these archives have none.
    #[error("this archive has no nodes")]
    Node,
    /// A single-valued field (any but `ids`) without exactly one value.
    #[error("field '{0}' takes one value")]
    NotOneValue(String),
    #[error("FORM_TYPE must be {NS_MAM}")]
    FormType,
    /// `with` is not a JID (the parser's complaint).
    #[error("'with': {0}")]
    With(String),
    /// `start` or `end` is not a XEP-0082 date and time.
    #[error("'{field}' is not a XEP-0082 date and time: {value}")]
    Stamp { field: String, value: String },
    /// A field XEP-0313 does not define (4.1.5: feature-not-implemented).
    #[error("unknown query field '{0}'")]
    UnknownField(String),
    /// XEP-0059 `<index/>`: not supported.
    #[error("paging by index is not supported; use <after/> or <before/>")]
    Index,
}

impl QueryError {
    pub fn condition(&self) -> StanzaErrorCondition {
        match self {
            QueryError::Unreadable(_)
            | QueryError::NotOneValue(_)
            | QueryError::FormType
            | QueryError::Stamp { .. } => StanzaErrorCondition::BadRequest,
            QueryError::With(_) => StanzaErrorCondition::JidMalformed,
            QueryError::Node | QueryError::UnknownField(_) | QueryError::Index => {
                StanzaErrorCondition::FeatureNotImplemented
            }
        }
    }
}

impl From<QueryError> for Refusal {
    fn from(e: QueryError) -> Refusal {
        Refusal::new(e.condition(), e.to_string())
    }
}

/// Reads a client's `<query xmlns='urn:xmpp:mam:2'/>` (of an IQ set, XEP-0313 4).
pub fn read_query(payload: Element, options: &QueryOptions) -> Result<ClientQuery, QueryError> {
    let q = parsers::Query::try_from(payload).map_err(|e| QueryError::Unreadable(e.to_string()))?;
    Ok(ClientQuery {
        query: storage_query(&q, options)?,
        queryid: q.queryid.map(|id| id.0),
        flip_page: q.flip_page,
    })
}

/// The storage query for a client's query: its form's filters and its XEP-0059 paging.
pub fn storage_query(q: &parsers::Query, options: &QueryOptions) -> Result<Query, QueryError> {
    if q.node.is_some() {
        return Err(QueryError::Node);
    }
    let mut out = Query::default();
    for f in q.form.iter().flat_map(|form| &form.fields) {
        let var = f.var.as_deref().unwrap_or("");
        let one = || match f.values.as_slice() {
            [v] => Ok(v.as_str()),
            _ => Err(QueryError::NotOneValue(var.to_owned())),
        };
        match var {
            "FORM_TYPE" if one()? != NS_MAM => return Err(QueryError::FormType),
            "FORM_TYPE" => {}
            "with" => {
                let jid = Jid::new(one()?).map_err(|e| QueryError::With(e.to_string()))?;
                out.with = Some(jid.to_string());
            }
            "start" | "end" => {
                let v = one()?;
                let t = DateTime::parse_from_rfc3339(v.trim())
                    .ok()
                    .and_then(|d| u64::try_from(d.timestamp_micros()).ok())
                    .ok_or_else(|| QueryError::Stamp {
                        field: var.to_owned(),
                        value: v.to_owned(),
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
            other => return Err(QueryError::UnknownField(other.to_owned())),
        }
    }
    let mut paging = Paging {
        max: options.page_size.min(MAX_PAGE),
        max_bytes: options.max_bytes,
        ..Paging::default()
    };
    if let Some(set) = &q.set {
        if set.index.is_some() {
            return Err(QueryError::Index);
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

/// The fields [`read_query`] understands: the answer to a form request (XEP-0313
/// 4.1.5), `ids` open to any value as XEP-0122 asks.
pub fn form() -> DataForm {
    let mut ids = Field::new("ids", FieldType::ListMulti);
    ids.validate = Some(Validate {
        datatype: Some(Datatype::String),
        method: Some(Method::Open),
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

/// The `<query/>` answering a form request.
pub fn form_query() -> parsers::Query {
    parsers::Query {
        queryid: None,
        node: None,
        form: Some(form()),
        set: None,
        flip_page: false,
    }
}

/// One result message: `item`, archived by `from`, forwarded to `to` (the querying
/// session).
pub fn result_message(from: &str, to: &str, queryid: Option<&str>, item: &Item) -> Bytes {
    let queryid = queryid
        .map(|q| format!(" queryid='{}'", escape(q)))
        .unwrap_or_default();
    let stamp = chrono::DateTime::from_timestamp_micros(item.time as i64)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let mut out = Vec::with_capacity(item.payload.len() + 300);
    out.extend_from_slice(
        format!(
            "<message from='{}' to='{}'><result xmlns='{NS_MAM}'{queryid} id='{}'>\
             <forwarded xmlns='{NS_FORWARD}'><delay xmlns='{NS_DELAY}' stamp='{stamp}'/>",
            escape(from),
            escape(to),
            escape(&item.id),
        )
        .as_bytes(),
    );
    out.extend_from_slice(&item.payload);
    out.extend_from_slice(b"</forwarded></result></message>");
    Bytes::from(out)
}

/// The `<fin/>` closing a page.
pub fn fin(page: &Page) -> Fin {
    let set = match (page.items.first(), page.items.last()) {
        (Some(first), Some(last)) => SetResult {
            first: Some(First {
                index: page.first_index,
                item: first.id.clone(),
            }),
            last: Some(last.id.clone()),
            count: Some(page.count),
        },
        _ => SetResult {
            first: None,
            last: None,
            count: Some(page.count),
        },
    };
    Fin {
        complete: page.complete,
        set,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: QueryOptions = QueryOptions {
        page_size: 50,
        max_bytes: Some(1000),
    };

    fn read(xml: &str) -> Result<ClientQuery, QueryError> {
        read_query(xml.parse().unwrap(), &OPTIONS)
    }

    /// A query with a submitted form holding `fields` (field elements).
    fn with_form(fields: &str) -> Result<Query, QueryError> {
        read(&format!(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
             {fields}</x></query>"
        ))
        .map(|q| q.query)
    }

    fn field(var: &str, value: &str) -> Result<Query, QueryError> {
        with_form(&format!(
            "<field var='{var}'><value>{value}</value></field>"
        ))
    }

    /// A query with an RSM `<set/>` holding `set`.
    fn with_set(set: &str) -> Result<Paging, QueryError> {
        read(&format!(
            "<query xmlns='urn:xmpp:mam:2'>\
             <set xmlns='http://jabber.org/protocol/rsm'>{set}</set></query>"
        ))
        .map(|q| q.query.paging)
    }

    #[test]
    fn an_empty_query_is_the_first_page_of_everything() {
        let q = read("<query xmlns='urn:xmpp:mam:2'/>").unwrap();
        assert_eq!(q.queryid, None);
        assert!(!q.flip_page);
        assert_eq!(
            q.query,
            Query {
                paging: Paging {
                    max: 50,
                    max_bytes: Some(1000),
                    ..Paging::default()
                },
                ..Query::default()
            }
        );
    }

    #[test]
    fn queryid_and_flip_page_are_kept() {
        let q = read("<query xmlns='urn:xmpp:mam:2' queryid='q1'><flip-page/></query>").unwrap();
        assert_eq!(q.queryid.as_deref(), Some("q1"));
        assert!(q.flip_page);
    }

    #[test]
    fn each_form_field_becomes_a_filter() {
        assert_eq!(
            field("with", "Juliet@Capulet.lit/Balcony")
                .unwrap()
                .with
                .as_deref(),
            Some("juliet@capulet.lit/Balcony")
        );
        assert_eq!(
            field("start", "2010-06-07T00:00:00Z").unwrap().start,
            Some(1_275_868_800_000_000)
        );
        assert_eq!(
            field("end", "2010-06-07T02:00:00.5+02:00").unwrap().end,
            Some(1_275_868_800_500_000)
        );
        assert_eq!(
            field("after-id", "a1").unwrap().after_id.as_deref(),
            Some("a1")
        );
        assert_eq!(
            field("before-id", "b1").unwrap().before_id.as_deref(),
            Some("b1")
        );
        assert_eq!(
            with_form("<field var='ids'><value>i1</value><value>i2</value></field>")
                .unwrap()
                .ids,
            ["i1", "i2"]
        );
        // FORM_TYPE may be left out.
        let q = read(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='after-id'><value>a1</value></field></x></query>",
        )
        .unwrap();
        assert_eq!(q.query.after_id.as_deref(), Some("a1"));
    }

    #[test]
    fn rsm_sets_the_paging() {
        let p = with_set("<max>10</max>").unwrap();
        assert_eq!((p.max, p.max_bytes), (10, Some(1000)));
        // A client's max, and the default, are capped.
        assert_eq!(with_set("<max>100000</max>").unwrap().max, MAX_PAGE);
        let big = QueryOptions {
            page_size: MAX_PAGE + 1,
            max_bytes: None,
        };
        let q = read_query("<query xmlns='urn:xmpp:mam:2'/>".parse().unwrap(), &big).unwrap();
        assert_eq!(
            (q.query.paging.max, q.query.paging.max_bytes),
            (MAX_PAGE, None)
        );
        // Count only.
        assert_eq!(with_set("<max>0</max>").unwrap().max, 0);
        let p = with_set("<after>x</after>").unwrap();
        assert_eq!(
            (p.after.as_deref(), p.before, p.from_end),
            (Some("x"), None, false)
        );
        // An empty <after/> is the start.
        assert_eq!(with_set("<after/>").unwrap().after, None);
        let p = with_set("<before>y</before>").unwrap();
        assert_eq!((p.before.as_deref(), p.from_end), (Some("y"), false));
        // An empty <before/> is the last page.
        let p = with_set("<max>5</max><before/>").unwrap();
        assert_eq!((p.max, p.before, p.from_end), (5, None, true));
    }

    #[test]
    fn each_error_has_its_condition() {
        let cases: Vec<(Result<_, QueryError>, QueryError, StanzaErrorCondition)> = vec![
            (
                read("<query xmlns='urn:xmpp:mam:1'/>").map(|q| q.query),
                QueryError::Unreadable(String::new()),
                StanzaErrorCondition::BadRequest,
            ),
            (
                read("<query xmlns='urn:xmpp:mam:2' node='n'/>").map(|q| q.query),
                QueryError::Node,
                StanzaErrorCondition::FeatureNotImplemented,
            ),
            (
                with_form("<field var='start'><value>1</value><value>2</value></field>"),
                QueryError::NotOneValue("start".into()),
                StanzaErrorCondition::BadRequest,
            ),
            (
                with_form("<field var='with'/>"),
                QueryError::NotOneValue("with".into()),
                StanzaErrorCondition::BadRequest,
            ),
            (
                read(
                    "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
                     <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:1</value></field>\
                     </x></query>",
                )
                .map(|q| q.query),
                QueryError::FormType,
                StanzaErrorCondition::BadRequest,
            ),
            (
                field("with", "@capulet.lit"),
                QueryError::With(String::new()),
                StanzaErrorCondition::JidMalformed,
            ),
            (
                field("start", "yesterday"),
                QueryError::Stamp {
                    field: "start".into(),
                    value: "yesterday".into(),
                },
                StanzaErrorCondition::BadRequest,
            ),
            (
                field("end", "2010-06-07"),
                QueryError::Stamp {
                    field: "end".into(),
                    value: "2010-06-07".into(),
                },
                StanzaErrorCondition::BadRequest,
            ),
            (
                field("{urn:example}search", "x"),
                QueryError::UnknownField("{urn:example}search".into()),
                StanzaErrorCondition::FeatureNotImplemented,
            ),
            (
                with_set("<index>3</index>").map(|_| Query::default()),
                QueryError::Index,
                StanzaErrorCondition::FeatureNotImplemented,
            ),
        ];
        for (got, want, condition) in cases {
            let e = got.unwrap_err();
            // Parser complaints are not ours to spell.
            match (&e, &want) {
                (QueryError::Unreadable(_), QueryError::Unreadable(_))
                | (QueryError::With(_), QueryError::With(_)) => {}
                _ => assert_eq!(e, want),
            }
            assert_eq!(e.condition(), condition, "{e}");
            let r = Refusal::from(e.clone());
            assert_eq!((r.condition, r.text), (condition, e.to_string()));
        }
        assert_eq!(
            QueryError::UnknownField("x".into()).to_string(),
            "unknown query field 'x'"
        );
        assert_eq!(
            QueryError::Stamp {
                field: "start".into(),
                value: "y".into()
            }
            .to_string(),
            "'start' is not a XEP-0082 date and time: y"
        );
        assert!(QueryError::Unreadable("e".into())
            .to_string()
            .starts_with("unreadable payload: "));
    }

    #[test]
    fn the_form_names_every_field() {
        let el = Element::from(form_query());
        let form = el.get_child("x", "jabber:x:data").unwrap();
        let vars: Vec<_> = form.children().filter_map(|f| f.attr("var")).collect();
        assert_eq!(
            vars,
            [
                "FORM_TYPE",
                "with",
                "start",
                "end",
                "before-id",
                "after-id",
                "ids"
            ]
        );
        let ids = form
            .children()
            .find(|f| f.attr("var") == Some("ids"))
            .unwrap();
        assert!(ids
            .get_child("validate", "http://jabber.org/protocol/xdata-validate")
            .unwrap()
            .has_child("open", "http://jabber.org/protocol/xdata-validate"));
        // What the form offers, a query may use.
        for var in &vars[1..] {
            let value = if *var == "start" || *var == "end" {
                "2010-06-07T00:00:00Z"
            } else {
                "juliet@capulet.lit"
            };
            field(var, value).unwrap();
        }
    }
}
