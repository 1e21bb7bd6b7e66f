//! Slots and their signed URLs. The XMPP side grants a slot by signing it; the HTTP side
//! checks the signature and needs nothing else but the secret.
//!
//! - GET URL: `BASE/SLOT/TAG/NAME`: SLOT is 128 random bits, TAG a truncated
//!   HMAC-SHA256 over SLOT and NAME, so neither can be guessed or changed.
//! - PUT URL: the GET URL plus `?size=N&type=CT&expires=UNIX&sig=HMAC`, the HMAC over
//!   SLOT, NAME, size, content type and expiry.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the GET tag (128 bits).
const TAG_BYTES: usize = 16;
/// Length of a slot id: 16 random bytes in unpadded base64url.
pub const SLOT_LEN: usize = 22;
/// The longest file name kept (in bytes).
pub const NAME_MAX: usize = 120;

/// What a slot grants, as signed into its PUT URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub id: String,
    pub name: String,
    pub size: u64,
    /// Empty when the request named no type: the PUT may send any, and the file is
    /// served as `application/octet-stream`.
    pub content_type: String,
    /// Unix time after which the PUT URL is refused.
    pub expires: u64,
}

#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub fn new(secret: &[u8]) -> Signer {
        Signer {
            key: secret.to_vec(),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            // Length-prefixed, so no two different part lists sign the same bytes.
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    fn put_parts(slot: &Slot) -> [Vec<u8>; 6] {
        [
            b"put".to_vec(),
            slot.id.as_bytes().to_vec(),
            slot.name.as_bytes().to_vec(),
            slot.size.to_string().into_bytes(),
            slot.content_type.as_bytes().to_vec(),
            slot.expires.to_string().into_bytes(),
        ]
    }

    pub fn get_tag(&self, id: &str, name: &str) -> String {
        let tag = self
            .mac(&[b"get", id.as_bytes(), name.as_bytes()])
            .finalize()
            .into_bytes();
        URL_SAFE_NO_PAD.encode(&tag[..TAG_BYTES])
    }

    pub fn check_get_tag(&self, id: &str, name: &str, tag: &str) -> bool {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(tag) else {
            return false;
        };
        raw.len() == TAG_BYTES
            && self
                .mac(&[b"get", id.as_bytes(), name.as_bytes()])
                .verify_truncated_left(&raw)
                .is_ok()
    }

    pub fn put_sig(&self, slot: &Slot) -> String {
        let parts = Self::put_parts(slot);
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        URL_SAFE_NO_PAD.encode(self.mac(&refs).finalize().into_bytes())
    }

    pub fn check_put_sig(&self, slot: &Slot, sig: &str) -> bool {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        let parts = Self::put_parts(slot);
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        self.mac(&refs).verify_slice(&raw).is_ok()
    }

    /// The path part of the GET URL (and the PUT URL before its query): `/SLOT/TAG/NAME`.
    pub fn path(&self, id: &str, name: &str) -> String {
        format!(
            "/{id}/{}/{}",
            self.get_tag(id, name),
            utf8_percent_encode(name, PATH_SEGMENT)
        )
    }

    /// `(put, get)` URLs of a slot under `base`.
    pub fn urls(&self, base: &str, slot: &Slot) -> (String, String) {
        let get = format!("{base}{}", self.path(&slot.id, &slot.name));
        let put = format!(
            "{get}?size={}&type={}&expires={}&sig={}",
            slot.size,
            utf8_percent_encode(&slot.content_type, NON_ALPHANUMERIC),
            slot.expires,
            self.put_sig(slot)
        );
        (put, get)
    }
}

/// What stays unescaped in a path segment: letters, digits and `-._~`.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A new slot id: 128 random bits.
pub fn new_slot_id() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

