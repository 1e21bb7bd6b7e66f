//! One avatar for old and new clients (XEP-0398): the PEP avatar (XEP-0084) and the
//! vCard photo (XEP-0054, XEP-0153) are kept the same, and sm puts the XEP-0153 hash in
//! the user's presence.
//!
//! - An avatar published to PEP (`urn:xmpp:avatar:metadata` naming an item of
//!   `urn:xmpp:avatar:data`) becomes the vCard's `<PHOTO><TYPE/><BINVAL/></PHOTO>`;
//!   metadata without `<info/>` (the avatar removed) removes the photo. An avatar only
//!   hosted elsewhere (`<info url/>`) is not copied.
//! - A vCard stored with a photo is published to PEP, as data (id: the SHA-1 of the
//!   image, hex) and metadata (`<info id bytes type/>`); one stored without a photo
//!   when PEP has an avatar publishes metadata without `<info/>`.
//! - Every available presence the user sends carries `<x xmlns='vcard-temp:x:update'>
//!   <photo>SHA-1</photo></x>` (replacing any the client put there; `<photo/>` when
//!   there is no avatar), and a change of avatar sends the presence of each available
//!   session again, so vCard-avatar clients see it.
//!
//! The first presence of the user's task reads the vCard (for the hash) and fills a
//! side that is empty from the other (an avatar set before this module ran). What goes
//! wrong in a conversion is logged; the client's write stands.

use std::sync::Arc;

use base64::Engine as _;
use sha1::{Digest, Sha1};
use tracing::{debug, info, warn};

use crate::config::SmConfig;
use crate::host::{
    Change, Declaration, Disco, Flow, Hook, Module, Packet, SessionKey, Stanzas, Stored, User,
};
use crate::modules::pep::{self, store};
use crate::modules::presence;
use crate::modules::vcard::{self, NS_VCARD};
use crate::xml::{Element, Node};

pub const NS_DATA: &str = "urn:xmpp:avatar:data";
pub const NS_METADATA: &str = "urn:xmpp:avatar:metadata";
pub const NS_UPDATE: &str = "vcard-temp:x:update";
pub const NS_CONVERSION: &str = "urn:xmpp:pep-vcard-conversion:0";

/// What this module's writes are marked with ([`Change::by`]).
const ME: &str = "avatars";

pub struct Avatars;

pub fn load_module(config: &SmConfig) -> jrs_config::Result<Arc<dyn Module>> {
    if let Some(n) = config.module_settings("avatars")? {
        n.allow(&[], &[])?;
    }
    Ok(Arc::new(Avatars))
}

/// The XEP-0153 hash of the user's avatar, `""` for none (user state; absent until the
/// vCard was read).
struct Hash(String);

/// An image, as the vCard and PEP carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Image {
    /// Its media type.
    kind: String,
    /// Base64, without line breaks.
    base64: String,
    bytes: usize,
    /// SHA-1 of the image, hex: the XEP-0084 id and the XEP-0153 hash.
    hash: String,
}

impl Image {
    fn new(kind: Option<&str>, text: &str) -> Result<Image, String> {
        let text: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let engine = base64::engine::general_purpose::STANDARD;
        let data = engine
            .decode(&text)
            .or_else(|_| {
                // Some clients leave the padding out.
                let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD;
                unpadded.decode(text.trim_end_matches('='))
            })
            .map_err(|e| format!("not base64: {e}"))?;
        if data.is_empty() {
            return Err("no image".into());
        }
        let hash = Sha1::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let kind = kind
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| sniff(&data).to_owned());
        Ok(Image {
            kind,
            base64: engine.encode(&data),
            bytes: data.len(),
            hash,
        })
    }
}

/// The media type of an image by its first bytes (for a vCard photo without `<TYPE/>`).
fn sniff(data: &[u8]) -> &'static str {
    match data {
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [0xff, 0xd8, 0xff, ..] => "image/jpeg",
        [b'G', b'I', b'F', b'8', ..] => "image/gif",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        _ => "application/octet-stream",
    }
}

/// The photo of a vCard: `None` without one (or one given only by `<EXTVAL/>`).
fn photo(vcard: &Element) -> Option<Result<Image, String>> {
    let photo = vcard.child("PHOTO", NS_VCARD)?;
    let binval = photo.child("BINVAL", NS_VCARD)?.text();
    if binval.trim().is_empty() {
        return None;
    }
    let kind = photo.child("TYPE", NS_VCARD).map(Element::text);
    Some(Image::new(kind.as_deref(), &binval))
}

