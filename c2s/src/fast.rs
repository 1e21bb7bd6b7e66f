//! XEP-0484 FAST: tokens issued after a SASL2 login, used with the HT-SHA-256-*
//! mechanisms (draft-schmaus-kitten-sasl-ht) to log in again in one round trip.
//!
//! Tokens are stored in xdb (`urn:jabberd-rs:fast:0`, docs/protocol.md) as the SHA-256
//! of the token only. Tokens are longer than SHA-256's block (64 bytes), and HMAC hashes
//! such keys first (RFC 2104), so HMAC(token, m) = HMAC(SHA-256(token), m): the hash is
//! enough to check a client's proof, and the token itself is never stored.
//! Each user agent (SASL2 `<user-agent id>`) has two slots, 'current' and 'new', as the
//! XEP's implementation notes suggest, so rotation survives a lost `<success/>`.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::Rng;
use sha2::{Digest, Sha256};

use jrs_auth::Credentials;
use jrs_stream::xml::escape;

use crate::scram::{constant_time_eq, hmac, ChannelBinding};

/// The protocol namespace (stream features, elements in `<authenticate>`/`<success>`).
pub const NS_FAST: &str = "urn:xmpp:fast:0";
/// The xdb namespace of a user's tokens.
pub const NS_FAST_STORE: &str = "urn:jabberd-rs:fast:0";

pub const HT_NONE: &str = "HT-SHA-256-NONE";
pub const HT_EXPR: &str = "HT-SHA-256-EXPR";
pub const HT_ENDP: &str = "HT-SHA-256-ENDP";

/// User agents with tokens per user, at most (the one whose tokens expire first goes).
const MAX_CLIENTS: usize = 16;

/// The HT mechanisms usable on a stream: with channel binding first, where the binding
/// exists (EXPR: tls-exporter, TLS 1.3; ENDP: tls-server-end-point).
pub fn mechanisms(cb: &ChannelBinding) -> Vec<String> {
    let mut m = vec![];
    if cb.exporter.is_some() {
        m.push(HT_EXPR.to_owned());
    }
    if cb.endpoint.is_some() {
        m.push(HT_ENDP.to_owned());
    }
    m.push(HT_NONE.to_owned());
    m
}

pub fn is_ht(mechanism: &str) -> bool {
    matches!(mechanism, HT_NONE | HT_EXPR | HT_ENDP)
}

/// The channel binding data an HT mechanism covers.
pub fn cb_data<'a>(mechanism: &str, cb: &'a ChannelBinding) -> Option<&'a [u8]> {
    match mechanism {
        HT_NONE => Some(&[]),
        HT_EXPR => cb.exporter.as_deref(),
        HT_ENDP => cb.endpoint.as_deref(),
        _ => None,
    }
}

/// The HT initial response: `authcid NUL HMAC(token, "Initiator" || cb-data)`.
pub fn parse_initial(data: &[u8]) -> Option<(String, Vec<u8>)> {
    let nul = data.iter().position(|b| *b == 0)?;
    let name = String::from_utf8(data[..nul].to_vec()).ok()?;
    (!name.is_empty()).then(|| (name, data[nul + 1..].to_vec()))
}

/// HMAC-SHA-256 keyed with a token's hash (equal to keying with the token, see above).
fn ht(key_hash: &[u8], label: &[u8], cb: &[u8]) -> Vec<u8> {
    hmac(jrs_auth::ScramHash::Sha256, key_hash, &[label, cb].concat())
}

/// A token's hash, which is all that is stored.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// What changes when the password does: new salts, new keys. A token records the
/// generation it was issued under and is refused under another.
pub fn generation(c: &Credentials) -> String {
    let mut h = Sha256::new();
    for k in &c.scram {
        h.update(&k.salt);
        h.update(&k.stored_key);
    }
    B64.encode(&h.finalize()[..12])
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub hash: Vec<u8>,
    pub mechanism: String,
    /// Unix time.
    pub expiry: i64,
    /// The highest `count` the client sent with it (replay protection).
    pub count: u64,
    pub generation: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Client {
    pub id: String,
    pub current: Option<Token>,
    pub new: Option<Token>,
}

/// A user's stored tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub clients: Vec<Client>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `<not-authorized/>`: no such token (or a replayed count).
    NotAuthorized,
    /// `<credentials-expired/>`: the token expired or the password changed since.
    Expired,
}

