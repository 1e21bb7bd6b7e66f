//! One component link: XEP-0114 handshake, then a loop that frames, checks and routes
//! every packet the component sends.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tracing::{debug, info, info_span, warn, Instrument};

use jrs_component::protocol::handshake_digest;
use jrs_component::transport::BoxIo;
use jrs_component::{FramedReader, PacketType, ReadError, TopLevel};
use jrs_stream::header::open_stream;
use jrs_stream::validate::validate_stanza;
use jrs_stream::{
    Frame, FrameKind, Stanza, StanzaErrorCondition, StreamError, StreamErrorCondition,
    StreamHeader, NS_COMPONENT_ACCEPT,
};

use crate::outbox::{run_writer, Outbox};
use crate::router::{Accepted, AckLink, Router};
use crate::tree::ConnId;

/// How a link ended.
enum End {
    /// The component closed its stream (or the connection): close ours.
    Closed,
    /// The component broke a rule: send this stream error and close.
    Error(StreamError),
    /// The writer stopped (the link was killed as stuck, or a write failed).
    WriterGone,
    /// Reading failed: the connection was reset or timed out.
    Lost(std::io::Error),
}

/// Which end of the XEP-0114 handshake the router is.
pub enum Side {
    /// The component connected (or a program the router runs speaks first): it sends
    /// the stream header and the handshake, checked against router-users.xml.
    Accepting,
    /// The router dialed the component (`<connect>`): the router sends the header and
    /// proves the shared secret; the component answers `<handshake/>`.
    Dialing { name: String, secret: String },
}

/// Serves one accepted connection until it ends.
pub async fn serve(router: Arc<Router>, io: BoxIo, peer: String) {
    serve_link(router, io, peer, Side::Accepting).await
}

/// Serves one component link until it ends.
pub async fn serve_link(router: Arc<Router>, io: BoxIo, peer: String, side: Side) {
    let conn = router.next_conn_id();
    let span = info_span!("link", conn, %peer, component = tracing::field::Empty);
    async move {
        debug!("accepted");
        let (r, w) = tokio::io::split(io);
        let outbox = Arc::new(Outbox::new(router.config.max_queue_bytes));
        let keepalive = router.config.keepalive;
        // Not in the link's span: the writer logs nothing, and entering and leaving the
        // span at each of its wake-ups cost the router about a twentieth of its
        // instructions per lone packet (docs/benchmarks.md, "Writes nothing waits for").
        let mut writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { run_writer(&outbox, w, keepalive).await }
        });
        let mut reader = FramedReader::new(r, router.config.limits);

        let handshake = async {
            match &side {
                Side::Accepting => authenticate(&router, conn, &mut reader, &outbox).await,
                Side::Dialing { name, secret } => {
                    authenticate_dialed(&router, conn, &mut reader, &outbox, name, secret).await
                }
            }
        };
        let authenticated =
            match tokio::time::timeout(router.config.handshake_timeout, handshake).await {
                Ok(Ok((name, trusted))) => Some((name, trusted)),
                Ok(Err(e)) if e.text == "connection closed" => {
                    debug!("closed before authenticating (a port probe?)");
                    outbox.close_with(b"");
                    None
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "refused");
                    outbox.close_with(e.to_xml().as_bytes());
                    None
                }
                Err(_) => {
                    warn!("no handshake in time");
                    outbox.close_with(
                        StreamError::new(
                            StreamErrorCondition::ConnectionTimeout,
                            "no handshake in time",
                        )
                        .to_xml()
                        .as_bytes(),
                    );
                    None
                }
            };
        let Some((name, trusted)) = authenticated else {
            // The writer drains the header and the error, then closes.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut writer).await;
            writer.abort();
            return;
        };
        tracing::Span::current().record("component", name.as_str());
        info!(trusted, "component connected");

        // How much of the component's stream was handled (acknowledged links).
        let mut handled = reader.position();
        let end = tokio::select! {
            end = read_packets(&router, conn, &mut reader, &outbox, trusted, &mut handled) => end,
            _ = &mut writer => End::WriterGone,
        };
        // Unbind first: from now on packets for this component are held for its return.
        router.unregister(conn, handled);
        let last: Vec<u8> = match &end {
            End::Closed => {
                info!("component closed its stream");
                b"</stream:stream>".to_vec()
            }
            End::Error(e) => {
                warn!(error = %e, "closing the link with a stream error");
                e.to_xml().into_bytes()
            }
            End::WriterGone => {
                warn!("link write side gone; disconnected");
                vec![]
            }
            End::Lost(e) => {
                // Reset by the peer, or nothing acknowledged within the link timeout (a
                // dead host or a cut network: TCP_USER_TIMEOUT).
                warn!(error = %e, "link lost");
                vec![]
            }
        };
        if let Ok(Ok(mut w)) = tokio::time::timeout(Duration::from_secs(5), writer).await {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                w.write_all(&last).await?;
                w.shutdown().await
            })
            .await;
            // Closing with unread input resets the connection, which can destroy the
            // stream error in flight: read (and drop) what the peer still sends, briefly.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 16 * 1024];
                let io = reader.get_mut();
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
    }
    .instrument(span)
    .await
}

