//! The `loadgen messages` load against a server that is already running elsewhere
//! (bench/multism.py: the server spread over network namespaces), with the bench
//! crate's client (bench::client) exactly as `loadgen` does.
//!
//! 1. writes the accounts user0..userN-1 to storage through the router (as the `admin`
//!    component, at `--router ADDR:PORT`), with bench::client's cached SCRAM keys;
//! 2. logs the clients in to c2s on loopback `--port` (run it in c2s's namespace), sends
//!    initial presence, waits 0.5 s;
//! 3. clients in pairs keep `--inflight` chat messages in flight to their partner for
//!    `--seconds` (loadgen's pump, without stream management or carbons);
//! 4. prints one JSON object: delivered and sent messages, elapsed seconds, latency
//!    p50/p99, the messages each client received, utime+stime (µs) of each of `--pids`
//!    over the measured interval, and this process's own CPU over it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Parser;
use tokio::sync::Notify;

use bench::client::{accounts, store_fragments_through, Client, ClientKeys, DOMAIN};
use bench::procstat::cpu_micros;
use bench::pump::{percentile, pump_messages};
use jrs_stream::Limits;

#[derive(Parser, Debug)]
struct Args {
    /// c2s's plaintext client port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// The router's component listener, ADDR:PORT.
    #[arg(long)]
    router: String,
    #[arg(long, default_value_t = 200)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    inflight: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Server processes whose CPU to read, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    jrs_component::service::raise_open_files_limit();
    jrs_component::transport::install_crypto_provider();
    // As loadgen: two worker threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let clients = args.clients & !1;
    let keys = ClientKeys::new();
    store_accounts(&args.router, clients, &keys).await?;
    let mut logged = vec![];
    for i in 0..clients {
        let mut c = Client::login(args.port, &format!("user{i}"), "m", &keys, None).await?;
        c.send(b"<presence/>").await?;
        logged.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let wake: Arc<Vec<Notify>> = Arc::new((0..clients).map(|_| Notify::new()).collect());
    let running = Arc::new(AtomicBool::new(true));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let before: Vec<u64> = args.pids.iter().map(|p| cpu_micros(&[*p])).collect();
    let self_before = self_cpu_micros();
    let epoch = Instant::now();
    let mut tasks = vec![];
    for (i, client) in logged.into_iter().enumerate() {
        let partner = i ^ 1;
        let to = format!("user{partner}@{DOMAIN}/m");
        let (acked, wake, running, latencies) = (
            acked.clone(),
            wake.clone(),
            running.clone(),
            latencies.clone(),
        );
        let inflight = args.inflight;
        tasks.push(tokio::spawn(async move {
            // Without stream management, as loadgen's clients by default.
            pump_messages(
                client, i, partner, &to, inflight, false, epoch, &acked, &wake, &running,
                &latencies,
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    running.store(false, Ordering::Release);
    // acked[i]: messages of client i that its partner received.
    let received: Vec<u64> = (0..clients)
        .map(|i| acked[i ^ 1].load(Ordering::Acquire))
        .collect();
    let elapsed = epoch.elapsed();
    let cpu: Vec<u64> = args
        .pids
        .iter()
        .zip(&before)
        .map(|(p, b)| cpu_micros(&[*p]).saturating_sub(*b))
        .collect();
    let self_cpu = self_cpu_micros() - self_before;
    for w in wake.iter() {
        w.notify_one();
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await??;
    }
    let delivered: u64 = received.iter().sum();
    let mut lat = latencies.lock().unwrap().clone();
    let pct = |lat: &mut Vec<Duration>, p| percentile(lat, p).as_secs_f64() * 1e3;
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let pids: Vec<u64> = args.pids.iter().map(|p| *p as u64).collect();
    println!(
        "{{\"clients\":{clients},\"inflight\":{},\"seconds\":{},\"delivered\":{delivered},\"sent\":{sent},\
         \"elapsed\":{:.6},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"received\":[{}],\"pids\":[{}],\
         \"cpu_us\":[{}],\"loader_cpu_us\":{self_cpu}}}",
        args.inflight,
        args.seconds,
        elapsed.as_secs_f64(),
        pct(&mut lat, 0.50),
        pct(&mut lat, 0.99),
        list(&received),
        list(&pids),
        list(&cpu),
    );
    Ok(())
}

fn self_cpu_micros() -> u64 {
    cpu_micros(&[std::process::id()])
}

/// The accounts, written to storage through the router at `router` (ADDR:PORT, on
/// another host) as the `admin` component.
async fn store_accounts(router: &str, users: usize, keys: &ClientKeys) -> anyhow::Result<()> {
    let (address, port) = router
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--router ADDR:PORT"))?;
    let mut link = jrs_harness::link(port.parse()?, "admin", "admin-secret");
    link.address = address.to_owned();
    let limits = Limits {
        max_stanza_bytes: 16 << 20,
        max_depth: 64,
    };
    let component = jrs_component::Component::connect(&link, limits).await?;
    store_fragments_through(component, accounts(users, keys)).await
}
