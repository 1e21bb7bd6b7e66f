//! XEP-0313 answers built from an archive page, the same for every archive owner (sm's
//! user archives, muc's room archives): one result message per item, and the `<fin/>`.

use bytes::Bytes;
use xmpp_parsers::mam::Fin;
use xmpp_parsers::rsm::{First, SetResult};

use jrs_stream::xml::escape;

use crate::archive::{Item, Page};

pub const NS_MAM: &str = "urn:xmpp:mam:2";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";

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
