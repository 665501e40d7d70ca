//! Ingest's metrics, declared here and registered by
//! [`super::start::start`] when the instance runs ingest (an instance
//! without it exports none of them). `/healthz` reads them through
//! [`crate::metrics::Metrics::handle`] for its verdict and its `ingest`
//! section, the status page for its reject count.

use crate::metrics::{counter_name, Collector, Count, Level, Stall};
use prometheus_client::registry::Registry;

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
}
