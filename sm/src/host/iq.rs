//! IQs (RFC 6120 8.2.3): which module answers a get or set, by its type, whom it is
//! addressed to and its payload element; every get/set gets an answer, and what no
//! module answers is `service-unavailable` (RFC 6120 8.4).

use bytes::Bytes;
use jid::Jid;
use tracing::debug;

use jrs_stream::{Stanza, StanzaErrorCondition};

use crate::host::kernel::User;
use crate::host::packet::Packet;
use crate::host::session::SessionKey;
use crate::xml::{Element, NS_CLIENT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IqKind {
    Get,
    Set,
}

/// Whom an IQ is addressed to, as the IQ table keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The server: `to` is a domain sm serves (from anyone). From the user's own
    /// session an IQ without `to` reaches these when no `Own` route takes it.
    Server,
    /// The user's own account, from one of the user's sessions: no `to` (RFC 6120
    /// 10.3.3), or `to` the user's bare JID.
    Own,
    /// A user's bare JID, from anyone else.
    Contact,
}

/// An IQ get or set for a module.
#[derive(Debug)]
pub struct Iq {
    pub stanza: Stanza,
    pub kind: IqKind,
    pub scope: Scope,
    /// The user's session that sent it; `None` when it came from the network.
    pub session: Option<SessionKey>,
    pub from: Option<Jid>,
    /// The one payload element.
    pub payload: minidom::Element,
}

impl Iq {
    pub fn is_get(&self) -> bool {
        self.kind == IqKind::Get
    }

    /// The payload as an `xmpp-parsers` type; `bad-request` naming the problem if it
    /// is not one.
    pub fn parse<T>(&self) -> Result<T, Reply>
    where
        T: TryFrom<minidom::Element>,
        T::Error: std::fmt::Display,
    {
        T::try_from(self.payload.clone()).map_err(|e| {
            Reply::error(
                StanzaErrorCondition::BadRequest,
                format!("unreadable payload: {e}"),
            )
        })
    }

    /// The payload as sm's own tree (for payloads stored as they are: vCards, private
    /// XML).
    pub fn element(&self) -> Result<Element, Reply> {
        let iq = crate::stanzas::parse(&self.stanza).map_err(|e| {
            Reply::error(StanzaErrorCondition::BadRequest, format!("unreadable: {e}"))
        })?;
        let payload = iq.elements().next().cloned();
        payload.ok_or_else(|| Reply::error(StanzaErrorCondition::BadRequest, "no payload"))
    }
}

/// The answer of an IQ handler.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// A result with this payload (self-contained XML), or none.
    Result(Option<String>),
    /// An error; `extra` is an application-specific condition element.
    Error {
        condition: StanzaErrorCondition,
        text: String,
        extra: Option<String>,
    },
    /// The handler answered (or must not answer) itself.
    Done,
}

impl Reply {
    pub fn empty() -> Reply {
        Reply::Result(None)
    }

    /// A result carrying one of sm's own trees.
    pub fn with(payload: Element) -> Reply {
        Reply::Result(Some(payload.to_xml()))
    }

    /// A result carrying an `xmpp-parsers` payload.
    pub fn typed(payload: impl Into<minidom::Element>) -> Reply {
        Reply::Result(Some(String::from(&payload.into())))
    }

    pub fn error(condition: StanzaErrorCondition, text: impl Into<String>) -> Reply {
        Reply::Error {
            condition,
            text: text.into(),
            extra: None,
        }
    }

    /// What nobody handles: `service-unavailable` (RFC 6120 8.4).
    pub fn not_handled() -> Reply {
        Reply::error(StanzaErrorCondition::ServiceUnavailable, "")
    }

    /// The answer to `request` (an IQ get or set), `None` for [`Reply::Done`].
    pub fn into_bytes(self, request: &Stanza) -> Option<Bytes> {
        match self {
            Reply::Done => None,
            Reply::Error {
                condition,
                text,
                extra,
            } => match extra {
                Some(x) => request.error_reply_with(condition, &text, &x),
                None => request.error_reply(condition, &text),
            },
            Reply::Result(payload) => {
                let mut iq = Element::new("iq", NS_CLIENT).with_attr("type", "result");
                if let Some(id) = request.attr("id") {
                    iq.set_attr("id", id);
                }
                if let Some(from) = request.attr("from") {
                    iq.set_attr("to", from);
                }
                if let Some(to) = request.attr("to") {
                    iq.set_attr("from", to);
                }
                let mut s = String::new();
                iq.write_in(&mut s, NS_CLIENT);
                let Some(payload) = payload else {
                    return Some(Bytes::from(s));
                };
                // `<iq .../>` becomes `<iq ...>PAYLOAD</iq>`.
                s.truncate(s.len() - 2);
                s.push('>');
                s.push_str(&payload);
                s.push_str("</iq>");
                Some(Bytes::from(s))
            }
        }
    }
}

