//! IQs as modules see them (RFC 6120 8.2.3): the request (`Iq`), whom it is addressed
//! to (`Scope`), and the answer (`Reply`). `host::iq_routing` finds the module.

use bytes::Bytes;
use jid::Jid;

use jrs_stream::{Stanza, StanzaErrorCondition};

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
