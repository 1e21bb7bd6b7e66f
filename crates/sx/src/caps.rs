//! Entity capabilities (XEP-0115): the hash of a disco#info result that an entity puts
//! in its presence (clients) or stream features (the server), so that others learn what
//! it supports with one query per distinct hash instead of one per entity.

use std::str::FromStr;

use xmpp_parsers::caps::hash_caps;
use xmpp_parsers::disco::DiscoInfoResult;
use xmpp_parsers::hashes::Algo;

pub const NS_CAPS: &str = "http://jabber.org/protocol/caps";
/// XEP-0390, entity capabilities 2.0.
pub const NS_ECAPS2: &str = "urn:xmpp:caps";
/// The XEP-0300 hash algorithm of the server's own XEP-0390 capabilities.
pub const ECAPS2_ALGO: &str = "sha-256";

/// The node of this server's own capabilities (`NODE#VER` is answered by sm's disco).
pub const NODE: &str = "urn:jabberd-rs:caps";

/// The string XEP-0115 5.1 hashes. Written here rather than taken from xmpp-parsers'
/// `compute_disco`, which sorts each item together with its `<` terminator: a feature
/// that is a prefix of another (`...#muc` and `...#muc#user`, `...shim` and
/// `...shim#SubID`) then sorts after it, and real clients' hashes do not verify.
pub fn verification_string(info: &DiscoInfoResult) -> Vec<u8> {
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut s = String::new();
    let identities = info
        .identities
        .iter()
        .map(|i| {
            format!(
                "{}/{}/{}/{}",
                i.category,
                i.type_,
                i.lang.as_deref().unwrap_or(""),
                i.name.as_deref().unwrap_or("")
            )
        })
        .collect();
    for i in sorted(identities) {
        s.push_str(&i);
        s.push('<');
    }
    for f in sorted(info.features.iter().cloned().collect()) {
        s.push_str(&f);
        s.push('<');
    }
    let mut forms: Vec<(String, String)> = vec![];
    for form in &info.extensions {
        let Some(form_type) = form.form_type() else {
            continue;
        };
        let mut text = format!("{form_type}<");
        let mut fields: Vec<_> = form
            .fields
            .iter()
            .filter(|f| f.var.as_deref() != Some("FORM_TYPE"))
            .collect();
        fields.sort_by(|a, b| a.var.cmp(&b.var));
        for f in fields {
            text.push_str(f.var.as_deref().unwrap_or(""));
            text.push('<');
            for v in sorted(f.values.clone()) {
                text.push_str(&v);
                text.push('<');
            }
        }
        forms.push((form_type.to_owned(), text));
    }
    forms.sort();
    for (_, text) in forms {
        s.push_str(&text);
    }
    s.into_bytes()
}

/// XEP-0115 5.4: a disco#info that is not hashed unambiguously (a `<` inside a value,
/// which the verification string uses as its separator; an identity, feature or form
/// listed twice) is never accepted, or one client could make its answer stand for
/// another client's hash.
fn unambiguous(info: &DiscoInfoResult) -> bool {
    use std::collections::HashSet;
    let clean = |s: &str| !s.contains('<');
    let mut identities = HashSet::new();
    for i in &info.identities {
        let parts = [
            i.category.as_str(),
            i.type_.as_str(),
            i.lang.as_deref().unwrap_or(""),
            i.name.as_deref().unwrap_or(""),
        ];
        if !parts.iter().all(|p| clean(p)) || !identities.insert(parts) {
            return false;
        }
    }
    // The features are a set already; their text is checked.
    if !info.features.iter().all(|f| clean(f)) {
        return false;
    }
    let mut forms = HashSet::new();
    for form in &info.extensions {
        let Some(form_type) = form.form_type() else {
            continue;
        };
        if !forms.insert(form_type) {
            return false;
        }
        let mut vars = HashSet::new();
        for f in &form.fields {
            let var = f.var.as_deref().unwrap_or("");
            if !clean(var) || !vars.insert(var) || !f.values.iter().all(|v| clean(v)) {
                return false;
            }
        }
    }
    true
}

/// The `ver` of `info` hashed with `hash` (a XEP-0300 name: `sha-1`, `sha-256`, ...);
/// `None` for an algorithm not known.
pub fn ver(info: &DiscoInfoResult, hash: &str) -> Option<String> {
    if !unambiguous(info) {
        return None;
    }
    let algo = Algo::from_str(hash).ok()?;
    let digest = hash_caps(&verification_string(info), algo).ok()?;
    Some(digest.to_base64())
}