/// `vcard` with `image` as its photo (`None`: without a photo).
fn with_photo(vcard: &Element, image: Option<&Image>) -> Element {
    let mut v = vcard.clone();
    v.children
        .retain(|n| !matches!(n, Node::Element(e) if e.is("PHOTO", NS_VCARD)));
    if let Some(i) = image {
        let photo = Element::new("PHOTO", NS_VCARD)
            .with_child(Element::new("TYPE", NS_VCARD).with_text(i.kind.clone()))
            .with_child(Element::new("BINVAL", NS_VCARD).with_text(i.base64.clone()));
        v.push(photo);
    }
    v
}

/// An avatar as PEP metadata describes it.
#[derive(Debug, Clone)]
struct Info {
    id: String,
    kind: Option<String>,
    /// Hosted elsewhere (not in the data node).
    url: bool,
}

/// The `<info/>`s of a metadata payload; `None` if it is not one.
fn infos(metadata: &Element) -> Option<Vec<Info>> {
    if !metadata.is("metadata", NS_METADATA) {
        return None;
    }
    Some(
        metadata
            .elements()
            .filter(|e| e.is("info", NS_METADATA))
            .filter_map(|e| {
                Some(Info {
                    id: e.attr("id")?.to_owned(),
                    kind: e.attr("type").map(str::to_owned),
                    url: e.attr("url").is_some(),
                })
            })
            .collect(),
    )
}

/// The `<info/>`s of the last metadata published; `None` when there is none.
async fn pep_avatar(u: &mut User) -> Result<Option<Vec<Info>>, String> {
    let items = store::node_items(u, NS_METADATA)
        .await
        .map_err(|e| e.to_string())?;
    let Some(last) = items.and_then(|i| i.last().cloned()) else {
        return Ok(None);
    };
    let metadata = Element::parse(last.payload.as_bytes(), "").map_err(|e| e.to_string())?;
    Ok(infos(&metadata))
}

/// The image item `id` of the data node holds, if the node is public: anyone may read a
/// vCard, so an avatar the user keeps for contacts (or themselves) stays out of it.
async fn pep_image(u: &mut User, info: &Info) -> Result<Image, String> {
    let access = store::load(u)
        .await
        .map_err(|e| e.to_string())?
        .nodes
        .iter()
        .find(|n| n.name == NS_DATA)
        .map(|n| n.config.access);
    if access != Some(pep::node::Access::Open) {
        return Err(format!(
            "the avatar is not public ({NS_DATA} access model {}): the vCard, which anyone may read, does not get it",
            access.map(|a| a.name()).unwrap_or("none")
        ));
    }
    let items = store::node_items(u, NS_DATA)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let item = items
        .iter()
        .find(|i| i.id == info.id)
        .ok_or_else(|| format!("no item '{}' in {NS_DATA}", info.id))?;
    let data = Element::parse(item.payload.as_bytes(), "").map_err(|e| e.to_string())?;
    if !data.is("data", NS_DATA) {
        return Err(format!(
            "item '{}' of {NS_DATA} is not avatar data",
            info.id
        ));
    }
    Image::new(info.kind.as_deref(), &data.text())
}

/// Publishes `image` to PEP: the data, then the metadata naming it.
async fn publish(u: &mut User, image: &Image) -> Result<(), String> {
    let data = format!("<data xmlns='{NS_DATA}'>{}</data>", image.base64);
    // The vCard it comes from is public: so is the avatar.
    let open = [("pubsub#access_model", "open")];
    pep::publish_item(u, ME, NS_DATA, &image.hash, &data, &open)
        .await
        .map_err(|r| format!("{r:?}"))?;
    let metadata = Element::new("metadata", NS_METADATA).with_child(
        Element::new("info", NS_METADATA)
            .with_attr("id", image.hash.clone())
            .with_attr("bytes", image.bytes.to_string())
            .with_attr("type", image.kind.clone()),
    );
    pep::publish_item(u, ME, NS_METADATA, &image.hash, &metadata.to_xml(), &open)
        .await
        .map_err(|r| format!("{r:?}"))
}

