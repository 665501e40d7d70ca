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
//! The daemon's own scalars, and those of ingest and the engine whose hot
//! paths still reach them through [`Metrics`], are declared once, in the
//! table of `declare_metrics!` below: field, name, help, and the
//! component whose families they belong to. The fields are plain atomics
//! behind a shared handle, so every hot path only pays a relaxed
//! increment (`Metrics::inc(&m.rejects)`). Families with labels
//! (components, sources) are built from their current
//! readings at each scrape.
//!
//! This module knows no domain type: components hand it plain values
//! ([`SourceHealth`]) or register a [`Collector`].

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

/// Which component a family belongs to: families of a component this
/// instance does not run are left out (a zero there would read as
/// "configured and idle").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The daemon itself (connection, readiness, lease).
    Daemon,
    /// Ingest, its sources included.
    Ingest,
    Engine,
}

/// Declares the scalar metrics once: each line gives the field (and its
/// doc), its type, the exported name, the help text, and its [`Part`].
macro_rules! declare_metrics {
    (
        scalars { $( $(#[$doc:meta])* $field:ident : $ty:ident = ($name:literal, $help:literal, $part:ident), )* }
        $(#[$sdoc:meta])*
        pub struct Metrics { $( $(#[$odoc:meta])* pub $ofield:ident : $oty:ty, )* }
    ) => {
        $(#[$sdoc])*
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $field: $ty, )*
            $( $(#[$odoc])* pub $ofield: $oty, )*
        }

        impl Metrics {
            /// Every scalar metric: exported name, help, part, and a
            /// handle on its value.
            fn scalars(&self) -> Vec<(&'static str, &'static str, Part, Scalar)> {
                vec![ $( ($name, $help, Part::$part, Scalar::$ty(self.$field.clone())), )* ]
            }
        }
    };
}

/// A handle on one scalar metric, for registration.
#[derive(Debug)]
enum Scalar {
    Count(Count),
    Level(Level),
    Flag(Flag),
}

declare_metrics! {
    scalars {
        observations_in: Count = ("presenced_observations_received_total", "Observations received from sources.", Ingest),
        observations_stored: Count = ("presenced_observations_stored_total", "Observations acknowledged by stream SENSORS.", Ingest),
        rejects: Count = ("presenced_rejects_total", "Inputs rejected into stream REJECTED.", Ingest),
        publish_retries: Count = ("presenced_publish_retries_total", "JetStream publishes retried after a failure.", Ingest),
        buffer_depth: Level = ("presenced_ingest_buffer_depth", "Observations waiting in the ingest buffer.", Ingest),
        buffer_capacity: Level = ("presenced_ingest_buffer_capacity", "Size of the ingest buffer.", Ingest),
        engine_observations: Count = ("presenced_engine_observations_total", "Observations applied by the engine.", Engine),
        engine_redeliveries: Count = ("presenced_engine_redeliveries_total", "Redelivered observations skipped as already applied.", Engine),
        engine_batches: Count = ("presenced_engine_batches_total", "Batches of observations the engine applied (observations per batch: how far behind it was).", Engine),
        engine_write_rounds: Count = ("presenced_engine_write_rounds_total", "Rounds of engine writes sent together, then awaited together: EVENTS publishes, KV compare-and-set writes, or, pipelined, one batch's KV writes with the next batch's EVENTS publishes.", Engine),
        kv_writes: Count = ("presenced_kv_writes_total", "Compare-and-set writes to KV presence and debounce.", Engine),
        kv_conflicts: Count = ("presenced_kv_conflicts_total", "KV writes refused for a stale revision.", Engine),
        engine_active: Flag = ("presenced_engine_active", "1 while this instance holds the engine's leader lease and runs the engine; 0 on a standby.", Engine),
        engine_takeovers: Count = ("presenced_engine_takeovers_total", "Times this instance took the engine's leader lease.", Engine),
        transitions: Count = ("presenced_transitions_total", "Zone state transitions published to EVENTS.", Engine),
        consumer_pending: Level = ("presenced_consumer_pending", "Observations in SENSORS not yet applied by the engine.", Engine),
        zones: Level = ("presenced_zones", "Zones configured.", Engine),
        zones_occupied: Level = ("presenced_zones_occupied", "Zones currently occupied or leaving.", Engine),
        nats_connected: Flag = ("presenced_nats_connected", "1 while connected to the leaf nats-server.", Daemon),
        nats_reconnects: Count = ("presenced_nats_reconnects_total", "Connections to the leaf nats-server after the first.", Daemon),
        /// Operations nats-server refused for lack of permission.
        permission_violations: Count = ("presenced_permission_violations_total", "Publishes and subscriptions nats-server refused for lack of permission.", Daemon),
        /// The holder's view of its lease in KV `owners`.
        lease_held: Flag = ("presenced_lease_held", "1 while this service's lease in KV owners is held (last renewal younger than lease.ttl).", Daemon),
        ready: Flag = ("presenced_ready", "1 once state is rehydrated and the consumer is bound.", Daemon),
    }
    /// Everything `/metrics` reports. Shared as `Arc<Metrics>`.
    pub struct Metrics {
        /// Since when ingest has been retrying input the leaf does not
        /// store (timeouts, a frozen or full server), and the last error:
        /// a hung leaf keeps its TCP connection, so `nats_connected` alone
        /// misses it.
        pub ingest_stalled: Stall,
        /// Since when the engine has been retrying a commit (transitions
        /// to EVENTS, zone states to KV) the leaf does not take, and why: a
        /// full store refuses writes while the connection stays up.
        pub engine_stalled: Stall,
        /// The newest zone clock (unix ms, 0 before the engine runs). Ahead
        /// of the system clock by more than [`Metrics::clock_ahead_ok_ms`]
        /// means the clock was stepped back: zones keep their clock (time
        /// never runs backwards for a zone), so their timers fire late.
        pub zone_clock_max_ms: AtomicU64,
        /// How far ahead a zone clock may legitimately be: readings may
        /// carry device times up to `ingest.max_clock_skew` ahead.
        pub clock_ahead_ok_ms: AtomicU64,
        /// The engine's leader lease (store::leader): active or standby,
        /// since when, who holds it.
        pub engine_role: std::sync::RwLock<Option<crate::base::ownership::Role>>,
        /// Every supervised component and its state.
        pub components: std::sync::Arc<crate::supervise::Registry>,
        /// Link state of each source, refreshed every second.
        pub sources: std::sync::RwLock<Vec<SourceHealth>>,
        /// The components this instance runs (`ingest`, `engine`, ...);
        /// empty when not set by a daemon (then every family is exported).
        pub runs: std::sync::RwLock<Vec<String>>,
        /// The last input ingest rejected (kept in REJECTED): `/healthz`
        /// and the status page name its reason.
        pub last_reject: std::sync::RwLock<Option<LastReject>>,
        /// Families components export themselves (the archiver's, the hub
        /// mirrors', the sources' gauges, the serial ports' counters with
        /// `source` and `device` labels and LD2410 rejects by reason),
        /// with their `/healthz` sections.
        pub collectors: std::sync::RwLock<Vec<std::sync::Arc<dyn Collector>>>,
    }
}

/// The last rejected input, as health reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReject {
    pub source: String,
    pub origin: String,
    pub reason: String,
    /// When it was received, Unix milliseconds.
    pub at_ms: i64,
}

impl Metrics {
    /// Records a reject for health (the counter is counted apart).
    pub fn note_reject(&self, reject: LastReject) {
        *self.last_reject.write().unwrap_or_else(|p| p.into_inner()) = Some(reject);
    }
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

/// One source's link, as `/healthz` and `presenced status` show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SourceHealth {
    pub name: String,
    /// `mqtt` or `serial`.
    pub kind: String,
    /// Connected to the broker / device open.
    pub up: bool,
    /// Seconds since the link went down (or since start, when it never
    /// came up); absent while up.
    pub down_seconds: Option<f64>,
    /// Seconds since the last reading arrived; absent before the first.
    pub last_reading_seconds: Option<f64>,
    /// Readings received since start.
    pub readings: u64,
    /// Down longer than `health.source_grace`.
    pub degraded: bool,
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

    /// A copy of the source links.
    pub fn source_health(&self) -> Vec<SourceHealth> {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_source_health(&self, v: Vec<SourceHealth>) {
        *self.sources.write().unwrap_or_else(|p| p.into_inner()) = v;
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

    /// Whether the families of `part` are exported by this instance.
    fn shows(&self, part: Part) -> bool {
        let runs = self.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        let all = runs.is_empty();
        let on = |c: &str| all || runs.iter().any(|r| r == c);
        match part {
            Part::Daemon => true,
            Part::Ingest => on("ingest"),
            Part::Engine => on("engine"),
        }
    }

    /// The registry of one scrape: the scalars this instance exports, then
    /// components and sources, then what components collect.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        for (name, help, part, scalar) in self.scalars() {
            if !self.shows(part) {
                continue;
            }
            match scalar {
                Scalar::Count(c) => r.register(counter_name(name), help, c),
                Scalar::Level(l) => r.register(name, help, l),
                Scalar::Flag(f) => r.register(name, help, f),
            }
        }
        self.register_components(&mut r);
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

    fn register_components(&self, r: &mut Registry) {
        let comps = self.components.snapshot();
        if !comps.is_empty() {
            let up = gauge_family();
            let failures = counter_family();
            for (c, h) in &comps {
                let l = labels(&[("component", c)]);
                up.get_or_create(&l)
                    .set(i64::from(h.state == crate::supervise::State::Running));
                failures.get_or_create(&l).inc_by(h.failures);
            }
            r.register(
                "presenced_component_up",
                "1 while the component runs (0 starting, stopped or failed).",
                up,
            );
            r.register(
                counter_name("presenced_component_failures_total"),
                "Unexpected ends of the component (also logged at ERROR).",
                failures,
            );
        }
        let sources = self.source_health();
        if !sources.is_empty() {
            let up = gauge_family();
            let age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
            for s in &sources {
                let l = labels(&[("source", &s.name)]);
                up.get_or_create(&l).set(i64::from(s.up));
                if let Some(a) = s.last_reading_seconds {
                    age.get_or_create(&l).set((a * 10.0).round() / 10.0);
                }
            }
            r.register(
                "presenced_source_up",
                "1 while the source's link (broker connection, device) is up.",
                up,
            );
            // Exported before the first reading too (then with no
            // sample), as the family of a configured source.
            r.register(
                "presenced_source_last_reading_age_seconds",
                "Seconds since the source's last reading.",
                Always(age),
            );
        }
    }

    /// The OpenMetrics text exposition (`# EOF` last).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

/// Things that happen to the daemon that are both logged and counted: one
/// call does both, so a log line and its counter cannot drift apart. The
/// fields are plain values (this module knows no domain type).
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A compare-and-set write found the key changed behind the engine.
    KvConflict { bucket: &'a str, key: &'a str },
    /// The connection to the leaf came back after a loss.
    NatsReconnected,
}

impl Metrics {
    /// Logs `event` and counts it.
    pub fn emit(&self, event: Event<'_>) {
        match event {
            Event::KvConflict { bucket, key } => {
                Metrics::inc(&self.kv_conflicts);
                tracing::error!(
                    bucket,
                    key = %key,
                    "compare-and-set conflict: the key changed behind the engine's back; reloading it"
                );
            }
            Event::NatsReconnected => {
                Metrics::inc(&self.nats_reconnects);
                tracing::info!("reconnected to nats-server");
            }
        }
    }
}

/// A family exported even while it has no sample.
#[derive(Debug)]
struct Always<M>(M);

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

    #[test]
    fn renders_openmetrics_text_with_the_same_sample_names() {
        let m = Metrics::default();
        Metrics::add(&m.observations_in, 3);
        m.ready.store(true, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("# TYPE presenced_observations_received counter\npresenced_observations_received_total 3\n"),
            "{text}"
        );
        assert!(text.contains("presenced_ready 1\n"), "{text}");
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

    /// Every scalar of the table is exported once, under its declared
    /// sample name, when its component runs.
    #[test]
    fn every_declared_scalar_is_exported_once() {
        let m = Metrics::default();
        let text = m.render();
        for (name, _, _, _) in m.scalars() {
            let samples = text
                .lines()
                .filter(|l| l.split(' ').next() == Some(name))
                .count();
            assert_eq!(samples, 1, "{name} in\n{text}");
        }
    }

    #[test]
    fn families_of_components_not_run_are_left_out() {
        let m = Metrics::default();
        *m.runs.write().unwrap() = vec!["engine".to_owned()];
        let text = m.render();
        assert!(text.contains("presenced_kv_writes_total 0\n"), "{text}");
        for absent in [
            "presenced_rejects_total",
            "presenced_archive_",
            "presenced_mqtt_connected",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
    }

    #[test]
    fn an_event_is_counted_where_it_is_logged() {
        let m = Metrics::default();
        m.emit(Event::KvConflict {
            bucket: "presence",
            key: "hall",
        });
        m.emit(Event::NatsReconnected);
        assert_eq!(m.kv_conflicts.load(Ordering::Relaxed), 1);
        assert_eq!(m.nats_reconnects.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.set_source_health(vec![SourceHealth {
            name: "a\"b".into(),
            kind: "mqtt".into(),
            up: true,
            down_seconds: None,
            last_reading_seconds: Some(1.25),
            readings: 1,
            degraded: false,
        }]);
        let text = m.render();
        assert!(
            text.contains("presenced_source_up{source=\"a\\\"b\"} 1\n"),
            "{text}"
        );
    }
}