/// Reads the stream header and the handshake; on success the link is registered and bound
/// to its name. Returns the component's name and whether it is trusted.
async fn authenticate<R: AsyncRead + Unpin>(
    router: &Router,
    conn: ConnId,
    reader: &mut FramedReader<R>,
    outbox: &Arc<Outbox>,
) -> Result<(String, bool), StreamError> {
    let header = match reader.next_frame().await {
        Ok(Frame::StreamOpen(bytes)) => StreamHeader::parse(&bytes, None),
        Ok(_) => Err(StreamError::new(
            StreamErrorCondition::NotWellFormed,
            "expected a stream header",
        )),
        Err(ReadError::Stream(e)) => Err(e),
        Err(e) => Err(StreamError::new(
            StreamErrorCondition::NotWellFormed,
            e.to_string(),
        )),
    };
    let stream_id = format!("{:016x}", rand::rng().random::<u64>());
    let name = header
        .as_ref()
        .ok()
        .and_then(|h| h.to.as_deref())
        .unwrap_or("")
        .to_ascii_lowercase();
    // RFC 6120 4.9.1.2: a stream error is preceded by our stream header.
    let _ = outbox
        .push(open_stream(NS_COMPONENT_ACCEPT, &[("from", &name), ("id", &stream_id)]).as_bytes());
    let header = header?;
    if header.xmlns.as_deref() != Some(NS_COMPONENT_ACCEPT) {
        return Err(StreamError::new(
            StreamErrorCondition::InvalidNamespace,
            format!("component streams use the namespace {NS_COMPONENT_ACCEPT}"),
        ));
    }
    // A component the router dials proves itself on that link only: a login from
    // anyone else under its name could replay the router's own handshake.
    if router
        .config
        .connect
        .iter()
        .any(|c| c.name.eq_ignore_ascii_case(&name))
    {
        return Err(StreamError::new(
            StreamErrorCondition::NotAuthorized,
            format!("'{name}' is dialed by the router (<connect>), it does not connect"),
        ));
    }
    let users = router.users();
    let Some(user) = users.find(&name) else {
        return Err(StreamError::new(
            StreamErrorCondition::HostUnknown,
            format!("no component named '{name}' is configured"),
        ));
    };
    let handshake = match reader.next_frame().await {
        Ok(Frame::Element(bytes)) => Stanza::parse(bytes)
            .map_err(|e| StreamError::new(StreamErrorCondition::NotWellFormed, e.to_string()))?,
        Ok(_) => {
            return Err(StreamError::new(
                StreamErrorCondition::NotAuthorized,
                "expected <handshake>",
            ))
        }
        Err(ReadError::Stream(e)) => return Err(e),
        Err(e) => {
            return Err(StreamError::new(
                StreamErrorCondition::NotWellFormed,
                e.to_string(),
            ))
        }
    };
    let expected = handshake_digest(&stream_id, &user.secret);
    let given = String::from_utf8_lossy(handshake.inner())
        .trim()
        .to_ascii_lowercase();
    if handshake.name() != "handshake" || !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        // A short pause makes guessing secrets slow without holding up honest peers.
        tokio::time::sleep(Duration::from_millis(200)).await;
        return Err(StreamError::new(
            StreamErrorCondition::NotAuthorized,
            "wrong handshake",
        ));
    }
    // An acknowledged link, if the component asks (docs/protocol.md).
    let accepted = if handshake.attr("acks").as_deref() == Some("1") {
        Accepted::WithAcks(AckLink {
            stream_id: stream_id.clone(),
            previd: handshake.attr("previd"),
        })
    } else {
        Accepted::Plain
    };
    router
        .register(conn, &name, user.trusted, outbox.clone(), accepted)
        .map_err(|e| StreamError::new(StreamErrorCondition::Conflict, e))?;
    Ok((name, user.trusted))
}

