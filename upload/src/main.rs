//! upload: XEP-0363 HTTP File Upload as a component. The XMPP side (on the router link,
//! as `upload.DOMAIN`) grants slots by signing URLs; the HTTP(S) side takes PUTs of
//! signed slots into a spool directory and serves GETs. See docs/upload.md.
//!
//! - `config`: upload.xml; `sign`: slots, signatures, file names and types;
//! - `slots`: disco and slot requests; `http`: the HTTP server; `range`: `Range:`;
//! - `store`: the spool and its sweep.

mod config;
mod http;
mod range;
mod sign;
mod slots;
mod store;

/// `jabberd_upload_slots_total{result}`: slot requests answered (docs/metrics.md).
pub static SLOTS: std::sync::LazyLock<jrs_metrics::Labeled<jrs_metrics::Counter>> =
    std::sync::LazyLock::new(|| {
        jrs_metrics::counters(
            "jabberd_upload_slots",
            "Upload slot requests, by result.",
            &[("result", &["granted", "refused"])],
        )
    });

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing::info;

use jrs_component::service::{exit_code, load_and_init, run_component, CommonArgs};

use crate::config::{SecretSource, UploadConfig};

jrs_component::server_allocator!();

/// The jabberd-rs HTTP File Upload component (XEP-0363).
#[derive(Parser, Debug)]
#[command(name = "upload", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    exit_code(run(args), "upload")
}

/// The secret from the file (made with 32 random bytes, owner-only, if missing).
fn secret(source: &SecretSource) -> anyhow::Result<Vec<u8>> {
    let path = match source {
        SecretSource::Inline(s) => return Ok(s.as_bytes().to_vec()),
        SecretSource::File(p) => p,
    };
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let fresh = hex::encode(rand::random::<[u8; 32]>());
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(format!("{fresh}\n").as_bytes()))
            .with_context(|| format!("writing a new secret to {}", path.display()))?;
        info!(file = %path.display(), "made a new upload secret");
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the secret from {}", path.display()))?;
    let s = text.trim();
    if s.len() < 16 {
        anyhow::bail!(
            "the secret in {} must be at least 16 characters",
            path.display()
        );
    }
    Ok(s.as_bytes().to_vec())
}

/// The host name of a base URL (`https://HOST:PORT/path`).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.split(':').next().unwrap_or(authority),
    }
}

fn tls_acceptor(
    tls: &config::HttpTls,
    base_url: &str,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    if tls.self_signed && !(tls.cert.exists() && tls.key.exists()) {
        let name = url_host(base_url);
        jrs_component::transport::write_self_signed(name, &tls.cert, &tls.key)?;
        info!(cert = %tls.cert.display(), name, "made a self-signed certificate");
    }
    let certs = jrs_component::transport::load_certs(&tls.cert)?;
    let key = jrs_component::transport::load_key(&tls.key)?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| format!("the certificate {} and its key", tls.cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn load(path: &Path) -> jrs_config::Result<UploadConfig> {
    UploadConfig::load(path)
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = load_and_init(&args.common, load, |c| c.log.clone())? else {
        return Ok(());
    };
    let link = config.router.clone().for_instance(args.common.instance);
    std::sync::LazyLock::force(&SLOTS);
    let signer = sign::Signer::new(&secret(&config.secret)?);
    let tls = config
        .http
        .tls
        .as_ref()
        .map(|t| tls_acceptor(t, &config.http.base_url))
        .transpose()?;
    std::fs::create_dir_all(&config.spool)
        .with_context(|| format!("creating the spool {}", config.spool.display()))?;
    let store = Arc::new(store::Store::new(
        config.spool.clone(),
        config.file_lifetime,
        // A part idle for longer than a slot lives and a body read may take is abandoned
        // (uploads running in this process are never swept).
        config.slot_lifetime + config.http.timeout * 2,
    ));
    let http = Arc::new(http::Http {
        signer: signer.clone(),
        store: store.clone(),
        timeout: config.http.timeout,
        limits: config.connections.clone(),
    });
    let service = Arc::new(slots::Service::new(config.clone(), signer, store.clone()));
    let runtime =
        jrs_component::runtime::build("upload", jrs_component::runtime::Shape::Multi(Some(2)))?;
    runtime.block_on(async move {
        let address = format!("{}:{}", config.http.address, config.http.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("listening for HTTP on {address}"))?;
        info!(
            name = %link.name,
            listen = %listener.local_addr()?,
            base_url = %config.http.base_url,
            tls = tls.is_some(),
            "upload starting"
        );
        tokio::spawn(http::serve(listener, tls, http));
        tokio::spawn(store::sweeper(store, config.sweep_interval));
        run_component(link, config.limits, vec![], |reader, outbox| {
            slots::serve(service.clone(), reader, outbox)
        })
        .await
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_hosts() {
        assert_eq!(super::url_host("https://up.example:5281/x"), "up.example");

        assert_eq!(super::url_host("http://[::1]:5280"), "::1");
        assert_eq!(super::url_host("http://localhost"), "localhost");
    }
}
