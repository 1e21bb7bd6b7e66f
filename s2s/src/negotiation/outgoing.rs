//! Opening an outgoing server stream, as a state machine without I/O: our header, the
//! remote's header and features, STARTTLS, the certificate check, SASL EXTERNAL where
//! both sides allow it, and the decision to use dialback. The driver (`negotiate` in
//! `outgoing.rs`) connects and does the I/O; what follows (dialback per local domain,
//! stanzas) is the connection task's.

use base64::Engine;
use rustls::pki_types::CertificateDer;
use tracing::{debug, info};

use jrs_stream::{Stanza, StreamErrorCondition, StreamHeader};
use jrs_sx::features::{NS_SASL, NS_TLS};
use jrs_sx::{stream_error, Close, Offered};

use crate::tls::CertificateCheck;
use crate::xml;

/// What an outgoing stream may do (from `s2s.xml`), and how certificates are checked.
pub struct Settings<'a> {
    pub require_encryption: bool,
    pub sasl_external: bool,
    pub dialback: bool,
    pub accept_unverified: bool,
    pub verify: &'a CertificateCheck,
}

pub enum Input {
    Header(StreamHeader),
    Element(Stanza),
    /// TLS is up (after [`Action::StartTls`]); the certificates the remote presented.
    TlsStarted(Vec<CertificateDer<'static>>),
}

#[derive(Debug)]
pub enum Action {
    /// Write our stream header.
    Header(String),
    Send(String),
    /// Upgrade to TLS as the client; answer [`Input::TlsStarted`].
    StartTls,
    /// SASL succeeded: a new stream starts on the connection.
    Restart,
    /// The stream is ready for dialback or already authenticated.
    Done(Established),
    Close(Close),
}

/// A negotiated stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// The remote's id of the stream (dialback keys are bound to it).
    pub stream_id: String,
    /// The local domain SASL EXTERNAL authenticated, if it did.
    pub sasl_local: Option<String>,
    /// Whether dialback may be used on this stream (policy on unverified certificates).
    pub dialback: bool,
    /// The remote offers XEP-0198 stream management.
    pub stream_management: bool,
}

enum State {
    /// Our header is sent; waiting for the remote's.
    AwaitHeader,
    /// Waiting for the remote's `<stream:features/>`.
    AwaitFeatures {
        stream_id: String,
    },
    /// `<starttls/>` sent.
    AwaitProceed,
    /// Waiting for the TLS handshake.
    Upgrading,
    /// `<auth mechanism='EXTERNAL'/>` sent.
    AwaitSasl {
        stream_id: String,
    },
    Finished,
}

pub struct Outgoing {
    local: String,
    remote: String,
    tls: bool,
    /// Whether the remote's certificate verified for its domain (known once TLS is up).
    cert_valid: Option<bool>,
    sasl_done: bool,
    /// The last features offered XEP-0198.
    stream_management: bool,
    state: State,
}

impl Outgoing {
    /// A stream from `local` to `remote` on a new connection (`certs` when it started
    /// with TLS). Returns the machine and the first actions (our header).
    pub fn start(
        settings: &Settings,
        local: &str,
        remote: &str,
        tls: bool,
        certs: Vec<CertificateDer<'static>>,
    ) -> (Outgoing, Vec<Action>) {
        let mut o = Outgoing {
            local: local.to_owned(),
            remote: remote.to_owned(),
            tls,
            cert_valid: None,
            sasl_done: false,
            stream_management: false,
            state: State::AwaitHeader,
        };
        if tls {
            o.check_certificate(settings, &certs);
        }
        let first = vec![o.header()];
        (o, first)
    }

    pub fn expects_header(&self) -> bool {
        matches!(self.state, State::AwaitHeader)
    }

    fn header(&self) -> Action {
        Action::Header(xml::header(&self.local, &self.remote, None))
    }

