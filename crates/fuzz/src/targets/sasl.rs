//! `sasl`: what a client sends to authenticate, as c2s reads it (c2s/src/sasl.rs,
//! c2s/src/scram.rs): the base64 payload of `<auth>`/`<response>`, PLAIN messages,
//! the username of a SCRAM client-first message, and the SCRAM exchange itself through
//! both servers c2s runs (rsasl's for SASL, its own for SASL2, with channel binding and
//! the XEP-0474 hash); with them the stored credentials record (crates/auth) and the
//! DER certificate read for `tls-server-end-point` (c2s/src/channel_binding.rs).
//!
//! Input: the mechanism on the first line, then one client message per line (raw, not
//! base64; each line is also decoded as base64 payload on its own).

use std::sync::OnceLock;

use jrs_auth::{Credentials, ScramHash, ScramKeys};

use crate::channel_binding::{end_point_hash, ChannelBinding};
use crate::sasl::{decode_payload, parse_plain, plain_matches, scram_hash, scram_username};
use crate::sasl::{ScramExchange, Step};
use crate::scram::{ssdp, ScramServer};

/// Keys of the password "pencil" with one iteration (what they are matters little: a
/// fuzzer cannot compute a proof against a random server nonce; the iteration count
/// keeps PLAIN checks cheap).
fn credentials() -> &'static Credentials {
    static C: OnceLock<Credentials> = OnceLock::new();
    C.get_or_init(|| Credentials {
        scram: [ScramHash::Sha1, ScramHash::Sha256]
            .into_iter()
            .map(|h| ScramKeys::derive(h, "pencil", b"0123456789abcdef", 1))
            .collect(),
    })
}

pub fn run(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let mechanism = String::from_utf8_lossy(lines.next().unwrap_or_default())
        .trim()
        .to_owned();
    let messages: Vec<&[u8]> = lines.take(8).collect();
    for m in &messages {
        if let Ok(text) = std::str::from_utf8(m) {
            let _ = decode_payload(text);
        }
        if let Some(plain) = parse_plain(m) {
            let _ = (plain.authzid, plain.username);
            let _ = plain_matches(credentials(), &plain.password);
        }
        let _ = scram_username(m);
        if let Ok(Some(stored)) = Credentials::parse(m) {
            let _ = (stored.keys(ScramHash::Sha1), stored.to_xml());
        }
        let _ = end_point_hash(m);
    }
    let Some(hash) = scram_hash(&mechanism) else {
        return;
    };
    let keys = credentials().keys(hash).expect("both hashes").clone();
    let cb = ChannelBinding {
        exporter: (!data.len().is_multiple_of(3)).then(|| vec![1; 32]),
        endpoint: (!data.len().is_multiple_of(5)).then(|| vec![2; 32]),
    };
    // SASL2: c2s's own SCRAM server.
    let offered = vec![mechanism.clone(), "SCRAM-SHA-1".to_owned()];
    let types = cb.types();
    let hash_of_offer = ssdp(hash, &offered, Some(&types));
    let mut own = ScramServer::new(
        &mechanism,
        keys.clone(),
        data.len().is_multiple_of(2),
        cb.clone(),
        Some(hash_of_offer),
    );
    for m in &messages {
        if !matches!(own.step(m), Step::Challenge(_)) {
            break;
        }
    }
    let _ = &own.authzid;
    // SASL: rsasl's.
    if let Ok(mut exchange) = ScramExchange::start(&mechanism, keys, cb) {
        for m in &messages {
            if !matches!(exchange.step(m), Step::Challenge(_)) {
                break;
            }
        }
    }
}
