//! The supervisor's families, declared here and registered by the daemon
//! with its [`Registry`]: readiness, and each supervised component's
//! state and unexpected ends. `/healthz` reads the same registry back
//! through [`crate::metrics::Metrics::handle`].

use super::{Registry, State};
use crate::metrics::{counter_family, counter_name, gauge_family, labels, Collector, Event, Flag};
use prometheus_client::registry::Registry as Families;
use std::sync::atomic::Ordering;

/// A supervised component ended unexpectedly or could not start.
pub const COMPONENT_FAILED: Event = Event {
    name: "component_failed",
    level: tracing::Level::ERROR,
    message: "component failed",
    counter: "presenced_component_failures_total{component}",
};

impl Collector for Registry {
    fn collect(&self, r: &mut Families) {
        let ready = Flag::default();
        ready.store(self.is_ready(), Ordering::Relaxed);
        r.register(
            "presenced_ready",
            "1 once state is rehydrated and the consumer is bound.",
            ready,
        );
        let comps = self.snapshot();
        if comps.is_empty() {
            return;
        }
        let up = gauge_family();
        let failures = counter_family();
        for (c, h) in &comps {
            let l = labels(&[("component", c)]);
            up.get_or_create(&l)
                .set(i64::from(h.state == State::Running));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::Arc;

    #[test]
    fn readiness_and_each_component_are_exported_once() {
        let m = Metrics::default();
        let reg = Arc::new(Registry::default());
        m.register(reg.clone());
        let text = m.render();
        assert!(text.contains("presenced_ready 0\n"), "{text}");
        assert!(!text.contains("presenced_component_up"), "{text}");
        reg.register("ingest", true);
        reg.running("ingest");
        reg.failed("engine", "boom".into(), false);
        reg.set_ready(true);
        let text = m.render();
        assert!(text.contains("presenced_ready 1\n"), "{text}");
        assert!(
            text.contains("presenced_component_up{component=\"ingest\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("presenced_component_failures_total{component=\"engine\"} 1\n"),
            "{text}"
        );
        assert_eq!(text.matches("# TYPE presenced_ready gauge").count(), 1);
        assert!(m.handle::<Registry>().is_some_and(|h| h.is_ready()));
    }
}