    fn check_certificate(&mut self, settings: &Settings, certs: &[CertificateDer<'static>]) {
        let verdict = (settings.verify)(certs, &self.remote);
        if let Err(why) = &verdict {
            info!(reason = %why, "the remote certificate does not verify");
        }
        self.cert_valid = Some(verdict.is_ok());
    }

    pub fn step(&mut self, settings: &Settings, input: Input) -> Vec<Action> {
        let mut out = vec![];
        let state = std::mem::replace(&mut self.state, State::Finished);
        self.state = match self.advance(settings, state, input, &mut out) {
            Ok(next) => next,
            Err(close) => {
                out.push(Action::Close(close));
                State::Finished
            }
        };
        out
    }

    fn advance(
        &mut self,
        settings: &Settings,
        state: State,
        input: Input,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        match (state, input) {
            (State::AwaitHeader, Input::Header(h)) => {
                let stream_id = h
                    .id
                    .clone()
                    .ok_or_else(|| Close::Gone("the remote's stream header has no id".into()))?;
                debug!(id = %stream_id, "stream opened");
                if h.version.as_deref() == Some("1.0") {
                    Ok(State::AwaitFeatures { stream_id })
                } else {
                    // A pre-1.0 server has no features: dialback only.
                    self.decide(settings, stream_id, &Offered::default(), out)
                }
            }
            (State::AwaitFeatures { stream_id }, Input::Element(e)) => {
                if e.name() == "stream:error" {
                    return Err(remote_error(&e));
                }
                if e.name() != "stream:features" {
                    return Err(stream_error(
                        StreamErrorCondition::NotAuthorized,
                        "expected stream features",
                    ));
                }
                self.decide(settings, stream_id, &Offered::parse(&e), out)
            }
            (State::AwaitProceed, Input::Element(e)) => {
                if e.name() != "proceed" || e.xmlns() != Some(NS_TLS) {
                    return Err(Close::Gone(format!("STARTTLS refused ({})", e.name())));
                }
                out.push(Action::StartTls);
                Ok(State::Upgrading)
            }
            (State::Upgrading, Input::TlsStarted(certs)) => {
                self.tls = true;
                self.check_certificate(settings, &certs);
                out.push(self.header());
                Ok(State::AwaitHeader)
            }
            (State::AwaitSasl { stream_id }, Input::Element(e)) => {
                if e.name() == "success" && e.xmlns() == Some(NS_SASL) {
                    info!("authenticated with SASL EXTERNAL");
                    self.sasl_done = true;
                    out.push(Action::Restart);
                    out.push(self.header());
                    return Ok(State::AwaitHeader);
                }
                info!(answer = e.name(), "SASL EXTERNAL refused; trying dialback");
                self.dialback(settings, stream_id, out)
            }
            (_, Input::Element(e)) if e.name() == "stream:error" => Err(remote_error(&e)),
            (_, _) => Err(stream_error(
                StreamErrorCondition::NotWellFormed,
                "unexpected in stream negotiation",
            )),
        }
    }

    /// What to do with the features offered.
    fn decide(
        &mut self,
        settings: &Settings,
        stream_id: String,
        offered: &Offered,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        if !self.tls && offered.starttls {
            out.push(Action::Send(format!("<starttls xmlns='{NS_TLS}'/>")));
            return Ok(State::AwaitProceed);
        }
        if !self.tls && settings.require_encryption {
            return Err(stream_error(
                StreamErrorCondition::PolicyViolation,
                "encryption is required and the remote does not offer STARTTLS",
            ));
        }
        self.stream_management = offered.stream_management;
        if self.sasl_done {
            out.push(Action::Done(Established {
                stream_id,
                sasl_local: Some(self.local.clone()),
                dialback: settings.dialback,
                stream_management: self.stream_management,
            }));
            return Ok(State::Finished);
        }
        let verified = self.cert_valid == Some(true);
        if self.tls && verified && offered.mechanism("EXTERNAL") && settings.sasl_external {
            let authzid = base64::engine::general_purpose::STANDARD.encode(&self.local);
            out.push(Action::Send(format!(
                "<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>{authzid}</auth>"
            )));
            return Ok(State::AwaitSasl { stream_id });
        }
        self.dialback(settings, stream_id, out)
    }

    /// Dialback, if the policy allows it on this stream.
    fn dialback(
        &mut self,
        settings: &Settings,
        stream_id: String,
        out: &mut Vec<Action>,
    ) -> Result<State, Close> {
        let verified = self.cert_valid == Some(true);
        let dialback = settings.dialback && (!self.tls || verified || settings.accept_unverified);
        if !dialback {
            return Err(Close::Gone(if self.tls && !verified {
                "the remote certificate does not verify and accept-unverified is off".into()
            } else {
                "no authentication method left (dialback disabled)".into()
            }));
        }
        out.push(Action::Done(Established {
            stream_id,
            sasl_local: None,
            dialback,
            stream_management: self.stream_management,
        }));
        Ok(State::Finished)
    }
}

fn remote_error(e: &Stanza) -> Close {
    Close::Gone(format!(
        "stream error from the remote: {}",
        jrs_component::client::error_condition(e)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use jrs_sx::features::features_xml;
    use jrs_sx::Feature;

    fn verify(certs: &[CertificateDer<'static>], domain: &str) -> Result<(), String> {
        match certs.first() {
            Some(c) if c.as_ref() == domain.as_bytes() => Ok(()),
            _ => Err("no".into()),
        }
    }

    fn settings() -> Settings<'static> {
        Settings {
            require_encryption: true,
            sasl_external: true,
            dialback: true,
            accept_unverified: true,
            verify: &verify,
        }
    }

    fn header(version: bool) -> Input {
        let v = if version { " version='1.0'" } else { "" };
        let xml = format!(
            "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' id='rid'{v}>"
        );
        Input::Header(StreamHeader::parse(&Bytes::from(xml), Some("jabber:server")).unwrap())
    }

    fn el(xml: &str) -> Input {
        Input::Element(Stanza::parse(Bytes::from(xml.to_owned())).unwrap())
    }

    fn features(f: &[Feature]) -> Input {
        el(&features_xml(f))
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

    fn done(actions: &[Action]) -> Option<&Established> {
        actions.iter().find_map(|a| match a {
            Action::Done(e) => Some(e),
            _ => None,
        })
    }

    fn through_tls(s: &Settings, certs: Vec<CertificateDer<'static>>) -> Outgoing {
        let (mut o, first) = Outgoing::start(s, "here.example", "there.example", false, vec![]);
        assert!(matches!(&first[..], [Action::Header(_)]));
        assert!(o.step(s, header(true)).is_empty());
        let a = o.step(
            s,
            features(&[Feature::StartTls { required: true }, Feature::Dialback]),
        );
        assert!(sends(&a).contains("<starttls"));
        let a = o.step(s, el("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"));
        assert!(matches!(&a[..], [Action::StartTls]));
        let a = o.step(s, Input::TlsStarted(certs));
        assert!(matches!(&a[..], [Action::Header(_)]));
        assert!(o.step(s, header(true)).is_empty());
        o
    }

    #[test]
    fn sasl_external_when_the_certificate_verifies() {
        let s = settings();
        let mut o = through_tls(&s, vec![CertificateDer::from(b"there.example".to_vec())]);
        let offer = [
            Feature::Mechanisms(vec!["EXTERNAL".into()]),
            Feature::Dialback,
        ];
        let a = o.step(&s, features(&offer));
        assert!(sends(&a).contains("mechanism='EXTERNAL'>aGVyZS5leGFtcGxl<"));
        let a = o.step(
            &s,
            el("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"),
        );
        assert!(matches!(&a[..], [Action::Restart, Action::Header(_)]));
        o.step(&s, header(true));
        let a = o.step(&s, features(&[Feature::StreamManagement]));
        assert_eq!(
            done(&a),
            Some(&Established {
                stream_id: "rid".into(),
                sasl_local: Some("here.example".into()),
                dialback: true,
                stream_management: true,
            })
        );
    }

    #[test]
    fn dialback_when_the_certificate_does_not_verify_or_sasl_fails() {
        let s = settings();
        let mut o = through_tls(&s, vec![]);
        let a = o.step(
            &s,
            features(&[
                Feature::Mechanisms(vec!["EXTERNAL".into()]),
                Feature::Dialback,
            ]),
        );
        assert!(
            !sends(&a).contains("<auth"),
            "no EXTERNAL with a certificate that does not verify"
        );
        assert!(matches!(
            done(&a),
            Some(Established {
                sasl_local: None,
                dialback: true,
                ..
            })
        ));
        let mut o = through_tls(&s, vec![CertificateDer::from(b"there.example".to_vec())]);
        o.step(
            &s,
            features(&[Feature::Mechanisms(vec!["EXTERNAL".into()])]),
        );
        let a = o.step(
            &s,
            el("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"),
        );
        assert!(matches!(
            done(&a),
            Some(Established {
                sasl_local: None,
                ..
            })
        ));
    }

    #[test]
    fn policy_failures() {
        let mut s = settings();
        // No STARTTLS offered while encryption is required.
        let (mut o, _) = Outgoing::start(&s, "here.example", "there.example", false, vec![]);
        o.step(&s, header(true));
        let a = o.step(&s, features(&[Feature::Dialback]));
        assert!(
            matches!(&a[..], [Action::Close(Close::Error(e))] if e.condition == StreamErrorCondition::PolicyViolation)
        );
        // An unverified certificate without accept-unverified: nothing left.
        s.accept_unverified = false;
        let mut o = through_tls(&s, vec![]);
        let a = o.step(&s, features(&[Feature::Dialback]));
        assert!(matches!(&a[..], [Action::Close(Close::Gone(_))]));
        // A pre-1.0 server over direct TLS: dialback at once.
        s.accept_unverified = true;
        let (mut o, _) = Outgoing::start(&s, "here.example", "there.example", true, vec![]);
        assert!(done(&o.step(&s, header(false))).is_some());
        // A stream error instead of features.
        let (mut o, _) = Outgoing::start(&s, "here.example", "there.example", true, vec![]);
        o.step(&s, header(true));
        let a = o.step(&s, el("<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"));
        assert!(
            matches!(&a[..], [Action::Close(Close::Gone(why))] if why.contains("host-unknown"))
        );
    }
}
