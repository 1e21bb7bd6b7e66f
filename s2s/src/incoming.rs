//! Incoming streams: a remote server connects to us, negotiates TLS, authenticates its
//! domain (SASL EXTERNAL with a certificate that verifies, or dialback with the
//! `db:verify` round trip to its authoritative server) and sends stanzas, which go into
//! the router once checked: well-formed, from a domain authenticated on this stream, to
//! one of ours.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use jrs_stream::validate::validate_stanza;
use jrs_stream::{Frame, Stanza, StanzaErrorCondition, StreamErrorCondition, StreamHeader};

use crate::config::TlsMode;
use crate::dialback;
use crate::link::{stream_error, Close, Link};
use crate::shared::Shared;
use crate::stream::S2sStream;
use crate::xml::{self, domain_of, Dialback, NS_DIALBACK_FEATURE, NS_SASL, NS_SERVER, NS_TLS};

/// The answer of the authoritative server about one `db:result` we received.
struct Outcome {
    remote: String,
    local: String,
    valid: bool,
}

struct In {
    shared: Arc<Shared>,
    link: Link,
    stream_id: String,
    /// The stream header's `to` (a local domain) and `from` (the remote's claim).
    local: String,
    remote: Option<String>,
    /// Whether the remote's certificate verified for `remote`.
    cert_valid: bool,
    sasl_done: bool,
    /// (remote domain, local domain) pairs authenticated on this stream.
    authorized: HashSet<(String, String)>,
    /// Dialback verifications under way.
    pending: HashSet<(String, String)>,
    outcomes: (
        mpsc::UnboundedSender<Outcome>,
        mpsc::UnboundedReceiver<Outcome>,
    ),
}

