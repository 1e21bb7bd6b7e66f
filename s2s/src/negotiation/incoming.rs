//! An incoming server stream as a state machine without I/O: the header and features,
//! STARTTLS, SASL EXTERNAL with a certificate that verifies, dialback (XEP-0220: the
//! remote asks with `db:result`, we verify with its authoritative server and answer;
//! we answer `db:verify` for keys we made), then stanzas from the domains authenticated
//! on the stream. The driver (`incoming.rs`) does the I/O and the verifications.
//!
//! XEP-0198 without resumption: once authenticated the remote may `<enable/>` stream
//! management; we count its stanzas and answer its `<r/>` with how many are safe at our
//! router ([`Action::AckWhenSafe`]), so that it keeps and sends again on a new stream
//! what an s2s that dies had read and not passed on.

use std::collections::HashSet;

use base64::Engine;
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tracing::{debug, info, warn};

use jrs_stream::validate::validate_stanza;
use jrs_stream::{Stanza, StreamErrorCondition, StreamHeader};
use jrs_sx::features::{features_xml, NS_SASL, NS_SM, NS_TLS};
use jrs_sx::{stream_error, Close, Feature};

use crate::dialback;
use crate::tls::CertificateCheck;
use crate::xml::{self, domain_of, Dialback};

/// What an incoming stream is allowed (from `s2s.xml`), and how certificates are checked.
pub struct Settings {
    pub hosts: Vec<String>,
    pub require_encryption: bool,
    pub sasl_external: bool,
    pub dialback: bool,
    /// The dialback secret (keys we made verify with it).
    pub secret: String,
    /// Whether a certificate chain verifies for a domain.
    pub verify: Box<CertificateCheck>,
}

impl Settings {
    fn serves(&self, domain: &str) -> bool {
        self.hosts.iter().any(|h| h == domain)
    }
}

pub enum Input {
    Header(StreamHeader),
    /// A top-level element (dialback elements use the `db` prefix of the stream header,
    /// so elements are checked here, not by the driver).
    Element(Stanza),
    /// TLS is up (after [`Action::StartTls`]); the certificates the remote presented.
    TlsStarted(Vec<CertificateDer<'static>>),
    /// The authoritative server's answer for a `db:result` we received.
    Verified {
        remote: String,
        local: String,
        valid: bool,
    },
}

#[derive(Debug)]
pub enum Action {
    /// Write our stream header.
    Header(String),
    Send(String),
    /// `<proceed/>` was written: upgrade to TLS, answer [`Input::TlsStarted`].
    StartTls,
    /// SASL succeeded: the next thing read is a new stream header.
    Restart,
    /// Ask `remote`'s authoritative server whether `key` is valid for this stream;
    /// answer [`Input::Verified`] whenever it is known.
    Verify {
        local: String,
        remote: String,
        key: String,
    },
    /// A checked stanza for the router (`jabber:server` mapped to the router's
    /// namespace); `original` is what to bounce if the router is away.
    Route {
        bytes: Bytes,
        original: Stanza,
    },
    /// XEP-0198 `<r/>`: answer `<a h='N'/>` once the router acknowledged everything
    /// routed before (the first N stanzas since `<enable/>` are then safe).
    AckWhenSafe(u64),
    Close(Close),
}

pub struct Incoming {
    /// Our id of the current stream (dialback keys are bound to it); new at each
    /// restart (RFC 6120 4.7.3).
    pub stream_id: String,
    /// The header's `to` (a local domain) and `from` (the remote's claim).
    pub local: String,
    remote: Option<String>,
    awaiting_header: bool,
    tls: bool,
    certs: Vec<CertificateDer<'static>>,
    /// Whether the remote's certificate verified for `remote`.
    cert_valid: bool,
    sasl_done: bool,
    /// (remote domain, local domain) pairs authenticated on this stream.
    authorized: HashSet<(String, String)>,
    /// Dialback verifications under way.
    pending: HashSet<(String, String)>,
    /// XEP-0198: stanzas received since the remote enabled stream management.
    received: Option<u64>,
}

impl Incoming {
    /// A new incoming connection; `certs` when it started with TLS.
    pub fn new(tls: bool, certs: Vec<CertificateDer<'static>>) -> Incoming {
        Incoming {
            stream_id: String::new(),
            local: String::new(),
            remote: None,
            awaiting_header: true,
            tls,
            certs,
            cert_valid: false,
            sasl_done: false,
            authorized: HashSet::new(),
            pending: HashSet::new(),
            received: None,
        }
    }

