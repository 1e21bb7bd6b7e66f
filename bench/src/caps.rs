//! Entity capabilities (XEP-0115) of the load generator's clients: a few client
//! "software" profiles, each with its disco#info, the `ver` hash of it (XEP-0115 5.1)
//! and the answer to a server's disco#info query.
//!
//! The verification string is built here from the sorted strings themselves, each then
//! followed by `<`: sorting each string together with its `<` would put a feature after
//! another it is a prefix of (`...#muc#user` before `...#muc`), which is not what
//! XEP-0115 hashes. The profiles include such pairs on purpose, so a server that hashes
//! them the wrong way would not verify them.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha1::{Digest, Sha1};

pub const NS_CAPS: &str = "http://jabber.org/protocol/caps";
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";

/// The PEP nodes every profile asks notifications of (`NODE+notify`).
pub const NOTIFY_NODES: [&str; 5] = [
    "urn:xmpp:avatar:metadata",
    "eu.siacs.conversations.axolotl.devicelist",
    "urn:xmpp:omemo:2:devices",
    "http://jabber.org/protocol/nick",
    "urn:xmpp:bookmarks:1",
];

/// One identity of a disco#info (`category/type/lang/name`).
#[derive(Debug, Clone)]
pub struct Identity {
    pub category: String,
    pub kind: String,
    pub lang: String,
    pub name: String,
}

/// A data form of a disco#info (XEP-0128): its FORM_TYPE and its other fields.
#[derive(Debug, Clone)]
pub struct Form {
    pub form_type: String,
    pub fields: Vec<(String, Vec<String>)>,
}

/// What a client's disco#info says; strings are written as they are (no escaping), so
/// they must not hold `<`, `&` or quotes.
#[derive(Debug, Clone)]
pub struct DiscoInfo {
    pub identities: Vec<Identity>,
    pub features: Vec<String>,
    pub forms: Vec<Form>,
}

impl DiscoInfo {
    /// The XEP-0115 5.1 verification string.
    pub fn verification_string(&self) -> String {
        let mut s = String::new();
        let mut identities: Vec<String> = self
            .identities
            .iter()
            .map(|i| format!("{}/{}/{}/{}", i.category, i.kind, i.lang, i.name))
            .collect();
        identities.sort();
        for i in identities {
            s.push_str(&i);
            s.push('<');
        }
        let mut features = self.features.clone();
        features.sort();
        for f in features {
            s.push_str(&f);
            s.push('<');
        }
        let mut forms = self.forms.clone();
        forms.sort_by(|a, b| a.form_type.cmp(&b.form_type));
        for form in forms {
            s.push_str(&form.form_type);
            s.push('<');
            let mut fields = form.fields.clone();
            fields.sort_by(|a, b| a.0.cmp(&b.0));
            for (var, mut values) in fields {
                s.push_str(&var);
                s.push('<');
                values.sort();
                for v in values {
                    s.push_str(&v);
                    s.push('<');
                }
            }
        }
        s
    }

    /// `ver` for `hash='sha-1'`: base64 of the SHA-1 of the verification string.
    pub fn ver(&self) -> String {
        B64.encode(Sha1::digest(self.verification_string().as_bytes()))
    }

    /// The `<query/>` answering a disco#info query for `node`.
    pub fn query(&self, node: &str) -> String {
        let mut q = format!("<query xmlns='{NS_DISCO_INFO}' node='{node}'>");
        for i in &self.identities {
            q.push_str(&format!(
                "<identity category='{}' type='{}'",
                i.category, i.kind
            ));
            if !i.lang.is_empty() {
                q.push_str(&format!(" xml:lang='{}'", i.lang));
            }
            if !i.name.is_empty() {
                q.push_str(&format!(" name='{}'", i.name));
            }
            q.push_str("/>");
        }
        for f in &self.features {
            q.push_str(&format!("<feature var='{f}'/>"));
        }
        for form in &self.forms {
            q.push_str(&format!(
                "<x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE' type='hidden'><value>{}</value></field>",
                form.form_type
            ));
            for (var, values) in &form.fields {
                q.push_str(&format!("<field var='{var}'>"));
                for v in values {
                    q.push_str(&format!("<value>{v}</value>"));
                }
                q.push_str("</field>");
            }
            q.push_str("</x>");
        }
        q.push_str("</query>");
        q
    }
}

/// A client program: its caps node, disco#info and `ver`.
#[derive(Debug, Clone)]
pub struct Software {
    pub node: String,
    pub info: DiscoInfo,
    pub ver: String,
}

impl Software {
    fn new(node: &str, info: DiscoInfo) -> Software {
        Software {
            node: node.to_owned(),
            ver: info.ver(),
            info,
        }
    }

    /// The `<c/>` of this software's presence.
    pub fn caps_element(&self) -> String {
        format!(
            "<c xmlns='{NS_CAPS}' hash='sha-1' node='{}' ver='{}'/>",
            self.node, self.ver
        )
    }
}

