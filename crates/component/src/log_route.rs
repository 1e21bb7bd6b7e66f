//! Sends the process's log records to the router as `log` packets (docs/protocol.md,
//! "Log packets"), besides stderr: a tracing [`Layer`] turns each record at or above
//! `route-level` into a [`LogRecord`] and queues it in a bounded channel; a task drains
//! the channel into the router link that [`attach`] gives it. Logging never waits for
//! the link: records made while it is down, or beyond the queue or the rate limit, are
//! dropped and counted, and the count is logged once the link is up again. A storm of
//! identical records sends the first one and, once its window ends, one summary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::client::Outbox;
use crate::log_record::{Level, LogRecord, Repeated};

/// Records with this target go to stderr only: for code that handles log records (a
/// sink's write errors), which must not feed itself.
pub const LOCAL_TARGET: &str = "local";
/// Records waiting for the drain task.
const QUEUE: usize = 1024;
/// Identical records within this window after the first are counted, not sent.
const STORM_WINDOW: Duration = Duration::from_secs(10);
/// Distinct records tracked for storms at once.
const STORM_KEYS: usize = 1024;
/// Packets per second at most (records and summaries), whatever their text.
const MAX_PER_SECOND: u32 = 200;

struct Shared {
    level: Level,
    process: String,
    tx: mpsc::Sender<LogRecord>,
    rx: Mutex<Option<mpsc::Receiver<LogRecord>>>,
    /// A router link is attached: records are worth making.
    up: AtomicBool,
    dropped: AtomicU64,
    storm: Mutex<Storm>,
    link: Mutex<Option<Link>>,
}

struct Link {
    outbox: Outbox,
    name: String,
    /// Hosts the link bound, so it may send from them (the router checks `from`).
    hosts: Vec<String>,
}

static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

/// The layer for [`crate::logging::init`]; `None` when routing is off.
pub fn layer(route_level: &str) -> Option<RouteLayer> {
    let level = Level::parse(route_level)?;
    let process = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let (tx, rx) = mpsc::channel(QUEUE);
    crate::client::on_log_refused(refused);
    let shared = SHARED.get_or_init(|| {
        Arc::new(Shared {
            level,
            process,
            tx,
            rx: Mutex::new(Some(rx)),
            up: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            storm: Mutex::new(Storm::new(STORM_WINDOW, STORM_KEYS, MAX_PER_SECOND)),
            link: Mutex::new(None),
        })
    });
    Some(RouteLayer {
        shared: shared.clone(),
    })
}

/// Gives the drain task the component's router link (called by the service loop once
/// connected and bound). `hosts`: the hosts the link bound.
pub fn attach(outbox: &Outbox, name: &str, hosts: Vec<String>) {
    let Some(shared) = SHARED.get() else {
        return;
    };
    *shared.link.lock().expect("log link") = Some(Link {
        outbox: outbox.clone(),
        name: name.to_owned(),
        hosts,
    });
    shared.up.store(true, Ordering::Release);
    if let Some(rx) = shared.rx.lock().expect("log queue").take() {
        tokio::spawn(drain(shared.clone(), rx));
    }
}

/// The link is gone: records are dropped (and counted) until the next [`attach`].
pub fn detach() {
    if let Some(shared) = SHARED.get() {
        shared.up.store(false, Ordering::Release);
        *shared.link.lock().expect("log link") = None;
    }
}

/// The router refused a log packet (a component that may not send them): stop trying
/// on this link.
pub fn refused(reason: &str) {
    if let Some(shared) = SHARED.get() {
        if shared.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(target: LOCAL_TARGET, "the router refuses this component's log packets ({reason}): log records go to stderr only; allow it type log in router-users.xml");
        }
        *shared.link.lock().expect("log link") = None;
    }
}