/// A token given to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub token: String,
    pub expiry: i64,
}

impl Issued {
    pub fn xml(&self) -> String {
        let expiry = chrono::DateTime::from_timestamp(self.expiry, 0)
            .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default();
        format!(
            "<token xmlns='{NS_FAST}' expiry='{expiry}' token='{}'/>",
            escape(&self.token)
        )
    }
}

impl Record {
    pub fn parse(xml: &[u8]) -> Record {
        let text = String::from_utf8_lossy(xml);
        let Ok(root) = text.trim().parse::<minidom::Element>() else {
            return Record::default();
        };
        let token = |e: &minidom::Element| -> Option<Token> {
            Some(Token {
                hash: B64.decode(e.attr("hash")?).ok()?,
                mechanism: e.attr("mechanism")?.to_owned(),
                expiry: e.attr("expiry")?.parse().ok()?,
                count: e.attr("count").and_then(|c| c.parse().ok()).unwrap_or(0),
                generation: e.attr("credentials").unwrap_or_default().to_owned(),
            })
        };
        let clients = root
            .children()
            .filter(|c| c.name() == "client")
            .filter_map(|c| {
                let mut client = Client {
                    id: c.attr("id")?.to_owned(),
                    ..Client::default()
                };
                for t in c.children().filter(|t| t.name() == "token") {
                    match t.attr("slot") {
                        Some("new") => client.new = token(t),
                        _ => client.current = token(t),
                    }
                }
                Some(client)
            })
            .collect();
        Record { clients }
    }

    pub fn to_xml(&self) -> String {
        let mut s = format!("<fast xmlns='{NS_FAST_STORE}'>");
        for c in &self.clients {
            s.push_str(&format!("<client id='{}'>", escape(&c.id)));
            for (slot, t) in [("current", &c.current), ("new", &c.new)] {
                if let Some(t) = t {
                    s.push_str(&format!(
                        "<token slot='{slot}' hash='{}' mechanism='{}' expiry='{}' count='{}' credentials='{}'/>",
                        B64.encode(&t.hash),
                        escape(&t.mechanism),
                        t.expiry,
                        t.count,
                        escape(&t.generation)
                    ));
                }
            }
            s.push_str("</client>");
        }
        s.push_str("</fast>");
        s
    }

    fn client(&mut self, id: &str) -> Option<&mut Client> {
        self.clients.iter_mut().find(|c| c.id == id)
    }

    /// Checks an HT proof from user agent `id`; on success the token moves to 'current'
    /// (a used 'new' token replaces the older one) and its count is kept.
    #[allow(clippy::too_many_arguments)]
    pub fn authenticate(
        &mut self,
        id: &str,
        mechanism: &str,
        proof: &[u8],
        cb: &[u8],
        count: Option<u64>,
        generation: &str,
        now: i64,
    ) -> Result<Vec<u8>, Refusal> {
        let client = self.client(id).ok_or(Refusal::NotAuthorized)?;
        let matches = |t: &Option<Token>| {
            t.as_ref().is_some_and(|t| {
                t.mechanism == mechanism && constant_time_eq(&ht(&t.hash, b"Initiator", cb), proof)
            })
        };
        let slot = if matches(&client.new) {
            &mut client.new
        } else if matches(&client.current) {
            &mut client.current
        } else {
            return Err(Refusal::NotAuthorized);
        };
        let token = slot.as_mut().expect("matched");
        if token.expiry <= now || token.generation != generation {
            *slot = None;
            return Err(Refusal::Expired);
        }
        if let Some(count) = count {
            if count <= token.count {
                return Err(Refusal::NotAuthorized);
            }
            token.count = count;
        }
        let key = token.hash.clone();
        if client.new.as_ref().is_some_and(|t| t.hash == key) {
            client.current = client.new.take();
        }
        Ok(ht(&key, b"Responder", cb))
    }

