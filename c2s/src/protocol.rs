//! The session protocol with sm (docs/protocol.md, "Sessions"): the handle of one
//! session, what sm's packets tell a connection, and how c2s writes its packets.

use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use futures_channel::mpsc;
use tokio::sync::oneshot;

use jrs_stream::children::children;
use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StreamErrorCondition};

pub use jrs_component::session::SessionState;

/// One stanza on its way to the client (from offline storage or not).
pub use jrs_component::session::Queued as Item;

/// What the router side hands a client connection.
pub enum ToClient {
    /// A stanza to write to the client as it is.
    Stanza(Item),
    /// sm ended the session: send this stream error and close.
    End(StreamErrorCondition, String),
    /// sm takes the session over (it was resumed elsewhere, or it answers our
    /// `hibernate`): close the client's stream if still open and `park` the session.
    Collect,
}

/// sm's answer to `start` or `resume`.
pub enum Answer {
    Started,
    Resumed(Resumption),
    /// The stanza error condition of the refusal.
    Refused(String),
}

/// A session sm handed to this connection.
pub struct Resumption {
    /// The session's handle, naming its full JID.
    pub handle: std::sync::Arc<SessionHandle>,
    /// Stanzas the session had received from its client (the `h` to report).
    pub received: u32,
    /// The client's last acknowledged count.
    pub acked: u32,
    /// How many of `items` (the first ones) had been sent to the client.
    pub sent: u32,
    /// What the client had not acknowledged or received, oldest first.
    pub items: Vec<Item>,
}

/// The XEP-0198 counts of a session handed to sm.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub received: u32,
    pub acked: u32,
    /// How many of the queued items were sent (the rest never left c2s).
    pub sent: usize,
}

/// What a client's session is sent (by the router's reader, for sm): futures-channel's
/// unbounded channel, not tokio's. tokio's allocates a block of 32 slots with every
/// channel and keeps it, its state padded to cache lines: 760 bytes per idle session;
/// this one about 100 (an allocation per queued message instead; docs/benchmarks.md,
/// "Channels that cost nothing idle"). Boxed, so that the channel's empty node is a
/// pointer, not a `ToClient`.
pub type ToClientSender = mpsc::UnboundedSender<Box<ToClient>>;
pub type ToClientReceiver = mpsc::UnboundedReceiver<Box<ToClient>>;

pub fn to_client_channel() -> (ToClientSender, ToClientReceiver) {
    mpsc::unbounded()
}

/// One client session as c2s and sm both name it.
pub struct SessionHandle {
    pub sid: String,
    pub jid: String,
    pub bare: String,
    pub to_client: ToClientSender,
    /// Resolved by sm's answer to `start` or `resume`.
    answer: Mutex<Option<oneshot::Sender<Answer>>>,
    /// The sm instance holding the session.
    sm: Mutex<Option<String>>,
    /// What sm would need to rebuild the session, and whether it must.
    kept: Mutex<Kept>,
}

/// What c2s keeps of a session for the day its sm instance loses it.
#[derive(Debug, Default)]
pub struct Kept {
    /// The session as the client made it (from what it sent).
    pub state: SessionState,
    /// Set while sm does not have the session.
    pub lost: Option<Lost>,
}

/// A session whose sm instance went away (or c2s's router link dropped).
#[derive(Debug)]
pub enum Lost {
    /// Waiting for an sm instance: the client's `stanza` packets wait here, in order.
    /// `ending` is set once the client has gone too: what it did not receive, returned
    /// in the `end` that follows the restore and what is held (sm must first have the
    /// session to deliver what its client sent, and to end it).
    Waiting {
        since: Instant,
        held: Vec<Bytes>,
        ending: Option<Vec<Item>>,
    },
    /// `restore` went out at `since`; sm answers `restored` (or `end`).
    Restoring { since: Instant },
}

/// Client stanzas held per session while its sm is away; past it they are refused.
pub const HELD_MAX: usize = 200;

