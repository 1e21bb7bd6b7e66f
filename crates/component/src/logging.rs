//! Logging set-up shared by every executable: `tracing` to stderr (the supervisor writes
//! each process's stderr to its own log file), filter from the config, RUST_LOG wins;
//! and records at or above `route-level` also to the router as `log` packets
//! ([`crate::log_route`]), once a component's service loop attaches its link.
//!
//! Under systemd with stderr going to the journal (`JOURNAL_STREAM` names stderr), the
//! lines carry no timestamp (journald adds its own) and start with the syslog priority
//! `<3>`..`<7>` of their level, so `journalctl -p warning` works.

use jrs_config::LogConfig;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub fn init(config: &LogConfig) {
    let route = crate::log_route::layer(&config.route_level);
    // The usual case (a plain `level`, no RUST_LOG, the router sent no more than stderr
    // gets): one filter for the whole subscriber. Per-layer filters, needed otherwise,
    // look the span up for each layer at every span entry and exit, and EnvFilter
    // takes a lock there: about 6% of sm's CPU per message under load
    // (docs/benchmarks.md, "Spans entered and left").
    let rust_log = std::env::var_os("RUST_LOG").is_some();
    if let Some((spans, events)) =
        one_filter(&config.level, rust_log, route.as_ref().map(|r| r.level()))
    {
        let filter = filter_fn(move |m| {
            if m.is_span() {
                spans >= *m.level()
            } else {
                events >= *m.level()
            }
        })
        .with_max_level_hint(spans.max(events));
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(stderr_layer())
            .with(route)
            .try_init();
        return;
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    // Per-layer filters: RUST_LOG or `level` must not hide records from the router
    // layer, whose own level is `route-level`.
    let stderr = stderr_layer().with_filter(filter);
    let route = route.map(|l| {
        let level = l.level();
        // Spans down to info too: their `host`/`domain`/`jid` fields name a record's host.
        let spans = LevelFilter::INFO.max(level);
        let filter = filter_fn(move |m| {
            if m.is_span() {
                spans >= *m.level()
            } else {
                level >= *m.level()
            }
        })
        .with_max_level_hint(spans);
        l.with_filter(filter)
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(route)
        .try_init();
}

/// Lines on stderr (see [`StderrFormat`]).
fn stderr_layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(StderrFormat::new(stderr_is_journal()))
}

/// The levels of spans and of events one filter for the whole subscriber lets
/// through, if one serves both layers: `level` is a plain level (not directives),
/// RUST_LOG is unset and the router layer wants no records stderr does not get (it
/// filters those it gets itself, at `route-level`). With the router layer, spans down
/// to info, whose `host`/`domain`/`jid` fields name a record's host (so stderr's lines
/// name them too).
fn one_filter(
    level: &str,
    rust_log: bool,
    route: Option<LevelFilter>,
) -> Option<(LevelFilter, LevelFilter)> {
    if rust_log {
        return None;
    }
    let level: LevelFilter = level.trim().parse().ok()?;
    match route {
        None => Some((level, level)),
        Some(route) if route <= level => Some((level.max(LevelFilter::INFO), level)),
        Some(_) => None,
    }
}

/// The stderr line format: tracing-subscriber's usual one (`Format::default()` without
/// colours), `2026-12-01T15:40:00.123456Z  INFO span{a=1}:inner{b=2}: target: message
/// k=v`, or for the journal a priority and no time. Written here, not by its
/// `Format`, which spends about 15 000 instructions on a line (the date formatted with
/// `write!` field by field, colour wrappers around every piece even without colours):
/// this one writes the same bytes (`same_lines_as_tracing_subscriber`) for 4 000 to
/// 6 500 fewer, the date's seconds formatted once a second (docs/benchmarks.md, "Log
/// lines").
struct StderrFormat {
    journal: bool,
}

impl StderrFormat {
    fn new(journal: bool) -> StderrFormat {
        StderrFormat { journal }
    }
}

impl<S, N> FormatEvent<S, N> for StderrFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        use tracing_log::NormalizeEvent;
        use tracing_subscriber::fmt::FormattedFields;
        // Records of the `log` crate carry their own target.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if self.journal {
            write!(writer, "<{}>", syslog_priority(*meta.level()))?;
        } else {
            write_time(&mut writer, std::time::SystemTime::now())?;
            writer.write_char(' ')?;
        }
        writer.write_str(match *meta.level() {
            Level::TRACE => "TRACE ",
            Level::DEBUG => "DEBUG ",
            Level::INFO => " INFO ",
            Level::WARN => " WARN ",
            Level::ERROR => "ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// `YYYY-MM-DDTHH:MM:SS.UUUUUUZ` (UTC, microseconds), as tracing-subscriber writes it.
/// The part up to the seconds is kept per thread and made again when the second
/// changes.
fn write_time(writer: &mut impl std::fmt::Write, now: std::time::SystemTime) -> std::fmt::Result {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, micros) = (since.as_secs(), since.subsec_micros());
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != secs {
            second.1.clear();
            civil_time(secs, &mut second.1);
            second.0 = secs;
        }
        writer.write_str(&second.1)
    })?;
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    writer.write_char('.')?;
    writer.write_str(std::str::from_utf8(&digits).expect("digits"))?;
    writer.write_char('Z')
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the Unix epoch (UTC).
fn civil_time(secs: u64, out: &mut String) {
    use std::fmt::Write as _;
    if let Some(t) = chrono::DateTime::from_timestamp(secs as i64, 0) {
        let _ = write!(out, "{}", t.format("%Y-%m-%dT%H:%M:%S"));
    }
}

/// sd-daemon(3) priority prefixes: err, warning, info, debug.
fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether stderr is the journal stream systemd set up: `JOURNAL_STREAM` is
/// `DEVICE:INODE` of that stream, and must match stderr itself (a child whose stderr
/// was redirected to a file inherits the variable, not the stream).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => journal_stream_is(&var.to_string_lossy(), m.dev(), m.ino()),
        Err(_) => false,
    }
}

