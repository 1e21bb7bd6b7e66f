//! Certificates per domain (chosen by SNI), the self-signed one made on first start, and
//! the TLS settings of both listener kinds.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use jrs_component::transport::{load_certs, load_key, write_self_signed};

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
}

/// Picks the certificate of the domain the client asked for (SNI); clients that send no
/// SNI (or an unknown name) get the first domain's.
#[derive(Debug)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let named = hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()));
        Some(named.unwrap_or(&self.default).clone())
    }
}

/// Loads every host's certificate, making self-signed ones first where configured and
/// missing.
pub fn load(hosts: &[Host]) -> anyhow::Result<Tls> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let mut by_name = HashMap::new();
    let mut first = None;
    for host in hosts {
        if host.self_signed && !(host.cert.exists() && host.key.exists()) {
            make_self_signed(host)?;
        }
        let certs = load_certs(&host.cert)?;
        let key = load_key(&host.key)?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .with_context(|| format!("the key in {} cannot sign", host.key.display()))?;
        let certified = Arc::new(CertifiedKey::new(certs, signing));
        first.get_or_insert_with(|| certified.clone());
        by_name.insert(host.name.clone(), certified);
    }
    let resolver = Arc::new(SniResolver {
        by_name,
        default: first.context("no host configured")?,
    });
    let starttls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    let mut direct = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    direct.alpn_protocols = vec![ALPN_XMPP_CLIENT.to_vec()];
    Ok(Tls {
        starttls: Arc::new(starttls),
        direct: Arc::new(direct),
    })
}

/// Writes a self-signed certificate for the host.
fn make_self_signed(host: &Host) -> anyhow::Result<()> {
    write_self_signed(&host.name, &host.cert, &host.key)?;
    info!(host = %host.name, cert = %host.cert.display(), "made a self-signed certificate");
    warn!(host = %host.name, "clients will not trust a self-signed certificate: configure a real one for production");
    Ok(())
}
