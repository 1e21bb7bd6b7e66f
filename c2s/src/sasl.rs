//! SASL for clients: SCRAM-SHA-1/-256 and their -PLUS variants (channel binding
//! `tls-exporter`, RFC 9266) through rsasl with the stored keys from xdb, and PLAIN over
//! TLS checked against the same keys.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rsasl::callback::{Context, Request, SessionCallback, SessionData};
use rsasl::mechanisms::scram::properties::ScramStoredPassword;
use rsasl::prelude::{
    ChannelBindingCallback, Mechanism, Mechname, Registry, SASLConfig, SASLServer, Session,
    SessionError, State, Validation,
};
use rsasl::property::AuthId;
use rsasl::validate::{Validate, ValidationError};

use jrs_auth::{Credentials, ScramHash, ScramKeys};

/// The mechanisms to advertise on a stream, in preference order.
pub fn offered(configured: &[String], tls: bool, channel_binding: bool) -> Vec<&str> {
    configured
        .iter()
        .map(String::as_str)
        .filter(|m| match *m {
            "PLAIN" => tls,
            m if m.ends_with("-PLUS") => tls && channel_binding,
            _ => true,
        })
        .collect()
}

/// The hash a SCRAM mechanism uses.
pub fn scram_hash(mechanism: &str) -> Option<ScramHash> {
    match mechanism.trim_end_matches("-PLUS") {
        "SCRAM-SHA-1" => Some(ScramHash::Sha1),
        "SCRAM-SHA-256" => Some(ScramHash::Sha256),
        _ => None,
    }
}

/// The username in a SCRAM client-first message (`gs2-header n=NAME,r=...`), unescaped.
pub fn scram_username(client_first: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(client_first).ok()?;
    // gs2-header: cbind-flag "," [authzid] "," ; then the bare client-first message.
    let mut parts = text.splitn(3, ',');
    let (_flag, _authzid, bare) = (parts.next()?, parts.next()?, parts.next()?);
    let name = bare.strip_prefix("n=")?.split(',').next()?;
    Some(name.replace("=2C", ",").replace("=3D", "="))
}

/// The mechanisms rsasl serves. Listed here because rsasl's default list (without its
/// `registry_static` feature) leaves out the -PLUS variants, and a SCRAM server only
/// detects a downgrade (client flag `y`) when the -PLUS variant is in its list.
static SCRAM_MECHANISMS: &[Mechanism] = &[
    rsasl::mechanisms::scram::SCRAM_SHA256_PLUS,
    rsasl::mechanisms::scram::SCRAM_SHA1_PLUS,
    rsasl::mechanisms::scram::SCRAM_SHA256,
    rsasl::mechanisms::scram::SCRAM_SHA1,
];

/// The authenticated username, set by rsasl's validation step only on a valid proof.
struct LoginValidation;
impl Validation for LoginValidation {
    type Value = String;
}

/// Gives rsasl the stored keys of the user logging in.
struct StoredKeys {
    keys: ScramKeys,
    channel_binding: bool,
}

impl SessionCallback for StoredKeys {
    fn callback(
        &self,
        _: &SessionData,
        _: &Context,
        request: &mut Request,
    ) -> Result<(), SessionError> {
        let k = &self.keys;
        request.satisfy::<ScramStoredPassword>(&ScramStoredPassword::new(
            k.iterations,
            &k.salt,
            &k.stored_key,
            &k.server_key,
        ))?;
        Ok(())
    }

    fn validate(
        &self,
        _: &SessionData,
        context: &Context,
        validate: &mut Validate<'_>,
    ) -> Result<(), ValidationError> {
        let authid = context.get_ref::<AuthId>().unwrap_or_default().to_owned();
        validate.finalize::<LoginValidation>(authid);
        Ok(())
    }

    fn enable_channel_binding(&self) -> bool {
        self.channel_binding
    }
}

/// Channel binding data of the client's TLS connection, for the type its gs2 header
/// names (tls-exporter or tls-server-end-point, XEP-0440).
struct Exporter(crate::channel_binding::ChannelBinding);

impl ChannelBindingCallback for Exporter {
    fn get_cb_data(&self, cbname: &str) -> Option<&[u8]> {
        self.0.data(cbname)
    }
}

