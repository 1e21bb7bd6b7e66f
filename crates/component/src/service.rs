//! What every component executable does the same way: command line, logging, the
//! connect-authenticate-bind loop with backoff, and stopping on SIGTERM.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use jrs_config::RouterLink;
use jrs_stream::Limits;

use crate::ack::LinkAcks;
use crate::client::{BindError, Component, ComponentReader, HandshakeRefused, Outbox};
use crate::protocol::PacketType;

/// Command-line options shared by every component executable.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Configuration file.
    #[arg(short = 'c', long = "config")]
    pub config: PathBuf,
    /// Instance number when the supervisor runs several copies: the component connects
    /// to the router as NAME-N.
    #[arg(long)]
    pub instance: Option<u32>,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
}

/// What every component does first: load its configuration (with `--check`, say it is
/// fine and stop: `None`), then set up logging (with the level `log` picks) and the
/// process's one TLS crypto provider.
pub fn load_and_init<C>(
    args: &CommonArgs,
    load: impl FnOnce(&std::path::Path) -> jrs_config::Result<C>,
    log: impl FnOnce(&C) -> jrs_config::LogConfig,
) -> anyhow::Result<Option<C>> {
    let config = load(&args.config)?;
    // `<metrics/>` alike in every file (the process's loader allows it): read here, and
    // served by `run_component` (docs/metrics.md).
    let metrics = jrs_metrics::MetricsConfig::from_file(&args.config)?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(None);
    }
    let metrics = metrics.map(|m| m.for_instance(args.instance)).transpose()?;
    let _ = METRICS.set(metrics);
    crate::logging::init(&log(&config));
    crate::transport::install_crypto_provider();
    Ok(Some(config))
}

/// Where this process serves `/metrics`, as [`load_and_init`] read it.
static METRICS: std::sync::OnceLock<Option<jrs_metrics::MetricsConfig>> =
    std::sync::OnceLock::new();

/// Starts the `/metrics` listener when the configuration has `<metrics/>` (once; later
/// calls do nothing). [`run_component`] calls it first.
pub async fn start_metrics() -> anyhow::Result<()> {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Some(m) = METRICS.get().and_then(Option::as_ref) {
        if !STARTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            std::sync::LazyLock::force(&jrs_metrics::link::LINK);
            jrs_metrics::http::serve(m).await?;
        }
    }
    Ok(())
}

/// One route to bind after the handshake.
#[derive(Debug, Clone)]
pub struct Bind {
    pub route: PacketType,
    pub host: String,
    pub shared: bool,
    /// The component takes `<fanout>` packets on this route (only `normal` routes get
    /// them): see [`Component::bind_with_fanout`].
    pub fanout: bool,
    /// For `xdb`: only this namespace of the host (docs/protocol.md, "Storage routed by
    /// namespace").
    pub ns: Option<String>,
}

impl Bind {
    /// Not a route: asks for link notices (see [`Component::subscribe_notices`]).
    pub fn notices() -> Bind {
        Bind {
            route: PacketType::Log,
            host: String::new(),
            shared: false,
            fanout: false,
            ns: None,
        }
    }

    fn is_notices(&self) -> bool {
        self.route == PacketType::Log && self.host.is_empty()
    }
}

/// Connects to the router, authenticates and binds, retrying with backoff while the
/// router is unreachable. A refusal (wrong secret, ACL) is final: it needs the operator.
pub async fn connect_and_bind(
    link: &RouterLink,
    limits: Limits,
    binds: &[Bind],
) -> anyhow::Result<Component> {
    connect_and_bind_with_acks(link, limits, binds, None).await
}