/// The answer for a failed storage operation: `resource-constraint` when a size or count
/// limit refused it, else `internal-server-error` (type `wait`: try again later).
pub fn storage_error(e: &jrs_xdb::XdbError) -> Reply {
    match e {
        jrs_xdb::XdbError::Refused(r)
            if r.condition == StanzaErrorCondition::ResourceConstraint =>
        {
            Reply::error(StanzaErrorCondition::ResourceConstraint, r.text.clone())
        }
        _ => Reply::error(
            StanzaErrorCondition::InternalServerError,
            format!("storage is not available right now ({e}); try again"),
        ),
    }
}

/// The payload of a get or set, as the IQ table looks it up; `Err` is the error answer.
fn read(stanza: &Stanza) -> Result<minidom::Element, Reply> {
    let kind = stanza.kind().unwrap_or("");
    if !matches!(kind, "get" | "set") {
        return Err(Reply::error(
            StanzaErrorCondition::BadRequest,
            "type must be get, set, result or error",
        ));
    }
    let iq =
        minidom::Element::from_reader_with_prefixes(stanza.as_slice(), Some(NS_CLIENT.to_owned()))
            .map_err(|e| {
                Reply::error(StanzaErrorCondition::BadRequest, format!("unreadable: {e}"))
            })?;
    let mut children = iq.children();
    match (children.next(), children.next()) {
        (Some(p), None) => Ok(p.clone()),
        _ => Err(Reply::error(
            StanzaErrorCondition::BadRequest,
            "an IQ get or set carries exactly one payload element",
        )),
    }
}

/// Finds the module for an IQ get/set and runs it. `scopes` are tried in order.
pub async fn answer(
    u: &mut User,
    p: &Packet,
    scopes: &[Scope],
    session: Option<SessionKey>,
) -> Reply {
    let payload = match read(p.stanza()) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let kind = if p.kind() == Some("get") {
        IqKind::Get
    } else {
        IqKind::Set
    };
    let ns = payload.ns();
    let ctx = u.ctx.clone();
    for scope in scopes {
        if let Some(m) = ctx.modules.iq_handler(kind, *scope, &ns, payload.name()) {
            let iq = Iq {
                stanza: p.stanza().clone(),
                kind,
                scope: *scope,
                session,
                from: p.from.clone(),
                payload,
            };
            debug!(module = m.name(), ns = %ns, "IQ");
            return m.iq(u, &iq).await;
        }
    }
    Reply::not_handled()
}

/// An IQ from the user's session `key` (after the outbound chain passed it).
pub async fn from_client(u: &mut User, key: SessionKey, p: Packet) {
    let own_domain =
        |j: &Jid| j.node().is_none() && j.resource().is_none() && j.domain() == u.jid.domain();
    let scopes: &[Scope] = match &p.to {
        None => &[Scope::Own, Scope::Server],
        Some(j) if u.is_self(j) => &[Scope::Own],
        Some(j) if own_domain(j) => &[Scope::Server],
        Some(j) => {
            let to = j.clone();
            u.route(&to, p.bytes().clone());
            return;
        }
    };
    if matches!(p.kind(), Some("result" | "error")) {
        // Answers to roster pushes and the like: nothing more to do.
        debug!(
            kind = p.kind().unwrap_or(""),
            "client answer to sm consumed"
        );
        return;
    }
    let reply = answer(u, &p, scopes, Some(key)).await;
    if let Some(bytes) = reply.into_bytes(p.stanza()) {
        u.deliver(key, bytes);
    }
}

/// An IQ from the network to the user (after the inbound chain passed it).
pub async fn inbound(u: &mut User, p: Packet) {
    let kind = p.kind().unwrap_or("");
    let Some(to) = p.to.clone() else { return };
    if let Ok(full) = to.try_as_full() {
        match u.find_resource(full) {
            Some(key) => u.deliver(key, p.for_client()),
            None if matches!(kind, "get" | "set") => {
                u.refuse(p.stanza(), StanzaErrorCondition::ServiceUnavailable, "")
            }
            None => debug!(kind, "IQ answer for a resource that is gone"),
        }
        return;
    }
    if !matches!(kind, "get" | "set") {
        // RFC 6121 8.5.2.1.3: results and errors to the bare JID are not delivered.
        debug!(kind, "IQ answer to the bare JID ignored");
        return;
    }
    let reply = answer(u, &p, &[Scope::Contact], None).await;
    if let Some(bytes) = reply.into_bytes(p.stanza()) {
        u.send(bytes);
    }
}