/// Serves one accepted connection.
pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, mode: TlsMode) {
    let stream = match mode {
        TlsMode::StartTls => S2sStream::Plain(tcp),
        TlsMode::Direct => {
            let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.server_direct.clone());
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => S2sStream::Server(Box::new(tls)),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let config = &shared.config;
    let link = Link::new(
        stream,
        config.limits,
        config.idle_timeout,
        config.rate_bytes,
    );
    let mut conn = In {
        link,
        stream_id: String::new(),
        local: String::new(),
        remote: None,
        cert_valid: false,
        sasl_done: false,
        authorized: HashSet::new(),
        pending: HashSet::new(),
        outcomes: mpsc::unbounded_channel(),
        shared: shared.clone(),
    };
    let close = conn.run().await;
    match &close {
        Close::Error(e) => warn!(error = %e, "closing the incoming stream with a stream error"),
        Close::Closed => info!("the remote closed its stream"),
        Close::Gone(why) => info!(reason = %why, "incoming connection gone"),
    }
    let In {
        link,
        local,
        stream_id,
        shared,
        ..
    } = conn;
    let local = if local.is_empty() {
        shared.config.hosts[0].name.clone()
    } else {
        local
    };
    link.finish(&close, || xml::header(&local, "", Some(&stream_id)))
        .await;
}

impl In {
    async fn run(&mut self) -> Close {
        if let Err(close) = self.open_stream().await {
            return close;
        }
        loop {
            let result = tokio::select! {
                frame = self.link.next_frame() => match frame {
                    Ok(frame) => self.frame(frame).await,
                    Err(close) => Err(close),
                },
                Some(outcome) = self.outcomes.1.recv() => self.outcome(outcome).await,
            };
            if let Err(close) = result {
                return close;
            }
        }
    }

    /// Reads the remote's stream header and answers with ours and the features.
    async fn open_stream(&mut self) -> Result<(), Close> {
        let frame = self.link.next_frame().await?;
        let Frame::StreamOpen(bytes) = frame else {
            return Err(stream_error(
                StreamErrorCondition::NotWellFormed,
                "expected a stream header",
            ));
        };
        self.stream_id = format!(
            "{:016x}{:04x}",
            rand::random::<u64>(),
            self.shared.unique() & 0xffff
        );
        tracing::Span::current().record("id", self.stream_id.as_str());
        let header = StreamHeader::parse(&bytes, Some(NS_SERVER))?;
        let to = header.to.as_deref().unwrap_or("").to_ascii_lowercase();
        let from = header.from.as_deref().map(str::to_ascii_lowercase);
        if let Some(from) = &from {
            tracing::Span::current().record("remote", from.as_str());
        }
        if !self.local.is_empty() && to != self.local {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                "a restarted stream must keep its domain",
            ));
        }
        let ours = xml::header(&to, from.as_deref().unwrap_or(""), Some(&self.stream_id));
        self.link.write(ours.as_bytes()).await?;
        self.link.header_sent = true;
        if !self.shared.config.serves(&to) {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                format!("'{to}' is not served here"),
            ));
        }
        if let Some(f) = &from {
            if self.shared.config.serves(f) || jid::Jid::new(f).is_err() {
                return Err(stream_error(
                    StreamErrorCondition::InvalidFrom,
                    format!("'{f}' is not a remote domain"),
                ));
            }
        }
        self.local = to;
        self.remote = from;
        let tls = self.link.stream().is_tls();
        if tls {
            if let Some(remote) = &self.remote {
                let verdict = self
                    .shared
                    .tls
                    .verifies(&self.link.stream().peer_certificates(), remote);
                self.cert_valid = verdict.is_ok();
                debug!(valid = self.cert_valid, reason = ?verdict.err(), "remote certificate");
            }
        }
        if header.version.as_deref() != Some("1.0") {
            // A pre-1.0 server: dialback only, no features.
            return Ok(());
        }
        let config = &self.shared.config;
        let mut features = String::new();
        if !tls {
            let required = if config.require_encryption {
                "<required/>"
            } else {
                ""
            };
            features.push_str(&format!("<starttls xmlns='{NS_TLS}'>{required}</starttls>"));
        }
        if tls && !self.sasl_done && self.cert_valid && config.sasl_external {
            features.push_str(&format!(
                "<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
            ));
        }
        if config.dialback && (tls || !config.require_encryption) {
            features.push_str(&format!(
                "<dialback xmlns='{NS_DIALBACK_FEATURE}'><errors/></dialback>"
            ));
        }
        self.link
            .write(format!("<stream:features>{features}</stream:features>").as_bytes())
            .await
    }

    async fn frame(&mut self, frame: Frame) -> Result<(), Close> {
        let bytes = match frame {
            Frame::Element(b) => b,
            Frame::StreamClose => return Err(Close::Closed),
            Frame::StreamOpen(_) => {
                return Err(stream_error(
                    StreamErrorCondition::NotWellFormed,
                    "a second stream header",
                ))
            }
        };
        let element = Stanza::parse(bytes)
            .map_err(|e| stream_error(StreamErrorCondition::NotWellFormed, e.to_string()))?;
        if let Some(db) = Dialback::parse(&element) {
            let db = db.map_err(|e| stream_error(StreamErrorCondition::InvalidXml, e))?;
            self.require_tls()?;
            return self.dialback(db).await;
        }
        // Everything else must be a well-formed, self-contained element.
        validate_stanza(element.as_slice())?;
        match (element.name(), element.xmlns()) {
            ("starttls", Some(NS_TLS)) => self.starttls().await,
            ("auth", Some(NS_SASL)) => self.sasl(&element).await,
            ("message" | "presence" | "iq", _) => self.stanza(element).await,
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

    fn require_tls(&self) -> Result<(), Close> {
        if self.shared.config.require_encryption && !self.link.stream().is_tls() {
            return Err(stream_error(
                StreamErrorCondition::PolicyViolation,
                "encryption is required: STARTTLS first",
            ));
        }
        Ok(())
    }

    async fn starttls(&mut self) -> Result<(), Close> {
        if self.link.stream().is_tls() {
            return Err(stream_error(
                StreamErrorCondition::PolicyViolation,
                "TLS is already established",
            ));
        }
        if self.link.has_buffered() {
            return Err(stream_error(
                StreamErrorCondition::PolicyViolation,
                "data after <starttls/> before <proceed/>",
            ));
        }
        self.link
            .write(format!("<proceed xmlns='{NS_TLS}'/>").as_bytes())
            .await?;
        self.link
            .accept_tls(self.shared.tls.server_starttls.clone())
            .await?;
        debug!("TLS established");
        self.open_stream().await
    }

    /// SASL EXTERNAL: the certificate verified for the stream's `from` domain; the
    /// authorization identity, if given, must be that domain.
    async fn sasl(&mut self, auth: &Stanza) -> Result<(), Close> {
        self.require_tls()?;
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
            && self.shared.config.sasl_external
            && !remote.is_empty()
            && (authzid.is_empty() || authzid == remote);
        if !ok {
            warn!(%mechanism, %authzid, "SASL refused");
            return self
                .link
                .write(format!("<failure xmlns='{NS_SASL}'><not-authorized/></failure>").as_bytes())
                .await;
        }
        self.link
            .write(format!("<success xmlns='{NS_SASL}'/>").as_bytes())
            .await?;
        info!(remote = %remote, local = %self.local, "authenticated with SASL EXTERNAL");
        self.authorized.insert((remote, self.local.clone()));
        self.sasl_done = true;
        self.link.restart();
        self.open_stream().await
    }

    async fn dialback(&mut self, db: Dialback) -> Result<(), Close> {
        if db.verify {
            // We are the authoritative server: was this key made by us?
            let id = db.id.clone().unwrap_or_default();
            let valid = self.shared.config.serves(&db.to)
                && dialback::check(&self.shared.secret, &db.from, &db.to, &id, &db.key);
            info!(receiving = %db.from, originating = %db.to, %id, valid, "answering db:verify");
            return self
                .link
                .write(xml::db_verify_answer(&db.to, &db.from, &id, valid).as_bytes())
                .await;
        }
        if db.kind.is_some() {
            return Err(stream_error(
                StreamErrorCondition::UnsupportedStanzaType,
                "a db:result answer on an incoming stream",
            ));
        }
        // A request: the remote `from` claims it may send to our `to`.
        if !self.shared.config.serves(&db.to) {
            return Err(stream_error(
                StreamErrorCondition::HostUnknown,
                format!("'{}' is not served here", db.to),
            ));
        }
        if self.shared.config.serves(&db.from) || !self.shared.config.dialback {
            return self
                .link
                .write(xml::db_result_answer(&db.to, &db.from, false).as_bytes())
                .await;
        }
        let pair = (db.from.clone(), db.to.clone());
        if self.authorized.contains(&pair) {
            return self
                .link
                .write(xml::db_result_answer(&db.to, &db.from, true).as_bytes())
                .await;
        }
        if !self.pending.insert(pair) {
            return Ok(());
        }
        info!(remote = %db.from, local = %db.to, "verifying a dialback key with the remote's authoritative server");
        let answer =
            crate::outgoing::verify(&self.shared, &db.to, &db.from, &self.stream_id, &db.key);
        let tx = self.outcomes.0.clone();
        tokio::spawn(async move {
            let valid = answer.await.unwrap_or(false);
            let _ = tx.send(Outcome {
                remote: db.from,
                local: db.to,
                valid,
            });
        });
        Ok(())
    }

    async fn outcome(&mut self, o: Outcome) -> Result<(), Close> {
        let pair = (o.remote.clone(), o.local.clone());
        self.pending.remove(&pair);
        if o.valid {
            info!(remote = %o.remote, local = %o.local, "remote authenticated with dialback");
            self.authorized.insert(pair);
        } else {
            warn!(remote = %o.remote, local = %o.local, "dialback verification failed");
        }
        self.link
            .write(xml::db_result_answer(&o.local, &o.remote, o.valid).as_bytes())
            .await
    }

    /// A stanza from the remote: checked, mapped and handed to the router.
    async fn stanza(&mut self, stanza: Stanza) -> Result<(), Close> {
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
        if !self.shared.to_router(bytes) {
            if let Some(reply) = stanza.error_reply(
                StanzaErrorCondition::ServiceUnavailable,
                "the server is restarting",
            ) {
                self.link.write(&reply).await?;
            }
        }
        Ok(())
    }
}
