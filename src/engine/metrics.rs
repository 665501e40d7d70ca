//! The engine's metrics, declared here and registered by
//! [`super::start::start`] when the instance runs the engine (a standby
//! exports them too, at their last values). The runner holds them
//! directly; `/healthz` reads them through
//! [`crate::metrics::Metrics::handle`] for its verdict (a stalled commit,
//! a zone clock ahead of the system clock) and its `engine` section.

use crate::metrics::{counter_name, Collector, Count, Event, Level, Stall};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Counters and gauges of the engine.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub observations: Count,
    pub redeliveries: Count,
    /// Batches applied (observations per batch: how far behind it was).
    pub batches: Count,
    /// Rounds of writes sent together, then awaited together.
    pub write_rounds: Count,
    pub kv_writes: Count,
    pub kv_conflicts: Count,
    pub transitions: Count,
    pub consumer_pending: Level,
    pub zones: Level,
    pub zones_occupied: Level,
    /// Since when the engine has been retrying a commit (transitions to
    /// EVENTS, zone states to KV) the leaf does not take, and why: a full
    /// store refuses writes while the connection stays up.
    pub stalled: Stall,
    /// The newest zone clock (unix ms, 0 before the engine runs). Ahead
    /// of the system clock by more than [`EngineMetrics::clock_ahead_ok_ms`]
    /// means the clock was stepped back: zones keep their clock (time
    /// never runs backwards for a zone), so their timers fire late.
    pub zone_clock_max_ms: AtomicU64,
    /// How far ahead a zone clock may legitimately be: readings may carry
    /// device times up to `ingest.max_clock_skew` ahead.
    pub clock_ahead_ok_ms: AtomicU64,
    /// Zone states as committed, for the status page in this process
    /// (here because the page finds the engine through its metrics).
    pub feed: std::sync::Arc<super::feed::Feed>,
}

/// A compare-and-set write found the key changed behind the engine (no
/// leader lease: another writer, or a lost reply); the key is reloaded.
pub const KV_CONFLICT: Event = Event {
    name: "engine_kv_conflict",
    level: tracing::Level::ERROR,
    message: "compare-and-set conflict: the key changed behind the engine's back; reloading it",
    counter: "presenced_kv_conflicts_total",
};

/// Compare-and-set writes refused while this engine held the leader
/// lease: another holder took over and wrote them; this one stands by.
/// Counted once per refused key.
pub const KV_CONFLICTS_FENCED: Event = Event {
    name: "engine_fenced",
    level: tracing::Level::WARN,
    message: "compare-and-set refused: another engine holds the leader lease and wrote these keys; this instance stops writing and stands by",
    counter: "presenced_kv_conflicts_total",
};

/// An observation redelivered by SENSORS that a zone has applied already.
pub const REDELIVERY_SKIPPED: Event = Event {
    name: "engine_redelivery_skipped",
    level: tracing::Level::DEBUG,
    message: "already applied; skipped",
    counter: "presenced_engine_redeliveries_total",
};

impl Collector for EngineMetrics {
    fn collect(&self, r: &mut Registry) {
        for (name, help, c) in [
            (
                "presenced_engine_observations_total",
                "Observations applied by the engine.",
                &self.observations,
            ),
            (
                "presenced_engine_redeliveries_total",
                "Redelivered observations skipped as already applied.",
                &self.redeliveries,
            ),
            (
                "presenced_engine_batches_total",
                "Batches of observations the engine applied (observations per batch: how far behind it was).",
                &self.batches,
            ),
            (
                "presenced_engine_write_rounds_total",
                "Rounds of engine writes sent together, then awaited together: EVENTS publishes, KV compare-and-set writes, or, pipelined, one batch's KV writes with the next batch's EVENTS publishes.",
                &self.write_rounds,
            ),
            (
                "presenced_kv_writes_total",
                "Compare-and-set writes to KV presence and debounce.",
                &self.kv_writes,
            ),
            (
                "presenced_kv_conflicts_total",
                "KV writes refused for a stale revision.",
                &self.kv_conflicts,
            ),
            (
                "presenced_transitions_total",
                "Zone state transitions published to EVENTS.",
                &self.transitions,
            ),
        ] {
            r.register(counter_name(name), help, c.clone());
        }
        let feed_readers = Level::default();
        crate::metrics::Metrics::set(&feed_readers, self.feed.readers() as u64);
        for (name, help, g) in [
            (
                "presenced_engine_feed_readers",
                "Readers in this process taking the engine's commits in memory (an open status page's follower) instead of through KV presence.",
                &feed_readers,
            ),
            (
                "presenced_consumer_pending",
                "Observations in SENSORS not yet applied by the engine.",
                &self.consumer_pending,
            ),
            ("presenced_zones", "Zones configured.", &self.zones),
            (
                "presenced_zones_occupied",
                "Zones currently occupied or leaving.",
                &self.zones_occupied,
            ),
        ] {
            r.register(name, help, g.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    #[test]
    fn exports_each_family_once_with_its_value() {
        let m = Metrics::default();
        let own = Arc::new(EngineMetrics::default());
        m.register(own.clone());
        Metrics::inc(&own.kv_writes);
        let text = m.render();
        assert!(
            text.contains("# TYPE presenced_kv_writes counter\npresenced_kv_writes_total 1\n"),
            "{text}"
        );
        for name in [
            "presenced_engine_observations_total",
            "presenced_engine_redeliveries_total",
            "presenced_kv_writes_total",
            "presenced_kv_conflicts_total",
            "presenced_transitions_total",
            "presenced_consumer_pending",
            "presenced_zones",
            "presenced_zones_occupied",
            "presenced_engine_feed_readers",
        ] {
            let n = text
                .lines()
                .filter(|l| l.split(' ').next() == Some(name))
                .count();
            assert_eq!(n, 1, "{name} in\n{text}");
        }
    }

    #[test]
    fn an_event_is_counted_where_it_is_logged() {
        let m = EngineMetrics::default();
        let key = "hall";
        crate::emit!(KV_CONFLICT, &m.kv_conflicts; bucket = "presence", key = %key);
        crate::emit!(KV_CONFLICTS_FENCED, &m.kv_conflicts, by = 2; conflicts = 2);
        assert_eq!(m.kv_conflicts.load(Ordering::Relaxed), 3);
    }
}
