//! The floor under the server's path for a lone message (issue 14): a chain of plain
//! relays with the same five hops as client -> c2s -> router -> sm -> router -> c2s ->
//! client, each relay a process of its own (this program with `relay`), forwarding
//! fixed-size messages that carry their send time, `--inflight` at a time.
//!
//! ```text
//! client --tcp--> r1 (c2s) --link--> r2 (router) --link--> r3 (sm) --link--> r4 (router)
//!        --link--> r5 (c2s) --tcp--> client
//! ```
//!
//! The client links are TCP on loopback; the four component links are TCP on loopback
//! or, with `--unix`, Unix stream sockets. Each relay reads what arrives and writes it
//! on: no parsing, no framing. `--flavour` chooses how a relay waits:
//! - `blocking`: one OS thread, blocking read and write (no runtime at all);
//! - `current`: tokio's current-thread runtime, one task;
//! - `multi`: tokio's multi-thread runtime (`--workers`, default 2), one task;
//!
//! and `--split` makes a tokio relay read in one task and write in another, the two
//! joined by an mpsc channel (the shape of the server's links: a reader task and a
//! writer task per connection).
//!
//! Prints messages/s, latency p50/p99 (send to receipt at the client), and CPU per
//! message of the relays (all, and each) and of the client, from
//! /proc/PID/task/*/schedstat, with context switches per message.
//!
//! ```text
//! cargo build --release --bins
//! target/release/relaychain --seconds 10 [--unix] [--flavour current] [--split]
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use bench::procstat::{context_switches, cpu_nanos};
use bench::pump::percentile;

#[derive(Parser, Debug)]
#[command(about = "A chain of plain relays: the floor under the server's five hops")]
struct Args {
    #[command(subcommand)]
    relay: Option<Relay>,
    /// Relays in the chain (hops - 1 ... the client links count as hops too: 5 relays
    /// make the six links of client -> c2s -> router -> sm -> router -> c2s -> client).
    #[arg(long, default_value_t = 5)]
    relays: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Bytes per message.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Messages in flight at a time.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Unix sockets for the links between relays (the client links stay TCP).
    #[arg(long)]
    unix: bool,
    #[arg(long, value_enum, default_value = "current")]
    flavour: Flavour,
    /// Worker threads of the multi-thread runtime.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// A reader task and a writer task joined by a channel, instead of one task.
    #[arg(long)]
    split: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq)]
enum Flavour {
    Blocking,
    Current,
    Multi,
    /// tokio current-thread, the socket read from registered for readability only and
    /// the one written to written directly: no wake-up when the next relay reads.
    Lean,
}

#[derive(Subcommand, Debug)]
enum Relay {
    /// One relay (started by the chain): accepts one connection on `listen`, connects
    /// to `connect`, and copies what arrives from the first to the second.
    Relay {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        #[arg(long)]
        listen: String,
        #[arg(long)]
        connect: String,
        #[arg(long, value_enum)]
        flavour: Flavour,
        #[arg(long)]
        workers: usize,
        #[arg(long)]
        split: bool,
    },
}

/// A connected stream of either family.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Stream {
    fn into_tokio(self) -> anyhow::Result<Box<dyn TokioStream>> {
        Ok(match self {
            Stream::Tcp(s) => {
                s.set_nonblocking(true)?;
                Box::new(tokio::net::TcpStream::from_std(s)?)
            }
            Stream::Unix(s) => {
                s.set_nonblocking(true)?;
                Box::new(tokio::net::UnixStream::from_std(s)?)
            }
        })
    }
    fn read_ref(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
    fn write_ref(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(true),
            Stream::Unix(s) => s.set_nonblocking(true),
        }
    }
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
trait TokioStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> TokioStream for T {}

