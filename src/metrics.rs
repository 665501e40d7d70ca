//! Counters and gauges of the daemon, exported in the OpenMetrics text
//! format through the `prometheus-client` library.
//!
//! This module keeps the registry of one scrape, its rendering, and the
//! shared helpers ([`Count`], [`Level`], [`Flag`], label families). A
//! component that owns its metrics declares them beside its code and
//! registers a [`Collector`] at its start, with its `/healthz` section if
//! it has one (the archiver: `archive::metrics`; the hub watch:
//! `hub::metrics`; the sources' gauges: `ingest::start`; each serial port:
//! `sources::serial::Ports`); they are exported after the rest.
//!
//! Every family is declared once, by the component that produces it
//! (readiness and the supervised components: `supervise::metrics`; ingest
//! and the source links: `ingest::metrics`; the engine:
//! `engine::metrics`; the lease and the leader role:
//! `store::metrics::LeaseMetrics`; the connection to the leaf:
//! `store::metrics::LinkMetrics`), and registered at its start, so an
//! instance exports only the families of what it runs. Their values are
//! plain atomics ([`Count`], [`Level`], [`Flag`]) the component's hot path
//! holds directly: a relaxed increment, no lookup.
//!
//! What a component both logs and counts is a named [`Event`], declared
//! beside its families and emitted with [`emit!`](crate::emit): one call
//! counts it and writes its line, so the two cannot drift apart.
//!
//! This module knows no domain type and imports nothing of the crate but
//! `base`: components register a [`Collector`]; `/healthz` and the status
//! page find a component's values again through [`Metrics::handle`], by
//! the component's own type.

mod event;
#[cfg(test)]
pub use event::captured;
pub use event::{Event, Tally};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A counter kept in an atomic (`_total` is added to its name on export).
#[derive(Debug, Default, Clone)]
pub struct Count(Arc<AtomicU64>);

/// A gauge of whole numbers kept in an atomic.
#[derive(Debug, Default, Clone)]
pub struct Level(Arc<AtomicU64>);

/// A 0/1 gauge kept in an atomic boolean.
#[derive(Debug, Default, Clone)]
pub struct Flag(Arc<AtomicBool>);

impl Deref for Count {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

impl Deref for Level {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

impl Deref for Flag {
    type Target = AtomicBool;
    fn deref(&self) -> &AtomicBool {
        &self.0
    }
}

impl TypedMetric for Count {
    const TYPE: MetricType = MetricType::Counter;
}
impl TypedMetric for Level {
    const TYPE: MetricType = MetricType::Gauge;
}
impl TypedMetric for Flag {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Count {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, u64, u64>(&self.0.load(Ordering::Relaxed), None)
    }
    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl EncodeMetric for Level {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.load(Ordering::Relaxed))
    }
    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl EncodeMetric for Flag {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&u64::from(self.0.load(Ordering::Relaxed)))
    }
    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Everything `/metrics` reports. Shared as `Arc<Metrics>`.
///
/// It holds no family of its own: what the instance runs, and the
/// collectors components registered at their start.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The components this instance runs (`ingest`, `engine`, ...).
    pub runs: std::sync::RwLock<Vec<String>>,
    /// Families components export themselves (the supervisor's, ingest's
    /// and the source links', the engine's, the lease's, the link's, the
    /// archiver's, the hub mirrors', the sources' gauges, the serial
    /// ports' counters), with their `/healthz` sections, in registration
    /// order.
    pub collectors: std::sync::RwLock<Vec<std::sync::Arc<dyn Collector>>>,
    /// The same collectors as typed handles, for the readers of their
    /// values (`/healthz`'s verdict, the status page): this module never
    /// names their types.
    handles: std::sync::RwLock<Vec<std::sync::Arc<dyn std::any::Any + Send + Sync>>>,
}

/// Since when a component has been retrying writes the leaf does not
/// take, and the last error; `None` while writes go through.
pub type Stall = std::sync::Mutex<Option<(std::time::Instant, String)>>;

/// Records a failed write in `stall`, keeping the start of the outage.
pub fn stalled(stall: &Stall, error: String) {
    let mut s = stall.lock().unwrap_or_else(|p| p.into_inner());
    let since = s.as_ref().map_or_else(std::time::Instant::now, |(t, _)| *t);
    *s = Some((since, error));
}

/// Ends the outage recorded in `stall`.
pub fn unstalled(stall: &Stall) {
    *stall.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Seconds since the outage in `stall` began, and its last error.
pub fn stall_of(stall: &Stall) -> Option<(f64, String)> {
    stall
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|(since, error)| (since.elapsed().as_secs_f64(), error.clone()))
}

