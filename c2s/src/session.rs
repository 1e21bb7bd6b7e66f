//! A bound client session: started with sm, then relaying stanzas between the client and
//! its sm instance until either side ends it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::info;

use jrs_stream::children::children;
use jrs_stream::xml::escape;
use jrs_stream::{Stanza, StanzaErrorCondition, StreamErrorCondition};
use jrs_sx::features::{NS_BIND, NS_SESSION};
use jrs_sx::{stream_error, Close, Connection};

use crate::iq::{error_iq, result_iq};
use crate::shared::{SessionHandle, Shared, ToClient};

/// How long sm may take to start a session.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of queued stanzas written to the client in one go.
const BURST: usize = 64 * 1024;

/// Starts the session for `full` (answering the client's bind request `bind_id`) and
/// relays until it ends.
pub async fn run(
    shared: &Arc<Shared>,
    conn: &mut Connection,
    peer: SocketAddr,
    bare: String,
    full: String,
    bind_id: String,
) -> Close {
    let (to_client, mut from_sm) = mpsc::unbounded_channel();
    let (handle, started) = shared.start_session(&full, &bare, to_client);
    let reply = match tokio::time::timeout(START_TIMEOUT, started).await {
        Ok(Ok(Ok(_sm))) => format!(
            "<iq type='result' id='{}'><bind xmlns='{NS_BIND}'><jid>{}</jid></bind></iq>",
            escape(&bind_id),
            escape(&full)
        ),
        Ok(Ok(Err(condition))) => {
            let cond = StanzaErrorCondition::parse(&condition)
                .unwrap_or(StanzaErrorCondition::InternalServerError);
            shared.end_session(&handle);
            error_iq(&bind_id, cond, "the session manager refused the session")
        }
        _ => {
            shared.end_session(&handle);
            error_iq(
                &bind_id,
                StanzaErrorCondition::InternalServerError,
                "the session manager did not answer",
            )
        }
    };
    let bound = reply.contains("type='result'");
    if let Err(close) = conn.write(reply.as_bytes()).await {
        shared.end_session(&handle);
        return close;
    }
    if !bound {
        return stream_error(
            StreamErrorCondition::InternalServerError,
            "no session could be started",
        );
    }
    info!(%peer, jid = %full, sid = %handle.sid, "session started");
    let close = relay(shared, conn, &handle, &mut from_sm).await;
    shared.end_session(&handle);
    info!(jid = %full, "session ended");
    close
}

async fn relay(
    shared: &Shared,
    conn: &mut Connection,
    handle: &SessionHandle,
    from_sm: &mut mpsc::UnboundedReceiver<Box<ToClient>>,
) -> Close {
    let keepalive = shared.config.keepalive;
    loop {
        let idle_write = tokio::time::sleep_until((conn.last_write() + keepalive).into());
        tokio::select! {
            element = conn.next_stanza() => {
                let stanza = match element {
                    Ok(s) => s,
                    Err(close) => return close,
                };
                if let Err(close) = client_stanza(shared, conn, handle, stanza).await {
                    return close;
                }
            }
            message = from_sm.recv() => match message.map(|m| *m) {
                Some(ToClient::Stanza(bytes)) => {
                    // Whatever else is queued for this client goes out in the same
                    // write: one system call for a burst, not one per stanza.
                    let mut burst = bytes.to_vec();
                    let mut end = None;
                    while burst.len() < BURST {
                        match from_sm.try_recv().map(|m| *m) {
                            Ok(ToClient::Stanza(more)) => burst.extend_from_slice(&more),
                            Ok(ToClient::End(condition, text)) => {
                                end = Some(stream_error(condition, text));
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(close) = conn.write(&burst).await {
                        return close;
                    }
                    if let Some(end) = end {
                        return end;
                    }
                }
                Some(ToClient::End(condition, text)) => return stream_error(condition, text),
                None => return stream_error(StreamErrorCondition::SystemShutdown, "shutting down"),
            },
            _ = idle_write => {
                if let Err(close) = conn.write(b" ").await {
                    return close;
                }
            }
        }
    }
}

/// A stanza from the bound client: answered here (session, bind, bad addressing) or
/// stamped with the full JID and passed to sm.
async fn client_stanza(
    shared: &Shared,
    conn: &mut Connection,
    handle: &SessionHandle,
    stanza: Stanza,
) -> Result<(), Close> {
    match stanza.name() {
        "message" | "presence" | "iq" => {}
        other => {
            return Err(stream_error(
                StreamErrorCondition::UnsupportedStanzaType,
                format!("<{other}> is not a stanza"),
            ))
        }
    }
    if let Some(to) = stanza.to() {
        let valid = jrs_stream::xml::unescape(to).is_some_and(|t| jid::Jid::new(&t).is_ok());
        if !valid {
            if let Some(reply) = stanza.error_reply(
                StanzaErrorCondition::JidMalformed,
                "the 'to' address is not a valid JID",
            ) {
                conn.write(&reply).await?;
            }
            return Ok(());
        }
    }
    if stanza.name() == "iq" {
        if stanza.id().is_none() {
            // RFC 6120 8.1.3: an IQ without id is not executed.
            let reply = error_iq(
                "",
                StanzaErrorCondition::BadRequest,
                "an IQ needs an id (RFC 6120 8.1.3)",
            );
            return conn.write(reply.as_bytes()).await;
        }
        if stanza.kind() == Some("set") {
            if let Some(answer) = own_iq(&stanza) {
                return conn.write(answer.as_bytes()).await;
            }
        }
    }
    // Never trust the client's from: stamp the session's full JID.
    let stamped: Bytes = stanza.with_addresses(None, Some(&handle.jid));
    if !shared.send(shared.session_packet("stanza", handle, &stamped)) {
        if let Some(reply) = stanza.error_reply(
            StanzaErrorCondition::ServiceUnavailable,
            "the server is restarting",
        ) {
            conn.write(&reply).await?;
        }
    }
    Ok(())
}

/// The answer to an IQ set c2s handles itself once bound: the legacy session request
/// (a no-op, RFC 6121 appendix E) and a second bind (refused).
fn own_iq(iq: &Stanza) -> Option<String> {
    let payload = children(iq).into_iter().next()?;
    let id = iq.attr("id").unwrap_or_default();
    match (payload.name.as_str(), payload.ns.as_str()) {
        ("session", NS_SESSION) => Some(result_iq(&id)),
        ("bind", NS_BIND) if iq.to().is_none() => Some(error_iq(
            &id,
            StanzaErrorCondition::NotAllowed,
            "this stream has a resource bound already",
        )),
        _ => None,
    }
}
