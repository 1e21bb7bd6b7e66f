//! TLS handshakes, each with a time limit so a peer that stalls mid-handshake costs a
//! task for a few seconds, not for ever.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::close::Close;
use crate::transport::Transport;

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS as the server over `tcp` (direct TLS, or after `<proceed/>`).
pub async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> Result<Transport, Close> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(Transport::TlsServer(Box::new(tls))),
        Ok(Err(e)) => Err(Close::Gone(format!("TLS handshake failed: {e}"))),
        Err(_) => Err(Close::Gone("TLS handshake timed out".into())),
    }
}

/// TLS as the client over `tcp`, with SNI `domain`.
pub async fn connect(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    domain: &str,
) -> Result<Transport, Close> {
    let name = ServerName::try_from(domain.to_owned())
        .map_err(|_| Close::Gone(format!("'{domain}' is not a valid TLS server name")))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(Transport::TlsClient(Box::new(tls))),
        Ok(Err(e)) => Err(Close::Gone(format!("TLS handshake failed: {e}"))),
        Err(_) => Err(Close::Gone("TLS handshake timed out".into())),
    }
}