/// Families a component exports itself, with its own labels (each serial
/// port's counters, say), so that this module needs none of its types.
pub trait Collector: Send + Sync + std::fmt::Debug {
    /// Registers the component's families, filled with their current
    /// values, for one scrape.
    fn collect(&self, registry: &mut Registry);

    /// The component's section of `/healthz` (its name and detail), if
    /// it has one.
    fn health(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }

    /// Registers families a component exports itself (exported last).
    pub fn add_collector(&self, collector: std::sync::Arc<dyn Collector>) {
        self.collectors
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(collector);
    }

    /// The `/healthz` sections of the components that registered a
    /// collector, in registration order.
    pub fn health_sections(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.collectors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|c| c.health())
            .collect()
    }

    /// Registers `collector`'s families and keeps it as a typed handle
    /// for [`Metrics::handle`].
    pub fn register<T: Collector + Send + Sync + 'static>(&self, collector: std::sync::Arc<T>) {
        self.add_collector(collector.clone());
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(collector);
    }

    /// The collector of type `T` a component registered, if it did (the
    /// component is not run, or has not started yet, otherwise).
    pub fn handle<T: Send + Sync + 'static>(&self) -> Option<std::sync::Arc<T>> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find_map(|h| h.clone().downcast::<T>().ok())
    }

    /// The collector of type `T`, registered first if none is: for
    /// families several starts share (the link's, by every connection
    /// made with these metrics).
    pub fn handle_or_register<T: Collector + Default + Send + Sync + 'static>(
        &self,
    ) -> std::sync::Arc<T> {
        let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = handles.iter().find_map(|h| h.clone().downcast::<T>().ok()) {
            return h;
        }
        let h = std::sync::Arc::new(T::default());
        handles.push(h.clone());
        drop(handles);
        self.add_collector(h.clone());
        h
    }

    /// The registry of one scrape: what components registered, in their
    /// order.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        for c in self
            .collectors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            c.collect(&mut r);
        }
        r
    }

    /// The OpenMetrics text exposition (`# EOF` last).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

/// A family exported even while it has no sample (a configured source's
/// reading age before its first reading, say).
#[derive(Debug)]
pub struct Always<M>(pub M);

impl<M: EncodeMetric> EncodeMetric for Always<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label pairs of a family, in the order they are written.
pub type Labels = Vec<(String, String)>;

/// `[("source", name)]` as [`Labels`].
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A labelled gauge family, filled at each scrape.
pub fn gauge_family() -> Family<Labels, Gauge> {
    Family::default()
}

/// A labelled counter family, filled at each scrape.
pub fn counter_family() -> Family<Labels, Counter> {
    Family::default()
}

/// The name a counter is registered under: the library adds `_total`, so
/// the table's full sample name loses it here.
pub fn counter_name(sample: &str) -> &str {
    sample.strip_suffix("_total").unwrap_or(sample)
}

/// A gauge value of the library's type (counts above `i64::MAX` do not
/// happen; they are clamped rather than wrapped).
pub fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Own(Count);

    impl Collector for Own {
        fn collect(&self, r: &mut Registry) {
            r.register(counter_name("presenced_own_total"), "Own.", self.0.clone());
        }
    }

    #[test]
    fn renders_openmetrics_text_with_the_same_sample_names() {
        let m = Metrics::default();
        let own = std::sync::Arc::new(Own::default());
        m.register(own.clone());
        Metrics::add(&own.0, 3);
        let text = m.render();
        assert!(
            text.contains("# TYPE presenced_own counter\npresenced_own_total 3\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split(' ');
            let name = parts.next().unwrap();
            assert!(name.starts_with("presenced_"), "{line}");
            if name.contains('{') {
                assert!(name.ends_with("\"}"), "{line}");
            }
            assert!(parts.next().unwrap().parse::<f64>().is_ok(), "{line}");
        }
    }

    /// A registered collector is found again by its type, once; a type
    /// nobody registered is not.
    #[test]
    fn a_registered_collector_is_its_typed_handle() {
        let m = Metrics::default();
        assert!(m.handle::<Own>().is_none());
        let a = m.handle_or_register::<Own>();
        let b = m.handle_or_register::<Own>();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        Metrics::inc(&a.0);
        assert_eq!(m.handle::<Own>().unwrap().0.load(Ordering::Relaxed), 1);
        let text = m.render();
        assert_eq!(text.matches("presenced_own_total 1\n").count(), 1, "{text}");
    }
}
