//! Counters and gauges of the daemon, rendered in Prometheus text format.
//!
//! Plain atomics in one struct rather than a metrics framework: the set is
//! small and fixed, and every hot path only pays a relaxed increment.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Everything `/metrics` reports. Shared as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub observations_in: AtomicU64,
    pub observations_stored: AtomicU64,
    pub rejects: AtomicU64,
    pub publish_retries: AtomicU64,
    /// Times a source found the ingest buffer full and had to wait.
    pub buffer_full: AtomicU64,
    pub buffer_depth: AtomicU64,
    pub buffer_capacity: AtomicU64,
    /// Since when ingest has been retrying input the leaf does not store
    /// (timeouts, a frozen or full server), and the last error: a hung
    /// leaf keeps its TCP connection, so `nats_connected` alone misses it.
    pub ingest_stalled: Stall,
    /// Since when the engine has been retrying a commit (transitions to
    /// EVENTS, zone states to KV) the leaf does not take, and why: a full
    /// store refuses writes while the connection stays up.
    pub engine_stalled: Stall,
    /// The newest zone clock (unix ms, 0 before the engine runs). Ahead
    /// of the system clock by more than [`Metrics::clock_ahead_ok_ms`]
    /// means the clock was stepped back: zones keep their clock (time
    /// never runs backwards for a zone), so their timers fire late.
    pub zone_clock_max_ms: AtomicU64,
    /// How far ahead a zone clock may legitimately be: readings may carry
    /// device times up to `ingest.max_clock_skew` ahead.
    pub clock_ahead_ok_ms: AtomicU64,
    pub engine_observations: AtomicU64,
    pub engine_redeliveries: AtomicU64,
    pub kv_writes: AtomicU64,
    pub kv_conflicts: AtomicU64,
    pub transitions: AtomicU64,
    pub consumer_pending: AtomicU64,
    pub zones_occupied: AtomicU64,
    pub zones: AtomicU64,
    pub nats_connected: AtomicBool,
    pub nats_reconnects: AtomicU64,
    /// Operations nats-server refused for lack of permission.
    pub permission_violations: AtomicU64,
    pub mqtt_connected: AtomicU64,
    /// Serial sources whose device is open.
    pub serial_connected: AtomicU64,
    /// LD2410 input rejected, by reason (indexed like
    /// `sources::ld2410::RejectKind::ALL`).
    pub serial_frame_rejects: [AtomicU64; 6],
    pub ready: AtomicBool,
    /// The archiver runs (`[archive]` configured).
    pub archive_enabled: AtomicBool,
    pub archive_snapshots: AtomicU64,
    pub archive_snapshot_failures: AtomicU64,
    pub archive_uploads: AtomicU64,
    pub archive_uploaded_bytes: AtomicU64,
    pub archive_upload_failures: AtomicU64,
    pub archive_verify_failures: AtomicU64,
    /// Snapshots whose upload is not yet verified.
    pub archive_pending: AtomicU64,
    /// False after an upload failed for a reason other than verification,
    /// true again after one succeeds.
    pub archive_s3_ok: AtomicBool,
    pub archive_pruned_local: AtomicU64,
    pub archive_pruned_remote: AtomicU64,
    /// Unix seconds of the newest snapshot and the last verified upload.
    pub archive_last_snapshot_seconds: AtomicU64,
    pub archive_last_upload_seconds: AtomicU64,
    /// The holder's view of its lease in KV `owners`.
    pub lease_held: AtomicBool,
    /// The engine's leader lease (store::leader): active or standby,
    /// since when, who holds it; and how often this instance took it.
    pub engine_role: std::sync::RwLock<Option<crate::store::leader::Role>>,
    pub engine_active: AtomicBool,
    pub engine_takeovers: AtomicU64,
    /// Hub mirror health, when `[hub]` is configured.
    pub mirrors: std::sync::RwLock<Mirrors>,
    /// Every supervised component and its state.
    pub components: std::sync::Arc<crate::supervise::Registry>,
    /// Link state of each source, refreshed every second.
    pub sources: std::sync::RwLock<Vec<SourceHealth>>,
    /// The components this instance runs (`ingest`, `engine`, ...); empty
    /// when not set by a daemon (then every family is rendered).
    pub runs: std::sync::RwLock<Vec<String>>,
    /// Whether MQTT / serial sources are configured: their families are
    /// left out otherwise.
    pub mqtt_configured: AtomicBool,
    pub serial_configured: AtomicBool,
    /// Every serial source's own counters, rendered with `source` and
    /// `device` labels (see `sources::serial::render_port_metrics`).
    pub serial_ports: std::sync::RwLock<Vec<crate::sources::serial::PortMetrics>>,
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

