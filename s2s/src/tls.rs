//! TLS for both directions. Certificates are checked by hand after the handshake, not by
//! rustls during it: a remote whose certificate does not verify may still authenticate
//! with dialback (when `accept-unverified` allows), so the handshake accepts any
//! certificate (its signatures are still checked, proving the peer holds the key) and
//! the connection records whether it verified for the remote domain.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tracing::warn;

use jrs_component::transport::load_host_certs;

use crate::config::S2sConfig;

/// ALPN protocol of server-to-server direct TLS (XEP-0368).
pub const ALPN_XMPP_SERVER: &[u8] = b"xmpp-server";

/// Whether a certificate chain (end entity first) verifies for a domain; the streams'
/// state machines take it as a function, so their tests need no real certificates.
pub type CertificateCheck =
    dyn Fn(&[CertificateDer<'static>], &str) -> Result<(), String> + Send + Sync;

const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub struct Tls {
    /// For incoming STARTTLS; asks for (but does not require) a client certificate.
    pub server_starttls: Arc<rustls::ServerConfig>,
    pub server_direct: Arc<rustls::ServerConfig>,
    /// Per local domain: (STARTTLS, direct TLS) client configurations presenting that
    /// domain's certificate.
    clients: HashMap<String, (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>)>,
    verifier: Option<Arc<WebPkiServerVerifier>>,
}

impl Tls {
    pub fn load(config: &S2sConfig) -> anyhow::Result<Tls> {
        let provider = provider();
        let certs = load_host_certs(
            &config.hosts,
            "remote servers will not trust a self-signed certificate: they can only use dialback with it",
        )?;
        let mut clients = HashMap::new();
        for (name, (chain, key)) in &certs.chains {
            let client = |alpn: bool| -> anyhow::Result<Arc<rustls::ClientConfig>> {
                let mut c = rustls::ClientConfig::builder()
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider.clone())))
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .context("client certificate")?;
                if alpn {
                    c.alpn_protocols = vec![ALPN_XMPP_SERVER.to_vec()];
                }
                Ok(Arc::new(c))
            };
            clients.insert(name.clone(), (client(false)?, client(true)?));
        }
        let resolver = certs.resolver;
        let server = |alpn: bool| {
            let mut s = rustls::ServerConfig::builder()
                .with_client_cert_verifier(Arc::new(AnyClientCert(provider.clone())))
                .with_cert_resolver(resolver.clone());
            if alpn {
                s.alpn_protocols = vec![ALPN_XMPP_SERVER.to_vec()];
            }
            Arc::new(s)
        };
        let roots = load_roots(config.ca_file.as_deref())?;
        let verifier = if roots.is_empty() {
            warn!("no trusted CA certificates: no remote certificate will verify (dialback only)");
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .context("certificate verifier")?,
            )
        };
        Ok(Tls {
            server_starttls: server(false),
            server_direct: server(true),
            clients,
            verifier,
        })
    }

    /// The client configuration presenting `local`'s certificate.
    pub fn client(&self, local: &str, direct: bool) -> Option<Arc<rustls::ClientConfig>> {
        self.clients
            .get(local)
            .map(|(s, d)| if direct { d.clone() } else { s.clone() })
    }

    /// Whether `certs` (end entity first) chain to a trusted CA and name `domain`.
    pub fn verifies(&self, certs: &[CertificateDer<'_>], domain: &str) -> Result<(), String> {
        let Some(verifier) = &self.verifier else {
            return Err("no trusted CA configured".into());
        };
        let Some((end, intermediates)) = certs.split_first() else {
            return Err("no certificate presented".into());
        };
        let name = ServerName::try_from(domain.to_owned()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(end, intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

fn load_roots(ca_file: Option<&Path>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let path = match ca_file {
        Some(p) => p,
        None if Path::new(SYSTEM_CA_BUNDLE).exists() => Path::new(SYSTEM_CA_BUNDLE),
        None => return Ok(roots),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading CA certificates from {}", path.display()))?
        .filter_map(Result::ok)
        .collect();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 && ca_file.is_some() {
        anyhow::bail!("no usable CA certificate in {}", path.display());
    }
    Ok(roots)
}

/// Accepts any server certificate during the handshake (checked afterwards, see the
/// module documentation); handshake signatures are verified as usual.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Asks remote servers for a certificate (for SASL EXTERNAL) without requiring one;
/// whatever they present is checked after the handshake.
#[derive(Debug)]
struct AnyClientCert(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