/// Publishes metadata without `<info/>`: no avatar (XEP-0084 4.5).
async fn unpublish(u: &mut User) -> Result<(), String> {
    let metadata = Element::new("metadata", NS_METADATA).to_xml();
    pep::publish_item(u, ME, NS_METADATA, "current", &metadata, &[])
        .await
        .map_err(|r| format!("{r:?}"))
}

/// Stores the vCard with `image` as its photo (`None`: none) unless it has it already;
/// `Ok` with the hash the vCard's photo now has.
async fn to_vcard(u: &mut User, vcard: &Element, image: Option<&Image>) -> Result<String, String> {
    let now = photo(vcard).and_then(Result::ok);
    let hash = image.map(|i| i.hash.clone()).unwrap_or_default();
    if now.as_ref().map(|i| &i.hash) == image.map(|i| &i.hash) {
        return Ok(hash);
    }
    let next = with_photo(vcard, image);
    vcard::set(u, ME, &next)
        .await
        .map_err(|r| format!("{r:?}"))?;
    info!(hash, "vCard photo converted from PEP");
    Ok(hash)
}

/// The `<x/>` of XEP-0153 for `hash` (`""`: no avatar).
fn update(hash: &str) -> String {
    if hash.is_empty() {
        format!("<x xmlns='{NS_UPDATE}'><photo/></x>")
    } else {
        format!("<x xmlns='{NS_UPDATE}'><photo>{hash}</photo></x>")
    }
}

/// The avatar's hash is now `hash`: the sessions' presence carries it, and goes out
/// again if it changed.
async fn set_hash(u: &mut User, hash: String) {
    let old = u.state.get::<Hash>().map(|h| h.0.clone());
    if old.as_deref() == Some(hash.as_str()) {
        return;
    }
    let x = Element::parse(update(&hash).as_bytes(), "").expect("well-formed");
    let mut any = false;
    for s in u.sessions.iter_mut().filter(|s| s.available) {
        if let Some(p) = &mut s.presence {
            p.children
                .retain(|n| !matches!(n, Node::Element(e) if e.is("x", NS_UPDATE)));
            p.push(x.clone());
            any = true;
        }
    }
    u.state.insert(Hash(hash));
    if any {
        presence::resend(u).await;
    }
}

/// The hash for the presence: known, or read from the vCard (then a side without an
/// avatar gets the other's). `None` when storage cannot say now.
async fn current(u: &mut User) -> Option<String> {
    if let Some(h) = u.state.get::<Hash>() {
        return Some(h.0.clone());
    }
    let vcard = match vcard::get(u).await {
        Ok(v) => v,
        Err(r) => {
            debug!("avatar hash unknown, the vCard is unreadable: {r:?}");
            return None;
        }
    };
    let hash = fill_missing(u, &vcard).await;
    u.state.insert(Hash(hash.clone()));
    Some(hash)
}

/// Fills the side (vCard or PEP) without an avatar from the other; the vCard's hash.
async fn fill_missing(u: &mut User, vcard: &Element) -> String {
    let pep = pep_avatar(u).await;
    match photo(vcard) {
        Some(Ok(image)) => {
            if let Ok(None) = pep {
                match publish(u, &image).await {
                    Ok(()) => info!(hash = image.hash, "vCard photo converted to PEP"),
                    Err(e) => warn!("vCard photo not converted to PEP: {e}"),
                }
            }
            image.hash
        }
        Some(Err(e)) => {
            debug!("vCard photo unreadable: {e}");
            String::new()
        }
        None => {
            let Ok(Some(infos)) = pep else {
                return String::new();
            };
            let Some(info) = infos.iter().find(|i| !i.url) else {
                return String::new();
            };
            let image = match pep_image(u, info).await {
                Ok(i) => i,
                Err(e) => {
                    debug!("PEP avatar not converted to the vCard: {e}");
                    return String::new();
                }
            };
            to_vcard(u, vcard, Some(&image)).await.unwrap_or_else(|e| {
                warn!("PEP avatar not converted to the vCard: {e}");
                String::new()
            })
        }
    }
}

