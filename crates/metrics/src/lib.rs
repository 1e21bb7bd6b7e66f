//! Metrics in the Prometheus and OpenMetrics text formats, served on `GET /metrics` by
//! every process that has a `<metrics address=".." port=".."/>` element (absent: off).
//! See `docs/metrics.md`.
//!
//! Built on `prometheus-client`, the official Rust client of the Prometheus project: it
//! has no global state or macros of its own, no dependencies beyond a few small crates
//! (`metrics` + `metrics-exporter-prometheus` bring a recorder, a registry keyed by
//! label strings looked up on every update, and an HTTP stack of their own), and it
//! encodes both text formats. What it lacks here is added in this crate:
//!
//! - every label set is made once, at start, from short fixed lists of values
//!   ([`Labeled`]): updating a metric is an atomic add, with no lock or map lookup (its
//!   `Family` takes a lock per update and its `Histogram` a mutex per observation);
//! - a lock-free histogram ([`Histogram`]);
//! - gauges read at scrape time from the process's own state ([`gauge_fn`],
//!   [`gauges_fn`]), so that nothing on the hot path keeps them;
//! - the process's CPU, memory and descriptors from `/proc/self` ([`process`]);
//! - the configuration element ([`config`]) and the HTTP listener ([`http`]).
//!
//! Metrics are values in `static`s (`LazyLock`) of each program's `metrics` module;
//! they register in the process-wide registry when first touched, and each program
//! touches its own at start so that every series is there from the first scrape. Label
//! values are always from fixed lists: never a JID, a domain or an address.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

pub mod config;
pub mod http;
pub mod link;
pub mod process;
pub mod storage;

pub use config::MetricsConfig;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;

/// The process-wide registry. Locked to register (at start) and to encode (a scrape),
/// never when a metric is updated.
static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

fn register(name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    REGISTRY
        .lock()
        .expect("metrics registry")
        .register(name, help, metric);
}

/// Registers a collector (metrics made at each scrape).
pub fn register_collector(collector: Box<dyn prometheus_client::collector::Collector>) {
    REGISTRY
        .lock()
        .expect("metrics registry")
        .register_collector(collector);
}

/// The registry in the Prometheus text format (version 0.0.4), or in OpenMetrics 1.0.
pub fn encode(openmetrics: bool) -> String {
    let registry = REGISTRY.lock().expect("metrics registry");
    let mut out = String::with_capacity(16 * 1024);
    let result = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
    };
    if let Err(e) = result {
        tracing::warn!("encoding the metrics failed: {e}");
    }
    out
}

/// A counter (its samples are named `NAME_total`).
pub fn counter(name: &str, help: &str) -> Counter {
    let c = Counter::default();
    register(name, help, c.clone());
    c
}

/// A gauge.
pub fn gauge(name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    register(name, help, g.clone());
    g
}

/// One label and the values it takes. Put `"other"` last in a list whose value comes
/// from outside (see [`Labeled::get`]).
pub type Label = (&'static str, &'static [&'static str]);

/// Counters, one per combination of label values, made at start.
pub fn counters(name: &str, help: &str, labels: &[Label]) -> Labeled<Counter> {
    let l = Labeled::new(labels, Counter::default);
    register(name, help, l.clone());
    l
}

/// Gauges, one per combination of label values, made at start.
pub fn gauges(name: &str, help: &str, labels: &[Label]) -> Labeled<Gauge> {
    let l = Labeled::new(labels, Gauge::default);
    register(name, help, l.clone());
    l
}

/// Histograms with `buckets` (upper bounds, ascending), one per label combination.
pub fn histograms(
    name: &str,
    help: &str,
    labels: &[Label],
    buckets: &'static [f64],
) -> Labeled<Histogram> {
    let l = Labeled::new(labels, || Histogram::new(buckets));
    register(name, help, l.clone());
    l
}

/// A gauge whose value `read` gives at each scrape.
pub fn gauge_fn(name: &str, help: &str, read: impl Fn() -> i64 + Send + Sync + 'static) {
    register(name, help, FnGauge(Arc::new(read)));
}

/// Gauges of one label whose values and series `read` gives at each scrape. The values
/// must come from a bounded set (the configuration, fixed lists).
pub fn gauges_fn(
    name: &str,
    help: &str,
    label: &'static str,
    read: impl Fn() -> Vec<(String, i64)> + Send + Sync + 'static,
) {
    register(
        name,
        help,
        FnGauges {
            label,
            read: Arc::new(read),
        },
    );
}

/// Seconds buckets for request latencies: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Metrics of one kind, one per combination of label values, all made at start: an
/// update finds its series by comparing a few short strings, then adds atomically.
#[derive(Clone)]
pub struct Labeled<M> {
    /// The values of each label, in order.
    values: Arc<Vec<&'static [&'static str]>>,
    /// Every combination, the last label varying fastest.
    series: Arc<Vec<(LabelSet, M)>>,
}

/// The label names and values of one series.
type LabelSet = Vec<(&'static str, &'static str)>;

impl<M> std::fmt::Debug for Labeled<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Labeled")
            .field("series", &self.series.len())
            .finish()
    }
}

