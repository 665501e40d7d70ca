//! The start of the input side inside the daemon: every configured
//! source, the bounded buffer, ingest into `SENSORS`, and the
//! once-a-second gauges that turn the sources' statuses into metrics and
//! health.

use super::IngestConfig;
use crate::component::Ctx;
use crate::metrics::{counter_name, Collector, Count, Level, Metrics};
use crate::sources::config::{MqttSource, SerialSource};
use crate::sources::{self, Item};
use crate::supervise::config::HealthConfig;
use crate::supervise::{self, Stage, Supervisor};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

pub use crate::base::ownership::Role;

/// The sections the input side reads.
pub struct Sections<'a> {
    pub ingest: &'a IngestConfig,
    pub mqtt: &'a BTreeMap<String, MqttSource>,
    pub serial: &'a BTreeMap<String, SerialSource>,
    pub health: &'a HealthConfig,
}

/// The sources' own gauges, registered by [`start`] when ingest runs: the
/// MQTT and serial families only when such a source is configured (a zero
/// there would read as "configured and down").
#[derive(Debug)]
struct SourceGauges {
    mqtt: Option<Level>,
    /// QoS 1 messages the MQTT sources hold unacknowledged.
    mqtt_unacknowledged: Option<Level>,
    serial: Option<Level>,
    /// Times a source found the ingest buffer full and had to wait.
    buffer_full: Count,
}

impl Collector for SourceGauges {
    fn collect(&self, r: &mut Registry) {
        r.register(
            counter_name("presenced_ingest_buffer_full_total"),
            "Times a source waited because the ingest buffer was full (or an MQTT source held its most unacknowledged messages).",
            self.buffer_full.clone(),
        );
        if let Some(g) = &self.mqtt {
            r.register(
                "presenced_mqtt_connected",
                "MQTT sources currently connected.",
                g.clone(),
            );
        }
        if let Some(g) = &self.mqtt_unacknowledged {
            r.register(
                "presenced_mqtt_unacknowledged",
                "QoS 1 messages the MQTT sources received and have not acknowledged yet (in the ingest buffer or being stored).",
                g.clone(),
            );
        }
        if let Some(g) = &self.serial {
            r.register(
                "presenced_serial_connected",
                "Serial sources whose device is open.",
                g.clone(),
            );
        }
    }
}

/// Name of a source's component: `source.<kind>.<name>`.
fn source_component(kind: &str, name: &str) -> String {
    format!("source.{kind}.{name}")
}

/// One source as the supervisor and the gauge task see it.
struct SourceLink {
    name: String,
    kind: &'static str,
    component: String,
    connected: Probe,
}

/// Reads a source's status: (link up, connections so far, readings so far).
type Probe = Arc<dyn Fn() -> (bool, u64, u64) + Send + Sync>;

/// The started input side, as READY sees it.
pub struct Inputs {
    links: Vec<SourceLink>,
    gauges: Arc<Gauges>,
    track: Arc<Mutex<Vec<LinkTrack>>>,
}

impl Inputs {
    /// Whether every source has started: connected once, or running
    /// without failure once `waited` (`health.source_start_wait` passed:
    /// a broker down at boot is reported by health, it does not hold the
    /// unit). A source that has started is marked running.
    pub fn started(&self, sup: &Supervisor, waited: bool) -> bool {
        let components = sup.registry();
        let mut started = true;
        for l in &self.links {
            let (_, connects, _) = (l.connected)();
            if !sup.is_running(&l.component) {
                started = false;
            } else if connects > 0 || waited {
                components.running(&l.component);
            } else {
                started = false;
            }
        }
        started
    }