/// What one step of an exchange produced.
pub enum Step {
    /// Send `<challenge>` with this data and wait for a `<response>`.
    Challenge(Vec<u8>),
    /// Authenticated as this SASL username; send `<success>` with the data.
    Success {
        username: String,
        additional: Vec<u8>,
    },
    /// Send `<failure><not-authorized/>`.
    Failure,
}

/// One SCRAM exchange in progress.
pub struct ScramExchange {
    session: Session<LoginValidation, Exporter>,
    /// The client-first message was taken.
    started: bool,
}

impl ScramExchange {
    /// Starts SCRAM `mechanism` with the user's stored keys. For an unknown user pass
    /// `decoy` keys: the exchange then fails at the proof like a wrong password, so
    /// failures do not reveal which accounts exist.
    pub fn start(
        mechanism: &str,
        keys: ScramKeys,
        exporter: crate::channel_binding::ChannelBinding,
    ) -> Result<ScramExchange, String> {
        let channel_binding = exporter.any();
        let config: Arc<SASLConfig> = SASLConfig::builder()
            .with_registry(Registry::with_mechanisms(SCRAM_MECHANISMS))
            .with_callback(StoredKeys {
                keys,
                channel_binding,
            })
            .map_err(|e| format!("SASL configuration: {e}"))?;
        let name = Mechname::parse(mechanism.as_bytes()).map_err(|e| format!("mechanism: {e}"))?;
        let session = SASLServer::<LoginValidation, Exporter>::with_cb(config, Exporter(exporter))
            .start_suggested(name)
            .map_err(|e| format!("starting {mechanism}: {e}"))?;
        Ok(ScramExchange {
            session,
            started: false,
        })
    }

    /// Feeds the client's data (the initial response or a `<response>`).
    pub fn step(&mut self, input: &[u8]) -> Step {
        let first = !std::mem::replace(&mut self.started, true);
        if !rsasl_can_parse(input, first) {
            return Step::Failure;
        }
        let mut out = Vec::new();
        match self.session.step(Some(input), &mut out) {
            Ok(State::Running) => Step::Challenge(out),
            Ok(State::Finished(_)) => match self.session.validation() {
                Some(username) => Step::Success {
                    username,
                    additional: out,
                },
                None => Step::Failure,
            },
            Err(_) => Step::Failure,
        }
    }
}

/// Whether rsasl's SCRAM server can read a client message without panicking: rsasl 2.3
/// (`mechanisms/scram/parser.rs`) slices every attribute as `attr[0..2]` (and an
/// authzid as `authzid[2..]`) without checking its length, so an empty or one-byte
/// attribute (`n,,n=u,r`, a trailing comma) panics there (found by fuzzing,
/// docs/fuzzing.md; kept in fuzz/regressions/sasl). Such a message is malformed
/// anyway (RFC 5802 7: every attribute is `x=value`), so it fails here instead.
/// `first`: the client-first message, whose gs2 header starts with a one-letter flag.
fn rsasl_can_parse(input: &[u8], first: bool) -> bool {
    let mut parts = input.split(|&b| b == b',');
    if first {
        // gs2-header: the flag (`n`, `y` or `p=NAME`), then an authzid (`a=NAME`) or
        // nothing.
        parts.next();
        if parts.next().is_some_and(|authzid| authzid.len() == 1) {
            return false;
        }
    }
    parts.all(|attribute| attribute.len() >= 2)
}

/// Keys that match no password, for exchanges with unknown users.
pub fn decoy_keys(hash: ScramHash) -> ScramKeys {
    use rand::RngCore;
    let len = match hash {
        ScramHash::Sha1 => 20,
        ScramHash::Sha256 => 32,
    };
    let mut rng = rand::rng();
    let mut random = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    ScramKeys {
        hash,
        iterations: jrs_auth::DEFAULT_ITERATIONS,
        salt: random(16),
        stored_key: random(len),
        server_key: random(len),
    }
}

/// A PLAIN message (RFC 4616): `authzid NUL authcid NUL password`.
pub struct PlainMessage {
    pub authzid: String,
    pub username: String,
    pub password: String,
}

