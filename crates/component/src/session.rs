//! What c2s and sm both write in the session protocol (docs/protocol.md, "Sessions"):
//! stanzas queued for a client, carried by `park`, `resumed` and `end` as `<queued/>`
//! elements, offline ones marked; and what a session is (its presence and flags),
//! carried by `restore` and `resumed` ([`SessionState`]).

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

/// Most directed presence targets a session's state carries.
pub const DIRECTED_MAX: usize = 100;

/// What sm keeps in memory about a session that c2s can tell it again: c2s sends it
/// with `restore` (sm lost the session: it restarted, or its router link dropped), sm
/// with `resumed` (so that the c2s now holding the session can restore it later).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    /// The last presence the client broadcast (no `to`), while it is available; `None`
    /// if it never sent initial presence or went unavailable since.
    pub presence: Option<Bytes>,
    /// XEP-0280 carbons enabled.
    pub carbons: bool,
    /// Asked for the roster: gets roster pushes (RFC 6121 2.1.6).
    pub roster: bool,
    /// Asked for the blocklist: gets blocklist pushes (XEP-0191).
    pub blocklist: bool,
    /// XEP-0352: the client said it is inactive.
    pub inactive: bool,
    /// The XEP-0198 resumption token, when the session is resumable.
    pub token: Option<String>,
    /// Entities the session sent directed available presence to, and no unavailable
    /// since (RFC 6121 4.6), at most [`DIRECTED_MAX`].
    pub directed: Vec<String>,
}

impl SessionState {
    /// The state as attributes of a `session` packet (name, unescaped value) and its
    /// content: the presence stanza as it is, then `<directed to='JID'/>` elements.
    pub fn encode(&self) -> (Vec<(&'static str, String)>, Vec<u8>) {
        let mut attrs = vec![];
        let flag = |on: bool| on.then(|| "1".to_owned());
        for (name, value) in [
            ("carbons", flag(self.carbons)),
            ("roster", flag(self.roster)),
            ("blocklist", flag(self.blocklist)),
            ("csi", self.inactive.then(|| "inactive".to_owned())),
            ("token", self.token.clone()),
        ] {
            if let Some(v) = value {
                attrs.push((name, v));
            }
        }
        let mut content = vec![];
        if let Some(p) = &self.presence {
            content.extend_from_slice(p);
        }
        for d in self.directed.iter().take(DIRECTED_MAX) {
            content.extend_from_slice(b"<directed to='");
            content.extend_from_slice(jrs_stream::xml::escape(d).as_bytes());
            content.extend_from_slice(b"'/>");
        }
        (attrs, content)
    }

    /// The state a `restore` or `resumed` packet carries (absent parts: off, none).
    pub fn decode(packet: &Stanza) -> SessionState {
        let on = |name: &str| matches!(packet.attr(name).as_deref(), Some("1" | "true"));
        let mut state = SessionState {
            carbons: on("carbons"),
            roster: on("roster"),
            blocklist: on("blocklist"),
            inactive: packet.attr("csi").as_deref() == Some("inactive"),
            token: packet.attr("token").filter(|t| !t.is_empty()),
            ..SessionState::default()
        };
        for c in children(packet) {
            match c.name.as_str() {
                "presence" if state.presence.is_none() => {
                    state.presence = Some(packet.bytes().slice(c.span));
                }
                "directed" if state.directed.len() < DIRECTED_MAX => {
                    let Ok(d) = Stanza::parse(packet.bytes().slice(c.span)) else {
                        continue;
                    };
                    if let Some(to) = d.attr("to").filter(|t| !t.is_empty()) {
                        state.directed.push(to);
                    }
                }
                _ => {}
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(state: &SessionState) -> Stanza {
        let (attrs, content) = state.encode();
        let mut xml = "<session type='restore' to='a@b' from='c2s' jid='a@b/r' sid='1'".to_owned();
        for (name, value) in attrs {
            xml.push_str(&format!(" {name}='{}'", jrs_stream::xml::escape(&value)));
        }
        let mut xml = xml.into_bytes();
        xml.push(b'>');
        xml.extend(content);
        xml.extend_from_slice(b"</session>");
        Stanza::parse(Bytes::from(xml)).unwrap()
    }

    #[test]
    fn session_state_round_trip() {
        let full = SessionState {
            presence: Some(Bytes::from_static(
                b"<presence from='a@b/r'><show>away</show><priority>5</priority></presence>",
            )),
            carbons: true,
            roster: true,
            blocklist: false,
            inactive: true,
            token: Some("t<'&>".into()),
            directed: vec!["room@muc.b/nick".into(), "o'brien@x".into()],
        };
        assert_eq!(SessionState::decode(&packet(&full)), full);
        let none = SessionState::default();
        let p = packet(&none);
        assert!(p.is_empty_element() || p.inner().is_empty());
        assert_eq!(SessionState::decode(&p), none);
    }

    #[test]
    fn session_state_ignores_what_it_does_not_know() {
        let p = Stanza::parse(Bytes::from_static(
            b"<session type='restore' carbons='yes' token=''><queued><message/></queued>\
              <directed/><presence/><presence type='unavailable'/></session>",
        ))
        .unwrap();
        let s = SessionState::decode(&p);
        assert!(!s.carbons && s.token.is_none() && s.directed.is_empty());
        assert_eq!(s.presence.as_deref(), Some(b"<presence/>".as_slice()));
    }

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