fn journal_stream_is(var: &str, dev: u64, ino: u64) -> bool {
    let mut parts = var.trim().splitn(2, ':');
    let parsed = (
        parts.next().and_then(|d| d.parse::<u64>().ok()),
        parts.next().and_then(|i| i.parse::<u64>().ok()),
    );
    parsed == (Some(dev), Some(ino))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn one_filter_serves_both_layers_only_when_it_lets_through_what_each_needs() {
        let (info, warn, debug) = (LevelFilter::INFO, LevelFilter::WARN, LevelFilter::DEBUG);
        assert_eq!(one_filter("info", false, Some(warn)), Some((info, info)));
        assert_eq!(one_filter("debug", false, Some(warn)), Some((debug, debug)));
        assert_eq!(one_filter("info", false, Some(info)), Some((info, info)));
        assert_eq!(one_filter("warn", false, None), Some((warn, warn)));
        // The router layer names hosts from info spans.
        assert_eq!(one_filter("warn", false, Some(warn)), Some((info, warn)));
        // It wants debug records stderr does not print: a filter per layer.
        assert_eq!(one_filter("info", false, Some(debug)), None);
        // RUST_LOG may hold directives: a filter per layer.
        assert_eq!(one_filter("info", true, Some(warn)), None);
        assert_eq!(one_filter("info,sm=debug", false, Some(warn)), None);
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(Level::ERROR), 3);
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(syslog_priority(Level::INFO), 6);
        assert_eq!(syslog_priority(Level::DEBUG), 7);
        assert_eq!(syslog_priority(Level::TRACE), 7);
    }

    #[test]
    fn journal_stream_must_name_this_stream() {
        assert!(journal_stream_is("8:1234", 8, 1234));
        assert!(journal_stream_is("8:1234\n", 8, 1234));
        assert!(!journal_stream_is("8:1235", 8, 1234));
        assert!(!journal_stream_is("9:1234", 8, 1234));
        assert!(!journal_stream_is("8", 8, 1234));
        assert!(!journal_stream_is("", 8, 1234));
        assert!(!journal_stream_is("a:b", 8, 1234));
    }

    /// Formats `events` with the stderr format and returns the lines.
    fn lines(journal: bool, events: impl FnOnce()) -> Vec<String> {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || Sink(sink.clone()))
            .with_ansi(false)
            .event_format(StderrFormat::new(journal));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, events);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_have_a_priority_and_no_time() {
        let got = lines(true, || {
            tracing::error!("broken");
            tracing::warn!("odd");
            tracing::info!(n = 1, "fine");
            tracing::debug!("detail");
        });
        assert_eq!(got.len(), 4, "{got:?}");
        for (line, prefix) in got.iter().zip(["<3>", "<4>", "<6>", "<7>"]) {
            assert!(
                line.starts_with(prefix),
                "{line:?} should start with {prefix}"
            );
            assert!(!line.contains('\x1b'), "no colours: {line:?}");
        }
        assert!(got[0].starts_with("<3>ERROR "), "{:?}", got[0]);
        assert!(got[2].ends_with("fine n=1"), "{:?}", got[2]);
    }

    /// The same events through tracing-subscriber's own format (no colours).
    fn reference_lines(events: impl FnOnce()) -> Vec<String> {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || Sink(sink.clone()))
            .with_ansi(false);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, events);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    fn events() {
        let peer: std::net::SocketAddr = "127.0.0.1:5222".parse().unwrap();
        let outer = tracing::info_span!("client", %peer);
        let _o = outer.enter();
        tracing::info!(user = "alice@localhost", "authenticated");
        let inner = tracing::info_span!("session", resource = "phone", sid = 7);
        let _i = inner.enter();
        tracing::warn!(n = 3, ok = true, what = ?Some("x"), "queue is {} long", 3);
        tracing::error!(target: "x::y", "to another target");
        let empty = tracing::info_span!("empty");
        let _e = empty.enter();
        tracing::debug!(text = "quote \" and \\ and\nline", "escaped");
        tracing::trace!("deep");
    }

    #[test]
    fn same_lines_as_tracing_subscriber() {
        let ours = lines(false, events);
        let theirs = reference_lines(events);
        assert_eq!(ours.len(), 5, "{ours:#?}");
        let time = "2026-12-01T15:40:00.123456Z ".len();
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a[time..], b[time..]);
            assert!(a.as_bytes()[time - 1] == b' ' && a.ends_with(&b[time..]));
        }
        assert_eq!(ours.len(), theirs.len());
        assert!(
            ours[1]
                .contains(" WARN client{peer=127.0.0.1:5222}:session{resource=\"phone\" sid=7}: "),
            "{}",
            ours[1]
        );
    }

    #[test]
    fn times_are_utc_to_the_microsecond() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |secs: u64, micros: u32| {
            let mut s = String::new();
            write_time(&mut s, UNIX_EPOCH + Duration::new(secs, micros * 1_000)).unwrap();
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(at(1_764_603_000, 123_456), "2025-12-01T15:30:00.123456Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        // The cached second is made again when the second changes.
        assert_eq!(at(1_764_603_001, 1), "2025-12-01T15:30:01.000001Z");
        assert_eq!(at(1_764_603_000, 2), "2025-12-01T15:30:00.000002Z");
    }

    #[test]
    fn plain_lines_keep_their_time() {
        let got = lines(false, || tracing::warn!("odd"));
        assert_eq!(got.len(), 1);
        // 2025-01-02T03:04:05.678901Z  WARN ...: starts with the year, not a priority.
        assert!(got[0].as_bytes()[0].is_ascii_digit(), "{:?}", got[0]);
        assert!(got[0].contains(" WARN "), "{:?}", got[0]);
    }
}
