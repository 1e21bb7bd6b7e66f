//! What c2s and sm both write in the session protocol (docs/protocol.md, "Sessions"):
//! stanzas queued for a client, carried by `park`, `resumed` and `end` as `<queued/>`
//! elements, offline ones marked.

use bytes::Bytes;

use jrs_stream::children::children;
use jrs_stream::Stanza;

/// A stanza on its way to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub bytes: Bytes,
    /// From offline storage: removed there only once the client has it.
    pub offline: bool,
}

impl Queued {
    pub fn new(bytes: Bytes) -> Queued {
        Queued {
            bytes,
            offline: false,
        }
    }
}

/// `items` as `<queued/>` elements, in order.
pub fn encode(items: &[Queued]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.bytes.len() + 32).sum());
    for i in items {
        out.extend_from_slice(if i.offline {
            b"<queued offline='1'>".as_slice()
        } else {
            b"<queued>".as_slice()
        });
        out.extend_from_slice(&i.bytes);
        out.extend_from_slice(b"</queued>");
    }
    out
}

/// The `<queued/>` stanzas of a session packet, in order.
pub fn decode(packet: &Stanza) -> Vec<Queued> {
    children(packet)
        .into_iter()
        .filter(|c| c.name == "queued")
        .filter_map(|c| {
            // Slices of the packet's bytes: nothing is copied.
            let q = Stanza::parse(packet.bytes().slice(c.span)).ok()?;
            let inner = q.inner();
            let start = inner.iter().position(|b| !b.is_ascii_whitespace())?;
            let end = inner.iter().rposition(|b| !b.is_ascii_whitespace())? + 1;
            Some(Queued {
                bytes: q.bytes().slice_ref(&inner[start..end]),
                offline: q.attr("offline").as_deref() == Some("1"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let list = vec![
            Queued::new(Bytes::from_static(
                b"<message to='a@b'><body>1</body></message>",
            )),
            Queued {
                bytes: Bytes::from_static(b"<message to='a@b'><body>2</body></message>"),
                offline: true,
            },
            Queued::new(Bytes::from_static(b"<presence/>")),
        ];
        let mut xml = b"<session type='park' jid='a@b/r' sid='1'>".to_vec();
        xml.extend(encode(&list));
        xml.extend_from_slice(b"</session>");
        let packet = Stanza::parse(Bytes::from(xml)).unwrap();
        assert_eq!(decode(&packet), list);
    }
}
