//! The hub watch's metrics and `/healthz` section: each mirror's lag,
//! contact, stalls and nudges, declared here and registered by
//! [`super::start`]; nothing is exported before the first poll.

use crate::metrics::{
    as_i64, counter_family, counter_name, gauge_family, labels, Collector, Event, Flag,
};
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;

/// The last reading of the site's hub mirrors and what happened to them.
#[derive(Debug, Default, Clone)]
pub struct Mirrors {
    /// Whether `[hub]` is configured (nothing is rendered otherwise).
    pub watched: bool,
    /// Whether the last poll reached the hub through the leaf link.
    pub hub_reachable: bool,
    pub report: Vec<MirrorReading>,
    /// Stalls and nudges per mirror, since start.
    pub stalls: std::collections::BTreeMap<String, u64>,
    pub nudges: std::collections::BTreeMap<String, u64>,
}

/// One hub mirror as last judged (the hub health tracker's report).
/// Serialized as `/healthz` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MirrorReading {
    pub mirror: String,
    /// `current`, `catching_up`, `stalled` or `unknown`.
    pub state: &'static str,
    /// Messages the source has and the mirror lacks.
    pub lag_messages: Option<u64>,
    /// Age difference between the source's newest message and the
    /// mirror's newest, when behind.
    pub lag_seconds: Option<f64>,
    /// Time since the hub last heard from the source.
    pub last_contact_seconds: Option<f64>,
    /// Why a reading failed, if one did.
    pub error: Option<String>,
}

impl MirrorReading {
    pub fn is_stalled(&self) -> bool {
        self.state == "stalled"
    }
}

/// Things that happen to a hub mirror and are counted.
#[derive(Debug, Clone, Copy)]
pub enum MirrorEvent {
    Stall,
    Nudge,
}

/// A hub mirror stopped making progress while the leaf has more.
pub const MIRROR_STALLED: Event = Event {
    name: "hub_mirror_stalled",
    level: tracing::Level::WARN,
    message: "hub mirror stalled: no progress while the leaf has more",
    counter: "presenced_mirror_stalls_total{mirror}",
};

/// A hub mirror behind and out of contact was restarted on request.
pub const MIRROR_NUDGED: Event = Event {
    name: "hub_mirror_nudged",
    level: tracing::Level::INFO,
    message: "hub mirror behind and out of contact: asked the hub to restart it",
    counter: "presenced_mirror_nudges_total{mirror}",
};

/// The hub watch's readings, shared between its task and the scrape.
#[derive(Debug, Default)]
pub struct HubMetrics {
    state: std::sync::RwLock<Mirrors>,
}