/// Families of the ingest component (sources included).
const INGEST_FAMILIES: &[&str] = &[
    "presenced_observations_received_total",
    "presenced_observations_stored_total",
    "presenced_rejects_total",
    "presenced_publish_retries_total",
    "presenced_ingest_buffer_full_total",
    "presenced_ingest_buffer_depth",
    "presenced_ingest_buffer_capacity",
];

/// Families of the engine component.
const ENGINE_FAMILIES: &[&str] = &[
    "presenced_engine_observations_total",
    "presenced_engine_redeliveries_total",
    "presenced_kv_writes_total",
    "presenced_kv_conflicts_total",
    "presenced_engine_active",
    "presenced_engine_takeovers_total",
    "presenced_transitions_total",
    "presenced_consumer_pending",
    "presenced_zones",
    "presenced_zones_occupied",
];

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

/// The last reading of the site's hub mirrors and what happened to them.
#[derive(Debug, Default, Clone)]
pub struct Mirrors {
    /// Whether `[hub]` is configured (nothing is rendered otherwise).
    pub watched: bool,
    /// Whether the last poll reached the hub through the leaf link.
    pub hub_reachable: bool,
    pub report: Vec<crate::hub::health::Health>,
    /// Stalls and nudges per mirror, since start.
    pub stalls: std::collections::BTreeMap<String, u64>,
    pub nudges: std::collections::BTreeMap<String, u64>,
}

/// Things that happen to a hub mirror and are counted.
#[derive(Debug, Clone, Copy)]
pub enum MirrorEvent {
    Stall,
    Nudge,
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

