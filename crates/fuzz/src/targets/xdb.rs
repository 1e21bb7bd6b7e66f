//! `xdb`: storage requests as xdb-file (and xdb-pg) read them from the router
//! (crates/xdb: `Request::parse`, the content of every operation: archive items,
//! queries, retractions, pages, batch failures, retention), the reference query
//! semantics over the items read, and the request written back.
//!
//! `mam`: a client's XEP-0313 query as sm and muc read it (crates/xdb/src/mam.rs): an
//! IQ the edges passed, read into minidom as sm's IQ routing does, the payload turned
//! into a storage query, which must read back the same from its own XML.

use bytes::Bytes;
use jrs_stream::Stanza;
use jrs_xdb::archive::{
    parse_failures, parse_items, parse_owned_items, parse_retraction, select, Page, Query,
    Retention,
};
use jrs_xdb::mam::{fin, read_query, result_message, QueryOptions};
use jrs_xdb::Request;

use crate::support::edge_checked;

pub fn run(data: &[u8]) {
    let Ok(s) = Stanza::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = Retention::from_attrs(|n| s.attr(n)).map(|r| r.attrs());
    let Ok(request) = Request::parse(&s) else {
        return;
    };
    let content = &request.content;
    let items = parse_items(content);
    let _ = parse_owned_items(content);
    let query = Query::parse(content);
    let _ = parse_retraction(content);
    let _ = parse_failures(content);
    if let Ok(page) = Page::parse(content) {
        let _ = page.to_bytes();
    }
    if let (Ok(items), Ok(query)) = (&items, &query) {
        if let Ok(page) = select(items, query) {
            let _ = Page::parse(&page.to_bytes());
            let _ = fin(&page);
        }
    }
    if let Ok(query) = &query {
        assert_eq!(
            Query::parse(query.to_xml().as_bytes()).as_ref(),
            Ok(query),
            "a query does not read back from its XML"
        );
    }
    let _ = request.result(b"<x/>");
    // Written back, a request the edges would pass reads the same.
    if edge_checked(data) {
        let again = request.to_bytes();
        let reread = Stanza::parse(again.clone())
            .ok()
            .and_then(|s| Request::parse(&s).ok());
        assert_eq!(
            reread.as_ref(),
            Some(&request),
            "a request does not read back: {}",
            String::from_utf8_lossy(&again)
        );
    }
}

pub fn mam(data: &[u8]) {
    // sm and muc get stanzas the edges checked.
    if !edge_checked(data) {
        return;
    }
    let Ok(iq) = xmpp_parsers::minidom::Element::from_reader_with_prefixes(
        data.trim_ascii(),
        Some("jabber:client".to_owned()),
    ) else {
        return;
    };
    for payload in iq.children() {
        let options = QueryOptions {
            page_size: 20,
            max_bytes: Some(4096),
        };
        let Ok(q) = read_query(payload.clone(), &options) else {
            continue;
        };
        let xml = q.query.to_xml();
        assert_eq!(
            Query::parse(xml.as_bytes()).as_ref(),
            Ok(&q.query),
            "the storage query does not read back: {xml}"
        );
        let page = Page {
            count: 1,
            first_index: Some(0),
            complete: true,
            items: vec![],
            oldest: None,
            newest: None,
        };
        let _ = fin(&page);
        let item = jrs_xdb::archive::Item {
            id: q.query.after_id.clone().unwrap_or_default(),
            time: q.query.start.unwrap_or(0),
            with: q.query.with.clone().unwrap_or_default(),
            payload: Bytes::from_static(b"<message/>"),
        };
        let _ = result_message("a@b", "a@b/c", q.queryid.as_deref(), &item);
    }
}