    /// Refreshes the gauges now (just before READY, so health never lags
    /// what READY claims).
    pub fn refresh(&self) {
        self.gauges
            .refresh(&mut self.track.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// How many sources run.
    pub fn sources(&self) -> usize {
        self.links.len()
    }
}

/// Starts ingest (component `ingest`) and every source of `s` (components
/// `source.<kind>.<name>`, all essential) when `on`, and the gauge task
/// (component `gauges`) in any case; registers their metrics. Sources →
/// bounded buffer → ingest → `SENSORS`.
pub fn start(
    ctx: &mut Ctx<'_>,
    s: Sections<'_>,
    on: bool,
    role: watch::Receiver<Role>,
    fence: crate::store::leader::Fence,
) -> Inputs {
    let metrics = ctx.metrics.clone();
    let components = ctx.sup.registry();
    let source_links = Arc::new(super::metrics::SourceLinks::default());
    metrics.register(source_links.clone());
    let own = Arc::new(SourceGauges {
        mqtt: (!s.mqtt.is_empty()).then(Level::default),
        mqtt_unacknowledged: (!s.mqtt.is_empty()).then(Level::default),
        serial: (!s.serial.is_empty()).then(Level::default),
        buffer_full: Count::default(),
    });
    if on {
        metrics.add_collector(own.clone());
    }
    let mut links: Vec<SourceLink> = Vec::new();
    let mut mqtt_statuses = Vec::new();
    let mut serial_statuses = Vec::new();
    if on {
        let counts = Arc::new(super::metrics::IngestMetrics::default());
        Metrics::set(&counts.buffer_capacity, s.ingest.buffer as u64);
        metrics.register(counts.clone());
        let (tx, rx) = mpsc::channel::<Item>(s.ingest.buffer.max(1));
        {
            let (js, site, m) = (ctx.js.clone(), ctx.site.clone(), counts);
            let (max, every) = (s.ingest.max_in_flight, s.ingest.reject_log_every);
            let gate = super::Gate {
                fence,
                role: role.clone(),
            };
            // Ingest ends when every source has dropped its sender: it is
            // stopped by the sources stage, not by a token of its own.
            ctx.sup.spawn("ingest", Stage::Ingest, true, async move {
                super::run(js, site, max, every, rx, m, Some(gate)).await;
                Ok(())
            });
            components.running("ingest");
        }
        for (name, src) in s.mqtt {
            let status = Arc::new(sources::mqtt::MqttStatus::default());
            let client_id = src
                .client_id
                .clone()
                .unwrap_or_else(|| format!("presenced-{}-{name}", ctx.site));
            let component = source_component("mqtt", name);
            let rules = sources::mqtt::DecodeRules {
                strict: s.ingest.strict_topics,
                max_clock_skew: s.ingest.max_clock_skew,
            };
            let (js, site) = (ctx.js.clone(), ctx.site.clone());
            let (name_, src_, tx_, status_) =
                (name.clone(), src.clone(), tx.clone(), status.clone());
            // A new lookup each tenure: its reader starts from SENSORS as
            // the previous holder left it.
            let fut = led(
                "mqtt",
                name.clone(),
                role.clone(),
                ctx.sup.stop_flag(Stage::Sources),
                move |stop| {
                    sources::mqtt::run(
                        name_.clone(),
                        src_.clone(),
                        client_id.clone(),
                        sources::mqtt::RunOptions {
                            rules,
                            stored: Some(
                                super::StoredDeliveries::new(js.clone(), site.clone()).lookup(),
                            ),
                        },
                        tx_.clone(),
                        status_.clone(),
                        stop,
                    )
                },
            );
            ctx.sup.spawn(&component, Stage::Sources, true, async move {
                fut.await.map_err(supervise::classify)
            });
            let st = status.clone();
            links.push(SourceLink {
                name: name.clone(),
                kind: "mqtt",
                component,
                connected: Arc::new(move || {
                    (
                        st.connected.load(Ordering::Relaxed),
                        st.connects.load(Ordering::Relaxed),
                        st.received.load(Ordering::Relaxed),
                    )
                }),
            });
            mqtt_statuses.push(status);
        }
        let ports = Arc::new(sources::serial::Ports::default());
        if !s.serial.is_empty() {
            metrics.add_collector(ports.clone());
        }
        for (name, src) in s.serial {
            let status = Arc::new(sources::serial::SerialStatus::default());
            let component = source_component("serial", name);
            let (name_, src_, tx_, status_) =
                (name.clone(), src.clone(), tx.clone(), status.clone());
            let skew = s.ingest.max_clock_skew;
            // One device, one reader: a standby does not open it.
            let fut = led(
                "serial",
                name.clone(),
                role.clone(),
                ctx.sup.stop_flag(Stage::Sources),
                move |stop| {
                    sources::serial::run(
                        name_.clone(),
                        src_.clone(),
                        skew,
                        tx_.clone(),
                        status_.clone(),
                        stop,
                    )
                },
            );
            ports.add(sources::serial::PortMetrics::new(
                name,
                &src.device,
                &status,
            ));
            ctx.sup.spawn(&component, Stage::Sources, true, async move {
                fut.await.map_err(supervise::classify)
            });
            let st = status.clone();
            links.push(SourceLink {
                name: name.clone(),
                kind: "serial",
                component,
                connected: Arc::new(move || {
                    (
                        st.connected.load(Ordering::Relaxed),
                        st.connects.load(Ordering::Relaxed),
                        st.observations.load(Ordering::Relaxed),
                    )
                }),
            });
            serial_statuses.push(status);
        }
        drop(tx);
    }
    let stop = ctx.sup.token(Stage::Work);
    let gauges = Arc::new(Gauges {
        links: links
            .iter()
            .map(|l| (l.name.clone(), l.kind, l.connected.clone()))
            .collect(),
        mqtt: mqtt_statuses,
        serial: serial_statuses,
        source_links,
        own,
        grace: s.health.source_grace,
        role: on.then_some(role),
    });
    let track = Arc::new(Mutex::new(gauges.track()));
    {
        let (gauges, track) = (gauges.clone(), track.clone());
        ctx.sup.spawn("gauges", Stage::Work, false, async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                gauges.refresh(&mut track.lock().unwrap_or_else(|p| p.into_inner()));
            }
        });
    }
    components.running("gauges");
    Inputs {
        links,
        gauges,
        track,
    }
}

