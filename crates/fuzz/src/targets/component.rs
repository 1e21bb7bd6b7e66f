//! `component`: the elements of the component protocol (docs/protocol.md) that carry
//! structure inside a packet, read from any bytes (crates/component): the recipients
//! and stanza of a `<fanout>`, the `<queued/>` stanzas of a session packet, a `<log/>`
//! record.

use bytes::Bytes;
use jrs_component::log_record::LogRecord;
use jrs_component::{fanout, session};
use jrs_stream::Stanza;

pub fn run(data: &[u8]) {
    let Ok(s) = Stanza::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = fanout::has_other_attributes(&s);
    if let Ok(f) = fanout::parse(s.inner()) {
        let mut out = bytes::BytesMut::new();
        for r in &f.recipients {
            fanout::address(&f.stanza, r.to, &mut out);
        }
    }
    for q in session::decode(&s) {
        let _ = (q.bytes, q.offline);
    }
    if let Some(record) = LogRecord::parse(&s) {
        let _ = (record.line(), record.to_xml());
    }
}
