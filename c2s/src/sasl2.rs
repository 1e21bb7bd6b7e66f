//! XEP-0388 SASL2 and XEP-0386 Bind 2: reading `<authenticate/>` (with its inline
//! requests: Bind 2, XEP-0198 resumption, XEP-0484 FAST) and writing `<success/>`.
//! The exchange itself runs in `negotiation.rs`; binding and resumption in `session/`.

use jrs_stream::xml::escape;
use jrs_stream::Stanza;
use jrs_sx::features::{NS_BIND2, NS_CSI, NS_SASL, NS_SASL2, NS_SM};

/// XEP-0280 message carbons, which Bind 2 may enable inline.
pub const NS_CARBONS: &str = "urn:xmpp:carbons:2";
use sha2::{Digest, Sha256};

use crate::fast::NS_FAST;

/// SASL2 `<user-agent/>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserAgent {
    pub id: Option<String>,
    pub software: Option<String>,
    pub device: Option<String>,
}

/// XEP-0198 `<enable/>` inside a Bind 2 request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmEnable {
    pub resume: bool,
    pub max: Option<u64>,
}

/// A Bind 2 request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindRequest {
    pub tag: Option<String>,
    pub sm: Option<SmEnable>,
    /// XEP-0352: the session starts inactive.
    pub inactive: bool,
    /// XEP-0280 carbons enabled inline (XEP-0386 4).
    pub carbons: bool,
}

/// FAST `<fast/>`: the client authenticates with a token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastUse {
    pub count: Option<u64>,
    pub invalidate: bool,
}

/// A parsed `<authenticate/>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub mechanism: String,
    /// The initial response; `None` when it was not valid base64.
    pub initial: Option<Vec<u8>>,
    pub user_agent: UserAgent,
    pub bind: Option<BindRequest>,
    /// XEP-0198 `<resume previd h/>`.
    pub resume: Option<(String, u32)>,
    pub request_token: Option<String>,
    pub fast: Option<FastUse>,
}

/// Reads `<authenticate/>`; `None` when it is not well-formed.
pub fn parse(e: &Stanza) -> Option<Request> {
    let xml = format!(
        "<authenticate xmlns='{NS_SASL2}'>{}</authenticate>",
        std::str::from_utf8(e.inner()).ok()?
    );
    let root: minidom::Element = xml.parse().ok()?;
    let text = |el: &minidom::Element, name: &str, ns: &str| {
        el.get_child(name, ns).map(|c| c.text().trim().to_owned())
    };
    let truthy = |v: Option<&str>| matches!(v, Some("true" | "1"));
    let mut r = Request {
        mechanism: e.attr("mechanism").unwrap_or_default().to_string(),
        initial: Some(vec![]),
        ..Request::default()
    };
    if let Some(i) = text(&root, "initial-response", NS_SASL2) {
        r.initial = crate::sasl::decode_payload(&i);
    }
    if let Some(ua) = root.get_child("user-agent", NS_SASL2) {
        r.user_agent = UserAgent {
            id: ua.attr("id").filter(|i| !i.is_empty()).map(str::to_owned),
            software: text(ua, "software", NS_SASL2),
            device: text(ua, "device", NS_SASL2),
        };
    }
    if let Some(b) = root.get_child("bind", NS_BIND2) {
        let mut bind = BindRequest {
            tag: text(b, "tag", NS_BIND2).filter(|t| !t.is_empty()),
            ..BindRequest::default()
        };
        if let Some(en) = b.get_child("enable", NS_SM) {
            bind.sm = Some(SmEnable {
                resume: truthy(en.attr("resume")),
                max: en.attr("max").and_then(|m| m.parse().ok()),
            });
        }
        bind.inactive = b.has_child("inactive", NS_CSI);
        bind.carbons = b.has_child("enable", NS_CARBONS);
        r.bind = Some(bind);
    }
    if let Some(res) = root.get_child("resume", NS_SM) {
        let previd = res.attr("previd").unwrap_or_default().to_owned();
        let h = res.attr("h").and_then(|h| h.parse().ok());
        // A malformed one is answered as a failed resumption.
        r.resume = Some((previd, h.unwrap_or(u32::MAX)));
    }
    if let Some(t) = root.get_child("request-token", NS_FAST) {
        r.request_token = Some(t.attr("mechanism").unwrap_or_default().to_owned());
    }
    if let Some(f) = root.get_child("fast", NS_FAST) {
        r.fast = Some(FastUse {
            count: f.attr("count").and_then(|c| c.parse().ok()),
            invalidate: truthy(f.attr("invalidate")),
        });
    }
    Some(r)
}

