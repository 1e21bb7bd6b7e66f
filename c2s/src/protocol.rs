//! The session protocol with sm (docs/protocol.md, "Sessions"): the handle of one
//! session, what sm's packets tell a connection, and how c2s writes its packets.

use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StreamErrorCondition};

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

/// One client session as c2s and sm both name it.
pub struct SessionHandle {
    pub sid: String,
    pub jid: String,
    pub bare: String,
    /// Boxed: a channel allocates its slots 32 at a time, and an idle client should cost
    /// 32 pointers there.
    pub to_client: mpsc::UnboundedSender<Box<ToClient>>,
    /// Resolved by sm's answer to `start` or `resume`.
    answer: Mutex<Option<oneshot::Sender<Answer>>>,
    /// The sm instance holding the session.
    sm: Mutex<Option<String>>,
}

impl SessionHandle {
    pub fn new(
        sid: String,
        jid: String,
        bare: String,
        to_client: mpsc::UnboundedSender<Box<ToClient>>,
        answer: oneshot::Sender<Answer>,
    ) -> SessionHandle {
        SessionHandle {
            sid,
            jid,
            bare,
            to_client,
            answer: Mutex::new(Some(answer)),
            sm: Mutex::new(None),
        }
    }

    /// A session this process no longer has, to tell sm it ended.
    pub fn gone(sid: String, jid: String) -> SessionHandle {
        let bare = jid.split('/').next().unwrap_or("").to_owned();
        SessionHandle {
            sid,
            jid,
            bare,
            to_client: mpsc::unbounded_channel().0,
            answer: Mutex::new(None),
            sm: Mutex::new(None),
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
        }
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
    let mut head = format!(
        "<session type='{kind}' to='{}' from='{}' jid='{}' sid='{}'",
        escape(&handle.bare),
        escape(me),
        escape(&handle.jid),
        escape(&handle.sid)
    );
    for (name, value) in attrs {
        head.push_str(&format!(" {name}='{}'", escape(value)));
    }
    jrs_stream::xml::element(&head, "session", content)
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
