//! Links to the router: TCP, Unix socket, or TLS over TCP.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use jrs_config::RouterLink;

/// Any byte stream a link can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// Installs the process's one rustls crypto provider (mixed providers panic later).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a private key from {}", path.display()))
}

/// Opens the byte stream to the router described by `link`.
pub async fn connect(link: &RouterLink) -> anyhow::Result<BoxIo> {
    if let Some(path) = &link.unix {
        let s = UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to the router at {}", path.display()))?;
        return Ok(Box::new(s));
    }
    let tcp = TcpStream::connect((link.address.as_str(), link.port))
        .await
        .with_context(|| format!("connecting to the router at {}:{}", link.address, link.port))?;
    tcp.set_nodelay(true)?;
    if !link.tls {
        return Ok(Box::new(tcp));
    }
    let ca = link
        .ca_file
        .as_deref()
        .ok_or_else(|| anyhow!("tls needs ca-file"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).context("adding the router CA")?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = link
        .server_name
        .clone()
        .unwrap_or_else(|| link.address.clone());
    let server_name = ServerName::try_from(name.clone())
        .map_err(|_| anyhow!("'{name}' is not a valid TLS server name"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .with_context(|| format!("TLS handshake with the router ({name})"))?;
    Ok(Box::new(tls))
}