async fn drain(shared: Arc<Shared>, mut rx: mpsc::Receiver<LogRecord>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(r) => send(&shared, r),
                None => return,
            },
            _ = tick.tick() => {
                let due = shared.storm.lock().expect("storm").due(SystemTime::now());
                for r in due {
                    send(&shared, r);
                }
                let dropped = shared.dropped.load(Ordering::Acquire);
                if dropped > 0 && shared.up.load(Ordering::Acquire) {
                    shared.dropped.fetch_sub(dropped, Ordering::AcqRel);
                    send(&shared, LogRecord {
                        from: String::new(),
                        level: Level::Warn,
                        process: shared.process.clone(),
                        instance: String::new(),
                        host: String::new(),
                        target: "jrs_component::log_route".into(),
                        time: SystemTime::now(),
                        message: format!("{dropped} log records were not sent to the router (link down, queue full or rate limit)"),
                        fields: vec![("dropped".into(), dropped.to_string())],
                        repeated: None,
                    });
                }
            }
        }
    }
}

fn send(shared: &Shared, mut r: LogRecord) {
    let link = shared.link.lock().expect("log link");
    let Some(link) = link.as_ref() else {
        shared.dropped.fetch_add(1, Ordering::AcqRel);
        return;
    };
    r.instance = link.name.clone();
    if r.host.is_empty() {
        r.host = link.name.clone();
    }
    // Routed by the record's host where the link serves it, so a sink bound for one
    // domain gets what concerns it; else by the component's name.
    r.from = if link.hosts.iter().any(|h| h.eq_ignore_ascii_case(&r.host)) {
        r.host.clone()
    } else {
        link.name.clone()
    };
    if !link.outbox.send(r.to_xml()) {
        shared.dropped.fetch_add(1, Ordering::AcqRel);
    }
}

/// The tracing layer (see the module's description).
pub struct RouteLayer {
    shared: Arc<Shared>,
}

impl RouteLayer {
    pub fn level(&self) -> tracing_subscriber::filter::LevelFilter {
        match self.shared.level {
            Level::Error => tracing::Level::ERROR.into(),
            Level::Warn => tracing::Level::WARN.into(),
            Level::Info => tracing::Level::INFO.into(),
            Level::Debug => tracing::Level::DEBUG.into(),
            Level::Trace => tracing::Level::TRACE.into(),
        }
    }
}

/// The domain a span says it concerns, kept in the span's extensions.
struct SpanHost(String);