fn listen(addr: &str) -> anyhow::Result<Box<dyn FnOnce() -> anyhow::Result<Stream>>> {
    if let Some(path) = addr.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).with_context(|| format!("binding {path}"))?;
        Ok(Box::new(move || Ok(Stream::Unix(l.accept()?.0))))
    } else {
        let a = addr.strip_prefix("tcp:").unwrap_or(addr).to_owned();
        let l = TcpListener::bind(&a).with_context(|| format!("binding {a}"))?;
        Ok(Box::new(move || {
            let s = l.accept()?.0;
            s.set_nodelay(true)?;
            Ok(Stream::Tcp(s))
        }))
    }
}

fn connect(addr: &str) -> anyhow::Result<Stream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = if let Some(path) = addr.strip_prefix("unix:") {
            UnixStream::connect(path).map(Stream::Unix)
        } else {
            TcpStream::connect(addr.strip_prefix("tcp:").unwrap_or(addr)).map(|s| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            })
        };
        match r {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => bail!("connecting to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn relay(
    listen_on: &str,
    connect_to: &str,
    flavour: Flavour,
    workers: usize,
    split: bool,
) -> anyhow::Result<()> {
    let accept = listen(listen_on)?;
    let mut down = connect(connect_to)?;
    let mut up = accept()?;
    if flavour == Flavour::Blocking {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = up.io().read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            down.io().write_all(&buf[..n])?;
        }
    }
    if flavour == Flavour::Lean {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(async move {
            up.set_nonblocking()?;
            down.set_nonblocking()?;
            // SAFETY: the `AsyncFd` owns the stream, whose descriptor stays open and the
            // same for the `AsyncFd`'s life.
            let up = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(up, tokio::io::Interest::READABLE)
            }?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let mut guard = up.readable().await?;
                let n = match guard.try_io(|fd| fd.get_ref().read_ref(&mut buf)) {
                    Ok(r) => r?,
                    Err(_) => continue,
                };
                if n == 0 {
                    return Ok(());
                }
                let mut at = 0;
                while at < n {
                    match down.write_ref(&buf[at..n]) {
                        Ok(w) => at += w,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            tokio::task::yield_now().await
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        });
    }
    let rt = match flavour {
        Flavour::Current => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?,
    };
    rt.block_on(async move {
        let mut up = up.into_tokio()?;
        let mut down = down.into_tokio()?;
        if split {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
            let writer = tokio::spawn(async move {
                while let Some(buf) = rx.recv().await {
                    down.write_all(&buf).await?;
                }
                Ok::<_, std::io::Error>(())
            });
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = up.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
            drop(tx);
            writer.await??;
        } else {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = up.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                down.write_all(&buf[..n]).await?;
            }
        }
        Ok(())
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// This process's CPU time (ns), every thread.
fn own_cpu() -> u64 {
    cpu_nanos(&[std::process::id()])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Relay::Relay {
        listen,
        connect,
        flavour,
        workers,
        split,
    }) = args.relay
    {
        return relay(&listen, &connect, flavour, workers, split);
    }
    if args.size < 16 {
        bail!("--size at least 16");
    }
    let dir = std::env::temp_dir().join(format!("relaychain-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Addresses: the client's sink, then each relay's listener.
    let sink_port = free_port()?;
    let sink = format!("tcp:127.0.0.1:{sink_port}");
    let mut addrs = vec![];
    for i in 0..args.relays {
        addrs.push(if args.unix && i > 0 {
            format!("unix:{}", dir.join(format!("r{i}.sock")).display())
        } else {
            format!("tcp:127.0.0.1:{}", free_port()?)
        });
    }
    let accept_sink = listen(&sink)?;
    let mut children: Vec<Child> = vec![];
    let exe = std::env::current_exe()?;
    for i in 0..args.relays {
        let next = if i + 1 < args.relays {
            addrs[i + 1].clone()
        } else {
            sink.clone()
        };
        children.push(
            Command::new(&exe)
                .args([
                    "relay",
                    "--listen",
                    &addrs[i],
                    "--connect",
                    &next,
                    "--flavour",
                    match args.flavour {
                        Flavour::Blocking => "blocking",
                        Flavour::Current => "current",
                        Flavour::Multi => "multi",
                        Flavour::Lean => "lean",
                    },
                    "--workers",
                    &args.workers.to_string(),
                ])
                .args(args.split.then_some("--split"))
                .stdin(Stdio::null())
                .spawn()?,
        );
    }
    let result = (|| -> anyhow::Result<()> {
        let mut out = connect(&addrs[0])?;
        let mut back = accept_sink()?;
        let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
        let epoch = Instant::now();
        let mut msg = vec![b'x'; args.size];
        let send = |out: &mut Stream, msg: &mut Vec<u8>| -> std::io::Result<()> {
            let stamp = epoch.elapsed().as_nanos() as u64;
            msg[..8].copy_from_slice(&stamp.to_le_bytes());
            out.io().write_all(msg)
        };
        // Warm up, then measure.
        let mut lat = Vec::with_capacity(1 << 20);
        let mut inbuf = vec![0u8; args.size];
        let mut round = |seconds: f64, lat: &mut Vec<Duration>| -> anyhow::Result<u64> {
            let until = Instant::now() + Duration::from_secs_f64(seconds);
            for _ in 0..args.inflight {
                send(&mut out, &mut msg)?;
            }
            let mut got = 0u64;
            let mut outstanding = args.inflight;
            while outstanding > 0 {
                back.io().read_exact(&mut inbuf)?;
                let now = epoch.elapsed().as_nanos() as u64;
                let stamp = u64::from_le_bytes(inbuf[..8].try_into().unwrap());
                lat.push(Duration::from_nanos(now.saturating_sub(stamp)));
                got += 1;
                outstanding -= 1;
                if Instant::now() < until {
                    send(&mut out, &mut msg)?;
                    outstanding += 1;
                }
            }
            Ok(got)
        };
        round(1.0, &mut lat)?;
        lat.clear();
        let before: Vec<u64> = pids.iter().map(|p| cpu_nanos(&[*p])).collect();
        let switches_before = context_switches(&pids);
        let own_before = own_cpu();
        let start = Instant::now();
        let n = round(args.seconds as f64, &mut lat)?;
        let elapsed = start.elapsed();
        let own = own_cpu() - own_before;
        let switches = context_switches(&pids) - switches_before;
        let each: Vec<f64> = pids
            .iter()
            .zip(&before)
            .map(|(p, b)| (cpu_nanos(&[*p]) - b) as f64 / 1e3 / n as f64)
            .collect();
        let total: f64 = each.iter().sum();
        println!(
            "relay chain: {} relays ({}{}), links between relays over {}, {} bytes, {} in flight, {:.1} s: {n} messages, {:.0} messages/s, latency p50 {:.3} ms p99 {:.3} ms, relays' CPU {:.1} µs/message ({:.1} per relay), {:.1} context switches/message, client {:.1} µs/message",
            args.relays,
            match args.flavour {
                Flavour::Blocking => "blocking threads".to_owned(),
                Flavour::Current => "tokio current-thread".to_owned(),
                Flavour::Multi => format!("tokio multi-thread, {} workers", args.workers),
                Flavour::Lean => "tokio current-thread, read interest only".to_owned(),
            },
            if args.split { ", reader and writer tasks" } else { "" },
            if args.unix { "Unix sockets" } else { "TCP loopback" },
            args.size,
            args.inflight,
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
            percentile(&mut lat, 0.50).as_secs_f64() * 1e3,
            percentile(&mut lat, 0.99).as_secs_f64() * 1e3,
            total,
            total / args.relays as f64,
            switches as f64 / n as f64,
            own as f64 / 1e3 / n as f64,
        );
        println!(
            "  CPU µs per message by relay: {}",
            each.iter()
                .enumerate()
                .map(|(i, v)| format!("r{} {v:.1}", i + 1))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    })();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}
