//! Stream features: what a layer offers, written as `<stream:features/>`, and what a
//! peer offered, read from its `<stream:features/>`.

use jrs_stream::xml::escape;
use jrs_stream::Stanza;

pub const NS_STREAMS: &str = jrs_stream::NS_STREAMS;
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
pub const NS_REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
pub const NS_SM: &str = "urn:xmpp:sm:3";
pub const NS_CSI: &str = "urn:xmpp:csi:0";
pub const NS_DIALBACK_FEATURE: &str = "urn:xmpp:features:dialback";
pub const NS_SASL2: &str = "urn:xmpp:sasl:2";
pub const NS_BIND2: &str = "urn:xmpp:bind:0";
pub const NS_FAST: &str = "urn:xmpp:fast:0";
pub const NS_SASL_CB: &str = "urn:xmpp:sasl-cb:0";

/// One stream feature a layer offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feature {
    /// RFC 6120 5: STARTTLS, possibly required before anything else.
    StartTls { required: bool },
    /// RFC 6120 6: SASL with these mechanisms, in order of preference.
    Mechanisms(Vec<String>),
    /// XEP-0077: in-band registration before authentication.
    Register,
    /// RFC 6120 7: resource binding.
    Bind,
    /// RFC 3921's session establishment, optional (RFC 6121 appendix E).
    Session,
    /// XEP-0198: stream management.
    StreamManagement,
    /// XEP-0352: client state indication.
    ClientStateIndication,
    /// XEP-0220 with XEP-0220's `<errors/>`: dialback, reporting errors.
    Dialback,
    /// XEP-0388 SASL2 with these mechanisms and what may be negotiated inline.
    Sasl2 {
        mechanisms: Vec<String>,
        inline: Sasl2Inline,
    },
    /// XEP-0440: the channel binding types the server can use on this stream.
    SaslChannelBinding(Vec<String>),
    /// XEP-0115 6.3 and XEP-0390 6: the server's own capabilities (the SHA-1 `ver` and
    /// the XEP-0390 hash of its disco#info).
    Caps { ver: String, ecaps2: String },
}

/// What SASL2's `<inline/>` offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sasl2Inline {
    /// XEP-0386 Bind 2, with the features it can enable (their `var`s).
    pub bind2: Option<Vec<String>>,
    /// XEP-0198 resumption inside `<authenticate/>`.
    pub sm: bool,
    /// XEP-0484 FAST mechanisms.
    pub fast: Vec<String>,
}

impl Feature {
    /// Written piece by piece, not with `write!`: every stream header of every login
    /// sends these (the formatting was about 11 000 instructions per `<stream:features/>`).
    fn write(&self, out: &mut String) {
        let mut put = |parts: &[&str]| parts.iter().for_each(|p| out.push_str(p));
        match self {
            Feature::StartTls { required: true } => {
                put(&["<starttls xmlns='", NS_TLS, "'><required/></starttls>"])
            }
            Feature::StartTls { required: false } => put(&["<starttls xmlns='", NS_TLS, "'/>"]),
            Feature::Mechanisms(list) => {
                put(&["<mechanisms xmlns='", NS_SASL, "'>"]);
                for m in list {
                    put(&["<mechanism>", &escape(m), "</mechanism>"]);
                }
                put(&["</mechanisms>"]);
            }
            Feature::Sasl2 { mechanisms, inline } => {
                put(&["<authentication xmlns='", NS_SASL2, "'>"]);
                for m in mechanisms {
                    put(&["<mechanism>", &escape(m), "</mechanism>"]);
                }
                put(&["<inline>"]);
                if let Some(vars) = &inline.bind2 {
                    put(&["<bind xmlns='", NS_BIND2, "'><inline>"]);
                    for v in vars {
                        put(&["<feature var='", &escape(v), "'/>"]);
                    }
                    put(&["</inline></bind>"]);
                }
                if inline.sm {
                    put(&["<sm xmlns='", NS_SM, "'/>"]);
                }
                if !inline.fast.is_empty() {
                    put(&["<fast xmlns='", NS_FAST, "'>"]);
                    for m in &inline.fast {
                        put(&["<mechanism>", &escape(m), "</mechanism>"]);
                    }
                    put(&["</fast>"]);
                }
                put(&["</inline></authentication>"]);
            }
            Feature::SaslChannelBinding(types) => {
                put(&["<sasl-channel-binding xmlns='", NS_SASL_CB, "'>"]);
                for t in types {
                    put(&["<channel-binding type='", &escape(t), "'/>"]);
                }
                put(&["</sasl-channel-binding>"]);
            }
            Feature::Register => put(&["<register xmlns='", NS_REGISTER_FEATURE, "'/>"]),
            Feature::Bind => put(&["<bind xmlns='", NS_BIND, "'/>"]),
            Feature::Session => put(&["<session xmlns='", NS_SESSION, "'><optional/></session>"]),
            Feature::StreamManagement => put(&["<sm xmlns='", NS_SM, "'/>"]),
            Feature::ClientStateIndication => put(&["<csi xmlns='", NS_CSI, "'/>"]),
            Feature::Caps { ver, ecaps2 } => put(&[
                "<c xmlns='",
                crate::caps::NS_CAPS,
                "' hash='sha-1' node='",
                crate::caps::NODE,
                "' ver='",
                &escape(ver),
                "'/><c xmlns='",
                crate::caps::NS_ECAPS2,
                "'><hash xmlns='urn:xmpp:hashes:2' algo='",
                crate::caps::ECAPS2_ALGO,
                "'>",
                &escape(ecaps2),
                "</hash></c>",
            ]),
            Feature::Dialback => put(&[
                "<dialback xmlns='",
                NS_DIALBACK_FEATURE,
                "'><errors/></dialback>",
            ]),
        }
    }
}

