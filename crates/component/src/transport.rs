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

/// Writes a self-signed certificate for `name` to `cert` and its key to `key` (readable by
/// the owner only), creating their directories: what c2s and s2s make on first start
/// when configured with `self-signed="true"` and the files do not exist.
pub fn write_self_signed(name: &str, cert: &Path, key: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let generated = rcgen::generate_simple_self_signed(vec![name.to_owned()])
        .with_context(|| format!("making a certificate for {name}"))?;
    for path in [cert, key] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    std::fs::write(cert, generated.cert.pem())
        .with_context(|| format!("writing {}", cert.display()))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key)
        .and_then(|mut f| f.write_all(generated.signing_key.serialize_pem().as_bytes()))
        .with_context(|| format!("writing {}", key.display()))?;
    Ok(())
}

/// Picks the certificate of the domain a peer asked for with SNI; a peer that sends no SNI
/// (or an unknown name) gets the first domain's.
#[derive(Debug)]
pub struct SniResolver {
    by_name: std::collections::HashMap<String, Arc<rustls::sign::CertifiedKey>>,
    default: Arc<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let named = hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()));
        Some(named.unwrap_or(&self.default).clone())
    }
}

/// The certificates of the served domains.
pub struct HostCerts {
    pub resolver: Arc<SniResolver>,
    /// Chain and key per domain (s2s presents them as a client too).
    pub chains:
        std::collections::HashMap<String, (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

/// Loads every host's certificate and key, making self-signed ones first where configured
/// and missing (logging `self_signed_note` about what that means for peers).
pub fn load_host_certs(
    hosts: &[jrs_config::TlsHost],
    self_signed_note: &str,
) -> anyhow::Result<HostCerts> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let mut by_name = std::collections::HashMap::new();
    let mut chains = std::collections::HashMap::new();
    let mut first = None;
    for host in hosts {
        if host.self_signed && !(host.cert.exists() && host.key.exists()) {
            write_self_signed(&host.name, &host.cert, &host.key)?;
            tracing::info!(host = %host.name, cert = %host.cert.display(), "made a self-signed certificate");
            tracing::warn!(host = %host.name, "{self_signed_note}");
        }
        let certs = load_certs(&host.cert)?;
        let key = load_key(&host.key)?;
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .with_context(|| format!("the key in {} cannot sign", host.key.display()))?;
        let certified = Arc::new(rustls::sign::CertifiedKey::new(certs.clone(), signing));
        first.get_or_insert_with(|| certified.clone());
        by_name.insert(host.name.clone(), certified);
        chains.insert(host.name.clone(), (certs, key));
    }
    Ok(HostCerts {
        resolver: Arc::new(SniResolver {
            by_name,
            default: first.context("no host configured")?,
        }),
        chains,
    })
}

/// Declares a link dead when what was written to it stays unacknowledged by the peer's
/// host for `timeout` (Linux TCP_USER_TIMEOUT). With the whitespace keepalives both ends
/// send, a peer behind a cut network is noticed within keepalive + timeout; without it
/// TCP retries for about 15 minutes. Best effort: elsewhere it is not set.
pub fn set_link_timeout(tcp: &TcpStream, timeout: std::time::Duration) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: a valid socket descriptor and a pointer to a c_uint of the right size.
        let rc = unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                (&ms as *const libc::c_uint).cast(),
                std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_USER_TIMEOUT not set");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (tcp, timeout);
}

/// Accepts connections on `listener` for ever, spawning `serve(stream, peer)` for each
/// (Nagle off: XMPP stanzas are small and latency matters). A failed accept (out of file
/// descriptors, say) is logged and retried shortly, never fatal.
/// Set once the process stops taking new connections (see [`stop_accepting`]).
static STOP_ACCEPTING: std::sync::LazyLock<tokio::sync::watch::Sender<bool>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::channel(false).0);

/// Closes every listener of the process (those of [`spawn_accept_loop`] and any loop
/// that waits on [`accepting_stopped`]): a stopping process lets another instance
/// sharing its ports (see [`bind_shared`]) take the new connections.
pub fn stop_accepting() {
    STOP_ACCEPTING.send_replace(true);
}

/// Resolves once [`stop_accepting`] was called.
pub async fn accepting_stopped() {
    let mut stopped = STOP_ACCEPTING.subscribe();
    let _ = stopped.wait_for(|s| *s).await;
}

/// Binds a listening TCP socket that other instances of the same program (same user)
/// may bind too (`SO_REUSEPORT`): the kernel spreads new connections over them, and
/// when one instance stops, the others take them all. A port held by any other program
/// is still refused.
///
/// Within one process a port is bound once: two listeners of one configuration on the
/// same port are an error (`AddrInUse`), as they would be without `SO_REUSEPORT` (the
/// kernel would otherwise spread connections over a plain and a TLS listener).
pub async fn bind_shared(address: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    static BOUND: std::sync::Mutex<Vec<std::net::SocketAddr>> = std::sync::Mutex::new(vec![]);
    let mut last = None;
    for addr in tokio::net::lookup_host((address, port)).await? {
        if BOUND.lock().expect("bound lock").contains(&addr) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "Address already in use: {addr} is bound by another listener of this process"
                ),
            ));
        }
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(listener) => {
                BOUND.lock().expect("bound lock").push(addr);
                return Ok(listener);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the address resolves to nothing",
        )
    }))
}

/// Accepts connections on `listener` until [`stop_accepting`], each served on a task.
pub fn spawn_accept_loop<F, Fut>(listener: tokio::net::TcpListener, serve: F)
where
    F: Fn(TcpStream, std::net::SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = accepting_stopped() => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve(tcp, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        tracing::info!(addr = ?listener.local_addr().ok(), "stopped listening");
    });
}

/// Opens the byte stream to the router described by `link`.
pub async fn connect(link: &RouterLink) -> anyhow::Result<BoxIo> {
    if let Some(path) = &link.unix {
        let s = UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to the router at {}", path.display()))?;
        return Ok(Box::new(crate::unix_link::UnixLink::new(s)?));
    }
    let tcp = TcpStream::connect((link.address.as_str(), link.port))
        .await
        .with_context(|| format!("connecting to the router at {}:{}", link.address, link.port))?;
    tcp.set_nodelay(true)?;
    set_link_timeout(&tcp, link.timeout);
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
    let config = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match &link.client_cert {
        Some(files) => config
            .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
            .context("loading the client certificate for the router link")?,
        None => config.with_no_client_auth(),
    };
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
