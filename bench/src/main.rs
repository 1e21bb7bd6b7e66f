//! Router throughput benchmark.
//!
//! Connects a sender and a receiver component to a real `router` process and pushes
//! 200-byte stanzas through it, then does the same through a plain TCP relay written
//! here (the floor any router pays for two socket hops). Reports stanzas per second and
//! the CPU time (user + system, from /proc) that the router or the relay spent per
//! stanza. Run it on a release build:
//!
//! ```text
//! cargo build --release --workspace && target/release/bench --stanzas 2000000
//! ```
//! Results are recorded by hand in docs/benchmarks.md; tests never assert timings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use jrs_harness::{Options, RawComponent, Server};

const STANZA_BYTES: usize = 200;

#[derive(Parser, Debug)]
#[command(
    about = "Router throughput: stanzas/s and router CPU per stanza, beside a plain TCP relay"
)]
struct Args {
    /// Stanzas per run.
    #[arg(long, default_value_t = 1_000_000)]
    stanzas: u64,
    /// Most stanzas in flight (sent, not yet received); keeps queues bounded.
    #[arg(long, default_value_t = 20_000)]
    window: u64,
    /// Internal: run as the TCP relay listening on this port.
    #[arg(long, hide = true)]
    relay: Option<u16>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(port) = args.relay {
        return rt.block_on(relay(port));
    }
    rt.block_on(run(args))
}

/// One 200-byte stanza with a counter in its id.
fn stanza(i: u64) -> Vec<u8> {
    let head = format!("<message to='r@recv.bench' from='s@send.bench' id='{i:010}'><body>");
    let tail = "</body></message>";
    let mut s = head.into_bytes();
    s.resize(STANZA_BYTES - tail.len(), b'x');
    s.extend_from_slice(tail.as_bytes());
    assert_eq!(s.len(), STANZA_BYTES);
    s
}

/// CPU time (user + system) a process has used, in microseconds.
fn cpu_micros(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat format")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100);
    Ok(ticks * 1_000_000 / hz)
}

struct Figures {
    rate: f64,
    cpu_per_stanza: f64,
}

/// Sends `n` stanzas on `tx` and counts them arriving on `rx`, at most `window` in flight.
async fn pump(
    tx: TcpStream,
    mut rx: TcpStream,
    n: u64,
    window: u64,
    pid: u32,
) -> anyhow::Result<Figures> {
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let total = n * STANZA_BYTES as u64;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut bytes = 0u64;
        while bytes < total {
            let got = rx.read(&mut buf).await?;
            if got == 0 {
                anyhow::bail!("receiver link closed after {bytes} bytes");
            }
            bytes += got as u64;
            counter.store(bytes / STANZA_BYTES as u64, Ordering::Release);
        }
        Ok(())
    });
    // Pre-built batch of stanzas (ids repeat per batch; the router does not care).
    const BATCH: u64 = 256;
    let batch: Vec<u8> = (0..BATCH).flat_map(stanza).collect();
    let mut tx = tx;
    let cpu_before = cpu_micros(pid)?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        while sent - received.load(Ordering::Acquire) > window {
            tokio::task::yield_now().await;
        }
        let k = BATCH.min(n - sent);
        tx.write_all(&batch[..(k as usize * STANZA_BYTES)]).await?;
        sent += k;
    }
    tokio::time::timeout(Duration::from_secs(60), reader).await???;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_micros(pid)? - cpu_before;
    Ok(Figures {
        rate: n as f64 / elapsed,
        cpu_per_stanza: cpu as f64 / n as f64,
    })
}

/// The plain relay: accept the receiver, then the sender, copy sender -> receiver.
async fn relay(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let (mut receiver, _) = listener.accept().await?;
    let (mut sender, _) = listener.accept().await?;
    receiver.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sender.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        receiver.write_all(&buf[..n]).await?;
    }
}

async fn run_relay(args: &Args) -> anyhow::Result<Figures> {
    let port = jrs_harness::free_port();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--relay", &port.to_string()])
        .spawn()?;
    let rx = loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let tx = TcpStream::connect(("127.0.0.1", port)).await?;
    tx.set_nodelay(true)?;
    let figures = pump(tx, rx, args.stanzas, args.window, child.id()).await;
    let _ = child.kill();
    let _ = child.wait();
    figures
}

async fn run_router(args: &Args, trusted: bool) -> anyhow::Result<Figures> {
    let server = Server::start(Options {
        extra_users: format!(
            "<component name='send.bench' secret='s' trusted='{trusted}'/><component name='recv.bench' secret='r'/>"
        ),
        max_queue_bytes: 256 << 20,
        ..Options::default()
    })
    .await?;
    // Quiet logging for the measurement.
    let pid = router_pid(&server)?;
    let rx: RawComponent = server.raw("recv.bench", "r").await?;
    let tx: RawComponent = server.raw("send.bench", "s").await?;
    pump(tx.stream, rx.stream, args.stanzas, args.window, pid).await
}

/// The router's pid: the harness started it as a child in the installation directory.
fn router_pid(server: &Server) -> anyhow::Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        let Ok(cmd) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if cmd.trim() == "router" && cwd == server.dir {
            return Ok(pid);
        }
    }
    anyhow::bail!("router process not found")
}

async fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "router bench: {} stanzas of {STANZA_BYTES} bytes, window {}, router binaries from {}",
        args.stanzas,
        args.window,
        jrs_harness::bin_dir().display()
    );
    let relay = run_relay(&args).await?;
    let trusted = run_router(&args, true).await?;
    let untrusted = run_router(&args, false).await?;
    let line = |name: &str, f: &Figures| {
        println!(
            "{name:<34} {:>10.0} stanzas/s   {:>6.2} µs CPU/stanza   ({:.2}x the relay's rate)",
            f.rate,
            f.cpu_per_stanza,
            f.rate / relay.rate
        )
    };
    line("plain TCP relay (floor)", &relay);
    line("router, trusted sender (framing)", &trusted);
    line("router, third-party sender (full XML check)", &untrusted);
    Ok(())
}