/// The `<stream:features/>` element offering `features`, in order.
pub fn features_xml(features: &[Feature]) -> String {
    let mut out = String::with_capacity(512);
    out.push_str("<stream:features>");
    for f in features {
        f.write(&mut out);
    }
    out.push_str("</stream:features>");
    out
}

/// What a peer offered in its `<stream:features/>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offered {
    pub starttls: bool,
    pub starttls_required: bool,
    pub mechanisms: Vec<String>,
    pub dialback: bool,
    pub stream_management: bool,
}

impl Offered {
    /// Reads a peer's `<stream:features/>` (its children are self-contained; the
    /// `stream` prefix was declared on the stream header, so the element is read with
    /// its own namespace supplied). Children that are not understood are ignored, as
    /// RFC 6120 4.3.2 asks; unreadable XML offers nothing.
    pub fn parse(features: &Stanza) -> Offered {
        let mut xml = format!("<features xmlns='{NS_STREAMS}'>");
        xml.push_str(&String::from_utf8_lossy(features.inner()));
        xml.push_str("</features>");
        let Ok(root) = xml.parse::<minidom::Element>() else {
            return Offered::default();
        };
        let mut offered = Offered::default();
        for child in root.children() {
            match (child.name(), child.ns().as_str()) {
                ("starttls", NS_TLS) => {
                    offered.starttls = true;
                    offered.starttls_required = child.has_child("required", NS_TLS);
                }
                ("mechanisms", NS_SASL) => {
                    offered.mechanisms = child
                        .children()
                        .filter(|m| m.is("mechanism", NS_SASL))
                        .map(|m| m.text().trim().to_owned())
                        .collect();
                }
                ("dialback", NS_DIALBACK_FEATURE) => offered.dialback = true,
                ("sm", NS_SM) => offered.stream_management = true,
                _ => {}
            }
        }
        offered
    }

