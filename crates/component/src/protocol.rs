//! Names and helpers of the component protocol. See `docs/protocol.md`.

use sha1::{Digest, Sha1};

use jrs_stream::xml::escape;
use jrs_stream::StanzaErrorCondition;

/// Namespace of the router's bind extension.
pub const NS_ROUTER: &str = "urn:jabberd-rs:router:0";
/// Namespace of storage requests and results.
pub const NS_XDB: &str = "urn:jabberd-rs:xdb:0";
/// Namespace of session traffic between c2s and sm.
pub const NS_SESSION: &str = "urn:jabberd-rs:session:0";
/// Namespace of log records.
pub const NS_LOG: &str = "urn:jabberd-rs:log:0";

/// The first level of the router's delivery tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PacketType {
    /// message / presence / iq addressed to an entity.
    Normal,
    /// Traffic between c2s and sm about one client session.
    Session,
    /// Storage requests and results.
    Xdb,
    /// Log records, copied to every bound instance.
    Log,
}

impl PacketType {
    pub const ALL: [PacketType; 4] = [
        PacketType::Normal,
        PacketType::Session,
        PacketType::Xdb,
        PacketType::Log,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PacketType::Normal => "normal",
            PacketType::Session => "session",
            PacketType::Xdb => "xdb",
            PacketType::Log => "log",
        }
    }

    pub fn parse(s: &str) -> Option<PacketType> {
        PacketType::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl std::fmt::Display for PacketType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a top-level element on a component stream is, from its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopLevel {
    Packet(PacketType),
    Bind,
    Unbind,
    /// A component asks for link notices (see `docs/protocol.md`).
    Notices,
    /// A link notice from the router (`<notice event='disconnected' name='..'/>`).
    Notice,
    Handshake,
    /// An acknowledgement on an acknowledged link (`<a h='N'/>`, see [`crate::ack`]).
    Ack,
    StreamError,
    Unknown,
}

impl TopLevel {
    pub fn classify(name: &str) -> TopLevel {
        match name {
            "message" | "presence" | "iq" | "fanout" => TopLevel::Packet(PacketType::Normal),
            "session" => TopLevel::Packet(PacketType::Session),
            "xdb" => TopLevel::Packet(PacketType::Xdb),
            "log" => TopLevel::Packet(PacketType::Log),
            "bind" => TopLevel::Bind,
            "unbind" => TopLevel::Unbind,
            "notices" => TopLevel::Notices,
            "notice" => TopLevel::Notice,
            "handshake" => TopLevel::Handshake,
            "a" => TopLevel::Ack,
            "stream:error" => TopLevel::StreamError,
            _ => TopLevel::Unknown,
        }
    }
}

/// The XEP-0114 handshake value: lowercase hex SHA-1 of stream id followed by the secret.
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    let mut h = Sha1::new();
    h.update(stream_id.as_bytes());
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

/// A bind (or unbind) request: `<bind xmlns=NS id= route= host= shared=/>`.
pub fn bind_request(
    element: &str,
    id: &str,
    route: PacketType,
    host: &str,
    shared: bool,
    fanout: bool,
) -> String {
    format!(
        "<{element} xmlns='{NS_ROUTER}' id='{}' route='{}' host='{}'{}{}/>",
        escape(id),
        route.name(),
        escape(host),
        if shared { " shared='true'" } else { "" },
        if fanout { " fanout='true'" } else { "" }
    )
}

/// The notice the router sends to subscribed links when component `name` disconnects.
pub fn disconnected_notice(name: &str) -> String {
    format!(
        "<notice xmlns='{NS_ROUTER}' event='disconnected' name='{}'/>",
        escape(name)
    )
}

/// The notice the router sends to subscribed links when component `name` binds
/// (`event` `bound`) or unbinds (`unbound`) a route; on subscription it sends one
/// `bound` notice for every route bound at that moment.
pub fn route_notice(event: &str, name: &str, route: PacketType, host: &str) -> String {
    format!(
        "<notice xmlns='{NS_ROUTER}' event='{event}' name='{}' route='{}' host='{}'/>",
        escape(name),
        route.name(),
        escape(host)
    )
}

/// The router's success answer to a bind or unbind.
pub fn bind_result(element: &str, id: &str) -> String {
    format!(
        "<{element} xmlns='{NS_ROUTER}' id='{}' type='result'/>",
        escape(id)
    )
}

/// The router's refusal of a bind or unbind.
pub fn bind_error(element: &str, id: &str, condition: StanzaErrorCondition, text: &str) -> String {
    format!(
        "<{element} xmlns='{NS_ROUTER}' id='{}' type='error'>{}</{element}>",
        escape(id),
        condition.to_xml(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_is_hex_sha1_of_id_and_secret() {
        assert_eq!(
            handshake_digest("3BF96D32", "secret"),
            "b09ea9b3b7f586be8a08d0a3dd7466f110aeb136"
        );
    }
}