/// `count` distinct client programs (at most 3 are written out; more are variants of
/// them with a version feature of their own), each asking notifications of
/// [`NOTIFY_NODES`].
pub fn softwares(count: usize) -> Vec<Software> {
    let base = |extra: &[&str]| -> Vec<String> {
        let mut f: Vec<String> = vec![
            NS_CAPS.into(),
            NS_DISCO_INFO.into(),
            "http://jabber.org/protocol/disco#items".into(),
            "urn:xmpp:ping".into(),
        ];
        f.extend(NOTIFY_NODES.iter().map(|n| format!("{n}+notify")));
        f.extend(extra.iter().map(|s| (*s).to_owned()));
        f
    };
    let identity = |kind: &str, name: &str| Identity {
        category: "client".into(),
        kind: kind.into(),
        lang: String::new(),
        name: name.into(),
    };
    (0..count)
        .map(|i| {
            let variant = format!("urn:jabberd-rs:bench:variant:{i}");
            match i % 3 {
                // A phone: MUC with its #user (a prefix pair), receipts, carbons.
                0 => Software::new(
                    "https://jabberd-rs.example/bench/phone",
                    DiscoInfo {
                        identities: vec![identity("phone", "Bench Phone 1.0")],
                        features: base(&[
                            "http://jabber.org/protocol/muc",
                            "http://jabber.org/protocol/muc#user",
                            "urn:xmpp:receipts",
                            "urn:xmpp:carbons:2",
                            &variant,
                        ]),
                        forms: vec![],
                    },
                ),
                // A desktop client: the nick node itself next to nick+notify (a prefix
                // pair), version, chat states.
                1 => Software::new(
                    "https://jabberd-rs.example/bench/desktop",
                    DiscoInfo {
                        identities: vec![identity("pc", "Bench Desktop 2.3")],
                        features: base(&[
                            "http://jabber.org/protocol/nick",
                            "jabber:iq:version",
                            "http://jabber.org/protocol/chatstates",
                            "http://jabber.org/protocol/caps#optimize",
                            &variant,
                        ]),
                        forms: vec![],
                    },
                ),
                // A web client with a software-information form (XEP-0232).
                _ => Software::new(
                    "https://jabberd-rs.example/bench/web",
                    DiscoInfo {
                        identities: vec![identity("web", "Bench Web")],
                        features: base(&["urn:xmpp:mam:2", "urn:xmpp:sid:0", &variant]),
                        forms: vec![Form {
                            form_type: "urn:xmpp:dataforms:softwareinfo".into(),
                            fields: vec![
                                ("software".into(), vec!["Bench Web".into()]),
                                ("software_version".into(), vec!["0.9".into()]),
                                ("os".into(), vec!["Linux".into()]),
                                ("ip_version".into(), vec!["ipv6".into(), "ipv4".into()]),
                            ],
                        }],
                    },
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_simple_example_of_xep_0115() {
        // XEP-0115 5.2.
        let info = DiscoInfo {
            identities: vec![Identity {
                category: "client".into(),
                kind: "pc".into(),
                lang: String::new(),
                name: "Exodus 0.9.1".into(),
            }],
            features: features(&[
                "http://jabber.org/protocol/disco#info",
                "http://jabber.org/protocol/disco#items",
                "http://jabber.org/protocol/muc",
                "http://jabber.org/protocol/caps",
            ]),
            forms: vec![],
        };
        assert_eq!(info.ver(), "QgayPKawpkPSDYmwT/WM94uAlu0=");
    }

    #[test]
    fn the_complex_example_of_xep_0115() {
        // XEP-0115 5.3 (the Greek name as it is, UTF-8).
        let identity = |lang: &str, name: &str| Identity {
            category: "client".into(),
            kind: "pc".into(),
            lang: lang.into(),
            name: name.into(),
        };
        let info = DiscoInfo {
            identities: vec![identity("en", "Psi 0.11"), identity("el", "Ψ 0.11")],
            features: features(&[
                "http://jabber.org/protocol/caps",
                "http://jabber.org/protocol/disco#info",
                "http://jabber.org/protocol/disco#items",
                "http://jabber.org/protocol/muc",
            ]),
            forms: vec![Form {
                form_type: "urn:xmpp:dataforms:softwareinfo".into(),
                fields: vec![
                    ("ip_version".into(), vec!["ipv4".into(), "ipv6".into()]),
                    ("os".into(), vec!["Mac".into()]),
                    ("os_version".into(), vec!["10.5.1".into()]),
                    ("software".into(), vec!["Psi".into()]),
                    ("software_version".into(), vec!["0.11".into()]),
                ],
            }],
        };
        assert_eq!(info.ver(), "q07IKJEyjvHSyhy//CH0CxmKi8w=");
    }

    #[test]
    fn a_prefix_sorts_first() {
        let info = DiscoInfo {
            identities: vec![],
            features: features(&["a#b", "a"]),
            forms: vec![],
        };
        assert_eq!(info.verification_string(), "a<a#b<");
    }

    #[test]
    fn profiles_are_distinct_and_want_the_nodes() {
        let s = softwares(3);
        assert_ne!(s[0].ver, s[1].ver);
        assert_ne!(s[1].ver, s[2].ver);
        for sw in &s {
            for n in NOTIFY_NODES {
                assert!(sw.info.features.contains(&format!("{n}+notify")));
            }
        }
    }
}
