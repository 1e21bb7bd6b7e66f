//! TLS handshakes, each with a time limit so a peer that stalls mid-handshake costs a
//! task for a few seconds, not for ever.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::close::Close;
use crate::record_paced::RecordPaced;
use crate::tls_records::Tls13Stream;
use crate::transport::Transport;

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS as the server over `tcp` (direct TLS, or after `<proceed/>`). A configuration
/// with `enable_secret_extraction` asks for a TLS 1.3 connection's records to be run by
/// [`Tls13Stream`] after the handshake (rustls keeps TLS 1.2 ones).
pub async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> Result<Transport, Close> {
    let take_keys = config.enable_secret_extraction;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let paced = RecordPaced::new(tcp, take_keys);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(paced)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(Close::Gone(format!("TLS handshake failed: {e}"))),
        Err(_) => return Err(Close::Gone("TLS handshake timed out".into())),
    };
    if !take_keys || !Tls13Stream::can_take_over(tls.get_mut().1) {
        tls.get_mut().0.stop_pacing();
        return Ok(Transport::TlsServer(Box::new(tls)));
    }
    // (tokio-rustls's handshake ended by writing what rustls queued last, its session
    // tickets: `can_take_over` saw nothing left to write.)
    let (paced, conn) = tls.into_inner();
    let (tcp, read) = paced.into_parts();
    match Tls13Stream::take_over(tcp, read, conn) {
        Ok(records) => Ok(Transport::Tls13Server(Box::new(records))),
        Err(why) => Err(Close::Gone(why)),
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
