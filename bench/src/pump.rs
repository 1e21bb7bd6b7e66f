//! The message load of `loadgen messages` and `multism_load`: clients in pairs, each
//! keeping a window of chat messages in flight to its partner, timestamped in their ids
//! for the delivery latency.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::Notify;

use jrs_stream::{Frame, Stanza};

use crate::client::Client;

/// Clients that enable stream management ask for an acknowledgement this often.
pub const ASK_EVERY: u64 = 5;

/// Sends to the partner with at most `inflight` unacknowledged, and receives from it,
/// until `running` is cleared. Returns how many this client sent. With `sm`, asks for an
/// acknowledgement every [`ASK_EVERY`] stanzas and answers the server's asks.
#[allow(clippy::too_many_arguments)]
pub async fn pump_messages(
    mut client: Client,
    me: usize,
    partner: usize,
    to: &str,
    inflight: u64,
    sm: bool,
    epoch: Instant,
    acked: &[AtomicU64],
    wake: &[Notify],
    running: &AtomicBool,
    latencies: &Mutex<Vec<Duration>>,
) -> anyhow::Result<u64> {
    let mut sent = 0u64;
    // XEP-0198: stanzas received since enabling (the client's h).
    let mut handled = 0u32;
    let mut local = Vec::new();
    loop {
        if !running.load(Ordering::Acquire) {
            break;
        }
        let mut batch = Vec::new();
        while sent - acked[me].load(Ordering::Acquire) < inflight {
            let stamp = epoch.elapsed().as_nanos();
            batch.extend_from_slice(
                format!("<message to='{to}' type='chat' id='{stamp}'><body>hello {sent}</body></message>").as_bytes(),
            );
            sent += 1;
            if sm && sent.is_multiple_of(ASK_EVERY) {
                batch.extend_from_slice(b"<r xmlns='urn:xmpp:sm:3'/>");
            }
        }
        if !batch.is_empty() {
            client.send(&batch).await?;
        }
        tokio::select! {
            frame = client.reader.next_frame() => {
                let Frame::Element(bytes) = frame? else { bail!("stream closed") };
                let stanza = Stanza::parse(bytes)?;
                if matches!(stanza.name(), "message" | "presence" | "iq") {
                    handled = handled.wrapping_add(1);
                } else if sm && stanza.name() == "r" {
                    client
                        .send(format!("<a xmlns='urn:xmpp:sm:3' h='{handled}'/>").as_bytes())
                        .await?;
                }
                if stanza.name() == "message" && stanza.kind() == Some("chat") {
                    if let Some(stamp) = stanza.id().and_then(|s| s.parse::<u128>().ok()) {
                        let now = epoch.elapsed().as_nanos();
                        local.push(Duration::from_nanos(now.saturating_sub(stamp) as u64));
                    }
                    acked[partner].fetch_add(1, Ordering::AcqRel);
                    wake[partner].notify_one();
                }
            }
            _ = wake[me].notified() => {}
        }
    }
    latencies.lock().unwrap().extend(local);
    Ok(sent)
}

/// The `p` quantile (0 to 1) of `samples` (sorted here).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}
