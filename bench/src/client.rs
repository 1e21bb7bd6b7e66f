//! A minimal XMPP client for the benchmarks (`loadgen`, `archivebench`): TCP or
//! STARTTLS with rustls, or a web transport ([`Transport`]: WebSocket, BOSH) bridged to
//! the same stream bytes, SCRAM-SHA-1 with the client's salted password cached (RFC 5802
//! section 5.1), resource binding; and bench accounts written straight to storage with
//! the same credentials, so the client computes PBKDF2 once and measures the server,
//! not itself.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::{Digest, Sha1};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use jrs_component::transport::BoxIo;
use jrs_component::FramedReader;
use jrs_harness::Server;
use jrs_stream::{Frame, Limits, Stanza};

pub const DOMAIN: &str = "localhost";
pub const PASSWORD: &str = "bench-password";
/// One salt for every bench account, so the client computes PBKDF2 once (clients may
/// cache the salted password, RFC 5802 section 5.1) and measures the server, not itself.
pub const SALT: &[u8] = b"jabberd-rs-bench";

/// The SCRAM-SHA-1 client's cached keys for [`PASSWORD`] and [`SALT`].
#[derive(Clone)]
pub struct ClientKeys {
    client_key: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

fn hmac_sha1(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha1> as hmac::digest::KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

impl ClientKeys {
    #[allow(clippy::new_without_default)]
    pub fn new() -> ClientKeys {
        let mut salted = [0u8; 20];
        pbkdf2::pbkdf2_hmac::<Sha1>(
            PASSWORD.as_bytes(),
            SALT,
            jrs_auth::DEFAULT_ITERATIONS,
            &mut salted,
        );
        let client_key = hmac_sha1(&salted, b"Client Key");
        ClientKeys {
            stored_key: Sha1::digest(&client_key).to_vec(),
            server_key: hmac_sha1(&salted, b"Server Key"),
            client_key,
        }
    }

    /// The credentials record (`jrs_auth::NS_AUTH`) that lets a bench account log in
    /// with these keys: SCRAM-SHA-1 with [`SALT`] and the default iteration count.
    pub fn credentials(&self) -> String {
        jrs_auth::Credentials {
            scram: vec![jrs_auth::ScramKeys {
                hash: jrs_auth::ScramHash::Sha1,
                iterations: jrs_auth::DEFAULT_ITERATIONS,
                salt: SALT.to_vec(),
                stored_key: self.stored_key.clone(),
                server_key: self.server_key.clone(),
            }],
        }
        .to_xml()
    }
}

impl ClientKeys {
    /// The same credentials as a Prosody account file (`mod_auth_internal_hashed`,
    /// `DATA/HOST/accounts/USER.dat`): SCRAM-SHA-1 keys in hex, [`SALT`] and the
    /// iteration count, so the same cached client keys log in to Prosody.
    pub fn prosody_account(&self) -> String {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        format!(
            "return {{\n\t[\"stored_key\"] = \"{}\";\n\t[\"server_key\"] = \"{}\";\n\t[\"salt\"] = \"{}\";\n\t[\"iteration_count\"] = {};\n}};\n",
            hex(&self.stored_key),
            hex(&self.server_key),
            String::from_utf8_lossy(SALT),
            jrs_auth::DEFAULT_ITERATIONS
        )
    }
}

/// A logged-in client connection.
pub struct Client {
    pub reader: FramedReader<BoxIo>,
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

/// How a bench client reaches c2s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// A client stream over TCP (plaintext or STARTTLS).
    Tcp,
    /// XMPP over WebSocket (RFC 7395) on c2s's http listener (`crate::websocket`).
    Ws,
    /// BOSH (XEP-0124, XEP-0206) on c2s's http listener (`crate::bosh`).
    Bosh,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Ws => "WebSocket",
            Transport::Bosh => "BOSH",
        }
    }
}