    /// After a successful login from user agent `id`: drops its tokens when asked to
    /// (`invalidate`), and issues a new one when requested, or when the token used is
    /// past half its life (rotation, unless invalidated).
    #[allow(clippy::too_many_arguments)]
    pub fn after_login(
        &mut self,
        id: &str,
        used: Option<&str>,
        invalidate: bool,
        request: Option<&str>,
        generation: &str,
        lifetime: i64,
        now: i64,
    ) -> Option<Issued> {
        self.prune(now);
        if invalidate && used.is_some() {
            self.clients.retain(|c| c.id != id);
        }
        let rotate = !invalidate
            && used.is_some()
            && self.client(id).is_some_and(|c| {
                c.new.is_none()
                    && c.current
                        .as_ref()
                        .is_some_and(|t| t.expiry - now < lifetime / 2)
            });
        let mechanism = request.or(if rotate { used } else { None })?;
        let bytes: [u8; 48] = rand::rng().random();
        let mut token = URL_SAFE_NO_PAD.encode(bytes);
        // Longer than SHA-256's block, so that HMAC hashes it (see the module comment).
        token.push_str(&URL_SAFE_NO_PAD.encode(rand::rng().random::<[u8; 12]>()));
        let issued = Issued {
            expiry: now + lifetime,
            token,
        };
        let stored = Token {
            hash: token_hash(&issued.token),
            mechanism: mechanism.to_owned(),
            expiry: issued.expiry,
            count: 0,
            generation: generation.to_owned(),
        };
        match self.client(id) {
            // An unused earlier 'new' token is replaced (XEP-0484 3.5).
            Some(c) => c.new = Some(stored),
            None => {
                if self.clients.len() >= MAX_CLIENTS {
                    let expiry = |c: &Client| {
                        [&c.current, &c.new]
                            .iter()
                            .filter_map(|t| t.as_ref().map(|t| t.expiry))
                            .max()
                    };
                    if let Some(i) =
                        (0..self.clients.len()).min_by_key(|i| expiry(&self.clients[*i]))
                    {
                        self.clients.remove(i);
                    }
                }
                self.clients.push(Client {
                    id: id.to_owned(),
                    current: None,
                    new: Some(stored),
                });
            }
        }
        Some(issued)
    }