impl<M> Labeled<M> {
    fn new(labels: &[Label], make: impl Fn() -> M) -> Labeled<M> {
        let mut sets: Vec<LabelSet> = vec![vec![]];
        for (name, values) in labels {
            sets = sets
                .into_iter()
                .flat_map(|set| {
                    values.iter().map(move |v| {
                        let mut s = set.clone();
                        s.push((*name, *v));
                        s
                    })
                })
                .collect();
        }
        Labeled {
            values: Arc::new(labels.iter().map(|(_, v)| *v).collect()),
            series: Arc::new(sets.into_iter().map(|s| (s, make())).collect()),
        }
    }

    /// The series with these label values, in the order of the labels. A value not in
    /// its label's list counts as the list's last (`"other"` where lists end with it).
    pub fn get(&self, values: &[&str]) -> &M {
        debug_assert_eq!(values.len(), self.values.len(), "one value per label");
        let index = self.values.iter().zip(values).fold(0, |index, (list, v)| {
            let i = list.iter().position(|l| l == v).unwrap_or(list.len() - 1);
            index * list.len() + i
        });
        &self.series[index].1
    }

    /// The series of a one-label metric with this value (see [`Labeled::get`]).
    pub fn by(&self, value: &str) -> &M {
        self.get(&[value])
    }
}

impl<M: EncodeMetric + TypedMetric> TypedMetric for Labeled<M> {
    const TYPE: MetricType = M::TYPE;
}

