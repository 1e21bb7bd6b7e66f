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
use tracing_subscriber::fmt::format::{Format, Full, Writer};
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
    // takes a lock there: a tenth of sm's CPU per message under load
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

/// The stderr line format: the usual one, or for the journal no time and a priority.
struct StderrFormat {
    journal: bool,
    timed: Format,
    untimed: Format<Full, ()>,
}

impl StderrFormat {
    fn new(journal: bool) -> StderrFormat {
        StderrFormat {
            journal,
            timed: Format::default(),
            untimed: Format::default().without_time(),
        }
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
        if !self.journal {
            return self.timed.format_event(ctx, writer, event);
        }
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.untimed.format_event(ctx, writer, event)
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

    #[test]
    fn plain_lines_keep_their_time() {
        let got = lines(false, || tracing::warn!("odd"));
        assert_eq!(got.len(), 1);
        // 2025-01-02T03:04:05.678901Z  WARN ...: starts with the year, not a priority.
        assert!(got[0].as_bytes()[0].is_ascii_digit(), "{:?}", got[0]);
        assert!(got[0].contains(" WARN "), "{:?}", got[0]);
    }
}