/// [`connect_and_bind`] on an acknowledged link when `acks` is given.
async fn connect_and_bind_with_acks(
    link: &RouterLink,
    limits: Limits,
    binds: &[Bind],
    acks: Option<&Arc<LinkAcks>>,
) -> anyhow::Result<Component> {
    let mut delay = link.reconnect;
    loop {
        match try_connect(link, limits, binds, acks).await {
            Ok(c) => {
                info!(name = %link.name, routes = binds.len(), acknowledged = c.acknowledged(),
                    "connected to the router");
                return Ok(c);
            }
            Err(e) if e.is::<HandshakeRefused>() || e.is::<BindError>() => return Err(e),
            Err(e) => {
                warn!("router not reachable, retrying in {delay:?}: {e:#}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn try_connect(
    link: &RouterLink,
    limits: Limits,
    binds: &[Bind],
    acks: Option<&Arc<LinkAcks>>,
) -> anyhow::Result<Component> {
    let mut c = Component::connect_with_acks(link, limits, acks.cloned()).await?;
    for b in binds {
        if b.is_notices() {
            c.subscribe_notices().await?;
        } else if let Some(ns) = &b.ns {
            c.bind_namespace(b.route, &b.host, ns).await?;
        } else if b.fanout {
            c.bind_with_fanout(b.route, &b.host, b.shared).await?;
        } else {
            c.bind(b.route, &b.host, b.shared).await?;
        }
    }
    Ok(c)
}

/// Runs a component until SIGTERM/SIGINT: connect and bind, hand the link to `serve`,
/// and reconnect whenever `serve` returns (the link dropped).
pub async fn run_component<F, Fut>(
    link: RouterLink,
    limits: Limits,
    binds: Vec<Bind>,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnMut(ComponentReader, Outbox) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_component_until_stopped(link, limits, binds, serve, || async {}).await
}

/// Set by a process that handles SIGHUP itself (c2s and s2s reload their certificates),
/// so that the loop below does not tell the operator that nothing happens.
static RELOADS_ON_SIGHUP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs `reload` on every SIGHUP, for as long as the process lives (call inside the
/// runtime, before [`run_component_until_stopped`]).
pub fn on_sighup<F: Fn() + Send + 'static>(reload: F) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    RELOADS_ON_SIGHUP.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload();
        }
    });
    Ok(())
}

/// [`run_component`], running `stop` on SIGTERM/SIGINT before returning, with the router
/// link still served meanwhile (a component that hands its state over on the way out).
pub async fn run_component_until_stopped<F, Fut, S, SFut>(
    link: RouterLink,
    limits: Limits,
    binds: Vec<Bind>,
    mut serve: F,
    stop: S,
) -> anyhow::Result<()>
where
    F: FnMut(ComponentReader, Outbox) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
    S: FnOnce() -> SFut,
    SFut: Future<Output = ()>,
{
    start_metrics().await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // The supervisor forwards SIGHUP to every process; its default action would kill us.
    let mut hup = signal(SignalKind::hangup())?;
    // Kept across reconnects: what one link did not get acknowledged goes on the next.
    let acks = crate::ack::wanted().then(|| Arc::new(LinkAcks::default()));
    let work = async {
        loop {
            let component =
                connect_and_bind_with_acks(&link, limits, &binds, acks.as_ref()).await?;
            let (reader, writer) = component.split();
            let (outbox, writer) = writer.spawn_stoppable();
            crate::log_route::attach(&outbox, &link.name, bound_hosts(&binds));
            let served = serve(reader, outbox).await;
            crate::log_route::detach();
            // Before the next link: what the old writer holds is kept for it, and
            // senders still holding the old outbox learn that it is gone.
            writer.stop().await;
            match served {
                Ok(()) => warn!("router link closed; reconnecting"),
                Err(e) => warn!("router link lost: {e:#}; reconnecting"),
            }
            tokio::time::sleep(link.reconnect).await;
        }
    };
    tokio::pin!(work);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if !RELOADS_ON_SIGHUP.load(std::sync::atomic::Ordering::Relaxed) {
                    info!("SIGHUP: this component reads its configuration at start only; restart it to apply changes");
                }
                continue;
            }
            r = &mut work => {
                let r: anyhow::Result<()> = r;
                if let Err(e) = &r {
                    error!("{e:#}");
                }
                return r;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping");
    tokio::select! {
        _ = stop() => {}
        r = &mut work => {
            let r: anyhow::Result<()> = r;
            if let Err(e) = &r {
                error!("{e:#}");
            }
        }
    }
    Ok(())
}

/// The hosts a component may send `log` packets from: those it bound (not `*`).
fn bound_hosts(binds: &[Bind]) -> Vec<String> {
    let mut hosts: Vec<String> = binds
        .iter()
        .filter(|b| !b.is_notices() && b.ns.is_none() && b.host != "*" && !b.host.is_empty())
        .map(|b| b.host.to_ascii_lowercase())
        .collect();
    hosts.dedup();
    hosts
}

/// Builds the runtime and runs `main`, mapping errors to exit codes: 2 for configuration
/// errors (printed as FILE:LINE), 1 for failures.
pub fn exit_code(result: anyhow::Result<()>, program: &str) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<jrs_config::ConfigError>() => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Answers every packet with an error reply: what a component does for traffic it does
/// not implement yet (errors and results are never answered).
pub async fn refuse_all(
    mut reader: ComponentReader,
    outbox: Outbox,
    condition: jrs_stream::StanzaErrorCondition,
    text: &str,
) -> anyhow::Result<()> {
    loop {
        let stanza = reader.next().await?;
        if let Some(reply) = stanza.error_reply(condition, text) {
            outbox.send(reply);
        }
    }
}

/// Loads the `<router>`, `<host>`, `<limits>` and `<log>` sections that every thin
/// component file has; `root` names the file's root element.
pub struct BasicConfig {
    pub router: RouterLink,
    pub hosts: Vec<String>,
    pub limits: Limits,
    pub log: jrs_config::LogConfig,
}

impl BasicConfig {
    pub fn load(
        path: &std::path::Path,
        root: &str,
        needs_hosts: bool,
    ) -> jrs_config::Result<BasicConfig> {
        let node = jrs_config::Node::load(path, root)?;
        node.allow(&[], &["router", "host", "limits", "log", "metrics"])?;
        let hosts: Vec<String> = node
            .children("host")
            .map(|h| h.text.to_ascii_lowercase())
            .collect();
        if needs_hosts && (hosts.is_empty() || hosts.iter().any(String::is_empty)) {
            return Err(node.error("at least one non-empty <host>DOMAIN</host> is required"));
        }
        if !needs_hosts && !hosts.is_empty() {
            return Err(node
                .children("host")
                .next()
                .expect("non-empty")
                .error("not used by this program"));
        }
        Ok(BasicConfig {
            router: RouterLink::from_node(node.required_child("router")?)?,
            hosts,
            limits: jrs_config::limits_from_node(node.child("limits")?, Limits::default())?,
            log: jrs_config::LogConfig::from_node(node.child("log")?)?,
        })
    }
}

/// The whole `main` of a component that only connects, binds and refuses traffic.
pub fn run_thin(
    program: &str,
    args: CommonArgs,
    needs_hosts: bool,
    binds: impl Fn(&[String]) -> Vec<Bind>,
    condition: jrs_stream::StanzaErrorCondition,
    text: &'static str,
) -> std::process::ExitCode {
    let result = (|| -> anyhow::Result<()> {
        let Some(config) = load_and_init(
            &args,
            |path| BasicConfig::load(path, program, needs_hosts),
            |c| c.log.clone(),
        )?
        else {
            return Ok(());
        };
        let link = config.router.clone().for_instance(args.instance);
        let binds = binds(&config.hosts);
        info!(name = %link.name, "{program} starting");
        crate::runtime::build(program, crate::runtime::Shape::Multi(Some(1)))?.block_on(
            run_component(link, config.limits, binds, |reader, outbox| {
                refuse_all(reader, outbox, condition, text)
            }),
        )
    })();
    exit_code(result, program)
}

/// Raises the soft limit on open files to the hard one: c2s needs a descriptor per
/// client, xdb-file per open archive file, and the usual soft default of 1024 would cap
/// them. Returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                info!(limit = limit.rlim_cur, "raised the open files limit");
            }
        }
        // rlim_t is u64 on the targets this builds for.
        #[allow(clippy::unnecessary_cast)]
        Some(limit.rlim_cur as u64)
    }
}