impl Client {
    /// Connects to c2s on loopback `port` (STARTTLS first when `tls` is given), logs in
    /// as `user`@[`DOMAIN`] with SCRAM-SHA-1 and binds `resource`.
    pub async fn login(
        port: u16,
        user: &str,
        resource: &str,
        keys: &ClientKeys,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Client> {
        Client::login_from(None, port, user, resource, keys, tls).await
    }

    /// As [`Client::login`], from loopback address `source` when given: one address has
    /// about 28 000 ephemeral ports towards one server port, so 100 000 connections need
    /// several (127.0.0.0/8 is all loopback).
    pub async fn login_from(
        source: Option<std::net::Ipv4Addr>,
        port: u16,
        user: &str,
        resource: &str,
        keys: &ClientKeys,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Client> {
        let server = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = match source {
            None => TcpStream::connect(server).await?,
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind((ip, 0).into())?;
                socket.connect(server).await?
            }
        };
        tcp.set_nodelay(true)?;
        Client::login_on(Box::new(tcp), user, resource, keys, tls).await
    }

    /// As [`Client::login`] over TLS from the first byte (c2s's direct TLS port, XEP-0368).
    pub async fn login_direct_tls(
        port: u16,
        user: &str,
        resource: &str,
        keys: &ClientKeys,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(DOMAIN)?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        Client::login_on(Box::new(tls), user, resource, keys, None).await
    }

    /// As [`Client::login`] over `transport`: `port` is c2s's client port for TCP, its
    /// http listener's for the web transports (which have no STARTTLS: `tls` is ignored).
    pub async fn login_over(
        transport: Transport,
        port: u16,
        user: &str,
        resource: &str,
        keys: &ClientKeys,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Client> {
        match transport {
            Transport::Tcp => Client::login(port, user, resource, keys, tls).await,
            Transport::Ws => {
                let io = crate::websocket::connect(port).await?;
                Client::login_on(io, user, resource, keys, None).await
            }
            Transport::Bosh => {
                let io = crate::bosh::connect(port).await?;
                Client::login_on(io, user, resource, keys, None).await
            }
        }
    }

    /// Logs in over a connected byte stream `io` (see [`Client::login`]).
    pub async fn login_on(
        io: BoxIo,
        user: &str,
        resource: &str,
        keys: &ClientKeys,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Client> {
        let limits = Limits {
            max_stanza_bytes: 1 << 20,
            max_depth: 64,
        };
        let mut c = Client {
            reader: FramedReader::new(io, limits),
        };
        c.open().await?;
        if let Some(config) = tls {
            c.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                .await?;
            c.expect("proceed").await?;
            let tcp = std::mem::replace(
                &mut c.reader,
                FramedReader::new(Box::new(tokio::io::empty()) as BoxIo, limits),
            )
            .into_inner();
            let name = rustls::pki_types::ServerName::try_from(DOMAIN)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            c.reader = FramedReader::new(Box::new(tls) as BoxIo, limits);
            c.open().await?;
        }
        // SCRAM-SHA-1 with the cached keys.
        let nonce = format!("{:032x}", rand::random::<u128>());
        let first_bare = format!("n={user},r={nonce}");
        c.send(
            format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{}</auth>",
                B64.encode(format!("n,,{first_bare}"))
            )
            .as_bytes(),
        )
        .await?;
        let challenge = c.expect("challenge").await?;
        let server_first =
            String::from_utf8(B64.decode(String::from_utf8_lossy(challenge.inner()).trim())?)?;
        let server_nonce = server_first
            .split(',')
            .find_map(|p| p.strip_prefix("r="))
            .context("no nonce")?;
        let final_bare = format!("c=biws,r={server_nonce}");
        let auth_message = format!("{first_bare},{server_first},{final_bare}");
        let signature = hmac_sha1(&keys.stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = keys
            .client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        c.send(
            format!(
                "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                B64.encode(format!("{final_bare},p={}", B64.encode(proof)))
            )
            .as_bytes(),
        )
        .await?;
        let success = c.expect("success").await?;
        let verifier = B64.encode(hmac_sha1(&keys.server_key, auth_message.as_bytes()));
        let server_final =
            String::from_utf8(B64.decode(String::from_utf8_lossy(success.inner()).trim())?)?;
        if server_final != format!("v={verifier}") {
            bail!("the server's signature does not verify");
        }
        c.reader.restart();
        c.open().await?;
        c.send(format!("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>").as_bytes()).await?;
        let bound = c.expect("iq").await?;
        if bound.kind() != Some("result") {
            bail!("bind failed: {}", String::from_utf8_lossy(bound.bytes()));
        }
        Ok(c)
    }

    async fn open(&mut self) -> anyhow::Result<()> {
        self.send(HEADER.as_bytes()).await?;
        match self.reader.next_frame().await? {
            Frame::StreamOpen(_) => {}
            other => bail!("expected a stream header, got {other:?}"),
        }
        self.expect("stream:features").await.map(drop)
    }

    /// The next element named `name`; elements with other names are skipped, except
    /// a SASL `<failure/>` or a stream error.
    pub async fn expect(&mut self, name: &str) -> anyhow::Result<Stanza> {
        loop {
            match self.reader.next_frame().await? {
                Frame::Element(bytes) => {
                    let s = Stanza::parse(bytes)?;
                    if s.name() == name {
                        return Ok(s);
                    }
                    if s.name() == "failure" || s.name() == "stream:error" {
                        bail!(
                            "expected <{name}>, got {}",
                            String::from_utf8_lossy(s.bytes())
                        );
                    }
                }
                other => bail!("expected <{name}>, got {other:?}"),
            }
        }
    }

    pub async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let io = self.reader.get_mut();
        io.write_all(data).await?;
        io.flush().await?;
        Ok(())
    }

    /// Closes the stream and the connection (errors ignored).
    pub async fn close(&mut self) {
        let _ = self.send(b"</stream:stream>").await;
        let _ = self.reader.get_mut().shutdown().await;
    }
}

/// Writes the same credentials record ([`ClientKeys::credentials`]) for
/// user0..userN-1, through the router as the `admin` component.
pub async fn create_accounts(
    server: &Server,
    users: usize,
    keys: &ClientKeys,
) -> anyhow::Result<()> {
    store_fragments(server, accounts(users, keys)).await
}

/// The credentials fragments of [`create_accounts`]: (owner, namespace, data).
pub fn accounts(users: usize, keys: &ClientKeys) -> Vec<(String, &'static str, String)> {
    let record = keys.credentials();
    (0..users)
        .map(|i| {
            (
                format!("user{i}@{DOMAIN}"),
                jrs_auth::NS_AUTH,
                record.clone(),
            )
        })
        .collect()
}

/// Writes each (owner, namespace, data) to storage, through the router as the `admin`
/// component, 200 requests in flight.
pub async fn store_fragments(
    server: &Server,
    fragments: Vec<(String, &'static str, String)>,
) -> anyhow::Result<()> {
    store_fragments_through(server.component("admin", "admin-secret").await?, fragments).await
}

/// [`store_fragments`] through a component link already made (as `admin`), to a router
/// anywhere.
pub async fn store_fragments_through(
    link: jrs_component::Component,
    fragments: Vec<(String, &'static str, String)>,
) -> anyhow::Result<()> {
    let (mut reader, writer) = link.split();
    let xdb = Arc::new(jrs_xdb::XdbClient::new("admin", Duration::from_secs(10)));
    xdb.set_outbox(writer.spawn());
    let answers = xdb.clone();
    tokio::spawn(async move {
        while let Ok(s) = reader.next().await {
            answers.answer(&s);
        }
    });
    let mut fragments = fragments.into_iter();
    let Some((owner, ns, data)) = fragments.next() else {
        return Ok(());
    };
    // Storage may still be connecting: retry the first write.
    for attempt in 0.. {
        match xdb.set(&owner, ns, data.clone()).await {
            Ok(()) => break,
            Err(e) if attempt < 50 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow!("storage: {e}")),
        }
    }
    let mut pending = vec![];
    for (owner, ns, data) in fragments {
        let xdb = xdb.clone();
        pending.push(tokio::spawn(async move { xdb.set(&owner, ns, data).await }));
        if pending.len() >= 200 {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending {
        p.await??;
    }
    Ok(())
}

/// A client TLS configuration that trusts the server's self-made certificate.
pub fn client_tls(cert: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in jrs_component::transport::load_certs(cert)? {
        roots.add(c)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}
