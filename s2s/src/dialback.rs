//! Dialback keys (XEP-0220 with the XEP-0185 recommendation):
//! `key = HMAC-SHA256(hex(SHA-256(secret)), receiving + ' ' + originating + ' ' + stream id)`,
//! in hex. Only we check keys we made, so the formula matters only for its security: the
//! key proves that whoever sent it can reach our secret.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub fn key(secret: &str, receiving: &str, originating: &str, stream_id: &str) -> String {
    let k = hex::encode(Sha256::digest(secret.as_bytes()));
    let mut mac = Hmac::<Sha256>::new_from_slice(k.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{receiving} {originating} {stream_id}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks `given` against the key we would make, in constant time.
pub fn check(
    secret: &str,
    receiving: &str,
    originating: &str,
    stream_id: &str,
    given: &str,
) -> bool {
    let expected = key(secret, receiving, originating, stream_id);
    expected.len() == given.len()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// A random secret for a process that has none configured (keys then stop verifying when
/// s2s restarts, which only costs the remote a new dialback).
pub fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xep_0185_example() {
        // The inputs of the XEP's example script (XMPP wiki); the value was computed
        // independently with Python's hashlib/hmac.
        let k = key(
            "s3cr3tf0rd14lb4ck",
            "domain2.tld",
            "domain1.tld",
            "D60000229F",
        );
        assert_eq!(
            k,
            "5e598fae34b90be084fb6a4a8a543ceb33549140bac9d829ef8d734d900616e4"
        );
        assert!(check(
            "s3cr3tf0rd14lb4ck",
            "domain2.tld",
            "domain1.tld",
            "D60000229F",
            &k
        ));
        assert!(!check(
            "other",
            "domain2.tld",
            "domain1.tld",
            "D60000229F",
            &k
        ));
        assert!(!check(
            "s3cr3tf0rd14lb4ck",
            "domain1.tld",
            "domain2.tld",
            "D60000229F",
            &k
        ));
    }
}
