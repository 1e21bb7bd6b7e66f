//! Drives a client stream's negotiation (`negotiation.rs`) with I/O: reads headers and
//! elements, writes what the machine says, upgrades to TLS, and asks storage for
//! credentials and new accounts.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use jrs_auth::{Credentials, NS_AUTH};
use jrs_stream::{Frame, StreamErrorCondition, StreamHeader};
use jrs_sx::{stream_error, Close, Connection};

use crate::fast::NS_FAST_STORE;
use crate::negotiation::{Action, Input, Negotiation, Outcome, Registration, NS_CLIENT};
use crate::shared::Shared;

/// Pause before answering a failed authentication: slows guessing, not honest users.
const FAILURE_DELAY: Duration = Duration::from_millis(300);

/// Runs the negotiation until the client binds a resource or asks to resume a session.
/// Called again after a failed resumption: the client may bind then.
pub async fn run(
    shared: &Arc<Shared>,
    conn: &mut Connection,
    negotiation: &mut Negotiation,
) -> Result<Outcome, Close> {
    let settings = &shared.negotiation;
    let mut input = read(conn, negotiation).await?;
    loop {
        let mut next = None;
        let mut out = Output::default();
        for action in negotiation.step(settings, input) {
            let action = match action {
                Action::Header(h) => {
                    out.header = true;
                    out.text.push_str(&h);
                    continue;
                }
                Action::Send(s) => {
                    out.text.push_str(&s);
                    continue;
                }
                // What was said before goes out before anything else happens.
                other => {
                    out.flush(conn).await?;
                    other
                }
            };
            match action {
                Action::Header(_) | Action::Send(_) => unreachable!("gathered above"),
                Action::StartTls => {
                    if conn.has_buffered() {
                        return Err(stream_error(
                            StreamErrorCondition::PolicyViolation,
                            "data after <starttls/> before <proceed/>",
                        ));
                    }
                    let tls = shared.tls();
                    conn.accept_tls(tls.starttls).await?;
                    next = Some(Input::TlsStarted {
                        cb: crate::channel_binding::of(
                            conn.transport(),
                            &tls.endpoints,
                            &shared.config.hosts,
                        ),
                    });
                }
                Action::Restart => conn.restart(),
                Action::LookupCredentials(bare) => {
                    next = Some(Input::Credentials(credentials(shared, &bare).await));
                }
                Action::LookupFast(bare) => {
                    next = Some(Input::Fast(fast_record(shared, &bare).await));
                }
                Action::StoreFast { bare, record } => {
                    let stored = match shared.xdb.set(&bare, NS_FAST_STORE, record).await {
                        Ok(()) => true,
                        Err(e) => {
                            warn!(user = %bare, "FAST tokens not stored: {e}");
                            false
                        }
                    };
                    next = Some(Input::FastStored(stored));
                }
                Action::Register { bare, password } => {
                    next = Some(Input::Registered(register(shared, &bare, &password).await));
                }
                Action::FailurePause => tokio::time::sleep(FAILURE_DELAY).await,
                Action::Done(outcome) => return Ok(outcome),
                Action::Close(close) => return Err(close),
            }
        }
        out.flush(conn).await?;
        input = match next {
            Some(input) => input,
            None => read(conn, negotiation).await?,
        };
    }
}

/// What one step of the negotiation writes, gathered so that it leaves in one write:
/// our stream header and its features were two system calls and two TCP segments, at
/// each of the two or three headers of a login.
#[derive(Default)]
struct Output {
    text: String,
    /// It holds our stream header.
    header: bool,
}

impl Output {
    async fn flush(&mut self, conn: &mut Connection) -> Result<(), Close> {
        if self.text.is_empty() {
            return Ok(());
        }
        let text = std::mem::take(&mut self.text);
        if std::mem::take(&mut self.header) {
            conn.write_header(&text).await
        } else {
            conn.write(text.as_bytes()).await
        }
    }
}

/// The next input from the client: a stream header where one is due, else an element
/// checked to be well-formed.
async fn read(conn: &mut Connection, negotiation: &Negotiation) -> Result<Input, Close> {
    if !negotiation.expects_header() {
        return Ok(Input::Element(conn.next_stanza().await?));
    }
    match conn.next_frame().await? {
        Frame::StreamOpen(bytes) => {
            Ok(Input::Header(StreamHeader::parse(&bytes, Some(NS_CLIENT))?))
        }
        _ => Err(stream_error(
            StreamErrorCondition::NotWellFormed,
            "expected a stream header",
        )),
    }
}

async fn credentials(shared: &Shared, bare: &str) -> Result<Option<Credentials>, ()> {
    match shared.xdb.get(bare, NS_AUTH).await {
        Ok(data) => Ok(Credentials::parse(&data).unwrap_or_else(|e| {
            warn!(user = bare, "unreadable credentials: {e}");
            None
        })),
        Err(e) => {
            warn!(user = bare, "cannot read credentials: {e}");
            Err(())
        }
    }
}

/// The credentials and the XEP-0484 token record of `bare`.
async fn fast_record(shared: &Shared, bare: &str) -> Result<(Option<Credentials>, Vec<u8>), ()> {
    let credentials = credentials(shared, bare).await?;
    match shared.xdb.get(bare, NS_FAST_STORE).await {
        Ok(data) => Ok((credentials, data.to_vec())),
        Err(e) => {
            warn!(user = bare, "cannot read FAST tokens: {e}");
            Err(())
        }
    }
}

async fn register(shared: &Shared, bare: &str, password: &str) -> Registration {
    match credentials(shared, bare).await {
        Err(()) => return Registration::StorageUnavailable,
        Ok(Some(_)) => return Registration::Taken,
        Ok(None) => {}
    }
    let record = Credentials::from_password(password).to_xml();
    match shared.xdb.set(bare, NS_AUTH, record).await {
        Ok(()) => {
            info!(user = %bare, "account registered");
            Registration::Created
        }
        Err(e) => {
            warn!(user = %bare, "registration not stored: {e}");
            Registration::NotStored
        }
    }
}
