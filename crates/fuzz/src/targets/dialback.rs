//! `dialback`: the XEP-0220 elements a remote server sends (`db:result`, `db:verify`),
//! read as s2s reads them (s2s/src/xml.rs: not validated as self-contained stanzas, the
//! `db` prefix being declared on the stream header), the key checked as s2s checks it
//! (s2s/src/dialback.rs), and the mapping of a `jabber:server` stanza to the router's
//! namespace and of its addresses to domains.

use bytes::Bytes;
use jrs_stream::Stanza;

use crate::dialback;
use crate::s2s_xml::{domain_of, to_internal, Dialback};

pub fn run(data: &[u8]) {
    let Ok(s) = Stanza::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    if let Some(Ok(db)) = Dialback::parse(&s) {
        let id = db.id.as_deref().unwrap_or("");
        let _ = dialback::check("secret", &db.to, &db.from, id, &db.key);
        let _ = (db.verify, db.kind);
    }
    for raw in [s.to(), s.from()].into_iter().flatten() {
        let _ = domain_of(raw);
    }
    let _ = to_internal(&s);
}