    pub fn mechanism(&self, name: &str) -> bool {
        self.mechanisms.iter().any(|m| m == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn every_feature_written_as_before() {
        let all = [
            Feature::StartTls { required: true },
            Feature::StartTls { required: false },
            Feature::Mechanisms(vec!["SCRAM-SHA-1".into(), "A&B".into()]),
            Feature::Sasl2 {
                mechanisms: vec!["PLAIN".into()],
                inline: Sasl2Inline {
                    bind2: Some(vec!["urn:xmpp:carbons:2".into()]),
                    sm: true,
                    fast: vec!["HT-SHA-256-NONE".into()],
                },
            },
            Feature::SaslChannelBinding(vec!["tls-exporter".into()]),
            Feature::Register,
            Feature::Bind,
            Feature::Session,
            Feature::StreamManagement,
            Feature::ClientStateIndication,
            Feature::Caps {
                ver: "v'1".into(),
                ecaps2: "e=".into(),
            },
            Feature::Dialback,
        ];
        assert_eq!(
            features_xml(&all),
            "<stream:features>\
             <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>\
             <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\
             <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism><mechanism>A&amp;B</mechanism></mechanisms>\
             <authentication xmlns='urn:xmpp:sasl:2'><mechanism>PLAIN</mechanism><inline>\
             <bind xmlns='urn:xmpp:bind:0'><inline><feature var='urn:xmpp:carbons:2'/></inline></bind>\
             <sm xmlns='urn:xmpp:sm:3'/><fast xmlns='urn:xmpp:fast:0'><mechanism>HT-SHA-256-NONE</mechanism></fast>\
             </inline></authentication>\
             <sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'><channel-binding type='tls-exporter'/></sasl-channel-binding>\
             <register xmlns='http://jabber.org/features/iq-register'/>\
             <bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
             <session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>\
             <sm xmlns='urn:xmpp:sm:3'/><csi xmlns='urn:xmpp:csi:0'/>\
             <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='urn:jabberd-rs:caps' ver='v&apos;1'/>\
             <c xmlns='urn:xmpp:caps'><hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>e=</hash></c>\
             <dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>\
             </stream:features>"
        );
    }

    fn stanza(xml: String) -> Stanza {
        Stanza::parse(Bytes::from(xml)).unwrap()
    }

    #[test]
    fn what_is_written_reads_back() {
        let xml = features_xml(&[
            Feature::StartTls { required: true },
            Feature::Mechanisms(vec!["EXTERNAL".into(), "SCRAM-SHA-1".into()]),
            Feature::Dialback,
            Feature::StreamManagement,
        ]);
        let offered = Offered::parse(&stanza(xml));
        assert!(offered.starttls && offered.starttls_required);
        assert!(offered.mechanism("EXTERNAL") && offered.mechanism("SCRAM-SHA-1"));
        assert!(offered.dialback && offered.stream_management);
        let plain = Offered::parse(&stanza(features_xml(&[Feature::StartTls {
            required: false,
        }])));
        assert!(plain.starttls && !plain.starttls_required && !plain.dialback);
    }

    #[test]
    fn names_count_only_in_their_namespace() {
        // A mechanism named in a foreign element is not an offer (the old substring
        // check took it for one).
        let xml = "<stream:features><x xmlns='urn:other'>&gt;EXTERNAL&lt; urn:ietf:params:xml:ns:xmpp-tls</x>\
                   <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms>\
                   </stream:features>";
        let offered = Offered::parse(&stanza(xml.to_owned()));
        assert!(!offered.starttls && !offered.mechanism("EXTERNAL") && offered.mechanism("PLAIN"));
        let broken = Offered::parse(&stanza("<stream:features><a></b></stream:features>".into()));
        assert_eq!(broken, Offered::default());
    }

    #[test]
    fn sasl2_features() {
        let xml = features_xml(&[
            Feature::Sasl2 {
                mechanisms: vec!["SCRAM-SHA-256".into()],
                inline: Sasl2Inline {
                    bind2: Some(vec![NS_SM.into()]),
                    sm: true,
                    fast: vec!["HT-SHA-256-NONE".into()],
                },
            },
            Feature::SaslChannelBinding(vec!["tls-exporter".into()]),
        ]);
        assert_eq!(
            xml,
            "<stream:features><authentication xmlns='urn:xmpp:sasl:2'><mechanism>SCRAM-SHA-256</mechanism>\
             <inline><bind xmlns='urn:xmpp:bind:0'><inline><feature var='urn:xmpp:sm:3'/></inline></bind>\
             <sm xmlns='urn:xmpp:sm:3'/><fast xmlns='urn:xmpp:fast:0'><mechanism>HT-SHA-256-NONE</mechanism></fast>\
             </inline></authentication><sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'>\
             <channel-binding type='tls-exporter'/></sasl-channel-binding></stream:features>"
        );
    }

    #[test]
    fn client_features() {
        let xml = features_xml(&[
            Feature::Bind,
            Feature::Session,
            Feature::StreamManagement,
            Feature::ClientStateIndication,
        ]);
        assert_eq!(
            xml,
            "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
             <session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>\
             <sm xmlns='urn:xmpp:sm:3'/><csi xmlns='urn:xmpp:csi:0'/></stream:features>"
        );
    }
}
