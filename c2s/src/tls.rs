//! Certificates per domain (chosen by SNI), the self-signed one made on first start, and
//! the TLS settings of both listener kinds.

use std::collections::HashMap;
use std::sync::Arc;

use jrs_component::transport::load_host_certs;

use crate::channel_binding::end_point_hash;
use crate::config::Host;

/// ALPN protocol of XMPP client connections over direct TLS (XEP-0368).
pub const ALPN_XMPP_CLIENT: &[u8] = b"xmpp-client";

/// The TLS configurations c2s serves with.
#[derive(Clone)]
pub struct Tls {
    /// For STARTTLS upgrades.
    pub starttls: Arc<rustls::ServerConfig>,
    /// For direct TLS (XEP-0368): the same certificates, ALPN `xmpp-client`.
    pub direct: Arc<rustls::ServerConfig>,
    /// For HTTPS (the web edge): the same certificates, ALPN `http/1.1`.
    pub web: Arc<rustls::ServerConfig>,
    /// The RFC 5929 `tls-server-end-point` hash of each host's certificate.
    pub endpoints: Arc<HashMap<String, Vec<u8>>>,
}

/// Loads every host's certificate (making self-signed ones where configured): at start,
/// and again on SIGHUP (new connections get the new certificates, open ones keep theirs).
/// `compact_records`: TLS 1.3 client connections' records are run by c2s after the
/// handshake (`<tls record-layer>`), which needs rustls to hand the keys over.
pub fn load(hosts: &[Host], compact_records: bool) -> anyhow::Result<Tls> {
    let certs = load_host_certs(
        hosts,
        "clients will not trust a self-signed certificate: configure a real one for production",
    )?;
    let endpoints = certs
        .chains
        .iter()
        .map(|(name, (chain, _))| (name.clone(), end_point_hash(chain[0].as_ref())))
        .collect();
    let mut starttls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(certs.resolver.clone());
    let mut direct = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(certs.resolver.clone());
    direct.alpn_protocols = vec![ALPN_XMPP_CLIENT.to_vec()];
    let mut web = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(certs.resolver);
    web.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Session resumption (TLS 1.3 PSK, TLS 1.2 tickets) for reconnecting clients: a
    // resumed handshake skips the certificate signature, most of a full handshake's CPU
    // (docs/benchmarks.md, "FAST reconnect"). Stateless tickets, so nothing per client
    // is kept here; keys are random per process and rotate every 6 hours (rustls'
    // recommended ticketer), and resumption still runs an ephemeral key exchange
    // (PSK-DHE only), so forward secrecy holds. One ticketer per configuration: a
    // ticket from one listener kind (ALPN) is never accepted by another.
    for config in [&mut starttls, &mut direct, &mut web] {
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    }
    for config in [&mut starttls, &mut direct] {
        config.enable_secret_extraction = compact_records;
    }
    Ok(Tls {
        starttls: Arc::new(starttls),
        direct: Arc::new(direct),
        web: Arc::new(web),
        endpoints: Arc::new(endpoints),
    })
}