/// The resource Bind 2 makes: the client's tag, '/', and an identifier stable per user
/// agent (XEP-0386 3.2.1), which never shows the user agent's id itself.
pub fn resource(bare: &str, tag: Option<&str>, user_agent: Option<&str>) -> String {
    use base64::Engine;
    let id = match user_agent {
        Some(ua) => {
            let h = Sha256::digest(format!("{bare}\0{ua}").as_bytes());
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&h[..6])
        }
        None => {
            use rand::Rng;
            format!("{:012x}", rand::rng().random::<u64>() >> 16)
        }
    };
    match tag {
        Some(t) => format!("{t}/{id}"),
        None => id,
    }
}

/// A SASL2 `<failure/>` with a RFC 6120 6.5 condition.
pub fn failure(condition: &str, text: Option<&str>) -> String {
    let text = text
        .map(|t| format!("<text>{}</text>", escape(t)))
        .unwrap_or_default();
    format!("<failure xmlns='{NS_SASL2}'><{condition} xmlns='{NS_SASL}'/>{text}</failure>")
}

/// A Bind 2 request as negotiation settled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind2 {
    pub full: String,
    pub sm: Option<SmEnable>,
    pub inactive: bool,
    pub carbons: bool,
}

/// A SASL2 authentication that succeeded: what `<success/>` carries and what follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub bare: String,
    /// The mechanism's additional data (SCRAM's server-final, HT's responder).
    pub additional: Vec<u8>,
    /// XEP-0484 `<token/>`, when one was issued.
    pub token: Option<String>,
    /// XEP-0198 resumption asked inline: `(previd, h)`.
    pub resume: Option<(String, u32)>,
    pub bind: Option<Bind2>,
    /// The stream features after `<success/>` (XEP-0388 4.6.1: no restart), for a
    /// stream not bound yet, and for one bound (or resumed) inline.
    pub features_unbound: String,
    pub features_bound: String,
}

impl Done {
    /// `<success/>` for `authzid` with `inner` (`<bound/>`, `<resumed/>`, `<failed/>`)
    /// and then the stream features.
    pub fn success(&self, authzid: &str, inner: &str, bound: bool) -> String {
        let additional = if self.additional.is_empty() {
            String::new()
        } else {
            format!(
                "<additional-data>{}</additional-data>",
                crate::sasl::encode_payload(&self.additional)
            )
        };
        format!(
            "<success xmlns='{NS_SASL2}'>{additional}<authorization-identifier>{}</authorization-identifier>{inner}{}</success>{}",
            escape(authzid),
            self.token.as_deref().unwrap_or_default(),
            if bound { &self.features_bound } else { &self.features_unbound }
        )
    }

    /// `<bound/>` with what was enabled inline.
    pub fn bound(enabled: &str) -> String {
        format!("<bound xmlns='{NS_BIND2}'>{enabled}</bound>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn reads_authenticate_with_inline_requests() {
        let xml = "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='HT-SHA-256-NONE'>\
            <initial-response>YWxpY2UAeA==</initial-response>\
            <user-agent id='ua-1'><software>App</software><device>Phone</device></user-agent>\
            <bind xmlns='urn:xmpp:bind:0'><tag>App</tag><enable xmlns='urn:xmpp:sm:3' resume='true' max='60'/><inactive xmlns='urn:xmpp:csi:0'/></bind>\
            <resume xmlns='urn:xmpp:sm:3' previd='abc' h='3'/>\
            <request-token xmlns='urn:xmpp:fast:0' mechanism='HT-SHA-256-NONE'/>\
            <fast xmlns='urn:xmpp:fast:0' count='2' invalidate='true'/></authenticate>";
        let r = parse(&Stanza::parse(Bytes::from_static(xml.as_bytes())).unwrap()).unwrap();
        assert_eq!(r.mechanism, "HT-SHA-256-NONE");
        assert_eq!(r.initial.as_deref(), Some(b"alice\0x".as_slice()));
        assert_eq!(r.user_agent.id.as_deref(), Some("ua-1"));
        assert_eq!(r.user_agent.device.as_deref(), Some("Phone"));
        let b = r.bind.unwrap();
        assert_eq!(b.tag.as_deref(), Some("App"));
        assert_eq!(
            b.sm,
            Some(SmEnable {
                resume: true,
                max: Some(60)
            })
        );
        assert!(b.inactive);
        assert_eq!(r.resume, Some(("abc".into(), 3)));
        assert_eq!(r.request_token.as_deref(), Some("HT-SHA-256-NONE"));
        assert_eq!(
            r.fast,
            Some(FastUse {
                count: Some(2),
                invalidate: true
            })
        );
    }

    #[test]
    fn resources_are_stable_per_user_agent() {
        let a = resource("alice@example.org", Some("App"), Some("ua-1"));
        assert_eq!(a, resource("alice@example.org", Some("App"), Some("ua-1")));
        assert!(a.starts_with("App/") && !a.contains("ua-1"));
        assert_ne!(a, resource("alice@example.org", Some("App"), Some("ua-2")));
        assert_ne!(resource("a@b", None, None), resource("a@b", None, None));
    }
}
