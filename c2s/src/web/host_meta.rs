//! XEP-0156 discovery: the WebSocket and BOSH endpoints in `host-meta` (XRD) and
//! `host-meta.json` (JRD), so web clients find them from the domain alone.

use jrs_stream::xml::escape;

pub const XRD_PATH: &str = "/.well-known/host-meta";
pub const JSON_PATH: &str = "/.well-known/host-meta.json";
const REL_WEBSOCKET: &str = "urn:xmpp:alt-connections:websocket";
const REL_BOSH: &str = "urn:xmpp:alt-connections:xbosh";

/// The WebSocket URL under `base` (`https://host:port` -> `wss://host:port/xmpp-websocket`).
pub fn websocket_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let rest = base
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| base.strip_prefix("http://").map(|r| format!("ws://{r}")))
        .unwrap_or_else(|| base.to_owned());
    format!("{rest}{}", super::WEBSOCKET_PATH)
}

/// The BOSH URL under `base`.
pub fn bosh_url(base: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), super::BOSH_PATH)
}

pub fn xrd(base: &str) -> String {
    format!(
        "<?xml version='1.0' encoding='utf-8'?>\n\
         <XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n  \
         <Link rel='{REL_WEBSOCKET}' href='{}'/>\n  \
         <Link rel='{REL_BOSH}' href='{}'/>\n</XRD>\n",
        escape(&websocket_url(base)),
        escape(&bosh_url(base))
    )
}

pub fn json(base: &str) -> String {
    let links = serde_json::json!({
        "links": [
            {"rel": REL_WEBSOCKET, "href": websocket_url(base)},
            {"rel": REL_BOSH, "href": bosh_url(base)},
        ]
    });
    format!("{links}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_websocket_endpoint() {
        assert_eq!(
            websocket_url("https://x.example:5281/"),
            "wss://x.example:5281/xmpp-websocket"
        );
        assert_eq!(
            websocket_url("http://127.0.0.1:5280"),
            "ws://127.0.0.1:5280/xmpp-websocket"
        );
        assert!(xrd("https://x.example").contains("href='wss://x.example/xmpp-websocket'"));
        let j: serde_json::Value = serde_json::from_str(&json("https://x.example")).unwrap();
        assert_eq!(j["links"][0]["rel"], "urn:xmpp:alt-connections:websocket");
        assert_eq!(j["links"][0]["href"], "wss://x.example/xmpp-websocket");
        assert_eq!(j["links"][1]["href"], "https://x.example/http-bind");
        assert!(xrd("https://x.example")
            .contains("rel='urn:xmpp:alt-connections:xbosh' href='https://x.example/http-bind'"));
    }
}
