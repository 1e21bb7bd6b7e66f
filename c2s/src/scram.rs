//! A SCRAM server (RFC 5802, RFC 7677) for SASL2. Ours rather than rsasl's because
//! XEP-0474 adds an attribute (`h`, the SSDP hash) to the server-first message, which
//! the client signs with its proof: rsasl cannot add one. It also serves both channel
//! binding types of XEP-0440 (`tls-exporter`, `tls-server-end-point`).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use jrs_auth::{ScramHash, ScramKeys};

use crate::sasl::Step;

pub use crate::channel_binding::ChannelBinding;

pub fn hash(h: ScramHash, data: &[u8]) -> Vec<u8> {
    match h {
        ScramHash::Sha1 => Sha1::digest(data).to_vec(),
        ScramHash::Sha256 => Sha256::digest(data).to_vec(),
    }
}

pub fn hmac(h: ScramHash, key: &[u8], data: &[u8]) -> Vec<u8> {
    fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &[u8]) -> Vec<u8> {
        let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key).expect("any key length");
        m.update(data);
        m.finalize().into_bytes().to_vec()
    }
    match h {
        ScramHash::Sha1 => run::<Hmac<Sha1>>(key, data),
        ScramHash::Sha256 => run::<Hmac<Sha256>>(key, data),
    }
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// XEP-0474 3.1: the SSDP hash of the advertised mechanisms and (when XEP-0440 was
/// used) channel binding types, each list sorted by octets.
pub fn ssdp(h: ScramHash, mechanisms: &[String], cb_types: Option<&[&str]>) -> String {
    let mut m: Vec<&str> = mechanisms.iter().map(String::as_str).collect();
    m.sort_unstable();
    let mut s = m.join("\x1e");
    if let Some(types) = cb_types {
        let mut t = types.to_vec();
        t.sort_unstable();
        s.push('\x1f');
        s.push_str(&t.join("\x1e"));
    }
    B64.encode(hash(h, s.as_bytes()))
}

enum Stage {
    First,
    Final {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Done,
}

pub struct ScramServer {
    keys: ScramKeys,
    plus: bool,
    plus_offered: bool,
    cb: ChannelBinding,
    ssdp: Option<String>,
    server_nonce: String,
    stage: Stage,
    username: String,
    /// The authzid of the gs2 header (empty when none).
    pub authzid: String,
}

impl ScramServer {
    /// `mechanism`'s exchange with the user's `keys` (decoy keys for an unknown user).
    /// `plus_offered`: a -PLUS mechanism was offered, so a client saying it could bind
    /// but thought we could not (`y`) saw a stripped list.
    pub fn new(
        mechanism: &str,
        keys: ScramKeys,
        plus_offered: bool,
        cb: ChannelBinding,
        ssdp: Option<String>,
    ) -> ScramServer {
        use rand::Rng;
        let bytes: [u8; 18] = rand::rng().random();
        ScramServer {
            keys,
            plus: mechanism.ends_with("-PLUS"),
            plus_offered,
            cb,
            ssdp,
            server_nonce: B64.encode(bytes),
            stage: Stage::First,
            username: String::new(),
            authzid: String::new(),
        }
    }

    pub fn step(&mut self, input: &[u8]) -> Step {
        let stage = std::mem::replace(&mut self.stage, Stage::Done);
        let out = match stage {
            Stage::First => self.first(input),
            Stage::Final {
                gs2_header,
                client_first_bare,
                server_first,
                nonce,
            } => self.last(
                input,
                &gs2_header,
                &client_first_bare,
                &server_first,
                &nonce,
            ),
            Stage::Done => None,
        };
        out.unwrap_or(Step::Failure)
    }

    fn first(&mut self, input: &[u8]) -> Option<Step> {
        let text = std::str::from_utf8(input).ok()?;
        let mut parts = text.splitn(3, ',');
        let (flag, authzid, bare) = (parts.next()?, parts.next()?, parts.next()?);
        match (flag, self.plus) {
            ("n", false) => {}
            // The client could bind and believed we could not: fine unless we offered
            // -PLUS (RFC 5802 6: then the list it saw was stripped).
            ("y", false) if !self.plus_offered => {}
            (f, true) if f.starts_with("p=") => {
                self.cb.data(&f[2..])?;
            }
            _ => return None,
        }
        self.authzid = match authzid {
            "" => String::new(),
            a => unescape(a.strip_prefix("a=")?)?,
        };
        let mut attrs = bare.split(',');
        let name = attrs.next()?.strip_prefix("n=")?;
        let cnonce = attrs.next()?.strip_prefix("r=")?;
        if cnonce.is_empty() {
            return None;
        }
        self.username = unescape(name)?;
        let nonce = format!("{cnonce}{}", self.server_nonce);
        let mut server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.keys.salt),
            self.keys.iterations
        );
        if let Some(h) = &self.ssdp {
            server_first.push_str(&format!(",h={h}"));
        }
        let gs2_header = format!("{flag},{authzid},");
        self.stage = Stage::Final {
            gs2_header,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Some(Step::Challenge(server_first.into_bytes()))
    }