const NS_CARBONS: &str = "urn:xmpp:carbons:2";
const NS_ROSTER: &str = "jabber:iq:roster";
const NS_BLOCKING: &str = "urn:xmpp:blocking";

/// Notes in `state` what a client stanza on its way to sm changes in the session as sm
/// keeps it: broadcast presence (the stamped bytes), directed presence, carbons, and
/// whether it asked for roster or blocklist pushes.
pub fn track(state: &mut SessionState, stanza: &Stanza, stamped: &Bytes) {
    match stanza.name() {
        "presence" => {
            let to = stanza
                .to()
                .and_then(|t| jrs_stream::xml::unescape(t).map(|t| t.into_owned()));
            match (to, stanza.kind()) {
                (None, None) => state.presence = Some(stamped.clone()),
                (None, Some("unavailable")) => {
                    state.presence = None;
                    state.directed.clear();
                }
                (Some(to), None)
                    if !state.directed.contains(&to)
                        && state.directed.len() < jrs_component::session::DIRECTED_MAX =>
                {
                    state.directed.push(to);
                }
                (Some(to), Some("unavailable")) => state.directed.retain(|d| d != &to),
                _ => {}
            }
        }
        "iq" if stanza.to().is_none() => {
            let Some(payload) = children(stanza).into_iter().next() else {
                return;
            };
            match (stanza.kind(), payload.name.as_str(), payload.ns.as_str()) {
                (Some("set"), "enable", NS_CARBONS) => state.carbons = true,
                (Some("set"), "disable", NS_CARBONS) => state.carbons = false,
                (Some("get"), "query", NS_ROSTER) => state.roster = true,
                (Some("get"), "blocklist", NS_BLOCKING) => state.blocklist = true,
                _ => {}
            }
        }
        _ => {}
    }
}

impl SessionHandle {
    pub fn new(
        sid: String,
        jid: String,
        bare: String,
        to_client: ToClientSender,
        answer: oneshot::Sender<Answer>,
    ) -> SessionHandle {
        SessionHandle {
            sid,
            jid,
            bare,
            to_client,
            answer: Mutex::new(Some(answer)),
            sm: Mutex::new(None),
            kept: Mutex::default(),
        }
    }

    /// A session this process no longer has, to tell sm it ended.
    pub fn gone(sid: String, jid: String) -> SessionHandle {
        let bare = jid.split('/').next().unwrap_or("").to_owned();
        SessionHandle {
            sid,
            jid,
            bare,
            to_client: to_client_channel().0,
            answer: Mutex::new(None),
            sm: Mutex::new(None),
            kept: Mutex::default(),
        }
    }

    /// The same session (id, channel) naming its full JID, held by `sm`.
    pub fn with_jid(&self, jid: String, sm: Option<&str>) -> SessionHandle {
        SessionHandle {
            sid: self.sid.clone(),
            jid,
            bare: self.bare.clone(),
            to_client: self.to_client.clone(),
            answer: Mutex::new(None),
            sm: Mutex::new(sm.map(str::to_owned)),
            kept: Mutex::new(Kept {
                state: self.kept().state.clone(),
                lost: None,
            }),
        }
    }

    /// What c2s keeps of the session (locked).
    pub fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().expect("kept lock")
    }

    /// The session's domain (the bare JID's).
    pub fn domain(&self) -> &str {
        self.bare.rsplit_once('@').map_or(&self.bare, |(_, d)| d)
    }

    /// Resolves the pending `start`/`resume`; false when none was pending.
    pub fn answer(&self, answer: Answer) -> bool {
        match self.answer.lock().expect("answer lock").take() {
            Some(tx) => {
                let _ = tx.send(answer);
                true
            }
            None => false,
        }
    }

    /// Whether the session waits for an sm instance to restore it on.
    pub fn sm_away(&self) -> bool {
        matches!(self.kept().lost, Some(Lost::Waiting { .. }))
    }

    /// Whether its client left while it waited: it ends after its restore.
    pub fn ends_after_restore(&self) -> bool {
        matches!(
            self.kept().lost,
            Some(Lost::Waiting {
                ending: Some(_),
                ..
            })
        )
    }

    pub fn sm(&self) -> Option<String> {
        self.sm.lock().expect("sm lock").clone()
    }

    pub fn set_sm(&self, sm: Option<&str>) {
        *self.sm.lock().expect("sm lock") = sm.map(str::to_owned);
    }
}