/// Whether `s` has the shape of a slot id (so it is safe as a directory name).
pub fn is_slot_id(s: &str) -> bool {
    s.len() == SLOT_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The file name a slot gets: the last path component of what the client sent, with
/// letters, digits, `.`, `-` and `_` kept and anything else made `_`; no leading dots,
/// at most [`NAME_MAX`] bytes (the extension kept), `file` when nothing is left.
pub fn sanitize_name(raw: &str) -> String {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out = String::new();
    for c in last.chars() {
        let c = if c.is_alphanumeric() || matches!(c, '.' | '-' | '_') {
            c
        } else {
            '_'
        };
        // No runs of `_` or `.` ("..", "___").
        if (c == '_' || c == '.') && out.ends_with(c) {
            continue;
        }
        out.push(c);
    }
    let trimmed = out.trim_start_matches(['.', '_']).trim_end_matches('.');
    let mut name = trimmed.to_owned();
    if name.len() > NAME_MAX {
        let ext = match name.rfind('.') {
            Some(i) if name.len() - i <= 16 => name[i..].to_owned(),
            _ => String::new(),
        };
        let mut cut = NAME_MAX - ext.len();
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name.push_str(&ext);
    }
    if name.is_empty() || name.starts_with('.') {
        name.insert_str(0, "file");
    }
    name
}

/// A content type a slot may carry: `type/subtype` with token characters and optional
/// `; param=value` parts, no quotes or control characters; lower-cased.
pub fn normalize_content_type(raw: &str) -> Option<String> {
    let ct = raw.trim().to_ascii_lowercase();
    if ct.is_empty() || ct.len() > 128 {
        return None;
    }
    let (essence, params) = match ct.split_once(';') {
        Some((e, p)) => (e.trim(), Some(p)),
        None => (ct.as_str(), None),
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    let (t, sub) = essence.split_once('/')?;
    if !token(t) || !token(sub) {
        return None;
    }
    if let Some(p) = params {
        for param in p.split(';') {
            let (k, v) = param.trim().split_once('=')?;
            if !token(k.trim()) || !token(v.trim()) {
                return None;
            }
        }
    }
    Some(ct)
}

/// Whether a browser may show the type inline: images, audio, video and plain text.
/// Anything else (HTML, SVG, XML, scripts, PDF, ...) is served as an attachment.
pub fn inline_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    matches!(
        essence,
        "image/png"
            | "image/jpeg"
            | "image/gif"
            | "image/webp"
            | "image/avif"
            | "image/heic"
            | "image/heif"
            | "image/bmp"
            | "text/plain"
    ) || essence.starts_with("audio/")
        || essence.starts_with("video/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> Slot {
        Slot {
            id: new_slot_id(),
            name: "photo.jpg".into(),
            size: 1234,
            content_type: "image/jpeg".into(),
            expires: 2_000_000_000,
        }
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let s = Signer::new(b"a secret of enough length");
        let slot = slot();
        assert!(is_slot_id(&slot.id));
        let sig = s.put_sig(&slot);
        assert!(s.check_put_sig(&slot, &sig));
        for tampered in [
            Slot {
                size: 1235,
                ..slot.clone()
            },
            Slot {
                content_type: "text/html".into(),
                ..slot.clone()
            },
            Slot {
                expires: slot.expires + 1,
                ..slot.clone()
            },
            Slot {
                name: "photo.html".into(),
                ..slot.clone()
            },
            Slot {
                id: new_slot_id(),
                ..slot.clone()
            },
        ] {
            assert!(!s.check_put_sig(&tampered, &sig), "{tampered:?}");
        }
        assert!(!s.check_put_sig(&slot, "garbage!"));
        assert!(!Signer::new(b"another secret, other key").check_put_sig(&slot, &sig));
        let tag = s.get_tag(&slot.id, &slot.name);
        assert!(s.check_get_tag(&slot.id, &slot.name, &tag));
        assert!(!s.check_get_tag(&slot.id, "other.jpg", &tag));
        assert!(!s.check_get_tag(&slot.id, &slot.name, &tag[1..]));
        let (put, get) = s.urls("https://h:5281", &slot);
        assert!(put.starts_with(&get));
        assert!(put.contains("type=image%2Fjpeg"));
        assert_eq!(get, format!("https://h:5281/{}/{tag}/photo.jpg", slot.id));
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(sanitize_name(".."), "file");
        assert_eq!(sanitize_name(""), "file");
        assert_eq!(sanitize_name(".hidden"), "hidden");
        assert_eq!(sanitize_name("my photo (1).jpg"), "my_photo_1_.jpg");
        assert_eq!(sanitize_name("a\u{0}b\nc.txt"), "a_b_c.txt");
        assert_eq!(sanitize_name("фото.jpg"), "фото.jpg");
        assert_eq!(sanitize_name("x%2F..%2Fy"), "x_2F._2Fy");
        let long = format!("{}.jpeg", "é".repeat(100));
        let s = sanitize_name(&long);
        assert!(s.len() <= NAME_MAX && s.ends_with(".jpeg"), "{s}");
        // Percent-encoded in URLs.
        let signer = Signer::new(b"0123456789abcdef");
        assert!(signer
            .path("x", "фото.jpg")
            .ends_with("/%D1%84%D0%BE%D1%82%D0%BE.jpg"));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            normalize_content_type(" Image/JPEG "),
            Some("image/jpeg".into())
        );
        assert_eq!(
            normalize_content_type("text/plain; charset=utf-8"),
            Some("text/plain; charset=utf-8".into())
        );
        assert_eq!(normalize_content_type("text/plain\r\nX: y"), None);
        assert_eq!(normalize_content_type("nonsense"), None);
        assert_eq!(normalize_content_type("a/b; c=\"d\""), None);
        assert!(inline_type("image/png"));
        assert!(inline_type("video/mp4"));
        for active in [
            "text/html",
            "image/svg+xml",
            "application/xml",
            "text/javascript",
            "application/pdf",
            "application/octet-stream",
        ] {
            assert!(!inline_type(active), "{active}");
        }
    }
}
