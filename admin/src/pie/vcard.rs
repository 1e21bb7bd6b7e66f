//! A vcard-temp vCard (XEP-0054) made from a user's PEP profile: the `urn:xmpp:vcard4`
//! node (XEP-0292) and the avatar nodes (XEP-0084). Prosody with its default modules
//! (`vcard4`, `vcard_legacy`) keeps a user's vCard only there, so an export from it has
//! no `<vCard xmlns='vcard-temp'/>`; sm serves vcard-temp from its own record, which
//! import fills with this.

use crate::xml::Element;

const NS_VCARD4: &str = "urn:ietf:params:xml:ns:vcard-4.0";
const NS_VCARD_TEMP: &str = "vcard-temp";
const NS_AVATAR_DATA: &str = "urn:xmpp:avatar:data";

fn text_of(e: &Element, child: &str) -> Option<String> {
    e.child(child, NS_VCARD4)
        .map(Element::text)
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// `home` or `work` from `<parameters><type><text>`.
fn kind(e: &Element) -> Option<&'static str> {
    let types = e.child("parameters", NS_VCARD4)?.child("type", NS_VCARD4)?;
    types.elements().find_map(|t| match t.text().trim() {
        "home" => Some("HOME"),
        "work" => Some("WORK"),
        _ => None,
    })
}

fn with_kind(mut e: Element, from: &Element) -> Element {
    if let Some(k) = kind(from) {
        e.push(Element::new(k, NS_VCARD_TEMP));
    }
    e
}

/// The base64 data of the avatar item with this id, if the user has it.
pub type AvatarData<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The vcard-temp form of a vCard4 `<vcard/>` and the avatar (`metadata` payload and
/// the `data` payloads by item id); `None` when nothing is left to put in it.
pub fn from_pep(
    vcard4: Option<&Element>,
    avatar: Option<(&Element, AvatarData)>,
) -> Option<Element> {
    let mut out = Element::new("vCard", NS_VCARD_TEMP);
    if let Some(v) = vcard4 {
        if let Some(fn_) = v.child("fn", NS_VCARD4).and_then(|f| text_of(f, "text")) {
            out = out.text_child("FN", &fn_);
        }
        if let Some(n) = v.child("n", NS_VCARD4) {
            let parts = [
                ("FAMILY", "surname"),
                ("GIVEN", "given"),
                ("MIDDLE", "additional"),
                ("PREFIX", "prefix"),
                ("SUFFIX", "suffix"),
            ];
            let mut name = Element::new("N", NS_VCARD_TEMP);
            for (temp, four) in parts {
                if let Some(t) = text_of(n, four) {
                    name = name.text_child(temp, &t);
                }
            }
            if !name.children.is_empty() {
                out.push(name);
            }
        }
        for field in v.elements() {
            let simple = match field.name.as_str() {
                "nickname" => Some(("NICKNAME", "text")),
                "title" => Some(("TITLE", "text")),
                "role" => Some(("ROLE", "text")),
                "note" => Some(("DESC", "text")),
                "url" => Some(("URL", "uri")),
                "bday" => Some(("BDAY", "date")),
                _ => None,
            };
            if let Some((temp, value)) = simple {
                if let Some(t) = text_of(field, value) {
                    out = out.text_child(temp, &t);
                }
                continue;
            }
            match field.name.as_str() {
                "email" => {
                    if let Some(t) = text_of(field, "text") {
                        let e = Element::new("EMAIL", NS_VCARD_TEMP)
                            .with_child(Element::new("INTERNET", NS_VCARD_TEMP))
                            .text_child("USERID", &t);
                        out.push(with_kind(e, field));
                    }
                }
                "tel" => {
                    if let Some(t) = text_of(field, "uri").or_else(|| text_of(field, "text")) {
                        let number = t.strip_prefix("tel:").unwrap_or(&t).to_owned();
                        let e = Element::new("TEL", NS_VCARD_TEMP).text_child("NUMBER", &number);
                        out.push(with_kind(e, field));
                    }
                }
                "adr" => {
                    let parts = [
                        ("POBOX", "pobox"),
                        ("EXTADD", "ext"),
                        ("STREET", "street"),
                        ("LOCALITY", "locality"),
                        ("REGION", "region"),
                        ("PCODE", "code"),
                        ("CTRY", "country"),
                    ];
                    let mut adr = Element::new("ADR", NS_VCARD_TEMP);
                    for (temp, four) in parts {
                        if let Some(t) = text_of(field, four) {
                            adr = adr.text_child(temp, &t);
                        }
                    }
                    if !adr.children.is_empty() {
                        out.push(with_kind(adr, field));
                    }
                }
                "impp" => {
                    if let Some(jid) = text_of(field, "uri")
                        .as_deref()
                        .and_then(|u| u.strip_prefix("xmpp:"))
                    {
                        out = out.text_child("JABBERID", jid);
                    }
                }
                "org" => {
                    if let Some(t) = text_of(field, "text") {
                        out.push(Element::new("ORG", NS_VCARD_TEMP).text_child("ORGNAME", &t));
                    }
                }
                _ => {}
            }
        }
    }
    if let Some((metadata, data)) = avatar {
        // The first <info/> with its data here (or an URL) makes the PHOTO.
        let photo = metadata
            .elements()
            .filter(|i| i.name == "info")
            .find_map(|info| {
                let mut photo = Element::new("PHOTO", NS_VCARD_TEMP);
                if let Some(t) = info.attr("type") {
                    photo = photo.text_child("TYPE", t);
                }
                if let Some(b64) = info.attr("id").and_then(data) {
                    return Some(photo.text_child("BINVAL", b64.trim()));
                }
                info.attr("url").map(|u| photo.text_child("EXTVAL", u))
            });
        if let Some(p) = photo {
            out.push(p);
        }
    }
    (!out.children.is_empty()).then_some(out)
}

/// The base64 text of an avatar `data` payload.
pub fn avatar_data(payload: &Element) -> Option<String> {
    payload
        .is("data", NS_AVATAR_DATA)
        .then(|| payload.text().trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcard4_and_avatar_become_vcard_temp() {
        let v4 = Element::parse(
            b"<vcard xmlns='urn:ietf:params:xml:ns:vcard-4.0'><fn><text>Alice Liddell</text></fn>\
              <n><surname>Liddell</surname><given>Alice</given><additional/></n>\
              <nickname><text>ally</text></nickname>\
              <email><text>alice@example.com</text><parameters><type><text>work</text></type></parameters></email>\
              <tel><uri>tel:+1 555</uri></tel><impp><uri>xmpp:alice@localhost</uri></impp></vcard>",
            "",
        )
        .unwrap();
        let meta = Element::parse(
            b"<metadata xmlns='urn:xmpp:avatar:metadata'><info id='h1' type='image/png' bytes='3'/></metadata>",
            "",
        )
        .unwrap();
        let data = |id: &str| (id == "h1").then(|| "AAAA".to_owned());
        let v = from_pep(Some(&v4), Some((&meta, &data))).unwrap();
        assert_eq!(
            v.to_xml(),
            "<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN><N><FAMILY>Liddell</FAMILY><GIVEN>Alice</GIVEN></N>\
             <NICKNAME>ally</NICKNAME><EMAIL><INTERNET/><USERID>alice@example.com</USERID><WORK/></EMAIL>\
             <TEL><NUMBER>+1 555</NUMBER></TEL><JABBERID>alice@localhost</JABBERID>\
             <PHOTO><TYPE>image/png</TYPE><BINVAL>AAAA</BINVAL></PHOTO></vCard>"
        );
        assert!(from_pep(None, None).is_none());
    }
}
