//! XMPP Ping (XEP-0199): answered for the server and, on their behalf, for accounts.

pub const NS_PING: &str = "urn:xmpp:ping";
