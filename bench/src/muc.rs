//! The group chat benchmark of `loadgen muc` (issue 10): one big room on a XEP-0045
//! service, the same clients against jabberd-rs (router, sm, c2s, muc, xdb-file) and
//! against Prosody's own MUC.
//!
//! 1. Fill: `occupants` clients log in, send initial presence and join `bench@SERVICE`
//!    (the first creates it as an instant room), `concurrency` joins at a time.
//! 2. Join: one more client joins (`joins` times, leaving in between): server CPU
//!    (precise, from /proc/PID/task/*/schedstat) of the join until the newcomer has every
//!    occupant's presence and the subject and every occupant has the newcomer's
//!    presence, plus 200 ms; the same for the leave. Medians are reported.
//! 3. Messages: `senders` occupants each keep `inflight` groupchat messages in flight
//!    (a message is done for its sender when the room reflects it back) for `seconds`;
//!    then the bench waits for every occupant to have every message. Deliveries per
//!    second (messages x occupants over the time until the last delivery) and server CPU
//!    per delivery.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use jrs_stream::{Frame, Stanza};
use tokio::task::JoinSet;

use crate::client::{Client, ClientKeys};
use crate::procstat::{cpu_nanos, per_process};

/// The server under test: where clients connect and which processes to measure.
pub struct Target {
    /// For the report: `jabberd-rs` or `prosody`.
    pub name: String,
    pub port: u16,
    pub pids: Vec<u32>,
    /// The MUC service's domain.
    pub service: String,
}

pub struct Plan {
    pub occupants: usize,
    pub joins: usize,
    pub senders: usize,
    pub inflight: u64,
    pub seconds: u64,
    pub concurrency: usize,
    /// Record these processes with `perf record` during the message phase into this
    /// file (perf's `-p` list).
    pub profile: Option<(String, Vec<u32>)>,
}

/// What all occupants received, counted by their reader tasks.
#[derive(Default)]
struct Counters {
    available: AtomicU64,
    unavailable: AtomicU64,
    groupchat: AtomicU64,
    errors: AtomicU64,
}

const ROOM: &str = "bench";