impl<M: EncodeMetric + TypedMetric> EncodeMetric for Labeled<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (set, m) in self.series.iter() {
            m.encode(encoder.encode_family(set)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

/// A histogram updated with atomics only (no lock): one counter per bucket, the sum as
/// the bits of an `f64` updated by compare-and-swap.
#[derive(Clone)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

struct HistogramInner {
    bounds: &'static [f64],
    /// One per bound, then the `+Inf` bucket; not cumulative.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish()
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            inner: Arc::new(HistogramInner {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.inner.bounds.partition_point(|b| *b < v);
        self.inner.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .inner
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// Observes the seconds since `start`.
    pub fn observe_since(&self, start: Instant) {
        self.observe(start.elapsed().as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.inner.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = f64::from_bits(self.inner.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Bytes read and written on XMPP streams (c2s, s2s): `PREFIX_bytes_in_total` and
/// `PREFIX_bytes_out_total`.
#[derive(Debug, Clone)]
pub struct Traffic {
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

impl Traffic {
    pub fn new(prefix: &str, what: &str) -> Traffic {
        Traffic {
            bytes_in: counter(
                &format!("{prefix}_bytes_in"),
                &format!("Bytes read from {what} (stream headers and elements)."),
            ),
            bytes_out: counter(
                &format!("{prefix}_bytes_out"),
                &format!("Bytes written to {what}."),
            ),
        }
    }
}

/// Increments a gauge now and decrements it when dropped (a connection's lifetime).
#[must_use]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }

    /// Moves the count to another gauge (a connection changing state).
    pub fn move_to(&mut self, gauge: &Gauge) {
        gauge.inc();
        self.0.dec();
        self.0 = gauge.clone();
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type ReadFn = Arc<dyn Fn() -> i64 + Send + Sync>;

#[derive(Clone)]
struct FnGauge(ReadFn);

impl std::fmt::Debug for FnGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnGauge")
    }
}

impl EncodeMetric for FnGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&(self.0)())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

type ReadAllFn = Arc<dyn Fn() -> Vec<(String, i64)> + Send + Sync>;

struct FnGauges {
    label: &'static str,
    read: ReadAllFn,
}

impl std::fmt::Debug for FnGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnGauges")
    }
}

impl EncodeMetric for FnGauges {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (value, n) in (self.read)() {
            let set = [(self.label, value.as_str())];
            encoder.encode_family(&set)?.encode_gauge(&n)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// The element name of a serialized element, by its first bytes (empty if there is
/// none), without a namespace prefix.
pub fn element_name(bytes: &[u8]) -> &str {
    let name = bytes.strip_prefix(b"<").unwrap_or(b"");
    let end = name
        .iter()
        .position(|b| matches!(b, b' ' | b'/' | b'>' | b'\t' | b'\r' | b'\n'))
        .unwrap_or(name.len());
    let name = std::str::from_utf8(&name[..end.min(32)]).unwrap_or("");
    name.rsplit_once(':').map_or(name, |(_, local)| local)
}

/// What stanza a serialized one is, by its first bytes: `message`, `presence`, `iq` or
/// `other`. A label for counts of stanzas.
pub fn stanza_kind(bytes: &[u8]) -> &'static str {
    match element_name(bytes) {
        "message" => "message",
        "presence" => "presence",
        "iq" => "iq",
        _ => "other",
    }
}

/// The values of a stanza-type label.
pub const STANZA_KINDS: &[&str] = &["message", "presence", "iq", "other"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labeled_series_are_made_up_front_and_found_by_value() {
        let l = Labeled::new(
            &[("a", &["x", "y"]), ("b", &["1", "other"])],
            Counter::<u64>::default,
        );
        assert_eq!(l.series.len(), 4);
        l.get(&["y", "1"]).inc();
        l.get(&["nope", "nope"]).inc();
        l.get(&["x", "nope"]).inc();
        assert_eq!(l.get(&["y", "1"]).get(), 1);
        assert_eq!(l.get(&["y", "other"]).get(), 1);
        assert_eq!(l.get(&["x", "other"]).get(), 1);
        assert_eq!(l.get(&["x", "1"]).get(), 0);
        assert_eq!(l.series[1].0, vec![("a", "x"), ("b", "other")]);
    }

    #[test]
    fn histogram_buckets_and_text() {
        let mut registry = Registry::default();
        let h = Histogram::new(&[0.1, 1.0]);
        registry.register("lat_seconds", "Latency", h.clone());
        h.observe(0.05);
        h.observe(0.1);
        h.observe(0.5);
        h.observe(7.0);
        assert_eq!(h.count(), 4);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("lat_seconds_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("lat_seconds_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("lat_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("lat_seconds_count 4\n"), "{out}");
        assert!(out.contains("lat_seconds_sum 7.65\n"), "{out}");
    }

    #[test]
    fn fn_gauges_and_guards() {
        let mut registry = Registry::default();
        registry.register("held", "Held", FnGauge(Arc::new(|| 7)));
        registry.register(
            "links",
            "Links",
            FnGauges {
                label: "component",
                read: Arc::new(|| vec![("sm".into(), 2), ("c2s".into(), 1)]),
            },
        );
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("held 7\n"), "{out}");
        assert!(out.contains("links{component=\"sm\"} 2\n"), "{out}");
        let (a, b) = (Gauge::<i64>::default(), Gauge::<i64>::default());
        {
            let mut g = GaugeGuard::new(&a);
            assert_eq!(a.get(), 1);
            g.move_to(&b);
            assert_eq!((a.get(), b.get()), (0, 1));
        }
        assert_eq!(b.get(), 0);
    }

    #[test]
    fn stanza_kinds() {
        assert_eq!(stanza_kind(b"<message to='a'/>"), "message");
        assert_eq!(stanza_kind(b"<presence/>"), "presence");
        assert_eq!(stanza_kind(b"<iq type='get'>"), "iq");
        assert_eq!(stanza_kind(b"<iqx/>"), "other");
        assert_eq!(stanza_kind(b"<r xmlns='urn:xmpp:sm:3'/>"), "other");
        assert_eq!(stanza_kind(b"<client:message>"), "message");
        assert_eq!(stanza_kind(b"message"), "other");
        assert_eq!(element_name(b"<xdb type='get'/>"), "xdb");
    }
}