/// Runs a source on the instance that holds the service's leader lease:
/// two instances of one service share its ingest as active and standby,
/// so one service has one reader of each broker session and device and
/// each reading is stored once. Sources wait, connected to nothing, until
/// the election has said something, and while another instance that runs
/// ingest holds the lease ([`Role::runs_sources`]). They stop when such an
/// instance is seen holding it (a takeover), not when this instance's own
/// renewals merely lapse: a lone instance cut from its leaf keeps reading
/// into its buffer, as before there were pairs. A holder running the
/// engine alone (a standby declared for the engine only) leaves the
/// reading to the instances that run ingest. On stopping, an
/// MQTT session stays with the broker, which keeps unacknowledged QoS 1
/// messages for the next holder under the same client id. Returns when
/// `stop` turns true, or with the source's own error.
async fn led<F, Fut, E>(
    kind: &'static str,
    name: String,
    mut role: watch::Receiver<Role>,
    mut stop: watch::Receiver<bool>,
    mut run: F,
) -> Result<(), E>
where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    loop {
        if role.borrow().since.is_none() {
            // The election's first answer comes within a round trip.
            tokio::select! {
                r = role.wait_for(|r| r.since.is_some()) => if r.is_err() { return Ok(()) },
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
        if !role.borrow().runs_sources() {
            let holder = role.borrow().holder.clone().unwrap_or_default();
            tracing::info!(source = %name, kind, %holder, "source standing by: this service's ingest is shared with another instance, which holds the lease and reads; this one starts when it takes the lease");
            tokio::select! {
                r = role.wait_for(Role::runs_sources) => if r.is_err() { return Ok(()) },
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
        if role.borrow().active {
            tracing::info!(source = %name, kind, "source started: this instance holds the service's lease and runs its ingest; other instances of the service stand by");
        } else {
            tracing::info!(source = %name, kind, "source started: the instance holding the service's lease does not run ingest (or none is seen holding it), so this one reads");
        }
        let (tx, rx) = watch::channel(false);
        let mut role_now = role.clone();
        let mut stop_now = stop.clone();
        let watcher = async move {
            tokio::select! {
                _ = role_now.wait_for(Role::another_runs_ingest) => {}
                _ = stop_now.wait_for(|s| *s) => {}
            }
            let _ = tx.send(true);
            // Keep the sender alive until the source has returned.
            std::future::pending::<()>().await
        };
        // The source sees `stop` through `rx` and returns on its own,
        // disconnecting cleanly.
        tokio::select! {
            r = run(rx) => r?,
            _ = watcher => {}
        }
        if *stop.borrow() {
            return Ok(());
        }
        if role.borrow().another_runs_ingest() {
            let holder = role.borrow().holder.clone().unwrap_or_default();
            tracing::warn!(source = %name, kind, %holder, "source stopped: another instance took the service's lease and runs its ingest; standing by");
        }
    }
}

/// The once-a-second gauges: MQTT/serial counts, buffer waits, LD2410
/// rejects, and each source's link state for health.
struct Gauges {
    links: Vec<(String, &'static str, Probe)>,
    mqtt: Vec<Arc<sources::mqtt::MqttStatus>>,
    serial: Vec<Arc<sources::serial::SerialStatus>>,
    source_links: Arc<super::metrics::SourceLinks>,
    own: Arc<SourceGauges>,
    grace: Duration,
    /// The lease's role while ingest runs: a standby's sources are down
    /// by design, not degraded.
    role: Option<watch::Receiver<Role>>,
}

/// Per link: when it went down (start counts as down), and the reading
/// count with the instant it last moved.
struct LinkTrack {
    down_since: Option<tokio::time::Instant>,
    last: (u64, Option<tokio::time::Instant>),
}

impl Gauges {
    /// Refreshes every gauge and the source links from the statuses;
    /// called every second and once more just before READY, so health
    /// never lags what READY claims.
    fn refresh(&self, track: &mut [LinkTrack]) {
        let now = tokio::time::Instant::now();
        let mut health = Vec::with_capacity(self.links.len());
        let standby = self
            .role
            .as_ref()
            .is_some_and(|r| r.borrow().another_runs_ingest());
        for ((name, kind, probe), t) in self.links.iter().zip(track.iter_mut()) {
            let (up, _, readings) = probe();
            match (up || standby, t.down_since) {
                (true, _) => t.down_since = None,
                (false, None) => t.down_since = Some(now),
                (false, Some(_)) => {}
            }
            if readings != t.last.0 {
                t.last = (readings, Some(now));
            }
            let down = t.down_since.map(|d| now - d);
            health.push(super::metrics::SourceHealth {
                name: name.clone(),
                kind: (*kind).to_owned(),
                up,
                down_seconds: down.map(|d| d.as_secs_f64()),
                last_reading_seconds: t.last.1.map(|l| (now - l).as_secs_f64()),
                readings,
                degraded: down.is_some_and(|d| d >= self.grace),
            });
        }
        self.source_links.set(health);
        let up = self
            .mqtt
            .iter()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .count();
        if let Some(g) = &self.own.mqtt {
            Metrics::set(g, up as u64);
        }
        if let Some(g) = &self.own.mqtt_unacknowledged {
            let held: u64 = self
                .mqtt
                .iter()
                .map(|s| s.unacknowledged.load(Ordering::Relaxed))
                .sum();
            Metrics::set(g, held);
        }
        let full: u64 = self
            .mqtt
            .iter()
            .map(|s| s.buffer_full.load(Ordering::Relaxed))
            .sum();
        Metrics::set(&self.own.buffer_full, full);
        let open = self
            .serial
            .iter()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .count();
        if let Some(g) = &self.own.serial {
            Metrics::set(g, open as u64);
        }
    }

    fn track(&self) -> Vec<LinkTrack> {
        let start = tokio::time::Instant::now();
        self.links
            .iter()
            .map(|_| LinkTrack {
                down_since: Some(start),
                last: (0, None),
            })
            .collect()
    }
}