    pub fn expects_header(&self) -> bool {
        self.awaiting_header
    }

    pub fn step(&mut self, settings: &Settings, input: Input) -> Vec<Action> {
        let mut out = vec![];
        let result = match input {
            Input::Header(h) if self.awaiting_header => self.header(settings, h, &mut out),
            Input::Header(_) => Err(stream_error(
                StreamErrorCondition::NotWellFormed,
                "a second stream header",
            )),
            Input::Element(_) if self.awaiting_header => Err(stream_error(
                StreamErrorCondition::NotWellFormed,
                "expected a stream header",
            )),
            Input::Element(e) => self.element(settings, e, &mut out),
            Input::TlsStarted(certs) => {
                self.tls = true;
                self.certs = certs;
                self.awaiting_header = true;
                Ok(())
            }
            Input::Verified {
                remote,
                local,
                valid,
            } => {
                self.verified(remote, local, valid, &mut out);
                Ok(())
            }
        };
        if let Err(close) = result {
            out.push(Action::Close(close));
        }
        out
    }

    /// The remote's stream header: ours in answer, then the features.
    fn header(
        &mut self,
        settings: &Settings,
        header: StreamHeader,
        out: &mut Vec<Action>,
    ) -> Result<(), Close> {
        let to = header.to.as_deref().unwrap_or("").to_ascii_lowercase();
        let from = header.from.as_deref().map(str::to_ascii_lowercase);
        if let Some(from) = &from {
            tracing::Span::current().record("remote", from.as_str());
        }
        self.stream_id = format!(
            "{:016x}{:04x}",
            rand::random::<u64>(),
            rand::random::<u16>()
        );
        tracing::Span::current().record("id", self.stream_id.as_str());
        if !self.local.is_empty() && to != self.local {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                "a restarted stream must keep its domain",
            ));
        }
        out.push(Action::Header(xml::header(
            &to,
            from.as_deref().unwrap_or(""),
            Some(&self.stream_id),
        )));
        if !settings.serves(&to) {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                format!("'{to}' is not served here"),
            ));
        }
        if let Some(f) = &from {
            if settings.serves(f) || jid::Jid::new(f).is_err() {
                return Err(stream_error(
                    StreamErrorCondition::InvalidFrom,
                    format!("'{f}' is not a remote domain"),
                ));
            }
        }
        self.local = to;
        self.remote = from;
        self.awaiting_header = false;
        if self.tls {
            if let Some(remote) = &self.remote {
                let verdict = (settings.verify)(&self.certs, remote);
                self.cert_valid = verdict.is_ok();
                debug!(valid = self.cert_valid, reason = ?verdict.err(), "remote certificate");
            }
        }
        if header.version.as_deref() != Some("1.0") {
            // A pre-1.0 server: dialback only, no features.
            return Ok(());
        }
        let mut features = vec![];
        if !self.tls {
            features.push(Feature::StartTls {
                required: settings.require_encryption,
            });
        }
        if self.tls && !self.sasl_done && self.cert_valid && settings.sasl_external {
            features.push(Feature::Mechanisms(vec!["EXTERNAL".into()]));
        }
        if settings.dialback && (self.tls || !settings.require_encryption) {
            features.push(Feature::Dialback);
        }
        if self.tls || !settings.require_encryption {
            features.push(Feature::StreamManagement);
        }
        out.push(Action::Send(features_xml(&features)));
        Ok(())
    }

    fn element(
        &mut self,
        settings: &Settings,
        element: Stanza,
        out: &mut Vec<Action>,
    ) -> Result<(), Close> {
        if let Some(db) = Dialback::parse(&element) {
            let db = db.map_err(|e| stream_error(StreamErrorCondition::InvalidXml, e))?;
            self.require_tls(settings)?;
            return self.dialback(settings, db, out);
        }
        // Everything else must be a well-formed, self-contained element.
        validate_stanza(element.as_slice())?;
        match (element.name(), element.xmlns()) {
            ("starttls", Some(NS_TLS)) => self.starttls(out),
            ("auth", Some(NS_SASL)) => self.sasl(settings, &element, out),
            ("message" | "presence" | "iq", _) => {
                self.stanza(element, out)?;
                if let Some(n) = &mut self.received {
                    *n += 1;
                }
                Ok(())
            }
            ("enable", Some(NS_SM)) => {
                self.enable(out);
                Ok(())
            }
            ("r", Some(NS_SM)) if self.received.is_some() => {
                out.push(Action::AckWhenSafe(self.received.unwrap_or(0)));
                Ok(())
            }
            // We send no stanzas on an incoming stream: nothing to count.
            ("a", Some(NS_SM)) if self.received.is_some() => Ok(()),
            ("stream:error", _) => Err(Close::Gone(format!(
                "the remote sent a stream error: {}",
                jrs_component::client::error_condition(&element)
            ))),
            (other, _) => Err(stream_error(
                StreamErrorCondition::UnsupportedStanzaType,
                format!("<{other}> is not expected here"),
            )),
        }
    }

    /// XEP-0198 `<enable/>`: once some domain is authenticated, and once; never resumable
    /// (a new stream carries what the remote sends again).
    fn enable(&mut self, out: &mut Vec<Action>) {
        let refusal = if self.authorized.is_empty() {
            Some("authenticate first")
        } else if self.received.is_some() {
            Some("stream management is enabled already")
        } else {
            None
        };
        match refusal {
            Some(text) => {
                debug!(text, "XEP-0198 enable refused");
                out.push(Action::Send(format!(
                    "<failed xmlns='{NS_SM}'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
                )));
            }
            None => {
                debug!("XEP-0198 enabled on the incoming stream");
                self.received = Some(0);
                out.push(Action::Send(format!("<enabled xmlns='{NS_SM}'/>")));
            }
        }
    }

    fn require_tls(&self, settings: &Settings) -> Result<(), Close> {
        if settings.require_encryption && !self.tls {
            return Err(stream_error(
                StreamErrorCondition::PolicyViolation,
                "encryption is required: STARTTLS first",
            ));
        }
        Ok(())
    }

    fn starttls(&mut self, out: &mut Vec<Action>) -> Result<(), Close> {
        if self.tls {
            return Err(stream_error(
                StreamErrorCondition::PolicyViolation,
                "TLS is already established",
            ));
        }
        out.push(Action::Send(format!("<proceed xmlns='{NS_TLS}'/>")));
        out.push(Action::StartTls);
        Ok(())
    }

    /// SASL EXTERNAL: the certificate verified for the stream's `from` domain; the
    /// authorization identity, if given, must be that domain.
    fn sasl(
        &mut self,
        settings: &Settings,
        auth: &Stanza,
        out: &mut Vec<Action>,
    ) -> Result<(), Close> {
        self.require_tls(settings)?;
        let mechanism = auth.attr("mechanism").unwrap_or_default();
        let payload = String::from_utf8_lossy(auth.inner()).trim().to_owned();
        let authzid = match payload.as_str() {
            "" | "=" => String::new(),
            b64 => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_else(|| "\u{0}invalid".into())
                .to_ascii_lowercase(),
        };
        let remote = self.remote.clone().unwrap_or_default();
        let ok = mechanism == "EXTERNAL"
            && self.cert_valid
            && !self.sasl_done
            && settings.sasl_external
            && !remote.is_empty()
            && (authzid.is_empty() || authzid == remote);
        if !ok {
            warn!(%mechanism, %authzid, "SASL refused");
            out.push(Action::Send(format!(
                "<failure xmlns='{NS_SASL}'><not-authorized/></failure>"
            )));
            return Ok(());
        }
        out.push(Action::Send(format!("<success xmlns='{NS_SASL}'/>")));
        info!(remote = %remote, local = %self.local, "authenticated with SASL EXTERNAL");
        self.authorized.insert((remote, self.local.clone()));
        self.sasl_done = true;
        self.awaiting_header = true;
        out.push(Action::Restart);
        Ok(())
    }

    fn dialback(
        &mut self,
        settings: &Settings,
        db: Dialback,
        out: &mut Vec<Action>,
    ) -> Result<(), Close> {
        if db.verify {
            // We are the authoritative server: was this key made by us?
            let id = db.id.clone().unwrap_or_default();
            let valid = settings.serves(&db.to)
                && dialback::check(&settings.secret, &db.from, &db.to, &id, &db.key);
            info!(receiving = %db.from, originating = %db.to, %id, valid, "answering db:verify");
            out.push(Action::Send(xml::db_verify_answer(
                &db.to, &db.from, &id, valid,
            )));
            return Ok(());
        }
        if db.kind.is_some() {
            return Err(stream_error(
                StreamErrorCondition::UnsupportedStanzaType,
                "a db:result answer on an incoming stream",
            ));
        }
        // A request: the remote `from` claims it may send to our `to`.
        if !settings.serves(&db.to) {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                format!("'{}' is not served here", db.to),
            ));
        }
        if settings.serves(&db.from) || !settings.dialback {
            out.push(Action::Send(xml::db_result_answer(&db.to, &db.from, false)));
            return Ok(());
        }
        let pair = (db.from.clone(), db.to.clone());
        if self.authorized.contains(&pair) {
            out.push(Action::Send(xml::db_result_answer(&db.to, &db.from, true)));
            return Ok(());
        }
        if !self.pending.insert(pair) {
            return Ok(());
        }
        info!(remote = %db.from, local = %db.to, "verifying a dialback key with the remote's authoritative server");
        out.push(Action::Verify {
            local: db.to,
            remote: db.from,
            key: db.key,
        });
        Ok(())
    }

    fn verified(&mut self, remote: String, local: String, valid: bool, out: &mut Vec<Action>) {
        let pair = (remote, local);
        self.pending.remove(&pair);
        let answer = xml::db_result_answer(&pair.1, &pair.0, valid);
        crate::metrics::dialback("in", valid);
        if valid {
            info!(remote = %pair.0, local = %pair.1, "remote authenticated with dialback");
            self.authorized.insert(pair);
        } else {
            warn!(remote = %pair.0, local = %pair.1, "dialback verification failed");
        }
        out.push(Action::Send(answer));
    }

    /// A stanza from the remote: its addresses must name a pair authenticated on this
    /// stream.
    fn stanza(&mut self, stanza: Stanza, out: &mut Vec<Action>) -> Result<(), Close> {
        let from = stanza.from().and_then(domain_of);
        let to = stanza.to().and_then(domain_of);
        let Some(from) = from else {
            return Err(stream_error(
                StreamErrorCondition::InvalidFrom,
                "a stanza needs a valid 'from' address",
            ));
        };
        let Some(to) = to else {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                "a stanza needs a valid 'to' address",
            ));
        };
        if !self.authorized.contains(&(from.clone(), to.clone())) {
            let from_known = self.authorized.iter().any(|(r, _)| *r == from);
            return Err(if from_known {
                stream_error(
                    StreamErrorCondition::HostUnknown,
                    format!("'{from}' is not authenticated for '{to}' on this stream"),
                )
            } else if self.authorized.is_empty() {
                stream_error(StreamErrorCondition::NotAuthorized, "authenticate first")
            } else {
                stream_error(
                    StreamErrorCondition::InvalidFrom,
                    format!("'{from}' was not authenticated on this stream"),
                )
            });
        }
        let Some(bytes) = xml::to_internal(&stanza) else {
            return Err(stream_error(
                StreamErrorCondition::InvalidNamespace,
                "stanzas must be in jabber:server",
            ));
        };
        out.push(Action::Route {
            bytes,
            original: stanza,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            hosts: vec!["here.example".into()],
            require_encryption: true,
            sasl_external: true,
            dialback: true,
            secret: "s3cret".into(),
            // Test certificates: a chain of one whose bytes name the domain.
            verify: Box::new(|certs, domain| match certs.first() {
                Some(c) if c.as_ref() == domain.as_bytes() => Ok(()),
                _ => Err("no".into()),
            }),
        }
    }

    fn header(from: &str) -> Input {
        let xml = format!(
            "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' \
             xmlns:db='jabber:server:dialback' to='here.example' from='{from}' version='1.0'>"
        );
        Input::Header(StreamHeader::parse(&Bytes::from(xml), Some("jabber:server")).unwrap())
    }

    fn el(xml: &str) -> Input {
        Input::Element(Stanza::parse(Bytes::from(xml.to_owned())).unwrap())
    }

    fn sends(actions: &[Action]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    fn closed(actions: &[Action]) -> Option<StreamErrorCondition> {
        actions.iter().find_map(|a| match a {
            Action::Close(Close::Error(e)) => Some(e.condition),
            _ => None,
        })
    }

    fn cert(domain: &str) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(domain.as_bytes().to_vec())]
    }

    /// Through STARTTLS, with the remote's certificate `certs`.
    fn over_tls(s: &Settings, certs: Vec<CertificateDer<'static>>) -> (Incoming, Vec<Action>) {
        let mut i = Incoming::new(false, vec![]);
        let a = i.step(s, header("there.example"));
        assert!(sends(&a).contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"));
        assert!(
            !sends(&a).contains("dialback"),
            "no dialback before TLS when it is required"
        );
        let a = i.step(s, el("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"));
        assert!(matches!(a.last(), Some(Action::StartTls)));
        i.step(s, Input::TlsStarted(certs));
        assert!(i.expects_header());
        let a = i.step(s, header("there.example"));
        (i, a)
    }

    #[test]
    fn sasl_external_with_a_verified_certificate() {
        let s = settings();
        let (mut i, a) = over_tls(&s, cert("there.example"));
        assert!(sends(&a).contains("<mechanism>EXTERNAL</mechanism>"));
        let a = i.step(&s, el("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>dGhlcmUuZXhhbXBsZQ==</auth>"));
        assert!(sends(&a).contains("<success"));
        assert!(matches!(a.last(), Some(Action::Restart)));
        let a = i.step(&s, header("there.example"));
        assert!(!sends(&a).contains("EXTERNAL"), "SASL only once");
        let a = i.step(
            &s,
            el("<message from='a@there.example' to='b@here.example'><body>x</body></message>"),
        );
        assert!(matches!(&a[..], [Action::Route { bytes, .. }] if bytes.starts_with(b"<message")));
    }

    #[test]
    fn no_external_without_a_verified_certificate_and_wrong_authzid_refused() {
        let s = settings();
        let (_, a) = over_tls(&s, cert("someone-else.example"));
        assert!(!sends(&a).contains("EXTERNAL") && sends(&a).contains("dialback"));
        let (mut i, _) = over_tls(&s, cert("there.example"));
        // base64("other.example")
        let a = i.step(&s, el("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>b3RoZXIuZXhhbXBsZQ==</auth>"));
        assert!(sends(&a).contains("<not-authorized/>"));
    }

    #[test]
    fn dialback_request_is_verified_then_answered() {
        let s = settings();
        let (mut i, _) = over_tls(&s, vec![]);
        let a = i.step(
            &s,
            el("<db:result from='there.example' to='here.example'>key</db:result>"),
        );
        assert!(
            matches!(&a[..], [Action::Verify { remote, key, .. }] if remote == "there.example" && key == "key")
        );
        // A stanza before the answer is not authorized.
        let a = i.step(
            &s,
            el("<message from='a@there.example' to='b@here.example'/>"),
        );
        assert_eq!(closed(&a), Some(StreamErrorCondition::NotAuthorized));
        let (mut i, _) = over_tls(&s, vec![]);
        i.step(
            &s,
            el("<db:result from='there.example' to='here.example'>key</db:result>"),
        );
        let a = i.step(
            &s,
            Input::Verified {
                remote: "there.example".into(),
                local: "here.example".into(),
                valid: true,
            },
        );
        assert!(sends(&a).contains("type='valid'"));
        let a = i.step(
            &s,
            el("<presence from='a@there.example' to='b@here.example'/>"),
        );
        assert!(matches!(&a[..], [Action::Route { .. }]));
        // Another remote domain on the same stream was not authenticated.
        let a = i.step(
            &s,
            el("<presence from='a@third.example' to='b@here.example'/>"),
        );
        assert_eq!(closed(&a), Some(StreamErrorCondition::InvalidFrom));
    }

    #[test]
    fn answers_db_verify_for_keys_we_made() {
        let s = settings();
        let (mut i, _) = over_tls(&s, vec![]);
        let key = dialback::key("s3cret", "there.example", "here.example", "sid");
        let a = i.step(
            &s,
            el(&format!(
                "<db:verify from='there.example' to='here.example' id='sid'>{key}</db:verify>"
            )),
        );
        assert!(sends(&a).contains("type='valid'"), "{}", sends(&a));
        let a = i.step(
            &s,
            el("<db:verify from='there.example' to='here.example' id='sid'>forged</db:verify>"),
        );
        assert!(sends(&a).contains("type='invalid'"));
    }

    #[test]
    fn refusals() {
        let s = settings();
        let mut i = Incoming::new(false, vec![]);
        i.step(&s, header("there.example"));
        let a = i.step(
            &s,
            el("<db:result from='there.example' to='here.example'>k</db:result>"),
        );
        assert_eq!(
            closed(&a),
            Some(StreamErrorCondition::PolicyViolation),
            "dialback before TLS"
        );
        let mut i = Incoming::new(true, vec![]);
        let a = i.step(&s, header("here.example"));
        assert_eq!(
            closed(&a),
            Some(StreamErrorCondition::InvalidFrom),
            "our own domain as from"
        );
        let (mut i, _) = over_tls(&s, vec![]);
        let a = i.step(
            &s,
            el("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"),
        );
        assert_eq!(
            closed(&a),
            Some(StreamErrorCondition::PolicyViolation),
            "TLS twice"
        );
        let (mut i, _) = over_tls(&s, vec![]);
        let a = i.step(
            &s,
            el("<message from='a@there.example' to='b@here.example'><!-- x --></message>"),
        );
        assert_eq!(closed(&a), Some(StreamErrorCondition::RestrictedXml));
        let (mut i, _) = over_tls(&s, vec![]);
        let a = i.step(&s, el("<message from='a@there.example' to='b@here.example'><body>\u{FFFF}</body></message>"));
        assert_eq!(
            closed(&a),
            Some(StreamErrorCondition::NotWellFormed),
            "raw U+FFFF"
        );
    }

    #[test]
    fn stream_management_counts_stanzas_once_authenticated() {
        let s = settings();
        let (mut i, a) = over_tls(&s, cert("there.example"));
        assert!(
            sends(&a).contains("<sm xmlns='urn:xmpp:sm:3'/>"),
            "{}",
            sends(&a)
        );
        let a = i.step(&s, el("<enable xmlns='urn:xmpp:sm:3'/>"));
        assert!(sends(&a).contains("<failed"), "not before authentication");
        i.step(
            &s,
            el("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"),
        );
        i.step(&s, header("there.example"));
        let a = i.step(&s, el("<enable xmlns='urn:xmpp:sm:3' resume='true'/>"));
        assert_eq!(
            sends(&a),
            "<enabled xmlns='urn:xmpp:sm:3'/>",
            "never resumable"
        );
        for _ in 0..2 {
            i.step(
                &s,
                el("<message from='a@there.example' to='b@here.example'><body>x</body></message>"),
            );
        }
        let a = i.step(&s, el("<r xmlns='urn:xmpp:sm:3'/>"));
        assert!(matches!(&a[..], [Action::AckWhenSafe(2)]), "{a:?}");
        let a = i.step(&s, el("<enable xmlns='urn:xmpp:sm:3'/>"));
        assert!(sends(&a).contains("<failed"), "only once");
    }
}