pub async fn run(target: &Target, keys: &ClientKeys, plan: &Plan) -> anyhow::Result<()> {
    let room = format!("{ROOM}@{}", target.service);
    let counters = Arc::new(Counters::default());
    let running = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sent_total = Arc::new(AtomicU64::new(0));

    // 1. Fill the room.
    let t = Instant::now();
    let cpu_fill = cpu_nanos(&target.pids);
    let mut first = Client::login(target.port, "user0", "muc", keys, None).await?;
    first.send(b"<presence/>").await?;
    first.send(join(&room, "n0").as_bytes()).await?;
    let created = wait_subject(&mut first).await?;
    if created {
        // A new room is locked until its owner accepts the default configuration.
        first
            .send(format!("<iq type='set' to='{room}' id='create'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>").as_bytes())
            .await?;
        loop {
            let s = next_stanza(&mut first).await?;
            if s.name() == "iq" && s.id() == Some("create") {
                if s.kind() != Some("result") {
                    bail!(
                        "room configuration refused: {}",
                        String::from_utf8_lossy(s.bytes())
                    );
                }
                break;
            }
        }
    }
    let shared = Shared {
        room: room.clone(),
        senders: plan.senders,
        inflight: plan.inflight,
        counters: counters.clone(),
        running: running.clone(),
        stop: stop.clone(),
        sent_total: sent_total.clone(),
        readers: Arc::new(Mutex::new(vec![])),
    };
    shared.spawn(first, 0);
    let next = Arc::new(AtomicU64::new(1));
    let mut logins = JoinSet::new();
    for _ in 0..plan.concurrency {
        let (next, keys, shared) = (next.clone(), keys.clone(), shared.clone());
        let (port, occupants) = (target.port, plan.occupants);
        logins.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= occupants {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut c = Client::login(port, &format!("user{i}"), "muc", &keys, None)
                    .await
                    .with_context(|| format!("login of user{i}"))?;
                c.send(b"<presence/>").await?;
                c.send(join(&shared.room, &format!("n{i}")).as_bytes())
                    .await?;
                wait_subject(&mut c).await?;
                shared.spawn(c, i);
            }
        });
    }
    while let Some(r) = logins.join_next().await {
        r??;
    }
    let n = plan.occupants as u64;
    // Each pair of occupants: the later one's presence reaches the earlier one after
    // the earlier one's join (which its own reader did not count).
    let pairs = n * (n - 1) / 2;
    if !wait_until(Duration::from_secs(120), || {
        counters.available.load(Ordering::Acquire) >= pairs
    })
    .await
    {
        bail!(
            "only {} of {pairs} presences reached occupants during the fill (is sm's queue per user, <sessions queue>, smaller than the room?)",
            counters.available.load(Ordering::Acquire)
        );
    }
    println!(
        "muc {}: {n} occupants joined {room} ({} at a time) in {:.1} s, server CPU {:.1} s",
        target.name,
        plan.concurrency,
        t.elapsed().as_secs_f64(),
        (cpu_nanos(&target.pids) - cpu_fill) as f64 / 1e9
    );
    settle(&target.pids).await;

    // 2. One more client joins and leaves, `joins` times.
    let mut newcomer = Client::login(
        target.port,
        &format!("user{}", plan.occupants),
        "muc",
        keys,
        None,
    )
    .await?;
    newcomer.send(b"<presence/>").await?;
    settle(&target.pids).await;
    let mut join_cpu = vec![];
    let mut join_by: Vec<Vec<u64>> = vec![vec![]; target.pids.len()];
    let mut leave_cpu = vec![];
    let (mut newcomer_wall, mut all_wall) = (vec![], vec![]);
    for _ in 0..plan.joins {
        let each: Vec<u64> = target.pids.iter().map(|p| cpu_nanos(&[*p])).collect();
        let before = cpu_nanos(&target.pids);
        let seen = counters.available.load(Ordering::Acquire);
        let t = Instant::now();
        newcomer.send(join(&room, "newcomer").as_bytes()).await?;
        let mut presences = 0u64;
        loop {
            let s = next_stanza(&mut newcomer).await?;
            match s.name() {
                "presence"
                    if s.kind().is_none()
                        && s.from().is_some_and(|f| f.starts_with(room.as_str())) =>
                {
                    presences += 1
                }
                "presence" if s.kind().is_none() => {}
                "presence" => bail!("join refused: {}", String::from_utf8_lossy(s.bytes())),
                "message" if contains(s.bytes(), b"<subject") => break,
                _ => {}
            }
        }
        newcomer_wall.push(t.elapsed());
        if presences != n + 1 {
            println!("  the newcomer got {presences} presences, not {}", n + 1);
        }
        let complete = wait_until(Duration::from_secs(60), || {
            counters.available.load(Ordering::Acquire) - seen >= n
        })
        .await;
        all_wall.push(t.elapsed());
        if !complete {
            println!("  not every occupant got the newcomer's presence");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        join_cpu.push(cpu_nanos(&target.pids) - before);
        for (k, p) in target.pids.iter().enumerate() {
            join_by[k].push(cpu_nanos(&[*p]) - each[k]);
        }
        // Leave.
        let before = cpu_nanos(&target.pids);
        let seen = counters.unavailable.load(Ordering::Acquire);
        newcomer
            .send(format!("<presence to='{room}/newcomer' type='unavailable'/>").as_bytes())
            .await?;
        loop {
            let s = next_stanza(&mut newcomer).await?;
            if s.name() == "presence" && s.kind() == Some("unavailable") {
                break;
            }
        }
        wait_until(Duration::from_secs(60), || {
            counters.unavailable.load(Ordering::Acquire) - seen >= n
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        leave_cpu.push(cpu_nanos(&target.pids) - before);
        settle(&target.pids).await;
    }
    let ms = |v: &mut Vec<u64>| median(v) as f64 / 1e6;
    let wall = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let by: Vec<(u32, f64)> = target
        .pids
        .iter()
        .zip(join_by.iter_mut())
        .map(|(p, v)| (*p, ms(v)))
        .collect();
    let mut sorted = join_cpu.clone();
    sorted.sort();
    println!(
        "muc {} join into {n} occupants (median of {}): server CPU {:.1} ms (all runs: {}), newcomer has {} presences + subject after {:.1} ms, every occupant has its presence after {:.1} ms; leave: server CPU {:.1} ms",
        target.name,
        plan.joins,
        ms(&mut join_cpu),
        sorted
            .iter()
            .map(|c| format!("{:.1}", *c as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" "),
        n + 1,
        wall(&mut newcomer_wall),
        wall(&mut all_wall),
        ms(&mut leave_cpu)
    );
    println!(
        "  join CPU ms by process (medians): {}",
        per_process(
            &target.pids,
            |pid| by.iter().find(|b| b.0 == pid).map_or(0.0, |b| b.1),
            ""
        )
    );
    newcomer.close().await;
    settle(&target.pids).await;

    // 3. A steady stream of room messages.
    let profiler = plan
        .profile
        .as_ref()
        .and_then(|(out, pids)| start_perf(out, pids));
    let each: Vec<u64> = target.pids.iter().map(|p| cpu_nanos(&[*p])).collect();
    let me = [std::process::id()];
    let own_before = cpu_nanos(&me);
    let before = cpu_nanos(&target.pids);
    let delivered_before = counters.groupchat.load(Ordering::Acquire);
    let t = Instant::now();
    running.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(plan.seconds)).await;
    running.store(false, Ordering::Release);
    let sending = t.elapsed();
    let delivered_sending = counters.groupchat.load(Ordering::Acquire) - delivered_before;
    // Senders stop at once; wait for what is in flight to reach everyone.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = sent_total.load(Ordering::Acquire);
    let expected = sent * n;
    let mut last = (counters.groupchat.load(Ordering::Acquire), Instant::now());
    while last.0 - delivered_before < expected && last.1.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = counters.groupchat.load(Ordering::Acquire);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let elapsed = last.1 - t;
    let delivered = last.0 - delivered_before;
    if let Some(p) = profiler {
        stop_perf(p);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = cpu_nanos(&target.pids) - before;
    let own = cpu_nanos(&me) - own_before;
    println!(
        "muc {} messages: {} senders, {} in flight each, {:.1} s: {sent} messages, {delivered} of {expected} deliveries in {:.2} s: {:.0} deliveries/s ({:.0} while sending), {:.0} messages/s; server CPU {:.2} µs/delivery ({:.0}% of a core; the clients {:.0}%)",
        target.name,
        plan.senders,
        plan.inflight,
        sending.as_secs_f64(),
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64(),
        delivered_sending as f64 / sending.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        cpu as f64 / 1e3 / delivered.max(1) as f64,
        cpu as f64 / 1e7 / elapsed.as_secs_f64(),
        own as f64 / 1e7 / elapsed.as_secs_f64(),
    );
    println!(
        "  CPU µs per delivery by process: {}",
        per_process(
            &target.pids,
            |pid| {
                let k = target
                    .pids
                    .iter()
                    .position(|p| *p == pid)
                    .expect("known pid");
                (cpu_nanos(&[pid]) - each[k]) as f64 / 1e3 / delivered.max(1) as f64
            },
            ""
        )
    );
    let errors = counters.errors.load(Ordering::Acquire);
    if errors > 0 {
        println!("  error stanzas received by occupants: {errors}");
    }
    stop.store(true, Ordering::Release);
    for r in shared.readers.lock().expect("readers").drain(..) {
        r.abort();
    }
    Ok(())
}

/// What every occupant's reader task shares.
#[derive(Clone)]
struct Shared {
    room: String,
    senders: usize,
    inflight: u64,
    counters: Arc<Counters>,
    running: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sent_total: Arc<AtomicU64>,
    readers: Arc<Mutex<Vec<tokio::task::JoinHandle<anyhow::Result<u64>>>>>,
}

impl Shared {
    /// Hands a joined client `c` (occupant `i`) to its reader task.
    fn spawn(&self, c: Client, i: usize) {
        let sender = (i < self.senders).then(|| format!("{}/n{i}", self.room));
        let task = tokio::spawn(occupant(
            c,
            sender,
            self.room.clone(),
            self.inflight,
            self.counters.clone(),
            self.running.clone(),
            self.stop.clone(),
            self.sent_total.clone(),
        ));
        self.readers.lock().expect("readers").push(task);
    }
}

fn join(room: &str, nick: &str) -> String {
    format!("<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>")
}

async fn next_stanza(c: &mut Client) -> anyhow::Result<Stanza> {
    match c.reader.next_frame().await? {
        Frame::Element(bytes) => Ok(Stanza::parse(bytes)?),
        other => bail!("expected a stanza, got {other:?}"),
    }
}

/// Reads until the room's subject (the end of a join); whether the room was created
/// (status 201 in the self-presence).
async fn wait_subject(c: &mut Client) -> anyhow::Result<bool> {
    let mut created = false;
    loop {
        let s = next_stanza(c).await?;
        match s.name() {
            "presence" if s.kind() == Some("error") => {
                bail!("join refused: {}", String::from_utf8_lossy(s.bytes()))
            }
            "presence"
                if contains(s.bytes(), b"code='201'") || contains(s.bytes(), b"code=\"201\"") =>
            {
                created = true
            }
            "message" if contains(s.bytes(), b"<subject") => return Ok(created),
            _ => {}
        }
    }
}

/// An occupant: counts what it receives; a sender also keeps `inflight` groupchat
/// messages in flight while `running`. Returns how many it sent.
#[allow(clippy::too_many_arguments)]
async fn occupant(
    mut c: Client,
    me: Option<String>,
    room: String,
    inflight: u64,
    counters: Arc<Counters>,
    running: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sent_total: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let (mut sent, mut echoed) = (0u64, 0u64);
    let mut batch = Vec::new();
    while !stop.load(Ordering::Acquire) {
        if me.is_some() && running.load(Ordering::Acquire) {
            batch.clear();
            while sent - echoed < inflight {
                batch.extend_from_slice(
                    format!("<message to='{room}' type='groupchat' id='m{sent}'><body>message {sent} of a steady stream into a big room</body></message>").as_bytes(),
                );
                sent += 1;
                sent_total.fetch_add(1, Ordering::AcqRel);
            }
            if !batch.is_empty() {
                c.send(&batch).await?;
            }
        }
        // Senders look at `running` again at least every 100 ms.
        let frame = if me.is_some() {
            match tokio::time::timeout(Duration::from_millis(100), c.reader.next_frame()).await {
                Ok(f) => f?,
                Err(_) => continue,
            }
        } else {
            c.reader.next_frame().await?
        };
        let Frame::Element(bytes) = frame else {
            bail!("stream closed")
        };
        let s = Stanza::parse(bytes)?;
        match (s.name(), s.kind()) {
            ("presence", None) => {
                counters.available.fetch_add(1, Ordering::AcqRel);
            }
            ("presence", Some("unavailable")) => {
                counters.unavailable.fetch_add(1, Ordering::AcqRel);
            }
            ("message", Some("groupchat")) if !contains(s.bytes(), b"<subject") => {
                counters.groupchat.fetch_add(1, Ordering::AcqRel);
                if me.is_some() && s.from() == me.as_deref() {
                    echoed += 1;
                }
            }
            (_, Some("error")) => {
                counters.errors.fetch_add(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }
    Ok(sent)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Polls `done` every 2 ms for at most `limit`; whether it became true.
async fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Waits (at most 60 s) until the server used under 1% of a core over 300 ms.
async fn settle(pids: &[u32]) {
    let start = Instant::now();
    let mut cpu = cpu_nanos(pids);
    while start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = cpu_nanos(pids);
        if now - cpu < 3_000_000 {
            return;
        }
        cpu = now;
    }
}

fn start_perf(out: &str, pids: &[u32]) -> Option<std::process::Child> {
    let list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    match std::process::Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "-g",
            "-o",
            out,
            "-p",
            &list,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => {
            eprintln!("profiling pids {list} during the message phase into {out}");
            std::thread::sleep(Duration::from_millis(500));
            Some(c)
        }
        Err(e) => {
            eprintln!("perf did not start: {e}");
            None
        }
    }
}

fn stop_perf(mut c: std::process::Child) {
    // SAFETY: kill(2) on the pid of a child this process started and has not waited for.
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGINT);
    }
    let _ = c.wait();
}

/// Debian's Prosody with its own MUC on `conference.localhost`, c2s on a loopback port,
/// accounts written as files (the same SCRAM keys as the bench's own accounts), in a
/// temporary directory. Dropping it stops Prosody.
pub struct Prosody {
    pub dir: std::path::PathBuf,
    pub port: u16,
    child: std::process::Child,
}

impl Prosody {
    pub async fn start(users: usize, keys: &ClientKeys) -> anyhow::Result<Prosody> {
        let dir = std::env::temp_dir().join(format!("jrs-bench-prosody-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let accounts = dir.join("data/localhost/accounts");
        std::fs::create_dir_all(&accounts)?;
        let record = keys.prosody_account();
        for i in 0..users {
            std::fs::write(accounts.join(format!("user{i}.dat")), &record)?;
        }
        let port = jrs_harness::free_port();
        let d = dir.display();
        let config = dir.join("prosody.cfg.lua");
        std::fs::write(
            &config,
            format!(
                r#"run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
log = {{ {{ levels = {{ min = "warn" }}, to = "file", filename = "{d}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
s2s_direct_tls_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", "disco", "ping", "presence" }}
modules_disabled = {{ "s2s", "s2s_bidi", "posix", "offline" }}
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = false
allow_unencrypted_plain_auth = false
VirtualHost "localhost"
Component "conference.localhost" "muc"
"#
            ),
        )?;
        let log = std::fs::File::create(dir.join("prosody.out"))?;
        let child = std::process::Command::new("prosody")
            .args(["--config", &config.display().to_string(), "-F"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prosody (apt-get install prosody)")?;
        let mut p = Prosody { dir, port, child };
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "prosody exited ({status}): {}",
                    std::fs::read_to_string(p.dir.join("prosody.out")).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(15) {
                bail!("prosody does not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own child, not yet waited for.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