/// The XEP-0390 hash of `info` with `algo` (`sha-256`, ...; SHA-1 is refused), base64.
pub fn ecaps2(info: &DiscoInfoResult, algo: &str) -> Option<String> {
    use xmpp_parsers::ecaps2::{compute_disco, hash_ecaps2};
    if !unambiguous(info) {
        return None;
    }
    let algo = Algo::from_str(algo).ok()?;
    let digest = hash_ecaps2(&compute_disco(info).ok()?, algo).ok()?;
    Some(digest.to_base64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(xml: &str) -> DiscoInfoResult {
        let el: minidom::Element = xml.parse().unwrap();
        DiscoInfoResult::try_from(el).unwrap()
    }

    #[test]
    fn the_xep_0115_simple_example_verifies() {
        // XEP-0115 5.2.
        let i = info("<query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' name='Exodus 0.9.1' type='pc'/><feature var='http://jabber.org/protocol/caps'/><feature var='http://jabber.org/protocol/disco#info'/><feature var='http://jabber.org/protocol/disco#items'/><feature var='http://jabber.org/protocol/muc'/></query>");
        assert_eq!(ver(&i, "sha-1").unwrap(), "QgayPKawpkPSDYmwT/WM94uAlu0=");
    }

    #[test]
    fn the_xep_0115_complex_example_verifies() {
        // XEP-0115 5.3: languages and names, a form.
        let i = info("<query xmlns='http://jabber.org/protocol/disco#info'><identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/><identity xml:lang='el' category='client' name='Ψ 0.11' type='pc'/><feature var='http://jabber.org/protocol/caps'/><feature var='http://jabber.org/protocol/disco#info'/><feature var='http://jabber.org/protocol/disco#items'/><feature var='http://jabber.org/protocol/muc'/><x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field><field var='ip_version' type='text-multi'><value>ipv4</value><value>ipv6</value></field><field var='os'><value>Mac</value></field><field var='os_version'><value>10.5.1</value></field><field var='software'><value>Psi</value></field><field var='software_version'><value>0.11</value></field></x></query>");
        assert_eq!(ver(&i, "sha-1").unwrap(), "q07IKJEyjvHSyhy//CH0CxmKi8w=");
    }

    #[test]
    fn the_xep_0390_example_verifies() {
        // XEP-0390 4.3 (its simple example).
        let i = info("<query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' name='BombusMod' type='mobile'/><feature var='http://jabber.org/protocol/si'/><feature var='http://jabber.org/protocol/bytestreams'/><feature var='http://jabber.org/protocol/chatstates'/><feature var='http://jabber.org/protocol/disco#info'/><feature var='http://jabber.org/protocol/disco#items'/><feature var='urn:xmpp:ping'/><feature var='jabber:iq:time'/><feature var='jabber:iq:privacy'/><feature var='jabber:iq:version'/><feature var='http://jabber.org/protocol/rosterx'/><feature var='urn:xmpp:time'/><feature var='jabber:x:oob'/><feature var='http://jabber.org/protocol/ibb'/><feature var='http://jabber.org/protocol/si/profile/file-transfer'/><feature var='urn:xmpp:receipts'/><feature var='jabber:iq:roster'/><feature var='jabber:iq:last'/></query>");
        assert_eq!(
            ecaps2(&i, "sha-256").unwrap(),
            "kzBZbkqJ3ADrj7v08reD1qcWUwNGHaidNUgD7nHpiw8="
        );
        assert!(ecaps2(&i, "sha-1").is_none());
    }

    #[test]
    fn a_feature_that_prefixes_another_sorts_first() {
        let i = info("<query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' type='bot'/><feature var='urn:x:shim#SubID'/><feature var='urn:x:shim'/></query>");
        assert_eq!(
            String::from_utf8(verification_string(&i)).unwrap(),
            "client/bot//<urn:x:shim<urn:x:shim#SubID<"
        );
        assert!(ver(&i, "md5").is_none());
    }

    #[test]
    fn an_ambiguous_answer_is_not_hashed() {
        // One feature that reads as two once joined with `<`.
        let forged = info("<query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' type='bot'/><feature var='urn:a&lt;urn:b'/></query>");
        assert!(ver(&forged, "sha-1").is_none());
        let twice = info("<query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' type='bot'/><identity category='client' type='bot'/><feature var='urn:a'/></query>");
        assert!(ver(&twice, "sha-1").is_none());
    }
}
