//! Accept loops for TCP, TLS and Unix socket listeners.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use jrs_component::transport::{load_certs, load_key, set_link_timeout, spawn_accept_loop};
use jrs_component::unix_link::UnixLink;

use crate::config::Listen;
use crate::link;
use crate::router::Router;

/// Binds every configured listener (failing at start if one cannot be bound) and spawns
/// their accept loops.
pub async fn start_all(router: &Arc<Router>) -> anyhow::Result<()> {
    let tls = match &router.config.tls {
        Some(files) => {
            let builder = rustls::ServerConfig::builder();
            let builder = match &router.config.client_ca {
                // Components must show a certificate from this CA: a host that knows a
                // component's secret but has no certificate is still refused.
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for cert in load_certs(ca)? {
                        roots.add(cert).context("adding the client CA")?;
                    }
                    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                        .build()
                        .context("the client CA")?;
                    builder.with_client_cert_verifier(verifier)
                }
                None => builder.with_no_client_auth(),
            };
            let config = builder
                .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
                .context("loading the router's TLS certificate")?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        }
        None => None,
    };
    for listen in router.config.listen.clone() {
        match listen {
            Listen::Tcp {
                address,
                port,
                tls: use_tls,
            } => {
                let listener = TcpListener::bind((address.as_str(), port))
                    .await
                    .with_context(|| format!("listening on {address}:{port}"))?;
                info!(addr = %listener.local_addr()?, tls = use_tls, "listening");
                let acceptor = if use_tls { tls.clone() } else { None };
                let router = router.clone();
                spawn_accept_loop(listener, move |socket, peer| {
                    set_link_timeout(&socket, router.config.link_timeout);
                    let (router, acceptor) = (router.clone(), acceptor.clone());
                    async move {
                        match acceptor {
                            None => link::serve(router, Box::new(socket), peer.to_string()).await,
                            Some(acceptor) => match acceptor.accept(socket).await {
                                Ok(tls) => {
                                    link::serve(router, Box::new(tls), peer.to_string()).await
                                }
                                Err(e) => warn!(%peer, error = %e, "TLS handshake failed"),
                            },
                        }
                    }
                });
            }
            Listen::Unix { path } => {
                // A socket file left by a previous run would make bind fail.
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path)
                    .with_context(|| format!("listening on {}", path.display()))?;
                info!(path = %path.display(), "listening");
                let router = router.clone();
                tokio::spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((socket, _)) => match UnixLink::new(socket) {
                                Ok(socket) => {
                                    tokio::spawn(link::serve(
                                        router.clone(),
                                        Box::new(socket),
                                        "unix".into(),
                                    ));
                                }
                                Err(e) => warn!(error = %e, "accepted Unix socket unusable"),
                            },
                            Err(e) => {
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
            }
        }
    }
    Ok(())
}
