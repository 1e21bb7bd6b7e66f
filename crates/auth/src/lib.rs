//! Stored credentials: SCRAM keys (RFC 5802 / RFC 7677) derived from a password, the
//! record xdb keeps for them, and checking a plain password against it.
//!
//! Only salt, iteration count, StoredKey and ServerKey are kept, per hash, so neither
//! the password nor anything that logs in without it is on disk (see
//! `docs/protocol.md`, "Credentials").

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use quick_xml::events::Event;
use rand::RngCore;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// xdb namespace of the credentials record.
pub const NS_AUTH: &str = "urn:jabberd-rs:auth:0";
/// Iterations for new keys (what Prosody and ejabberd use).
pub const DEFAULT_ITERATIONS: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    pub fn name(self) -> &'static str {
        match self {
            ScramHash::Sha1 => "SHA-1",
            ScramHash::Sha256 => "SHA-256",
        }
    }

    fn parse(s: &str) -> Option<ScramHash> {
        match s {
            "SHA-1" => Some(ScramHash::Sha1),
            "SHA-256" => Some(ScramHash::Sha256),
            _ => None,
        }
    }
}

/// SCRAM keys for one hash function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub hash: ScramHash,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

fn hmac<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac =
        <M as hmac::digest::KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

impl ScramKeys {
    /// Derives the keys of `password` with `salt` (RFC 5802 section 3). The password
    /// should already be SASLprep'ed by the caller where that matters; ASCII passwords
    /// are unaffected.
    pub fn derive(hash: ScramHash, password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let (stored_key, server_key) = match hash {
            ScramHash::Sha1 => {
                let mut salted = [0u8; 20];
                pbkdf2::pbkdf2_hmac::<Sha1>(password.as_bytes(), salt, iterations, &mut salted);
                let client_key = hmac::<Hmac<Sha1>>(&salted, b"Client Key");
                (
                    Sha1::digest(&client_key).to_vec(),
                    hmac::<Hmac<Sha1>>(&salted, b"Server Key"),
                )
            }
            ScramHash::Sha256 => {
                let mut salted = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
                let client_key = hmac::<Hmac<Sha256>>(&salted, b"Client Key");
                (
                    Sha256::digest(&client_key).to_vec(),
                    hmac::<Hmac<Sha256>>(&salted, b"Server Key"),
                )
            }
        };
        ScramKeys {
            hash,
            iterations,
            salt: salt.to_vec(),
            stored_key,
            server_key,
        }
    }

    /// Whether `password` yields these keys (used for PLAIN).
    pub fn matches(&self, password: &str) -> bool {
        let other = ScramKeys::derive(self.hash, password, &self.salt, self.iterations);
        constant_time_eq(&other.stored_key, &self.stored_key)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Everything stored to authenticate one account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    pub scram: Vec<ScramKeys>,
}

#[derive(Debug, thiserror::Error)]
#[error("credentials record: {0}")]
pub struct CredentialsError(String);

impl Credentials {
    /// New credentials for `password`: SHA-1 and SHA-256 keys with fresh random salts.
    pub fn from_password(password: &str) -> Credentials {
        let mut rng = rand::rng();
        let scram = [ScramHash::Sha1, ScramHash::Sha256]
            .into_iter()
            .map(|hash| {
                let mut salt = [0u8; 16];
                rng.fill_bytes(&mut salt);
                ScramKeys::derive(hash, password, &salt, DEFAULT_ITERATIONS)
            })
            .collect();
        Credentials { scram }
    }

    pub fn keys(&self, hash: ScramHash) -> Option<&ScramKeys> {
        self.scram.iter().find(|k| k.hash == hash)
    }

    /// Checks a plain password (SASL PLAIN, over TLS only).
    pub fn check_password(&self, password: &str) -> bool {
        self.keys(ScramHash::Sha256)
            .or_else(|| self.keys(ScramHash::Sha1))
            .is_some_and(|k| k.matches(password))
    }

    /// The record as stored in xdb.
    pub fn to_xml(&self) -> String {
        let mut s = format!("<credentials xmlns='{NS_AUTH}'>");
        for k in &self.scram {
            s.push_str(&format!(
                "<scram hash='{}' iterations='{}' salt='{}' stored-key='{}' server-key='{}'/>",
                k.hash.name(),
                k.iterations,
                B64.encode(&k.salt),
                B64.encode(&k.stored_key),
                B64.encode(&k.server_key)
            ));
        }
        s.push_str("</credentials>");
        s
    }

    /// Reads a stored record. An empty fragment means "no such account": `Ok(None)`.
    pub fn parse(fragment: &[u8]) -> Result<Option<Credentials>, CredentialsError> {
        if fragment.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let bad = |what: &str| CredentialsError(what.to_owned());
        let mut reader = quick_xml::Reader::from_reader(fragment);
        let mut creds = Credentials::default();
        loop {
            match reader.read_event().map_err(|e| bad(&e.to_string()))? {
                Event::Empty(e) | Event::Start(e) if e.local_name().as_ref() == "scram" => {
                    let get = |name: &str| -> Result<String, CredentialsError> {
                        let a = e
                            .attributes()
                            .flatten()
                            .find(|a| a.key.as_ref() == name)
                            .ok_or_else(|| bad(&format!("<scram> without {name}")))?;
                        Ok(a.value.into_owned())
                    };
                    let b64 = |v: String| B64.decode(v).map_err(|_| bad("bad base64"));
                    let Some(hash) = ScramHash::parse(&get("hash")?) else {
                        continue;
                    };
                    creds.scram.push(ScramKeys {
                        hash,
                        iterations: get("iterations")?
                            .parse()
                            .map_err(|_| bad("bad iterations"))?,
                        salt: b64(get("salt")?)?,
                        stored_key: b64(get("stored-key")?)?,
                        server_key: b64(get("server-key")?)?,
                    });
                }
                Event::Eof => break,
                _ => {}
            }
        }
        if creds.scram.is_empty() {
            return Err(bad("no SCRAM keys"));
        }
        Ok(Some(creds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5802 section 5 example: user "user", password "pencil", salt
    /// QSXCR+Q6sek8bf92, 4096 iterations.
    #[test]
    fn derives_rfc5802_keys() {
        let salt = B64.decode("QSXCR+Q6sek8bf92").unwrap();
        let k = ScramKeys::derive(ScramHash::Sha1, "pencil", &salt, 4096);
        // ServerSignature in the RFC is HMAC(ServerKey, AuthMessage); check ServerKey via
        // the known StoredKey/ServerKey of this example instead.
        assert_eq!(B64.encode(&k.stored_key), "6dlGYMOdZcOPutkcNY8U2g7vK9Y=");
        assert_eq!(B64.encode(&k.server_key), "D+CSWLOshSulAsxiupA+qs2/fTE=");
    }

    #[test]
    fn record_round_trip_and_password_check() {
        let c = Credentials::from_password("s3cret");
        let parsed = Credentials::parse(c.to_xml().as_bytes()).unwrap().unwrap();
        assert_eq!(parsed, c);
        assert!(parsed.check_password("s3cret"));
        assert!(!parsed.check_password("wrong"));
        assert!(Credentials::parse(b"").unwrap().is_none());
    }
}