impl HubMetrics {
    fn mirrors_mut(&self) -> std::sync::RwLockWriteGuard<'_, Mirrors> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the hub mirror health.
    pub fn mirrors(&self) -> Mirrors {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts a stall or nudge of `mirror`.
    pub fn mirror_event(&self, mirror: &str, event: MirrorEvent) {
        self.counter(mirror, event)(1);
    }

    /// The count of `event` for `mirror`, as an [`emit!`](crate::emit)
    /// counter.
    pub fn counter<'a>(&'a self, mirror: &'a str, event: MirrorEvent) -> impl Fn(u64) + 'a {
        move |n| {
            let mut m = self.mirrors_mut();
            let map = match event {
                MirrorEvent::Stall => &mut m.stalls,
                MirrorEvent::Nudge => &mut m.nudges,
            };
            *map.entry(mirror.to_owned()).or_default() += n;
        }
    }

    /// Stores the latest reading of every mirror.
    pub fn set_mirrors(&self, hub_reachable: bool, report: Vec<MirrorReading>) {
        let mut m = self.mirrors_mut();
        m.watched = true;
        m.hub_reachable = hub_reachable;
        m.report = report;
    }
}

impl Collector for HubMetrics {
    fn collect(&self, r: &mut Registry) {
        let m = self.mirrors();
        if !m.watched {
            return;
        }
        let reachable = Flag::default();
        reachable.store(m.hub_reachable, Ordering::Relaxed);
        r.register(
            "presenced_hub_reachable",
            "1 if the last poll reached the hub through the leaf link.",
            reachable,
        );
        type Row = fn(&MirrorReading) -> Option<u64>;
        let gauges: [(&str, &str, Row); 4] = [
            (
                "presenced_mirror_lag_messages",
                "Messages the leaf holds that the hub mirror lacks.",
                |h| h.lag_messages,
            ),
            (
                "presenced_mirror_lag_milliseconds",
                "Age of the leaf's newest message minus the mirror's newest, when behind.",
                |h| h.lag_seconds.map(|s| (s * 1000.0) as u64),
            ),
            (
                "presenced_mirror_last_contact_milliseconds",
                "Time since the hub last heard from the mirror's source.",
                |h| h.last_contact_seconds.map(|s| (s * 1000.0) as u64),
            ),
            (
                "presenced_mirror_stalled",
                "1 while the mirror makes no progress and the leaf has more.",
                |h| Some(u64::from(h.is_stalled())),
            ),
        ];
        for (name, help, value) in gauges {
            let family = gauge_family();
            for h in &m.report {
                if let Some(v) = value(h) {
                    family
                        .get_or_create(&labels(&[("mirror", &h.mirror)]))
                        .set(as_i64(v));
                }
            }
            r.register(name, help, family);
        }
        for (name, help, map) in [
            (
                "presenced_mirror_stalls_total",
                "Stalls of each hub mirror (also logged at WARN).",
                &m.stalls,
            ),
            (
                "presenced_mirror_nudges_total",
                "Times the hub was asked to restart a mirror after its link came back.",
                &m.nudges,
            ),
        ] {
            let family = counter_family();
            for h in &m.report {
                family
                    .get_or_create(&labels(&[("mirror", &h.mirror)]))
                    .inc_by(map.get(&h.mirror).copied().unwrap_or(0));
            }
            r.register(counter_name(name), help, family);
        }
    }

    /// Hub mirrors are a detail, not the daemon's own health: a stalled
    /// mirror is reported here but does not make the answer 503.
    fn health(&self) -> Option<(&'static str, serde_json::Value)> {
        let mirrors = self.mirrors();
        if !mirrors.watched {
            return None;
        }
        let stalled = mirrors.report.iter().filter(|h| h.is_stalled()).count();
        Some((
            "hub",
            serde_json::json!({
                "reachable": mirrors.hub_reachable,
                "mirrors_stalled": stalled,
                "mirrors": mirrors.report,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::Arc;

    #[test]
    fn renders_hub_mirrors_only_when_watched() {
        let registry = Metrics::default();
        let m = Arc::new(HubMetrics::default());
        registry.add_collector(m.clone());
        assert!(!registry.render().contains("presenced_mirror"));
        m.set_mirrors(
            true,
            vec![MirrorReading {
                mirror: "SENSORS-home".into(),
                state: "stalled",
                lag_messages: Some(12),
                lag_seconds: Some(1.5),
                last_contact_seconds: None,
                error: Some("hub: timed out".into()),
            }],
        );
        m.mirror_event("SENSORS-home", MirrorEvent::Stall);
        let text = registry.render();
        for line in [
            "presenced_hub_reachable 1\n",
            "presenced_mirror_lag_messages{mirror=\"SENSORS-home\"} 12\n",
            "presenced_mirror_lag_milliseconds{mirror=\"SENSORS-home\"} 1500\n",
            "presenced_mirror_stalled{mirror=\"SENSORS-home\"} 1\n",
            "presenced_mirror_stalls_total{mirror=\"SENSORS-home\"} 1\n",
            "presenced_mirror_nudges_total{mirror=\"SENSORS-home\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("last_contact_milliseconds{"),
            "unknown values are left out"
        );
    }

    #[test]
    fn a_stall_is_counted_where_it_is_logged() {
        let m = HubMetrics::default();
        let mirror = "SENSORS-home";
        crate::emit!(MIRROR_STALLED, m.counter(mirror, MirrorEvent::Stall); mirror = %mirror, lag_messages = ?Some(3));
        assert_eq!(m.mirrors().stalls.get("SENSORS-home"), Some(&1));
    }
}