impl<S> Layer<S> for RouteLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut v = HostFields::default();
        attrs.record(&mut v);
        if let (Some(host), Some(span)) = (v.0.host(), ctx.span(id)) {
            span.extensions_mut().insert(SpanHost(host));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let level = Level::from_tracing(meta.level());
        if level > self.shared.level
            || meta.target() == LOCAL_TARGET
            || meta.target().starts_with("jrs_component::log_route")
        {
            return;
        }
        if !self.shared.up.load(Ordering::Acquire) {
            self.shared.dropped.fetch_add(1, Ordering::AcqRel);
            return;
        }
        let mut v = Fields::default();
        event.record(&mut v);
        let host = v.host().or_else(|| {
            ctx.event_scope(event).and_then(|scope| {
                scope
                    .into_iter()
                    .find_map(|s| s.extensions().get::<SpanHost>().map(|h| h.0.clone()))
            })
        });
        let record = LogRecord {
            from: String::new(),
            level,
            process: self.shared.process.clone(),
            instance: String::new(),
            host: host.unwrap_or_default(),
            target: meta.target().to_owned(),
            time: SystemTime::now(),
            message: v.message,
            fields: v.fields,
            repeated: None,
        };
        let admit = self.shared.storm.lock().expect("storm").admit(&record);
        match admit {
            Admit::Send => {
                if self.shared.tx.try_send(record).is_err() {
                    self.shared.dropped.fetch_add(1, Ordering::AcqRel);
                }
            }
            Admit::Counted => {}
            Admit::Limited => {
                self.shared.dropped.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, String)>,
}

impl Fields {
    /// `host` or `domain`, else the domain of a `jid` or `user` field.
    fn host(&self) -> Option<String> {
        let get = |n: &str| {
            self.fields
                .iter()
                .find(|(k, v)| k == n && !v.is_empty())
                .map(|(_, v)| v.as_str())
        };
        if let Some(h) = get("host").or_else(|| get("domain")) {
            return Some(h.to_ascii_lowercase());
        }
        let jid = get("jid").or_else(|| get("user"))?;
        let domain = jid.rsplit_once('@').map_or(jid, |(_, d)| d);
        let domain = domain.split('/').next().unwrap_or("");
        (jid.contains('@') && !domain.is_empty()).then(|| domain.to_ascii_lowercase())
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields
                .push((field.name().to_owned(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields.push((field.name().to_owned(), text));
        }
    }
}

/// The fields of a new span that can name its host ([`Fields::host`]), and only those:
/// spans that carry none (sm makes one per stanza) then cost no allocation here. Copying
/// every field of every span was two thirds of what creating a span cost sm.
#[derive(Default)]
struct HostFields(Fields);

impl HostFields {
    fn wanted(field: &Field) -> bool {
        matches!(field.name(), "host" | "domain" | "jid" | "user")
    }
}

impl Visit for HostFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::wanted(field) {
            self.0.record_str(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if Self::wanted(field) {
            self.0.record_debug(field, value);
        }
    }
}

/// What to do with one record.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Send,
    /// Identical to one sent within the window: counted for its summary.
    Counted,
    /// Over the rate limit.
    Limited,
}

/// Summarises storms: per (level, target, host, message), the first record of a window
/// goes out, later ones in the window are counted, and when the window ends with a
/// count one summary record follows (with `count`, `first`, `last`).
pub struct Storm {
    window: Duration,
    max_keys: usize,
    max_per_second: u32,
    entries: HashMap<(Level, String, String, String), Entry>,
    second: u64,
    in_second: u32,
}

struct Entry {
    start: SystemTime,
    template: LogRecord,
    count: u64,
    first: SystemTime,
    last: SystemTime,
}

fn elapsed(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or(Duration::ZERO)
}

impl Storm {
    pub fn new(window: Duration, max_keys: usize, max_per_second: u32) -> Storm {
        Storm {
            window,
            max_keys,
            max_per_second,
            entries: HashMap::new(),
            second: 0,
            in_second: 0,
        }
    }

    /// Decides for a record made at `r.time`.
    pub fn admit(&mut self, r: &LogRecord) -> Admit {
        let now = r.time;
        let key = (r.level, r.target.clone(), r.host.clone(), r.message.clone());
        if let Some(e) = self.entries.get_mut(&key) {
            // Within the window; or past it with a count `due` has not summarised yet,
            // which then goes on counting rather than losing it.
            if elapsed(e.start, now) < self.window || e.count > 0 {
                if e.count == 0 {
                    e.first = now;
                }
                e.count += 1;
                e.last = now;
                return Admit::Counted;
            }
        }
        if !self.take_token(now) {
            return Admit::Limited;
        }
        if self.entries.len() >= self.max_keys && !self.entries.contains_key(&key) {
            // Full of live windows: sent untracked, the rate limit still bounds it.
            return Admit::Send;
        }
        self.entries.insert(
            key,
            Entry {
                start: now,
                template: r.clone(),
                count: 0,
                first: now,
                last: now,
            },
        );
        Admit::Send
    }

    fn take_token(&mut self, now: SystemTime) -> bool {
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second {
            self.second = second;
            self.in_second = 0;
        }
        if self.in_second >= self.max_per_second {
            return false;
        }
        self.in_second += 1;
        true
    }

    /// The summaries of windows that ended by `now` (whose entries are then forgotten).
    pub fn due(&mut self, now: SystemTime) -> Vec<LogRecord> {
        let window = self.window;
        let mut out = vec![];
        self.entries.retain(|_, e| {
            if elapsed(e.start, now) < window {
                return true;
            }
            if e.count > 0 {
                let mut r = e.template.clone();
                r.time = now;
                r.repeated = Some(Repeated {
                    count: e.count,
                    first: e.first,
                    last: e.last,
                });
                out.push(r);
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(message: &str, at_ms: u64) -> LogRecord {
        LogRecord {
            from: String::new(),
            level: Level::Warn,
            process: "sm".into(),
            instance: String::new(),
            host: "localhost".into(),
            target: "sm::x".into(),
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + at_ms),
            message: message.into(),
            fields: vec![],
            repeated: None,
        }
    }

    #[test]
    fn storm_sends_first_then_one_summary() {
        let mut s = Storm::new(Duration::from_secs(10), 100, 1000);
        assert_eq!(s.admit(&rec("boom", 0)), Admit::Send);
        for i in 1..=999 {
            assert_eq!(s.admit(&rec("boom", i)), Admit::Counted);
        }
        // Another text is its own record.
        assert_eq!(s.admit(&rec("other", 5)), Admit::Send);
        assert!(s.due(rec("", 9_000).time).is_empty());
        let due = s.due(rec("", 10_000).time);
        assert_eq!(due.len(), 1, "{due:?}");
        let r = &due[0];
        assert_eq!(r.message, "boom");
        let rep = r.repeated.as_ref().unwrap();
        assert_eq!(rep.count, 999);
        assert_eq!(rep.first, rec("", 1).time);
        assert_eq!(rep.last, rec("", 999).time);
        // After the summary the next one goes out again and opens a new window.
        assert_eq!(s.admit(&rec("boom", 10_001)), Admit::Send);
        assert_eq!(s.admit(&rec("boom", 10_002)), Admit::Counted);
    }

    #[test]
    fn single_record_has_no_summary() {
        let mut s = Storm::new(Duration::from_secs(10), 100, 1000);
        assert_eq!(s.admit(&rec("once", 0)), Admit::Send);
        assert!(s.due(rec("", 60_000).time).is_empty());
        assert_eq!(s.admit(&rec("once", 60_001)), Admit::Send);
    }

    #[test]
    fn ended_window_not_yet_summarised_keeps_counting() {
        let mut s = Storm::new(Duration::from_secs(10), 100, 1000);
        s.admit(&rec("boom", 0));
        s.admit(&rec("boom", 1));
        // The window ended but `due` has not run: the count is not lost.
        assert_eq!(s.admit(&rec("boom", 11_000)), Admit::Counted);
        let due = s.due(rec("", 11_500).time);
        assert_eq!(due[0].repeated.as_ref().unwrap().count, 2);
    }

    #[test]
    fn distinct_records_are_rate_limited() {
        let mut s = Storm::new(Duration::from_secs(10), 10_000, 5);
        let admitted: Vec<Admit> = (0..8).map(|i| s.admit(&rec(&format!("m{i}"), 0))).collect();
        assert_eq!(admitted.iter().filter(|a| **a == Admit::Send).count(), 5);
        assert_eq!(admitted.iter().filter(|a| **a == Admit::Limited).count(), 3);
        assert_eq!(s.admit(&rec("m9", 1_000)), Admit::Send);
    }

    #[test]
    fn host_from_fields() {
        let f = |pairs: &[(&str, &str)]| Fields {
            message: String::new(),
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(
            f(&[("domain", "Example.org")]).host().as_deref(),
            Some("example.org")
        );
        assert_eq!(f(&[("jid", "a@b.org/r")]).host().as_deref(), Some("b.org"));
        assert_eq!(f(&[("jid", "nodomain")]).host(), None);
        assert_eq!(f(&[("max", "1")]).host(), None);
    }

    #[test]
    fn span_fields_are_kept_only_when_they_can_name_a_host() {
        use std::sync::Mutex;
        use tracing_subscriber::layer::SubscriberExt;
        type Seen = Arc<Mutex<Vec<(usize, Option<String>)>>>;
        struct Capture(Seen);
        impl<S: Subscriber> Layer<S> for Capture {
            fn on_new_span(
                &self,
                attrs: &tracing::span::Attributes<'_>,
                _: &tracing::span::Id,
                _: Context<'_, S>,
            ) {
                let mut v = HostFields::default();
                attrs.record(&mut v);
                self.0.lock().unwrap().push((v.0.fields.len(), v.0.host()));
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(Capture(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let _a = tracing::info_span!("inbound", from = "x@y.org/r", n = 3);
            let _b = tracing::info_span!("user", jid = %"alice@Example.org");
            let _c = tracing::info_span!("server", domain = "example.net", other = "z");
        });
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (0, None),
                (1, Some("example.org".into())),
                (1, Some("example.net".into()))
            ]
        );
    }
}