/// The handshake with the roles reversed (jabberd's `connect`): our header to the
/// component, its header with the stream id, our digest of the id and the secret, its
/// `<handshake/>`. The link then counts as the component `name` (its router-users.xml
/// entry, if any, says whether it is trusted and what it may bind).
async fn authenticate_dialed<R: AsyncRead + Unpin>(
    router: &Router,
    conn: ConnId,
    reader: &mut FramedReader<R>,
    outbox: &Arc<Outbox>,
    name: &str,
    secret: &str,
) -> Result<(String, bool), StreamError> {
    let _ = outbox.push(open_stream(NS_COMPONENT_ACCEPT, &[("to", name)]).as_bytes());
    let frame = reader.next_frame().await;
    let id = match frame {
        Ok(Frame::StreamOpen(bytes)) => StreamHeader::parse(&bytes, None)?.id,
        Ok(_) => None,
        Err(ReadError::Stream(e)) => return Err(e),
        Err(e) => {
            return Err(StreamError::new(
                StreamErrorCondition::NotWellFormed,
                e.to_string(),
            ))
        }
    };
    let Some(id) = id else {
        return Err(StreamError::new(
            StreamErrorCondition::InvalidXml,
            "the component's stream header has no id",
        ));
    };
    let _ =
        outbox.push(format!("<handshake>{}</handshake>", handshake_digest(&id, secret)).as_bytes());
    match reader.next_frame().await {
        Ok(Frame::Element(bytes))
            if Stanza::parse(bytes.clone()).is_ok_and(|s| s.name() == "handshake") => {}
        Ok(Frame::Element(bytes)) => {
            return Err(StreamError::new(
                StreamErrorCondition::NotAuthorized,
                format!(
                    "the component refused the handshake: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            ))
        }
        Ok(_) => {
            return Err(StreamError::new(
                StreamErrorCondition::NotAuthorized,
                "no <handshake/>",
            ))
        }
        Err(ReadError::Stream(e)) => return Err(e),
        Err(e) => {
            return Err(StreamError::new(
                StreamErrorCondition::NotWellFormed,
                e.to_string(),
            ))
        }
    }
    let trusted = router.users().find(name).is_some_and(|u| u.trusted);
    router
        .register(conn, name, trusted, outbox.clone(), Accepted::Dialed)
        .map_err(|e| StreamError::new(StreamErrorCondition::Conflict, e))?;
    Ok((name.to_owned(), trusted))
}

/// Frames, checks and routes packets until the stream ends. Every stanza of one read is
/// routed as one batch, straight from the read buffer.
async fn read_packets<R: AsyncRead + Unpin>(
    router: &Router,
    conn: ConnId,
    reader: &mut FramedReader<R>,
    outbox: &Outbox,
    trusted: bool,
    handled: &mut u64,
) -> End {
    let mut frames = Vec::new();
    let mut ack_timer = Box::pin(tokio::time::sleep(Duration::ZERO));
    loop {
        frames.clear();
        let mut broken = None;
        loop {
            match reader.next_range() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        let (end, done) = handle_frames(router, conn, reader.buffer(), &frames, trusted, outbox);
        // Acks alone owe no ack (two idle ends would acknowledge each other's forever).
        let packet = frames
            .iter()
            .any(|(_, range)| !is_ack(&reader.buffer()[range.clone()]));
        if let Some(done) = done {
            *handled = reader.position_of(done);
        }
        if let Some(end) = end {
            return end;
        }
        // Everything read so far is handled (routed, held or bounced): on an
        // acknowledged link the router owes the component an ack for it.
        outbox.handled(*handled, packet);
        if let Some(e) = broken {
            return End::Error(e);
        }
        outbox.wait_drained().await;
        // Waiting for the component, send the ack owed alone if nothing to ride along
        // with came by its deadline.
        let filled = loop {
            let Some(due) = outbox.ack_deadline() else {
                break reader.fill().await;
            };
            if ack_timer.deadline() != due {
                ack_timer.as_mut().reset(due);
            }
            tokio::select! {
                r = reader.fill() => break r,
                _ = ack_timer.as_mut() => outbox.ack_now(),
            }
        };
        match filled {
            Ok(()) => {}
            Err(ReadError::Stream(e)) => return End::Error(e),
            Err(ReadError::Closed) => return End::Closed,
            Err(ReadError::Io(e)) => return End::Lost(e),
        }
    }
}

/// Handles the frames of one read in order; returns how the stream ends, if it does,
/// and where in the buffer the last frame handled ends (frames after one that ends the
/// stream are not handled).
fn handle_frames(
    router: &Router,
    conn: ConnId,
    buf: &[u8],
    frames: &[(FrameKind, Range<usize>)],
    trusted: bool,
    outbox: &Outbox,
) -> (Option<End>, Option<usize>) {
    let mut batch: Vec<(PacketType, Stanza<&[u8]>)> = Vec::with_capacity(frames.len());
    let mut end = None;
    let mut done = None;
    for (kind, range) in frames {
        let bytes = &buf[range.clone()];
        crate::metrics::M.bytes_in.inc_by(bytes.len() as u64);
        match kind {
            FrameKind::StreamClose => {
                end = Some(End::Closed);
                break;
            }
            FrameKind::StreamOpen => unreachable!("the framer opens a stream once"),
            FrameKind::Element => {}
        }
        // Most frames on a busy link are acks: read without the parser when spelled as
        // we write them.
        if let Some(h) = jrs_component::ack::quick_ack(bytes) {
            outbox.acknowledged(h);
            done = Some(range.end);
            continue;
        }
        if !trusted {
            if let Err(e) = validate_stanza(bytes) {
                end = Some(End::Error(e));
                break;
            }
        }
        let stanza = match Stanza::parse_slice(bytes) {
            Ok(s) => s,
            Err(e) => {
                end = Some(End::Error(StreamError::new(
                    StreamErrorCondition::NotWellFormed,
                    e.to_string(),
                )));
                break;
            }
        };
        match TopLevel::classify(stanza.name()) {
            TopLevel::Packet(route) if stanza.to().is_none() && route != PacketType::Log => {
                // Addressed to the router itself, which offers no services.
                if let Some(reply) = stanza.error_reply(
                    StanzaErrorCondition::ServiceUnavailable,
                    "the router offers no services; set 'to'",
                ) {
                    router.reply_to_sender(conn, reply);
                }
            }
            TopLevel::Packet(route) => {
                crate::metrics::M.packets_in.by(route.name()).inc();
                batch.push((route, stanza))
            }
            TopLevel::Bind | TopLevel::Unbind => {
                // In order: what was sent before the bind is routed before it.
                router.route_batch(conn, &batch);
                batch.clear();
                router.handle_bind(conn, &stanza, stanza.name() == "unbind");
            }
            TopLevel::Notices => {
                router.route_batch(conn, &batch);
                batch.clear();
                router.subscribe_notices(conn, &stanza);
            }
            TopLevel::Ack => match jrs_component::ack::parse_h(stanza.attr("h").as_deref()) {
                Some(h) => outbox.acknowledged(h),
                None => {
                    end = Some(End::Error(StreamError::new(
                        StreamErrorCondition::InvalidXml,
                        "<a/> needs a number h",
                    )));
                    break;
                }
            },
            TopLevel::StreamError => {
                warn!(error = %String::from_utf8_lossy(bytes), "component sent a stream error");
                end = Some(End::Closed);
                break;
            }
            TopLevel::Handshake | TopLevel::Notice | TopLevel::Unknown => {
                end = Some(End::Error(StreamError::new(
                    StreamErrorCondition::UnsupportedStanzaType,
                    format!("<{}> is not a packet the router handles", stanza.name()),
                )));
                break;
            }
        }
        done = Some(range.end);
    }
    router.route_batch(conn, &batch);
    (end, done)
}

/// Whether a frame is an ack (`<a .../>`), from its first bytes.
fn is_ack(frame: &[u8]) -> bool {
    frame.starts_with(b"<a ") || frame.starts_with(b"<a/")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