/// `<session type=KIND to=BARE from=ME jid= sid= attrs..>content</session>`.
pub fn packet(
    me: &str,
    kind: &str,
    handle: &SessionHandle,
    attrs: &[(&str, &str)],
    content: &[u8],
) -> Bytes {
    // In pieces, not `format!`: every stanza a client sends is wrapped so.
    let (bare, me, jid, sid) = (
        escape(&handle.bare),
        escape(me),
        escape(&handle.jid),
        escape(&handle.sid),
    );
    let values: Vec<_> = attrs.iter().map(|(_, v)| escape(v)).collect();
    let mut head: Vec<&str> = vec![
        "<session type='",
        kind,
        "' to='",
        &bare,
        "' from='",
        &me,
        "' jid='",
        &jid,
        "' sid='",
        &sid,
        "'",
    ];
    for ((name, _), value) in attrs.iter().zip(&values) {
        head.extend([" ", name, "='", value, "'"]);
    }
    jrs_stream::xml::element_from_parts(&head, "session", content)
}

/// Stanzas as `<queued/>` elements for `park` and `end`.
pub fn items(items: &[Item]) -> Vec<u8> {
    jrs_component::session::encode(items)
}

/// The `<queued/>` stanzas of an sm packet, in order.
pub fn queued_items(packet: &Stanza) -> Vec<Item> {
    jrs_component::session::decode(packet)
}

/// The stanza a `stanza` packet carries (`offline='1'`: from offline storage).
pub fn stanza_item(packet: &Stanza) -> Item {
    Item {
        bytes: Bytes::copy_from_slice(packet.inner()),
        offline: packet.attr("offline").as_deref() == Some("1"),
    }
}

/// The name of the first element in `content` (a condition inside `<session type='end'>`).
pub fn first_element_name(content: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(content).ok()?;
    let start = text.find('<')? + 1;
    let name: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '/' && *c != '>')
        .collect();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(state: &mut SessionState, xml: &'static str) {
        let stanza = Stanza::parse(Bytes::from_static(xml.as_bytes())).unwrap();
        let stamped = stanza.with_addresses(None, Some("a@b/r"));
        track(state, &stanza, &stamped);
    }

    #[test]
    fn tracks_what_sm_would_lose() {
        let mut s = SessionState::default();
        note(
            &mut s,
            "<iq type='get' id='1'><query xmlns='jabber:iq:roster'/></iq>",
        );
        note(
            &mut s,
            "<iq type='set' id='2'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
        );
        note(
            &mut s,
            "<iq type='get' id='3' to='x@y'><blocklist xmlns='urn:xmpp:blocking'/></iq>",
        );
        note(&mut s, "<presence><show>away</show></presence>");
        note(&mut s, "<presence to='room@muc/me'/>");
        note(&mut s, "<presence to='gw.example'/>");
        note(&mut s, "<presence to='gw.example' type='unavailable'/>");
        note(&mut s, "<presence to='c@d' type='subscribe'/>");
        assert!(s.roster && s.carbons && !s.blocklist);
        assert_eq!(s.directed, ["room@muc/me"]);
        let p = s.presence.clone().unwrap();
        assert!(p.windows(12).any(|w| w == b"from='a@b/r'"), "{p:?}");
        note(
            &mut s,
            "<iq type='set' id='4'><disable xmlns='urn:xmpp:carbons:2'/></iq>",
        );
        note(&mut s, "<presence type='unavailable'/>");
        assert!(!s.carbons && s.presence.is_none() && s.directed.is_empty());
    }
}