    fn render_components(&self, out: &mut String) {
        let comps = self.components.snapshot();
        if !comps.is_empty() {
            let name = "presenced_component_up";
            let _ = writeln!(
                out,
                "# HELP {name} 1 while the component runs (0 starting, stopped or failed).\n# TYPE {name} gauge"
            );
            for (c, h) in &comps {
                let up = u64::from(h.state == crate::supervise::State::Running);
                let _ = writeln!(out, "{name}{{component=\"{c}\"}} {up}");
            }
            let name = "presenced_component_failures_total";
            let _ = writeln!(
                out,
                "# HELP {name} Unexpected ends of the component (also logged at ERROR).\n# TYPE {name} counter"
            );
            for (c, h) in &comps {
                let _ = writeln!(out, "{name}{{component=\"{c}\"}} {}", h.failures);
            }
        }
        let sources = self.source_health();
        if !sources.is_empty() {
            let name = "presenced_source_up";
            let _ = writeln!(
                out,
                "# HELP {name} 1 while the source's link (broker connection, device) is up.\n# TYPE {name} gauge"
            );
            for s in &sources {
                let _ = writeln!(out, "{name}{{source=\"{}\"}} {}", s.name, u64::from(s.up));
            }
            let name = "presenced_source_last_reading_age_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} Seconds since the source's last reading.\n# TYPE {name} gauge"
            );
            for s in &sources {
                if let Some(age) = s.last_reading_seconds {
                    let _ = writeln!(out, "{name}{{source=\"{}\"}} {age:.1}", s.name);
                }
            }
        }
    }

    fn mirrors_mut(&self) -> std::sync::RwLockWriteGuard<'_, Mirrors> {
        self.mirrors.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the hub mirror health.
    pub fn mirrors(&self) -> Mirrors {
        self.mirrors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a stall or nudge of `mirror`.
    pub fn mirror_event(&self, mirror: &str, event: MirrorEvent) {
        let mut m = self.mirrors_mut();
        let map = match event {
            MirrorEvent::Stall => &mut m.stalls,
            MirrorEvent::Nudge => &mut m.nudges,
        };
        *map.entry(mirror.to_owned()).or_default() += 1;
    }

    /// Stores the latest reading of every mirror.
    pub fn set_mirrors(&self, hub_reachable: bool, report: Vec<crate::hub::health::Health>) {
        let mut m = self.mirrors_mut();
        m.watched = true;
        m.hub_reachable = hub_reachable;
        m.report = report;
    }

    /// Registers a serial source so `/metrics` shows its port's counters.
    pub fn add_serial_port(&self, port: crate::sources::serial::PortMetrics) {
        self.serial_ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(port);
    }

    fn render_mirrors(&self, out: &mut String) {
        let m = self.mirrors();
        if !m.watched {
            return;
        }
        let _ = writeln!(
            out,
            "# HELP presenced_hub_reachable 1 if the last poll reached the hub through the leaf link.\n# TYPE presenced_hub_reachable gauge\npresenced_hub_reachable {}",
            u64::from(m.hub_reachable)
        );
        type Row = fn(&crate::hub::health::Health) -> Option<u64>;
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
                |h| Some(u64::from(h.state == crate::hub::health::State::Stalled)),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for h in &m.report {
                if let Some(v) = value(h) {
                    let _ = writeln!(out, "{name}{{mirror=\"{}\"}} {v}", h.mirror);
                }
            }
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
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for h in &m.report {
                let _ = writeln!(
                    out,
                    "{name}{{mirror=\"{}\"}} {}",
                    h.mirror,
                    map.get(&h.mirror).copied().unwrap_or(0)
                );
            }
        }
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let flag = |a: &AtomicBool| u64::from(a.load(Ordering::Relaxed));
        let rows: &[(&str, &str, &str, u64)] = &[
            (
                "presenced_observations_received_total",
                "counter",
                "Observations received from sources.",
                get(&self.observations_in),
            ),
            (
                "presenced_observations_stored_total",
                "counter",
                "Observations acknowledged by stream SENSORS.",
                get(&self.observations_stored),
            ),
            (
                "presenced_rejects_total",
                "counter",
                "Inputs rejected into stream REJECTED.",
                get(&self.rejects),
            ),
            (
                "presenced_publish_retries_total",
                "counter",
                "JetStream publishes retried after a failure.",
                get(&self.publish_retries),
            ),
            (
                "presenced_ingest_buffer_full_total",
                "counter",
                "Times a source waited because the ingest buffer was full.",
                get(&self.buffer_full),
            ),
            (
                "presenced_ingest_buffer_depth",
                "gauge",
                "Observations waiting in the ingest buffer.",
                get(&self.buffer_depth),
            ),
            (
                "presenced_ingest_buffer_capacity",
                "gauge",
                "Size of the ingest buffer.",
                get(&self.buffer_capacity),
            ),
            (
                "presenced_engine_observations_total",
                "counter",
                "Observations applied by the engine.",
                get(&self.engine_observations),
            ),
            (
                "presenced_engine_redeliveries_total",
                "counter",
                "Redelivered observations skipped as already applied.",
                get(&self.engine_redeliveries),
            ),
            (
                "presenced_kv_writes_total",
                "counter",
                "Compare-and-set writes to KV presence and debounce.",
                get(&self.kv_writes),
            ),
            (
                "presenced_kv_conflicts_total",
                "counter",
                "KV writes refused for a stale revision.",
                get(&self.kv_conflicts),
            ),
            (
                "presenced_engine_active",
                "gauge",
                "1 while this instance holds the engine's leader lease and runs the engine; 0 on a standby.",
                flag(&self.engine_active),
            ),
            (
                "presenced_engine_takeovers_total",
                "counter",
                "Times this instance took the engine's leader lease.",
                get(&self.engine_takeovers),
            ),
            (
                "presenced_transitions_total",
                "counter",
                "Zone state transitions published to EVENTS.",
                get(&self.transitions),
            ),
            (
                "presenced_consumer_pending",
                "gauge",
                "Observations in SENSORS not yet applied by the engine.",
                get(&self.consumer_pending),
            ),
            (
                "presenced_zones",
                "gauge",
                "Zones configured.",
                get(&self.zones),
            ),
            (
                "presenced_zones_occupied",
                "gauge",
                "Zones currently occupied or leaving.",
                get(&self.zones_occupied),
            ),
            (
                "presenced_nats_connected",
                "gauge",
                "1 while connected to the leaf nats-server.",
                flag(&self.nats_connected),
            ),
            (
                "presenced_nats_reconnects_total",
                "counter",
                "Connections to the leaf nats-server after the first.",
                get(&self.nats_reconnects),
            ),
            (
                "presenced_permission_violations_total",
                "counter",
                "Publishes and subscriptions nats-server refused for lack of permission.",
                get(&self.permission_violations),
            ),
            (
                "presenced_mqtt_connected",
                "gauge",
                "MQTT sources currently connected.",
                get(&self.mqtt_connected),
            ),
            (
                "presenced_serial_connected",
                "gauge",
                "Serial sources whose device is open.",
                get(&self.serial_connected),
            ),
            (
                "presenced_lease_held",
                "gauge",
                "1 while this service's lease in KV owners is held (last renewal younger than lease.ttl).",
                flag(&self.lease_held),
            ),
            (
                "presenced_ready",
                "gauge",
                "1 once state is rehydrated and the consumer is bound.",
                flag(&self.ready),
            ),
            (
                "presenced_archive_snapshots_total",
                "counter",
                "Snapshots written to object store snapshots.",
                get(&self.archive_snapshots),
            ),
            (
                "presenced_archive_snapshot_failures_total",
                "counter",
                "Scheduled snapshots that failed.",
                get(&self.archive_snapshot_failures),
            ),
            (
                "presenced_archive_uploads_total",
                "counter",
                "Snapshots PUT to S3 and verified.",
                get(&self.archive_uploads),
            ),
            (
                "presenced_archive_uploaded_bytes_total",
                "counter",
                "Bytes of snapshots PUT to S3 and verified.",
                get(&self.archive_uploaded_bytes),
            ),
            (
                "presenced_archive_upload_failures_total",
                "counter",
                "Upload attempts that failed (retried with backoff).",
                get(&self.archive_upload_failures),
            ),
            (
                "presenced_archive_verify_failures_total",
                "counter",
                "Remote copies whose size or sha256 did not match.",
                get(&self.archive_verify_failures),
            ),
            (
                "presenced_archive_pending",
                "gauge",
                "Snapshots waiting for a verified upload.",
                get(&self.archive_pending),
            ),
            (
                "presenced_archive_s3_ok",
                "gauge",
                "0 while uploads fail for reasons other than verification.",
                flag(&self.archive_s3_ok),
            ),
            (
                "presenced_archive_pruned_local_total",
                "counter",
                "Snapshots pruned from the object store.",
                get(&self.archive_pruned_local),
            ),
            (
                "presenced_archive_pruned_remote_total",
                "counter",
                "Snapshots pruned from S3.",
                get(&self.archive_pruned_remote),
            ),
            (
                "presenced_archive_last_snapshot_timestamp_seconds",
                "gauge",
                "Unix time of the newest snapshot.",
                get(&self.archive_last_snapshot_seconds),
            ),
            (
                "presenced_archive_last_upload_timestamp_seconds",
                "gauge",
                "Unix time of the last verified upload.",
                get(&self.archive_last_upload_seconds),
            ),
        ];
        // Families of a component this instance does not run are left out:
        // a zero there would read as "configured and idle".
        let archive = self.archive_enabled.load(Ordering::Relaxed);
        let runs = self.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
        let all = runs.is_empty();
        let on = |c: &str| all || runs.iter().any(|r| r == c);
        let mqtt = all || (on("ingest") && self.mqtt_configured.load(Ordering::Relaxed));
        let serial = all || (on("ingest") && self.serial_configured.load(Ordering::Relaxed));
        let shown = |name: &str| {
            if name.starts_with("presenced_archive_") {
                archive
            } else if INGEST_FAMILIES.contains(&name) {
                on("ingest")
            } else if ENGINE_FAMILIES.contains(&name) {
                on("engine")
            } else if name == "presenced_mqtt_connected" {
                mqtt
            } else if name == "presenced_serial_connected" {
                serial
            } else {
                true
            }
        };
        for &(name, kind, help, value) in rows {
            if !shown(name) {
                continue;
            }
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let name = "presenced_serial_frame_rejects_total";
        if !serial {
            self.render_mirrors(&mut out);
            self.render_components(&mut out);
            return out;
        }
        let _ = writeln!(
            out,
            "# HELP {name} LD2410 input rejected, by reason.\n# TYPE {name} counter"
        );
        for (kind, n) in crate::sources::ld2410::RejectKind::ALL
            .iter()
            .zip(&self.serial_frame_rejects)
        {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", kind.label(), get(n));
        }
        self.render_mirrors(&mut out);
        self.render_components(&mut out);
        crate::sources::serial::render_port_metrics(
            &self.serial_ports.read().unwrap_or_else(|p| p.into_inner()),
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_hub_mirrors_only_when_watched() {
        use crate::hub::health::{Health, State};
        let m = Metrics::default();
        assert!(!m.render().contains("presenced_mirror"));
        m.set_mirrors(
            true,
            vec![Health {
                mirror: "SENSORS-home".into(),
                state: State::Stalled,
                lag_messages: Some(12),
                lag_seconds: Some(1.5),
                last_contact_seconds: None,
                error: Some("hub: timed out".into()),
            }],
        );
        m.mirror_event("SENSORS-home", MirrorEvent::Stall);
        let text = m.render();
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
    fn renders_prometheus_text() {
        let m = Metrics::default();
        Metrics::add(&m.observations_in, 3);
        let text = m.render();
        assert!(text.contains("# TYPE presenced_observations_received_total counter\npresenced_observations_received_total 3\n"));
        assert!(text.contains("presenced_ready 0\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split(' ');
            let name = parts.next().unwrap();
            assert!(name.starts_with("presenced_"), "{line}");
            if name.contains('{') {
                assert!(name.ends_with("\"}"), "{line}");
            }
            assert!(parts.next().unwrap().parse::<u64>().is_ok(), "{line}");
        }
    }
}