    fn last(
        &mut self,
        input: &[u8],
        gs2_header: &str,
        client_first_bare: &str,
        server_first: &str,
        nonce: &str,
    ) -> Option<Step> {
        let text = std::str::from_utf8(input).ok()?;
        let (without_proof, proof) = text.rsplit_once(",p=")?;
        let mut attrs = without_proof.split(',');
        let c = B64.decode(attrs.next()?.strip_prefix("c=")?).ok()?;
        let r = attrs.next()?.strip_prefix("r=")?;
        let mut expected = gs2_header.as_bytes().to_vec();
        if let Some(kind) = gs2_header.strip_prefix("p=") {
            let kind = kind.split(',').next()?;
            expected.extend_from_slice(self.cb.data(kind)?);
        }
        if !constant_time_eq(&c, &expected) || r != nonce {
            return None;
        }
        let proof = B64.decode(proof).ok()?;
        let h = self.keys.hash;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(h, &self.keys.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return None;
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        if !constant_time_eq(&hash(h, &client_key), &self.keys.stored_key) {
            return None;
        }
        let verifier = hmac(h, &self.keys.server_key, auth_message.as_bytes());
        Some(Step::Success {
            username: self.username.clone(),
            additional: format!("v={}", B64.encode(verifier)).into_bytes(),
        })
    }
}

/// A saslname (RFC 5802 5.1: "," and "=" escaped).
fn unescape(s: &str) -> Option<String> {
    let out = s.replace("=2C", ",").replace("=3D", "=");
    (!out.contains('=') || s.contains("=3D")).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc_keys(h: ScramHash, salt_b64: &str) -> ScramKeys {
        ScramKeys::derive(h, "pencil", &B64.decode(salt_b64).unwrap(), 4096)
    }

    fn run(
        h: ScramHash,
        mech: &str,
        salt: &str,
        cfirst: &str,
        snonce: &str,
        cfinal: &str,
    ) -> (String, Step) {
        let mut s = ScramServer::new(
            mech,
            rfc_keys(h, salt),
            false,
            ChannelBinding::default(),
            None,
        );
        s.server_nonce = snonce.into();
        let Step::Challenge(first) = s.step(cfirst.as_bytes()) else {
            panic!("no challenge")
        };
        (String::from_utf8(first).unwrap(), s.step(cfinal.as_bytes()))
    }

    #[test]
    fn rfc5802_sha1_vector() {
        let (first, last) = run(
            ScramHash::Sha1,
            "SCRAM-SHA-1",
            "QSXCR+Q6sek8bf92",
            "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        );
        assert_eq!(
            first,
            "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
        );
        let Step::Success {
            username,
            additional,
        } = last
        else {
            panic!("failed")
        };
        assert_eq!(username, "user");
        assert_eq!(additional, b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=");
    }

    #[test]
    fn rfc7677_sha256_vector() {
        let (first, last) = run(
            ScramHash::Sha256,
            "SCRAM-SHA-256",
            "W22ZaJ0SNY7soEsUEjb6gQ==",
            "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        );
        assert!(first.ends_with(",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"));
        let Step::Success { additional, .. } = last else {
            panic!("failed")
        };
        assert_eq!(
            additional,
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn a_wrong_proof_fails() {
        let (_, last) = run(
            ScramHash::Sha1,
            "SCRAM-SHA-1",
            "QSXCR+Q6sek8bf92",
            "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Tt=",
        );
        assert!(matches!(last, Step::Failure));
    }

    /// A client side, to check what the server signs.
    pub fn client_final(
        keys_password: &str,
        h: ScramHash,
        cfirst_bare: &str,
        gs2: &[u8],
        server_first: &str,
    ) -> String {
        let attrs: Vec<&str> = server_first.split(',').collect();
        let salt = B64.decode(&attrs[1][2..]).unwrap();
        let iter: u32 = attrs[2][2..].parse().unwrap();
        let mut salted = vec![0u8; if h == ScramHash::Sha1 { 20 } else { 32 }];
        match h {
            ScramHash::Sha1 => pbkdf2_sha1(keys_password, &salt, iter, &mut salted),
            ScramHash::Sha256 => pbkdf2_sha256(keys_password, &salt, iter, &mut salted),
        }
        let client_key = hmac(h, &salted, b"Client Key");
        let stored = hash(h, &client_key);
        let without = format!("c={},{}", B64.encode(gs2), attrs[0]);
        let auth = format!("{cfirst_bare},{server_first},{without}");
        let sig = hmac(h, &stored, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        format!("{without},p={}", B64.encode(proof))
    }

    fn pbkdf2_sha1(p: &str, salt: &[u8], i: u32, out: &mut [u8]) {
        // PBKDF2 by hand (RFC 5802 Hi): U1 = HMAC(P, salt || 1), Ui = HMAC(P, Ui-1).
        let mut u = hmac(
            ScramHash::Sha1,
            p.as_bytes(),
            &[salt, &[0, 0, 0, 1]].concat(),
        );
        let mut acc = u.clone();
        for _ in 1..i {
            u = hmac(ScramHash::Sha1, p.as_bytes(), &u);
            acc.iter_mut().zip(&u).for_each(|(a, b)| *a ^= b);
        }
        out.copy_from_slice(&acc);
    }

    fn pbkdf2_sha256(p: &str, salt: &[u8], i: u32, out: &mut [u8]) {
        let mut u = hmac(
            ScramHash::Sha256,
            p.as_bytes(),
            &[salt, &[0, 0, 0, 1]].concat(),
        );
        let mut acc = u.clone();
        for _ in 1..i {
            u = hmac(ScramHash::Sha256, p.as_bytes(), &u);
            acc.iter_mut().zip(&u).for_each(|(a, b)| *a ^= b);
        }
        out.copy_from_slice(&acc);
    }

    #[test]
    fn ssdp_matches_the_xep_example() {
        // XEP-0474 4.3: SHA-1 of 'SCRAM-SHA-1\x1eSCRAM-SHA-1-PLUS\x1ftls-exporter\x1etls-server-end-point'.
        let mechs = vec!["SCRAM-SHA-1-PLUS".to_string(), "SCRAM-SHA-1".to_string()];
        let h = ssdp(
            ScramHash::Sha1,
            &mechs,
            Some(&["tls-server-end-point", "tls-exporter"]),
        );
        let expected = B64.encode(Sha1::digest(
            b"SCRAM-SHA-1\x1eSCRAM-SHA-1-PLUS\x1ftls-exporter\x1etls-server-end-point",
        ));
        assert_eq!(h, expected);
        assert_eq!(h, "G6k/rBLDqgOhRRaCuuatSDFkJ08=", "the XEP's example value");
        // Without XEP-0440 there is no separator.
        let plain = ssdp(ScramHash::Sha256, &mechs, None);
        assert_eq!(
            plain,
            B64.encode(Sha256::digest(b"SCRAM-SHA-1\x1eSCRAM-SHA-1-PLUS"))
        );
    }

    #[test]
    fn ssdp_is_signed_and_plus_binds_either_type() {
        let keys = ScramKeys::derive(ScramHash::Sha256, "pencil", b"0123456789abcdef", 4096);
        let cb = ChannelBinding {
            exporter: Some(vec![1; 32]),
            endpoint: Some(vec![2; 32]),
        };
        for (kind, data) in [
            ("tls-exporter", vec![1u8; 32]),
            ("tls-server-end-point", vec![2u8; 32]),
        ] {
            let mut s = ScramServer::new(
                "SCRAM-SHA-256-PLUS",
                keys.clone(),
                true,
                cb.clone(),
                Some("HASH=".into()),
            );
            let gs2 = format!("p={kind},,");
            let bare = "n=alice,r=abcdef";
            let Step::Challenge(first) = s.step(format!("{gs2}{bare}").as_bytes()) else {
                panic!()
            };
            let first = String::from_utf8(first).unwrap();
            assert!(first.ends_with(",h=HASH="), "{first}");
            let fin = client_final(
                "pencil",
                ScramHash::Sha256,
                bare,
                &[gs2.as_bytes(), &data].concat(),
                &first,
            );
            assert!(
                matches!(s.step(fin.as_bytes()), Step::Success { .. }),
                "{kind}"
            );
        }
        // A client that computed its proof over another server-first (no h) fails.
        let mut s = ScramServer::new(
            "SCRAM-SHA-256",
            keys.clone(),
            true,
            cb.clone(),
            Some("HASH=".into()),
        );
        let Step::Challenge(first) = s.step(b"n,,n=alice,r=abcdef") else {
            panic!()
        };
        let first = String::from_utf8(first).unwrap();
        let stripped = first.trim_end_matches(",h=HASH=");
        let fin = client_final(
            "pencil",
            ScramHash::Sha256,
            "n=alice,r=abcdef",
            b"n,,",
            stripped,
        );
        assert!(matches!(s.step(fin.as_bytes()), Step::Failure));
        // 'y' when -PLUS was offered is a downgrade; unknown binding types fail.
        let mut s = ScramServer::new("SCRAM-SHA-256", keys.clone(), true, cb.clone(), None);
        assert!(matches!(s.step(b"y,,n=alice,r=abc"), Step::Failure));
        let mut s = ScramServer::new("SCRAM-SHA-256-PLUS", keys, true, cb, None);
        assert!(matches!(
            s.step(b"p=tls-unique,,n=alice,r=abc"),
            Step::Failure
        ));
    }
}
