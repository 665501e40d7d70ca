//! Ingest's metrics, declared here and registered by
//! [`super::start::start`] when the instance runs ingest (an instance
//! without it exports none of them), and the source links
//! ([`SourceLinks`], exported while sources are configured). `/healthz`
//! reads them through [`crate::metrics::Metrics::handle`] for its verdict
//! and its `ingest` and `sources` sections, the status page for its
//! reject count.

use crate::metrics::{
    counter_name, gauge_family, labels, Always, Collector, Count, Event, Labels, Level, Stall,
};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Counters and gauges of ingest; its hot path holds them directly.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub observations_in: Count,
    pub observations_stored: Count,
    pub rejects: Count,
    pub publish_retries: Count,
    /// Observations waiting in the sources' bounded buffer.
    pub buffer_depth: Level,
    pub buffer_capacity: Level,
    /// Since when ingest has been retrying input the leaf does not store
    /// (timeouts, a frozen or full server), and the last error: a hung
    /// leaf keeps its TCP connection, so the link's gauge alone misses it.
    pub stalled: Stall,
    /// The last input ingest rejected (kept in REJECTED): `/healthz` and
    /// the status page name its reason.
    pub last_reject: std::sync::RwLock<Option<LastReject>>,
    /// The last accepted reading of each sensor, as sent on
    /// `live.<site>.<sensor>`: the status page in this process shows them
    /// from here (following the subject through nats-server had the server
    /// deliver, and the daemon parse, every reading it had just sent).
    pub live: std::sync::RwLock<std::collections::BTreeMap<String, serde_json::Value>>,
}

/// Input rejected and kept in stream REJECTED. Every one is counted; the
/// line is written at most once per interval and source, with the number
/// left out since the last (`suppressed`).
pub const INPUT_REJECTED: Event = Event {
    name: "input_rejected",
    level: tracing::Level::WARN,
    message: "input rejected; kept in stream REJECTED",
    counter: "presenced_rejects_total",
};

/// The last rejected input, as health reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReject {
    pub source: String,
    pub origin: String,
    pub reason: String,
    /// When it was received, Unix milliseconds.
    pub at_ms: i64,
}

impl IngestMetrics {
    /// Records a reject for health (the counter is counted apart).
    pub fn note_reject(&self, reject: LastReject) {
        *self.last_reject.write().unwrap_or_else(|p| p.into_inner()) = Some(reject);
    }

    /// A copy of the last reject.
    pub fn last_reject(&self) -> Option<LastReject> {
        self.last_reject
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
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

/// The link state of each source, refreshed every second by the gauge
/// task of [`super::start::start`].
#[derive(Debug, Default)]
pub struct SourceLinks(std::sync::RwLock<Vec<SourceHealth>>);

impl SourceLinks {
    /// A copy of the source links.
    pub fn get(&self) -> Vec<SourceHealth> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, links: Vec<SourceHealth>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = links;
    }
}

impl Collector for SourceLinks {
    fn collect(&self, r: &mut Registry) {
        let sources = self.get();
        if sources.is_empty() {
            return;
        }
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
        // Exported before the first reading too (then with no sample), as
        // the family of a configured source.
        r.register(
            "presenced_source_last_reading_age_seconds",
            "Seconds since the source's last reading.",
            Always(age),
        );
    }
}

impl Collector for IngestMetrics {
    fn collect(&self, r: &mut Registry) {
        for (name, help, c) in [
            (
                "presenced_observations_received_total",
                "Observations received from sources.",
                &self.observations_in,
            ),
            (
                "presenced_observations_stored_total",
                "Observations acknowledged by stream SENSORS.",
                &self.observations_stored,
            ),
            (
                "presenced_rejects_total",
                "Inputs rejected into stream REJECTED.",
                &self.rejects,
            ),
            (
                "presenced_publish_retries_total",
                "JetStream publishes retried after a failure.",
                &self.publish_retries,
            ),
        ] {
            r.register(counter_name(name), help, c.clone());
        }
        r.register(
            "presenced_ingest_buffer_depth",
            "Observations waiting in the ingest buffer.",
            self.buffer_depth.clone(),
        );
        r.register(
            "presenced_ingest_buffer_capacity",
            "Size of the ingest buffer.",
            self.buffer_capacity.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::Arc;

    /// Same sample names and types as before ingest owned them, each
    /// exported once, with the values its hot path counts.
    #[test]
    fn exports_each_family_once_with_its_value() {
        let m = Metrics::default();
        let own = Arc::new(IngestMetrics::default());
        m.register(own.clone());
        Metrics::add(&own.observations_in, 3);
        Metrics::set(&own.buffer_capacity, 100);
        let text = m.render();
        assert!(
            text.contains("# TYPE presenced_observations_received counter\npresenced_observations_received_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE presenced_ingest_buffer_capacity gauge\npresenced_ingest_buffer_capacity 100\n"),
            "{text}"
        );
        for name in [
            "presenced_observations_received_total",
            "presenced_observations_stored_total",
            "presenced_rejects_total",
            "presenced_publish_retries_total",
            "presenced_ingest_buffer_depth",
            "presenced_ingest_buffer_capacity",
        ] {
            let n = text
                .lines()
                .filter(|l| l.split(' ').next() == Some(name))
                .count();
            assert_eq!(n, 1, "{name} in\n{text}");
        }
        assert!(m.handle::<IngestMetrics>().is_some());
    }

    fn link(name: &str, last_reading_seconds: Option<f64>) -> SourceHealth {
        SourceHealth {
            name: name.into(),
            kind: "mqtt".into(),
            up: true,
            down_seconds: None,
            last_reading_seconds,
            readings: 1,
            degraded: false,
        }
    }

    /// No family without a source; a source's reading age is exported as
    /// a family before its first reading; label values are escaped.
    #[test]
    fn source_links_are_exported_per_source_with_escaped_labels() {
        let m = Metrics::default();
        let links = Arc::new(SourceLinks::default());
        m.register(links.clone());
        assert!(!m.render().contains("presenced_source_"));
        links.set(vec![link("a\"b", Some(1.25)), link("quiet", None)]);
        let text = m.render();
        assert!(
            text.contains("presenced_source_up{source=\"a\\\"b\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("presenced_source_last_reading_age_seconds{source=\"a\\\"b\"} 1.3\n"),
            "{text}"
        );
        assert!(
            text.contains("presenced_source_up{source=\"quiet\"} 1\n")
                && !text.contains("age_seconds{source=\"quiet\"}"),
            "{text}"
        );
    }
}