/// Metadata was published to PEP: the vCard follows.
async fn from_metadata(u: &mut User, payload: &str) {
    let Some(infos) = Element::parse(payload.as_bytes(), "")
        .ok()
        .and_then(|m| infos(&m))
    else {
        debug!("unreadable avatar metadata: not converted");
        return;
    };
    let image = if infos.is_empty() {
        None
    } else {
        let Some(info) = infos.iter().find(|i| !i.url) else {
            debug!("the avatar is hosted elsewhere: the vCard keeps its photo");
            return;
        };
        match pep_image(u, info).await {
            Ok(i) => Some(i),
            Err(e) => {
                warn!("PEP avatar not converted to the vCard: {e}");
                return;
            }
        }
    };
    let vcard = match vcard::get(u).await {
        Ok(v) => v,
        Err(r) => {
            warn!("PEP avatar not converted, the vCard is unreadable: {r:?}");
            return;
        }
    };
    match to_vcard(u, &vcard, image.as_ref()).await {
        Ok(hash) => set_hash(u, hash).await,
        Err(e) => warn!("PEP avatar not converted to the vCard: {e}"),
    }
}

/// A vCard was stored: PEP follows.
async fn from_vcard(u: &mut User, xml: &str) {
    let Ok(vcard) = Element::parse(xml.as_bytes(), "") else {
        return;
    };
    let pep = match pep_avatar(u).await {
        Ok(p) => p,
        Err(e) => {
            warn!("vCard photo not converted, the PEP avatar is unreadable: {e}");
            return;
        }
    };
    match photo(&vcard) {
        Some(Ok(image)) => {
            let there = pep
                .as_ref()
                .is_some_and(|infos| infos.iter().any(|i| i.id == image.hash));
            if !there {
                match publish(u, &image).await {
                    Ok(()) => info!(hash = image.hash, "vCard photo converted to PEP"),
                    Err(e) => warn!("vCard photo not converted to PEP: {e}"),
                }
            }
            set_hash(u, image.hash).await;
        }
        Some(Err(e)) => warn!("vCard photo unreadable, not converted: {e}"),
        None => {
            if pep.as_ref().is_some_and(|infos| !infos.is_empty()) {
                match unpublish(u).await {
                    Ok(()) => info!("vCard photo removed: PEP avatar removed"),
                    Err(e) => warn!("vCard photo removal not converted to PEP: {e}"),
                }
            }
            set_hash(u, String::new()).await;
        }
    }
}