/// Parsed by hand: three NUL-separated fields need no library.
pub fn parse_plain(data: &[u8]) -> Option<PlainMessage> {
    let text = std::str::from_utf8(data).ok()?;
    let mut parts = text.split('\0');
    let m = PlainMessage {
        authzid: parts.next()?.to_owned(),
        username: parts.next()?.to_owned(),
        password: parts.next()?.to_owned(),
    };
    (parts.next().is_none() && !m.username.is_empty()).then_some(m)
}

/// Checks a PLAIN password against stored credentials.
pub fn plain_matches(credentials: &Credentials, password: &str) -> bool {
    credentials.check_password(password)
}

/// Decodes the base64 payload of `<auth>`/`<response>` ("=" means empty, RFC 6120 6.4.2).
pub fn decode_payload(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text == "=" || text.is_empty() {
        return Some(vec![]);
    }
    B64.decode(text).ok()
}

pub fn encode_payload(data: &[u8]) -> String {
    if data.is_empty() {
        "=".to_owned()
    } else {
        B64.encode(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scram_usernames() {
        assert_eq!(
            scram_username(b"n,,n=alice,r=abc").as_deref(),
            Some("alice")
        );
        assert_eq!(
            scram_username(b"p=tls-exporter,,n=a=2Cb=3Dc,r=x").as_deref(),
            Some("a,b=c")
        );
        assert_eq!(scram_username(b"garbage"), None);
    }

    #[test]
    fn offers_plus_and_plain_only_over_tls() {
        let all: Vec<String> = crate::config::ALL_MECHANISMS
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            offered(&all, false, false),
            vec!["SCRAM-SHA-256", "SCRAM-SHA-1"]
        );
        assert_eq!(offered(&all, true, true).len(), 5);
    }

    #[test]
    fn scram_round_trip_with_stored_keys() {
        // A client computed by hand from RFC 5802 is long; check that a wrong proof fails
        // and the first step yields a challenge with the stored salt instead.
        let keys = ScramKeys::derive(ScramHash::Sha1, "pencil", b"salt-bytes-16...", 4096);
        let mut ex = ScramExchange::start("SCRAM-SHA-1", keys, Default::default()).unwrap();
        let Step::Challenge(first) = ex.step(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL") else {
            panic!("expected a challenge")
        };
        let first = String::from_utf8(first).unwrap();
        assert!(first.starts_with("r=fyko+d2lbbFgONRv9qkxdawL"), "{first}");
        assert!(first.contains(&format!("s={}", B64.encode(b"salt-bytes-16..."))));
        let nonce = first.split(',').next().unwrap();
        let bad = format!("c=biws,{nonce},p={}", B64.encode([0u8; 20]));
        assert!(matches!(ex.step(bad.as_bytes()), Step::Failure));
    }

    #[test]
    fn short_attributes_fail_before_rsasl() {
        // Each of these panicked inside rsasl 2.3's parser.
        let keys = ScramKeys::derive(ScramHash::Sha1, "pencil", b"salt-bytes-16...", 1);
        for first in [
            &b"n,,n=user,r"[..],
            b"n,,n=user,r=abc,",
            b"n,a,n=user,r=abc",
            b"n,,n=user,,r=abc",
            b"n,,",
        ] {
            let mut ex =
                ScramExchange::start("SCRAM-SHA-1", keys.clone(), Default::default()).unwrap();
            assert!(matches!(ex.step(first), Step::Failure), "{first:?}");
        }
        for last in [
            &b"c=biws,r=abc,p"[..],
            b"c=biws,r=abc,p=x,",
            b"c,r=x,p=y",
            b"",
        ] {
            let mut ex =
                ScramExchange::start("SCRAM-SHA-1", keys.clone(), Default::default()).unwrap();
            assert!(matches!(ex.step(b"n,,n=user,r=abc"), Step::Challenge(_)));
            assert!(matches!(ex.step(last), Step::Failure), "{last:?}");
        }
    }

    #[test]
    fn parses_plain() {
        let m = parse_plain(b"\0alice\0secret").unwrap();
        assert_eq!(
            (m.authzid.as_str(), m.username.as_str(), m.password.as_str()),
            ("", "alice", "secret")
        );
        assert!(parse_plain(b"alice").is_none());
    }
}