    /// Drops expired tokens and clients left without any.
    fn prune(&mut self, now: i64) {
        for c in &mut self.clients {
            for slot in [&mut c.current, &mut c.new] {
                if slot.as_ref().is_some_and(|t| t.expiry <= now) {
                    *slot = None;
                }
            }
        }
        self.clients
            .retain(|c| c.current.is_some() || c.new.is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proof(token: &str, cb: &[u8]) -> Vec<u8> {
        // What a client computes: HMAC keyed with the token itself.
        hmac(
            jrs_auth::ScramHash::Sha256,
            token.as_bytes(),
            &[b"Initiator".as_slice(), cb].concat(),
        )
    }

    #[test]
    fn ht_sha_256_keyed_with_the_hash_equals_keyed_with_the_token() {
        let mut r = Record::default();
        let issued = r
            .after_login("ua", None, false, Some(HT_NONE), "g", 1000, 0)
            .unwrap();
        assert!(issued.token.len() > 64);
        let cb = b"";
        let responder = r
            .authenticate("ua", HT_NONE, &proof(&issued.token, cb), cb, None, "g", 1)
            .unwrap();
        let expected = hmac(
            jrs_auth::ScramHash::Sha256,
            issued.token.as_bytes(),
            b"Responder",
        );
        assert_eq!(responder, expected);
    }

    #[test]
    fn ht_sha_256_vector() {
        // HMAC-SHA-256 as RFC 4231 test case 2 computes it: key "Jefe".
        let mac = hmac(
            jrs_auth::ScramHash::Sha256,
            b"Jefe",
            b"what do ya want for nothing?",
        );
        assert_eq!(
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Initiator over channel binding data: the message is the label then the data.
        let key = "k".repeat(80);
        let with_cb = hmac(
            jrs_auth::ScramHash::Sha256,
            key.as_bytes(),
            b"InitiatorCBDATA",
        );
        assert_eq!(ht(&token_hash(&key), b"Initiator", b"CBDATA"), with_cb);
    }

    #[test]
    fn tokens_rotate_and_are_bound_to_mechanism_and_binding() {
        let mut r = Record::default();
        let t1 = r
            .after_login("ua", None, false, Some(HT_EXPR), "g", 1000, 0)
            .unwrap();
        // Wrong mechanism, wrong binding data, wrong user agent: refused.
        assert_eq!(
            r.authenticate("ua", HT_NONE, &proof(&t1.token, b""), b"", None, "g", 1),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            r.authenticate("ua", HT_EXPR, &proof(&t1.token, b"x"), b"y", None, "g", 1),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            r.authenticate(
                "other",
                HT_EXPR,
                &proof(&t1.token, b"x"),
                b"x",
                None,
                "g",
                1
            ),
            Err(Refusal::NotAuthorized)
        );
        assert!(r
            .authenticate(
                "ua",
                HT_EXPR,
                &proof(&t1.token, b"x"),
                b"x",
                Some(1),
                "g",
                1
            )
            .is_ok());
        // Replayed count.
        assert_eq!(
            r.authenticate(
                "ua",
                HT_EXPR,
                &proof(&t1.token, b"x"),
                b"x",
                Some(1),
                "g",
                2
            ),
            Err(Refusal::NotAuthorized)
        );
        // Past half its life: a new token; the old one stays valid until the new is used.
        let t2 = r
            .after_login("ua", Some(HT_EXPR), false, None, "g", 1000, 600)
            .unwrap();
        assert!(r
            .authenticate("ua", HT_EXPR, &proof(&t1.token, b"x"), b"x", None, "g", 601)
            .is_ok());
        assert!(r
            .authenticate("ua", HT_EXPR, &proof(&t2.token, b"x"), b"x", None, "g", 602)
            .is_ok());
        assert_eq!(
            r.authenticate("ua", HT_EXPR, &proof(&t1.token, b"x"), b"x", None, "g", 603),
            Err(Refusal::NotAuthorized)
        );
        // Round trip through storage.
        assert_eq!(Record::parse(r.to_xml().as_bytes()), r);
    }

    #[test]
    fn expiry_password_change_and_invalidation() {
        let mut r = Record::default();
        let t = r
            .after_login("ua", None, false, Some(HT_NONE), "g1", 100, 0)
            .unwrap();
        assert_eq!(
            r.authenticate("ua", HT_NONE, &proof(&t.token, b""), b"", None, "g2", 1),
            Err(Refusal::Expired)
        );
        let t = r
            .after_login("ua", None, false, Some(HT_NONE), "g1", 100, 0)
            .unwrap();
        assert_eq!(
            r.authenticate("ua", HT_NONE, &proof(&t.token, b""), b"", None, "g1", 100),
            Err(Refusal::Expired)
        );
        let t = r
            .after_login("ua", None, false, Some(HT_NONE), "g1", 100, 200)
            .unwrap();
        assert!(r
            .authenticate("ua", HT_NONE, &proof(&t.token, b""), b"", None, "g1", 201)
            .is_ok());
        assert_eq!(
            r.after_login("ua", Some(HT_NONE), true, None, "g1", 100, 201),
            None
        );
        assert!(r.clients.is_empty());
        assert_eq!(
            r.authenticate("ua", HT_NONE, &proof(&t.token, b""), b"", None, "g1", 202),
            Err(Refusal::NotAuthorized)
        );
        assert!(Issued {
            token: "t".into(),
            expiry: 0
        }
        .xml()
        .contains("expiry='1970-01-01T00:00:00Z'"));
    }
}