#[async_trait::async_trait]
impl Module for Avatars {
    fn name(&self) -> &'static str {
        "avatars"
    }

    fn declare(&self) -> Declaration {
        Declaration::default()
            .requires("pep")
            .requires("vcard")
            .requires("presence")
            // Before presence (100) broadcasts it and keeps it.
            .stanzas(Hook::Outbound, Stanzas::Presence, 300)
            .hook(Hook::Stored, 0)
            .feature(Disco::Account, NS_CONVERSION)
    }

    /// Available presence carries the hash.
    async fn outbound(&self, u: &mut User, _from: SessionKey, p: &mut Packet) -> Flow {
        if p.kind().is_some() {
            return Flow::Pass;
        }
        if let Some(hash) = current(u).await {
            p.remove_children(|_, c| c.name == "x" && c.ns == NS_UPDATE);
            p.push_child(&update(&hash));
        }
        Flow::Pass
    }

    async fn stored(&self, u: &mut User, change: &Change<'_>) {
        if change.by == Some(ME) {
            return;
        }
        match change.what {
            Stored::PepPublished {
                node: NS_METADATA,
                payload,
                ..
            } => from_metadata(u, payload).await,
            Stored::VCard { xml } => from_vcard(u, xml).await,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::caps::Cache;
    use crate::modules::testing::*;

    const CAPS: &str =
        "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='av='/>";
    /// Not a real picture: what matters is the bytes.
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\nnot really a picture";

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    fn sha1(data: &[u8]) -> String {
        Sha1::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// alice with two sessions (the phone wants avatar metadata events) and bob
    /// subscribed to her presence.
    async fn alice() -> User {
        let ctx = ctx(None, "");
        let cache = ctx.shared.get::<Cache>().unwrap();
        cache.insert("av=", vec![format!("{NS_METADATA}+notify")]);
        ctx.store
            .set(
                "alice@localhost",
                "jabber:iq:roster",
                "<query xmlns='jabber:iq:roster' ver='1'><item jid='bob@localhost' subscription='both'/></query>",
            )
            .await
            .unwrap();
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        send(&mut u, "phone", &format!("<presence>{CAPS}</presence>")).await;
        online(&mut u, "laptop", 0).await;
        take(&mut u);
        u
    }

    /// A publish with open access (as Conversations publishes avatars): only a public
    /// avatar goes to the vCard.
    fn publish(node: &str, id: &str, payload: &str) -> String {
        format!("<iq type='set' id='p'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item id='{id}'>{payload}</item></publish><publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='pubsub#access_model'><value>open</value></field></x></publish-options></pubsub></iq>")
    }

    async fn vcard(u: &mut User) -> String {
        send(
            u,
            "laptop",
            "<iq type='get' id='v'><vCard xmlns='vcard-temp'/></iq>",
        )
        .await;
        let out = take(u);
        to(&out, "laptop", &["id='v'", "type='result'"])[0].to_owned()
    }

    #[tokio::test]
    async fn an_avatar_published_in_pep_becomes_the_vcard_photo_and_the_presence_hash() {
        let mut u = alice().await;
        send(
            &mut u,
            "laptop",
            "<iq type='set' id='n'><vCard xmlns='vcard-temp'><FN>Alice</FN></vCard></iq>",
        )
        .await;
        take(&mut u);
        let hash = sha1(PNG);
        send(
            &mut u,
            "phone",
            &publish(
                NS_DATA,
                &hash,
                &format!("<data xmlns='{NS_DATA}'>{}</data>", b64(PNG)),
            ),
        )
        .await;
        let meta = format!("<metadata xmlns='{NS_METADATA}'><info id='{hash}' bytes='{}' type='image/png'/></metadata>", PNG.len());
        send(&mut u, "phone", &publish(NS_METADATA, &hash, &meta)).await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='p'", "type='result'"]).len(),
            2,
            "{out:?}"
        );
        // The presence of both sessions goes out again with the hash: to bob and to
        // alice's own resources.
        let update = format!("<x xmlns='vcard-temp:x:update'><photo>{hash}</photo></x>");
        assert_eq!(
            to(&out, "", &["to='bob@localhost'", &update]).len(),
            2,
            "{out:?}"
        );
        assert_eq!(
            to(&out, "laptop", &["<presence", &update]).len(),
            2,
            "{out:?}"
        );
        let v = vcard(&mut u).await;
        assert!(
            v.contains("<FN>Alice</FN>")
                && v.contains(&format!(
                    "<PHOTO><TYPE>image/png</TYPE><BINVAL>{}</BINVAL></PHOTO>",
                    b64(PNG)
                )),
            "{v}"
        );
        // Later presence carries it, whatever the client put there.
        send(&mut u, "laptop", "<presence><show>away</show><x xmlns='vcard-temp:x:update'><photo>0123</photo></x></presence>").await;
        let out = take(&mut u);
        let sent = to(&out, "", &["to='bob@localhost'", "<show>away</show>"]);
        assert!(
            sent.len() == 1 && sent[0].contains(&update) && !sent[0].contains("0123"),
            "{out:?}"
        );

        // The avatar removed (metadata without <info/>): the photo goes, the hash is empty.
        send(
            &mut u,
            "phone",
            &publish(
                NS_METADATA,
                "current",
                &format!("<metadata xmlns='{NS_METADATA}'/>"),
            ),
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "", &["to='bob@localhost'", "<photo/>"]).len(),
            2,
            "{out:?}"
        );
        let v = vcard(&mut u).await;
        assert!(v.contains("<FN>Alice</FN>") && !v.contains("PHOTO"), "{v}");
    }

    #[tokio::test]
    async fn an_avatar_for_contacts_only_stays_out_of_the_public_vcard() {
        let mut u = alice().await;
        let hash = sha1(PNG);
        let data = format!("<data xmlns='{NS_DATA}'>{}</data>", b64(PNG));
        let private = |node: &str, payload: &str| {
            format!("<iq type='set' id='p'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item id='{hash}'>{payload}</item></publish></pubsub></iq>")
        };
        send(&mut u, "phone", &private(NS_DATA, &data)).await;
        let meta = format!("<metadata xmlns='{NS_METADATA}'><info id='{hash}' bytes='{}' type='image/png'/></metadata>", PNG.len());
        send(&mut u, "phone", &private(NS_METADATA, &meta)).await;
        take(&mut u);
        assert!(!vcard(&mut u).await.contains("BINVAL"));
    }

    #[tokio::test]
    async fn a_vcard_photo_is_published_to_pep() {
        let mut u = alice().await;
        // Base64 in lines, as vCard clients write it; no TYPE.
        let lines = b64(PNG);
        let (a, b) = lines.split_at(10);
        send(&mut u, "laptop", &format!("<iq type='set' id='s'><vCard xmlns='vcard-temp'><FN>Alice</FN><PHOTO><BINVAL>{a}\n{b}</BINVAL></PHOTO></vCard></iq>")).await;
        let out = take(&mut u);
        let hash = sha1(PNG);
        assert_eq!(
            to(&out, "laptop", &["id='s'", "type='result'"]).len(),
            1,
            "{out:?}"
        );
        // The phone wants metadata events: it gets the new avatar's.
        let event = to(&out, "phone", &["pubsub#event", NS_METADATA]);
        assert_eq!(event.len(), 1, "{out:?}");
        assert!(
            event[0].contains(&format!(
                "<info id='{hash}' bytes='{}' type='image/png'/>",
                PNG.len()
            )),
            "{event:?}"
        );
        assert_eq!(
            to(
                &out,
                "",
                &["to='bob@localhost'", &format!("<photo>{hash}</photo>")]
            )
            .len(),
            2,
            "{out:?}"
        );
        send(&mut u, "phone", &format!("<iq type='get' id='d'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='{NS_DATA}'/></pubsub></iq>")).await;
        let out = take(&mut u);
        let data = to(&out, "phone", &["id='d'", "type='result'"]);
        assert!(
            data[0].contains(&format!(
                "<item id='{hash}'><data xmlns='{NS_DATA}'>{}</data>",
                b64(PNG)
            )),
            "{data:?}"
        );

        // The same vCard again publishes nothing new.
        send(&mut u, "laptop", &format!("<iq type='set' id='s'><vCard xmlns='vcard-temp'><FN>Alice</FN><PHOTO><BINVAL>{}</BINVAL></PHOTO></vCard></iq>", b64(PNG))).await;
        let out = take(&mut u);
        assert!(to(&out, "phone", &["pubsub#event"]).is_empty(), "{out:?}");
        assert!(to(&out, "", &["<presence"]).is_empty(), "{out:?}");

        // A vCard without a photo removes the PEP avatar.
        send(
            &mut u,
            "laptop",
            "<iq type='set' id='s'><vCard xmlns='vcard-temp'><FN>Alice</FN></vCard></iq>",
        )
        .await;
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "phone",
                &[
                    "pubsub#event",
                    &format!("<metadata xmlns='{NS_METADATA}'/>")
                ]
            )
            .len(),
            1,
            "{out:?}"
        );
        assert_eq!(
            to(&out, "", &["to='bob@localhost'", "<photo/>"]).len(),
            2,
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn presence_says_there_is_no_avatar_and_an_old_vcard_photo_reaches_pep() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        let out = take(&mut u);
        assert_eq!(
            to(
                &out,
                "phone",
                &["<presence", "<x xmlns='vcard-temp:x:update'><photo/></x>"]
            )
            .len(),
            1,
            "{out:?}"
        );

        // A photo set before this module ran is in PEP after the next login.
        ctx.store
            .set("carol@localhost", "vcard-temp", format!("<vCard xmlns='vcard-temp'><PHOTO><TYPE>image/png</TYPE><BINVAL>{}</BINVAL></PHOTO></vCard>", b64(PNG)))
            .await
            .unwrap();
        let mut c = user(&ctx, "carol@localhost");
        online(&mut c, "phone", 0).await;
        let out = take(&mut c);
        assert_eq!(
            to(
                &out,
                "phone",
                &["<presence", &format!("<photo>{}</photo>", sha1(PNG))]
            )
            .len(),
            1,
            "{out:?}"
        );
        send(&mut c, "phone", &format!("<iq type='get' id='m'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='{NS_METADATA}'/></pubsub></iq>")).await;
        let out = take(&mut c);
        assert!(
            to(
                &out,
                "phone",
                &["id='m'", &format!("<info id='{}'", sha1(PNG))]
            )
            .len()
                == 1,
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn the_account_advertises_the_conversion() {
        let ctx = ctx(None, "");
        let mut u = user(&ctx, "alice@localhost");
        online(&mut u, "phone", 0).await;
        take(&mut u);
        send(&mut u, "phone", "<iq type='get' id='d' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
        let out = take(&mut u);
        assert_eq!(
            to(&out, "phone", &["id='d'", NS_CONVERSION]).len(),
            1,
            "{out:?}"
        );
    }
}
