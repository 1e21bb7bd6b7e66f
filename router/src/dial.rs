//! Components the router reaches itself, as the seeds' `connect` and `exec` base
//! modules did: `<connect>` dials a component listening on another host (a gateway in a
//! DMZ that may not open connections inward) and `<exec>` runs a program whose standard
//! input and output are its link (a bot or a transport in a few lines of any language).
//! Both are then links like any other (routes, ACL, grace period), and both come back
//! with backoff when they end.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, info_span, warn, Instrument};

use jrs_component::transport::BoxIo;
use jrs_config::RouterLink;

use crate::config::Exec;
use crate::link::{serve_link, Side};
use crate::router::Router;

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A link that lived this long starts the backoff again from its first step.
const STABLE: Duration = Duration::from_secs(60);

/// Starts a task for every `<connect>` and `<exec>` of the configuration.
pub fn start_all(router: &Arc<Router>) {
    for link in router.config.connect.clone() {
        let span = info_span!("connect", component = %link.name);
        tokio::spawn(connect_loop(router.clone(), link).instrument(span));
    }
    for exec in router.config.exec.clone() {
        let span = info_span!("exec", component = %exec.name);
        tokio::spawn(exec_loop(router.clone(), exec).instrument(span));
    }
}

/// The next wait: doubled each time, from the first step again after a stable link.
fn backoff(delay: Duration, first: Duration, lived: Duration) -> Duration {
    if lived >= STABLE {
        first
    } else {
        (delay * 2).min(MAX_BACKOFF)
    }
}

async fn connect_loop(router: Arc<Router>, link: RouterLink) {
    let first = link.reconnect.max(Duration::from_millis(50));
    let mut delay = first;
    loop {
        let started = Instant::now();
        match jrs_component::transport::connect(&link).await {
            Ok(io) => {
                info!(address = %link.address, port = link.port, "connected to the component");
                let side = Side::Dialing {
                    name: link.name.to_ascii_lowercase(),
                    secret: link.secret.clone(),
                };
                let peer = format!("{}:{}", link.address, link.port);
                serve_link(router.clone(), io, peer, side).await;
                info!("link to the component ended");
            }
            Err(e) => warn!("component not reachable, retrying in {delay:?}: {e:#}"),
        }
        tokio::time::sleep(delay).await;
        delay = backoff(delay, first, started.elapsed());
    }
}

async fn exec_loop(router: Arc<Router>, exec: Exec) {
    let first = Duration::from_millis(500);
    let mut delay = first;
    loop {
        let started = Instant::now();
        match spawn(&exec) {
            Ok(mut child) => {
                info!(command = %exec.command, pid = child.id(), "started");
                let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
                    warn!("no pipes to the program");
                    return;
                };
                let io: BoxIo = Box::new(tokio::io::join(stdout, stdin));
                // The program speaks first, as any component that connects.
                serve_link(
                    router.clone(),
                    io,
                    format!("exec:{}", exec.name),
                    Side::Accepting,
                )
                .await;
                // The link is over: the program goes too (it may not notice by itself),
                // with whatever it started (`sh -c` forks): its whole process group.
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) with a negative pid signals that process group;
                    // the group is the child's own (process_group(0) below).
                    unsafe {
                        libc::kill(-(pid as i32), libc::SIGKILL);
                    }
                }
                let _ = child.start_kill();
                match child.wait().await {
                    Ok(status) => info!(%status, "program ended"),
                    Err(e) => warn!("program not reaped: {e}"),
                }
            }
            Err(e) => warn!(command = %exec.command, "could not start the program: {e}"),
        }
        info!("restarting in {delay:?}");
        tokio::time::sleep(delay).await;
        delay = backoff(delay, first, started.elapsed());
    }
}

fn spawn(exec: &Exec) -> std::io::Result<tokio::process::Child> {
    if let Some(dir) = exec.log.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&exec.log)?;
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&exec.command)
        .env("JABBERD_NAME", &exec.name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        // The router's end is the program's end: no orphan keeps the name.
        .kill_on_drop(true)
        // Its own process group, so that what it starts goes with it.
        .process_group(0);
    if let Some(secret) = &exec.secret {
        cmd.env("JABBERD_SECRET", secret);
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_ceiling_and_starts_again_after_a_stable_link() {
        let first = Duration::from_millis(500);
        assert_eq!(
            backoff(first, first, Duration::ZERO),
            Duration::from_secs(1)
        );
        assert_eq!(
            backoff(Duration::from_secs(20), first, Duration::ZERO),
            MAX_BACKOFF
        );
        assert_eq!(backoff(Duration::from_secs(20), first, STABLE), first);
    }
}
