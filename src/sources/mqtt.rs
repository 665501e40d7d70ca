//! MQTT source: subscribes to the configured topics and turns each publish
//! into [`Item`]s for ingest.
//!
//! Delivery is at-least-once end to end: the session is persistent
//! (`clean_session = false`) and the PUBACK is sent only when ingest fires
//! the item's [`Ack`], i.e. once the observation is stored in JetStream.
//! Until then the broker keeps the message and redelivers it after a crash
//! or a lost connection.
//!
//! Ids (`Nats-Msg-Id` in `SENSORS`) identify one delivery, not the
//! content: sensors repeat the same payload (`ON`, `ON`, ...) and each
//! repeat is a reading. A first delivery gets a new id
//! ([`crate::observation::delivery_id`]). Only a QoS 1 redelivery (DUP
//! flag) must not be stored twice, and it gets the id of its first
//! delivery: from memory when this process handed that delivery to ingest,
//! else from `SENSORS`, where every QoS 1 reading carries the header
//! `Presenced-Delivery` (source, packet id, hash of topic and payload,
//! index); a redelivery whose readings are all found there was stored
//! before a crash and is only acknowledged. Packet ids alone are not
//! unique (QoS 0 uses 0; the broker reuses an id once it is acknowledged
//! and after a reconnect); with the content hash they name one
//! unacknowledged message, which is all a redelivery can be.
//!
//! Brokers differ in when they redeliver: Mosquitto resends unacked
//! messages when the session resumes; nats-server's MQTT listener resends
//! them after its `mqtt.ack_wait` (30 s by default), on a live connection
//! too. Both keep the packet id. Retained messages are skipped unless the
//! mapping reads a device timestamp: their age is unknown.
//!
//! Payloads up to MQTT's maximum are read (a smaller client limit drops the
//! connection and the broker redelivers the same message forever); those
//! over `max_payload` are acknowledged and kept in `REJECTED`.
//!
//! [`decode`] is the pure part (topic and payload to observations or
//! rejections); [`run`] is the connection loop around it.

use crate::base::backoff::Backoff;
use crate::metrics::Event as TelemetryEvent;
use crate::observation::{input_id, Observation, OBSERVATION_SCHEMA};
use crate::sources::config::{MqttSource, Zigbee2MqttKind};
use crate::sources::espresense::{Espresense, Outcome};
use crate::sources::payload::{
    check_device_time, extract_timestamp, extract_value, PayloadError, ValueSelector,
};
use crate::sources::topic::{SensorTemplate, TopicError, TopicFilter};
use crate::sources::{Ack, Item, Rejected};
use crate::time::Timestamp;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// MQTT's largest packet (the remaining length is at most 268,435,455
/// bytes): rumqttc drops the connection on a bigger incoming packet, and
/// the broker would then redeliver the same QoS 1 message forever. Sizes
/// are policed by `max_payload` after reading instead.
pub const MQTT_MAX_PACKET: usize = 268_435_455;
/// Outgoing packets are subscribes, acks and pings.
const OUTGOING_MAX_PACKET: usize = 64 * 1024;
/// Bytes of an oversized payload kept in its `REJECTED` record.
pub const OVERSIZED_HEAD: usize = 1024;
/// How long a connection must stay up before the reconnect backoff starts
/// over: a broker that accepts and then drops each connection (a bad
/// message, an ACL kick) must not be hammered at the shortest delay.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Requests (acks, subscribes) queued for the event loop. Acks that find
/// it full wait in the connection's own queue ([`AckQueue`]) and are
/// handed on as it empties.
const REQUEST_CAPACITY: usize = 4096;
/// Most QoS 1 messages a source holds unacknowledged (in the ingest
/// buffer or being stored) before it stops reading from the broker; it
/// reads again once fewer than [`UNACKED_RESUME`] are held. The broker's
/// in-flight window should keep it lower, but the one measured here did
/// not always (Mosquitto 2.0 with `max_inflight_messages 1000` left the
/// daemon holding 61,000 under a saturating publisher), and every message
/// held is memory on the edge host that the broker would otherwise hold.
/// Four ingest batches of the default `max_in_flight`: enough to keep
/// ingest busy.
pub const UNACKED_MAX: u64 = 4096;
/// See [`UNACKED_MAX`].
const UNACKED_RESUME: u64 = UNACKED_MAX / 2;
/// Most publishes read and parked while the source waits on ingest (see
/// `Connection::keep_alive_until`): raw messages, a few hundred bytes each
/// for sensor payloads.
const PARK_MAX: usize = UNACKED_MAX as usize;
/// First reconnect delay; doubles up to `reconnect_max`.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Least time between two "ingest is behind" warnings.
const BUFFER_FULL_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a clean disconnect may take on shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One topic filter, the sensor it feeds and where its value is.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub filter: TopicFilter,
    pub sensor: SensorTemplate,
    pub value: ValueSelector,
    /// The device's own timestamp; absent means the receive time.
    pub timestamp: Option<ValueSelector>,
}

/// Builds the mappings of one source: explicit topics first, then the
/// Zigbee2MQTT devices. Several mappings may share a topic (one device
/// reporting occupancy and illuminance in one payload): the topic is
/// subscribed once and every mapping of it reads the message. The same
/// topic mapped twice to the same sensor is refused: the second would be
/// dead config.
pub fn compile_mappings(cfg: &MqttSource) -> Result<Vec<Mapping>, TopicError> {
    let mut out: Vec<(String, Mapping)> = Vec::new();
    for (i, t) in cfg.topics.iter().enumerate() {
        let at = format!("topics[{i}]");
        let filter = TopicFilter::parse(&t.filter).map_err(|e| e.at(format!("{at}.filter")))?;
        let sensor = SensorTemplate::parse(&t.sensor, filter.wildcards())
            .map_err(|e| e.at(format!("{at}.sensor")))?;
        let mapping = Mapping {
            filter,
            sensor,
            value: ValueSelector::parse(t.value.as_deref()),
            timestamp: t
                .timestamp
                .as_deref()
                .map(|s| ValueSelector::parse(Some(s))),
        };
        push_unique(&mut out, at, mapping)?;
    }
    if let Some(z) = &cfg.zigbee2mqtt {
        for (i, d) in z.devices.iter().enumerate() {
            let at = format!("zigbee2mqtt.devices[{i}]");
            for (what, text) in [("base_topic", &z.base_topic), ("device", &d.device)] {
                if text.is_empty() || text.contains(['+', '#']) {
                    return Err(TopicError::Template {
                        template: text.clone(),
                        reason: format!(
                            "Zigbee2MQTT {what} must be non-empty and contain no `+` or `#`"
                        ),
                    }
                    .at(at));
                }
            }
            let filter = TopicFilter::parse(&format!("{}/{}", z.base_topic, d.device))
                .map_err(|e| e.at(format!("{at}.device")))?;
            let sensor = match &d.sensor {
                Some(s) => SensorTemplate::parse(s, 0).map_err(|e| e.at(format!("{at}.sensor")))?,
                None => SensorTemplate::parse(&d.device, 0).map_err(|_| {
                    TopicError::Template {
                        template: d.device.clone(),
                        reason: "the device name is not a valid sensor id \
                                 ([a-z0-9_-], 1 to 64 characters); set `sensor`"
                            .into(),
                    }
                    .at(format!("{at}.sensor"))
                })?,
            };
            let pointer = match d.kind {
                Zigbee2MqttKind::Occupancy => "/occupancy",
                Zigbee2MqttKind::Contact => "/contact",
                Zigbee2MqttKind::Illuminance => "/illuminance",
            };
            let mapping = Mapping {
                filter,
                sensor,
                value: ValueSelector::Pointer(pointer.into()),
                timestamp: None,
            };
            push_unique(&mut out, at, mapping)?;
        }
    }
    Ok(out.into_iter().map(|(_, m)| m).collect())
}

fn push_unique(
    out: &mut Vec<(String, Mapping)>,
    at: String,
    mapping: Mapping,
) -> Result<(), TopicError> {
    if let Some((first, _)) = out.iter().find(|(_, m)| {
        m.filter.as_str() == mapping.filter.as_str() && m.sensor.as_str() == mapping.sensor.as_str()
    }) {
        return Err(TopicError::Template {
            template: mapping.sensor.as_str().to_owned(),
            reason: format!(
                "topic {:?} is already mapped to sensor {:?} by {first}",
                mapping.filter.as_str(),
                mapping.sensor.as_str()
            ),
        }
        .at(at));
    }
    out.push((at, mapping));
    Ok(())
}

/// The filters to subscribe, each once, in mapping order.
pub fn subscriptions(mappings: &[Mapping]) -> Vec<String> {
    let mut seen = HashSet::new();
    mappings
        .iter()
        .map(|m| m.filter.as_str())
        .filter(|f| seen.insert(*f))
        .map(str::to_owned)
        .collect()
}

/// The mappings that read `topic`: every mapping of the first filter that
/// matches it (a specific filter listed before a wildcard one wins), with
/// the levels its wildcards captured.
fn find_mappings<'m, 't>(
    mappings: &'m [Mapping],
    topic: &'t str,
) -> Option<(Vec<&'m Mapping>, Vec<&'t str>)> {
    let (first, caps) = mappings
        .iter()
        .find_map(|m| m.filter.captures(topic).map(|c| (m, c)))?;
    let group = mappings
        .iter()
        .filter(|m| m.filter.as_str() == first.filter.as_str())
        .collect();
    Some((group, caps))
}

/// What [`decode`] checks beyond the mappings.
#[derive(Clone, Copy, Debug)]
pub struct DecodeRules {
    /// Reject messages on subscribed topics that no mapping claims.
    pub strict: bool,
    /// See `ingest.max_clock_skew`.
    pub max_clock_skew: Duration,
}

/// Turns one incoming publish into observations and rejections (one per
/// mapping of its topic); `None` when no mapping claims the topic and
/// `strict` is off.
///
/// Ids are left empty: they identify a delivery, not the content, and
/// the connection assigns them (see [`Connection::assign_ids`]).
///
/// When several mappings read one topic, a mapping whose value is absent
/// from this payload is skipped (Zigbee2MQTT devices report some
/// properties in some messages only); the message is rejected only when
/// no mapping found its value.
pub fn decode(
    source: &str,
    mappings: &[Mapping],
    rules: DecodeRules,
    topic: &str,
    payload: &[u8],
    received_at: Timestamp,
) -> Option<Vec<Result<Observation, Rejected>>> {
    let reject = |reason: String| Rejected {
        source: source.to_owned(),
        origin: format!("mqtt topic {topic}"),
        reason,
        payload: bytes::Bytes::copy_from_slice(payload),
        received_at,
        id: String::new(),
    };
    let Some((group, caps)) = find_mappings(mappings, topic) else {
        if !rules.strict {
            return None;
        }
        let reason = "no mapping for this topic (ingest.strict_topics is on)";
        return Some(vec![Err(reject(reason.into()))]);
    };
    let shared = group.len() > 1;
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for mapping in group {
        let sensor = match mapping.sensor.render(&caps) {
            Ok(s) => s,
            Err(reason) => {
                out.push(Err(reject(reason)));
                continue;
            }
        };
        let value = match extract_value(payload, &mapping.value) {
            Ok(v) => v,
            Err(PayloadError::Missing { at }) if shared => {
                missing.push(at);
                continue;
            }
            Err(e) => {
                out.push(Err(reject(format!("payload: {e}"))));
                continue;
            }
        };
        let observed_at = match &mapping.timestamp {
            None => received_at,
            Some(sel) => match extract_timestamp(payload, sel)
                .map_err(|e| e.to_string())
                .and_then(|t| check_device_time(t, received_at, rules.max_clock_skew))
            {
                Ok(t) => t,
                Err(e) => {
                    out.push(Err(reject(format!("timestamp: {e}"))));
                    continue;
                }
            },
        };
        out.push(Ok(Observation {
            v: OBSERVATION_SCHEMA,
            sensor,
            value,
            observed_at,
            id: String::new(),
            source: source.to_owned(),
            delivery: None,
        }));
    }
    if out.is_empty() {
        out.push(Err(reject(format!(
            "payload: none of {} is present",
            missing.join(", ")
        ))));
    }
    Some(out)
}

/// Counters and state of one MQTT source, read by health and metrics.
#[derive(Debug, Default)]
pub struct MqttStatus {
    /// Whether the broker has accepted the current connection.
    pub connected: AtomicBool,
    /// Successful connections (ConnAcks), the first one included.
    pub connects: AtomicU64,
    /// Connections lost after a ConnAck.
    pub disconnects: AtomicU64,
    /// Subscription acknowledgements (SUBACK) from the broker: one per
    /// connection once reading has really started.
    pub subscribed: AtomicU64,
    /// Publishes received on subscribed topics.
    pub received: AtomicU64,
    /// Publishes that became rejections.
    pub rejected: AtomicU64,
    /// Times reading paused because ingest is behind and the broker holds
    /// the rest: the channel to ingest was full, or [`UNACKED_MAX`]
    /// messages were held unacknowledged.
    pub buffer_full: AtomicU64,
    /// Publishes acknowledged and dropped on purpose: no mapping (and not
    /// strict), or a retained message without a device timestamp.
    pub ignored: AtomicU64,
    /// QoS 1 redeliveries of messages an earlier process had stored:
    /// acknowledged without storing them again.
    pub redelivered: AtomicU64,
    /// QoS 1 messages received whose PUBACK has not been handed on yet:
    /// waiting in the ingest buffer or being stored. The broker's
    /// in-flight window should bound it; more than that is memory the
    /// daemon holds that the broker would otherwise hold.
    pub unacknowledged: AtomicU64,
}

/// The first connection to the broker (counted in `connects`).
pub const MQTT_CONNECTED: TelemetryEvent = TelemetryEvent {
    name: "mqtt_connected",
    level: tracing::Level::INFO,
    message: "connected to MQTT broker",
    counter: "MqttStatus::connects",
};

/// A connection after an outage that was logged (counted in `connects`).
pub const MQTT_BACK: TelemetryEvent = TelemetryEvent {
    name: "mqtt_back",
    level: tracing::Level::INFO,
    message: "MQTT broker reachable again",
    counter: "MqttStatus::connects",
};

/// Any other connection after the first (counted in `connects`).
pub const MQTT_RECONNECTED: TelemetryEvent = TelemetryEvent {
    name: "mqtt_reconnected",
    level: tracing::Level::DEBUG,
    message: "reconnected to MQTT broker",
    counter: "MqttStatus::connects",
};

/// A QoS 1 copy of a message this connection has in flight: dropped
/// (the original's ack covers both).
pub const MQTT_IN_FLIGHT_COPY: TelemetryEvent = TelemetryEvent {
    name: "mqtt_in_flight_copy",
    level: tracing::Level::DEBUG,
    message: "MQTT redelivery of a message still in flight; dropped",
    counter: "MqttStatus::ignored",
};

/// A retained message without a device timestamp: acknowledged, dropped.
pub const MQTT_RETAINED_WITHOUT_TIME: TelemetryEvent = TelemetryEvent {
    name: "mqtt_retained_without_time",
    level: tracing::Level::DEBUG,
    message: "ignoring retained MQTT message: no device timestamp",
    counter: "MqttStatus::ignored",
};

/// A message on a topic no mapping matches (not strict): acknowledged,
/// dropped.
pub const MQTT_UNMAPPED: TelemetryEvent = TelemetryEvent {
    name: "mqtt_unmapped",
    level: tracing::Level::DEBUG,
    message: "no mapping for MQTT topic; ignored",
    counter: "MqttStatus::ignored",
};

/// An ESPresense device that is not configured: acknowledged, dropped.
pub const MQTT_ESPRESENSE_UNKNOWN: TelemetryEvent = TelemetryEvent {
    name: "mqtt_espresense_unknown",
    level: tracing::Level::DEBUG,
    message: "ESPresense device not configured; ignored",
    counter: "MqttStatus::ignored",
};

/// A QoS 1 redelivery of a message an earlier process stored:
/// acknowledged without storing it again.
pub const MQTT_ALREADY_STORED: TelemetryEvent = TelemetryEvent {
    name: "mqtt_already_stored",
    level: tracing::Level::DEBUG,
    message: "MQTT redelivery of a message already stored; acknowledged",
    counter: "MqttStatus::redelivered",
};

/// A message its mapping rejects: handed to ingest for REJECTED.
pub const MQTT_REJECTED: TelemetryEvent = TelemetryEvent {
    name: "mqtt_rejected",
    level: tracing::Level::DEBUG,
    message: "MQTT message rejected",
    counter: "MqttStatus::rejected",
};

/// A payload larger than `max_payload`: its head is kept in REJECTED.
pub const MQTT_OVERSIZED: TelemetryEvent = TelemetryEvent {
    name: "mqtt_oversized",
    level: tracing::Level::WARN,
    message: "oversized MQTT payload rejected",
    counter: "MqttStatus::rejected",
};

/// The channel to ingest was full: reading pauses, the broker holds the
/// rest. Every time is counted; the line is written at most once per
/// `BUFFER_FULL_LOG_EVERY`, with the count so far (`times`).
pub const MQTT_BUFFER_FULL: TelemetryEvent = TelemetryEvent {
    name: "mqtt_buffer_full",
    level: tracing::Level::WARN,
    message: "ingest is behind; holding back MQTT input (the broker keeps it)",
    counter: "MqttStatus::buffer_full (summed into presenced_ingest_buffer_full_total)",
};

/// Why the source stopped for good. Connection problems never end up
/// here (they are retried); these are the ones a retry cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt.{source_name}: mapping {error}")]
    Mapping {
        source_name: String,
        error: TopicError,
    },
    /// The password file is missing or unreadable: a deployment problem
    /// (credential not installed), named by its config field.
    #[error("mqtt.{source_name}.password_file: cannot read {}: {error}", path.display())]
    PasswordFile {
        source_name: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("MQTT config: {0}")]
    Config(String),
    #[error("ingest stopped accepting input")]
    IngestClosed,
}

impl MqttError {
    /// Whether running the source again could succeed without anyone
    /// changing the config or the host. Only a closed ingest channel
    /// qualifies (the daemon is stopping or ingest was restarted); a
    /// mapping, config or secret problem fails the same way every time.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MqttError::IngestClosed)
    }

    /// Whether the daemon should stop (and its supervisor report why)
    /// rather than run on without this source: the operator must fix the
    /// config or install the secret. The opposite of
    /// [`MqttError::is_retryable`].
    pub fn is_fatal(&self) -> bool {
        !self.is_retryable()
    }
}

/// Looks up the QoS 1 deliveries of a source (by name) stored in `SENSORS`:
/// delivery header -> `Nats-Msg-Id`. Ingest provides it (it owns the
/// stream); the source only calls it.
pub type StoredLookup = std::sync::Arc<
    dyn Fn(String) -> futures::future::BoxFuture<'static, Result<HashMap<String, String>, String>>
        + Send
        + Sync,
>;

/// What the source needs beyond its own section of the config.
#[derive(Clone)]
pub struct RunOptions {
    pub rules: DecodeRules,
    /// Where redeliveries of QoS 1 messages stored by an earlier process
    /// are looked up; `None` turns that off (every delivery unknown to this
    /// process gets a new id).
    pub stored: Option<StoredLookup>,
}

/// Reads the broker until `shutdown` turns true (or its sender is gone),
/// then disconnects cleanly and returns `Ok`. Connection problems are
/// retried forever with capped exponential backoff; only problems that a
/// retry cannot fix are errors.
pub async fn run(
    source: String,
    cfg: MqttSource,
    client_id: String,
    opts: RunOptions,
    tx: mpsc::Sender<Item>,
    status: Arc<MqttStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), MqttError> {
    let mappings = compile_mappings(&cfg).map_err(|error| MqttError::Mapping {
        source_name: source.clone(),
        error,
    })?;
    let mut filters = subscriptions(&mappings);
    let espresense = cfg.espresense.as_ref().map(Espresense::new);
    if let Some(es) = &espresense {
        let f = es.filter();
        if !filters.contains(&f) {
            filters.push(f);
        }
    }
    if filters.is_empty() {
        warn!(source = %source, "MQTT source has no topics to read");
    }
    let mqtt_options = options(&source, &cfg, &client_id)?;
    let (client, eventloop) = AsyncClient::new(mqtt_options, REQUEST_CAPACITY);
    let in_flight = InFlight::new(status.clone());
    let mut conn = Connection {
        acks: Arc::default(),
        source,
        broker: format!("{}:{}", cfg.host, cfg.port),
        mappings,
        filters,
        espresense,
        rules: opts.rules,
        max_payload: cfg.max_payload,
        deliveries: Deliveries::new(opts.stored),
        client,
        tx,
        status,
        generation: Arc::new(AtomicU64::new(0)),
        in_flight,
        runtime: tokio::runtime::Handle::current(),
        connected: false,
        outage_logged: false,
        ever_connected: false,
        last_full_warn: None,
        parked: VecDeque::new(),
        lost: false,
    };
    let result = conn
        .serve(eventloop, &mut shutdown, cfg.reconnect_max)
        .await;
    conn.status.connected.store(false, Ordering::Relaxed);
    result
}

/// The client options, checked: what rumqttc would panic on is refused,
/// and the password file is read. `check-config` runs this too (with a
/// placeholder client id), so whatever it refuses fails the config check
/// before the daemon starts.
pub fn options(source: &str, cfg: &MqttSource, client_id: &str) -> Result<MqttOptions, MqttError> {
    if client_id.is_empty() || client_id.starts_with(' ') {
        return Err(MqttError::Config(format!(
            "client id {client_id:?} is invalid: the broker keeps the session under it, so it must be non-empty"
        )));
    }
    if !cfg.keep_alive.is_zero() && cfg.keep_alive < Duration::from_secs(1) {
        return Err(MqttError::Config(format!(
            "keep_alive {} is below 1s (use 0 to disable)",
            humantime::format_duration(cfg.keep_alive)
        )));
    }
    let mut o = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    o.set_keep_alive(cfg.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        // Incoming: MQTT's own maximum, so whatever the broker accepts is
        // read (and rejected by `max_payload` if too large) instead of
        // dropping the connection and being redelivered forever.
        .set_max_packet_size(MQTT_MAX_PACKET, OUTGOING_MAX_PACKET);
    let password = match &cfg.password_file {
        None => None,
        Some(path) => Some(crate::base::secrets::read_secret(path).map_err(|error| {
            MqttError::PasswordFile {
                source_name: source.to_owned(),
                path: path.clone(),
                error,
            }
        })?),
    };
    match (&cfg.username, password) {
        (Some(u), p) => {
            o.set_credentials(u.clone(), p.unwrap_or_default());
        }
        (None, Some(_)) => return Err(MqttError::Config(
            "password_file is set but username is not; MQTT sends a password only with a user name"
                .into(),
        )),
        (None, None) => {}
    }
    Ok(o)
}

/// What the loop does after handling an event.
enum Flow {
    Continue,
    Stop,
}

/// Acks that found rumqttc's request queue full, oldest first, with the
/// connection generation each belongs to. The serve loop hands them on
/// before each poll of the event loop (which empties the request queue).
///
/// Why not an awaiting send on a spawned task, as before: rumqttc's queue
/// (flume) walks the list of every waiting sender each time one finishes,
/// and under a saturating publisher thousands waited at once; the walk
/// took three quarters of the daemon's CPU and cut the end-to-end rate to
/// a quarter (docs/PERFORMANCE.md). Here a waiting ack costs a slot in a
/// `VecDeque`. Their number stays within what the broker lets the source
/// hold unacknowledged (its window, or [`UNACKED_MAX`]).
#[derive(Default)]
struct AckQueue(std::sync::Mutex<std::collections::VecDeque<(u64, Publish)>>);

impl AckQueue {
    /// Sends `ack` now if the request queue has room and no older ack
    /// waits (PUBACKs go out in the order they were fired), else queues it.
    fn push(&self, client: &AsyncClient, generation: u64, ack: Publish) {
        let mut waiting = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.is_empty() && client.try_ack(&ack).is_ok() {
            return;
        }
        waiting.push_back((generation, ack));
    }

    /// Hands on as many waiting acks of connection `generation` as the
    /// request queue takes; acks of an earlier connection are dropped
    /// (the broker redelivers those messages, and their packet ids may
    /// now name others).
    fn hand_on(&self, client: &AsyncClient, generation: u64) {
        let mut waiting = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((issued, ack)) = waiting.front() {
            if *issued != generation {
                debug!(
                    pkid = ack.pkid,
                    "MQTT connection changed since delivery; not acking, the broker redelivers"
                );
            } else if client.try_ack(ack).is_err() {
                return;
            }
            waiting.pop_front();
        }
    }
}

struct Connection {
    source: String,
    broker: String,
    mappings: Vec<Mapping>,
    filters: Vec<String>,
    /// The ESPresense preset; it keeps per-person state across messages.
    espresense: Option<Espresense>,
    rules: DecodeRules,
    /// `mqtt.<name>.max_payload`.
    max_payload: usize,
    /// Ids given to QoS 1 deliveries, to give a redelivery its first id.
    deliveries: Deliveries,
    client: AsyncClient,
    tx: mpsc::Sender<Item>,
    status: Arc<MqttStatus>,
    /// Bumped whenever a connection ends: an ack issued for a publish of an
    /// earlier connection is not sent, because the broker redelivers that
    /// message on the new one and the packet id may by then name another
    /// message.
    generation: Arc<AtomicU64>,
    /// Packet ids handed to ingest and not yet acked, by generation.
    in_flight: InFlight,
    /// Acks that found rumqttc's request queue full.
    acks: Arc<AckQueue>,
    /// Where a subscribe that finds the request queue full is sent.
    runtime: tokio::runtime::Handle,
    connected: bool,
    /// Whether the current outage has been logged (once per outage).
    outage_logged: bool,
    ever_connected: bool,
    last_full_warn: Option<Instant>,
    /// Publishes read while the source waits on ingest (see
    /// [`Connection::keep_alive_until`]), taken before anything new is
    /// read. They belong to the current connection: a lost connection
    /// drops them unacknowledged, and the broker redelivers them.
    parked: VecDeque<Publish>,
    /// The connection was lost (counted and logged); the serve loop waits
    /// out the reconnect backoff before polling again.
    lost: bool,
}

impl Connection {
    async fn serve(
        &mut self,
        mut eventloop: EventLoop,
        shutdown: &mut watch::Receiver<bool>,
        reconnect_max: Duration,
    ) -> Result<(), MqttError> {
        let mut backoff = Backoff::new(BACKOFF_START, reconnect_max);
        let mut connected_at: Option<Instant> = None;
        let result = loop {
            if std::mem::take(&mut self.lost) {
                if connected_at
                    .take()
                    .is_some_and(|t| t.elapsed() >= STABLE_AFTER)
                {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|s| *s) => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            if self.status.unacknowledged.load(Ordering::Relaxed) >= UNACKED_MAX {
                if let Flow::Stop = self.hold_back(&mut eventloop, shutdown).await {
                    break Ok(());
                }
                continue;
            }
            self.acks
                .hand_on(&self.client, self.generation.load(Ordering::Acquire));
            let event = match self.parked.pop_front() {
                Some(p) => Ok(Event::Incoming(Packet::Publish(p))),
                None => tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|s| *s) => break Ok(()),
                    ev = eventloop.poll() => {
                        alive_while_behind(&mut eventloop, &ev);
                        ev
                    }
                },
            };
            let flow = match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected_at = Some(Instant::now());
                    self.on_connected(ack.session_present);
                    Ok(Flow::Continue)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.on_publish(p, &mut eventloop, shutdown).await
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    self.on_suback(&s.return_codes);
                    Ok(Flow::Continue)
                }
                Ok(_) => Ok(Flow::Continue),
                Err(e) => {
                    self.on_connection_error(&e);
                    Ok(Flow::Continue)
                }
            };
            match flow {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        if self.connected {
            self.disconnect(&mut eventloop).await;
        }
        result
    }

    fn on_connected(&mut self, session_present: bool) {
        self.connected = true;
        self.status.connected.store(true, Ordering::Relaxed);
        let connects = &self.status.connects;
        if self.outage_logged {
            crate::emit!(MQTT_BACK, connects; source = %self.source, broker = %self.broker, session_present);
        } else if !self.ever_connected {
            crate::emit!(MQTT_CONNECTED, connects; source = %self.source, broker = %self.broker, session_present);
        } else {
            crate::emit!(MQTT_RECONNECTED, connects; source = %self.source, broker = %self.broker, session_present);
        }
        self.ever_connected = true;
        self.outage_logged = false;
        // Every time: a broker that restarted without persistence has lost
        // the session and its subscriptions.
        if self.filters.is_empty() {
            return;
        }
        let subs: Vec<SubscribeFilter> = self
            .filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        if self.client.try_subscribe_many(subs.clone()).is_err() {
            let client = self.client.clone();
            let source = self.source.clone();
            self.runtime.spawn(async move {
                if let Err(error) = client.subscribe_many(subs).await {
                    debug!(source = %source, %error, "MQTT subscribe not sent; the event loop is gone");
                }
            });
        }
    }

    fn on_suback(&self, codes: &[SubscribeReasonCode]) {
        self.status.subscribed.fetch_add(1, Ordering::Relaxed);
        for (filter, code) in self.filters.iter().zip(codes) {
            match code {
                SubscribeReasonCode::Failure => warn!(
                    source = %self.source,
                    broker = %self.broker,
                    filter = %filter,
                    "MQTT broker refused the subscription (check its ACL)"
                ),
                SubscribeReasonCode::Success(qos) if *qos == QoS::AtMostOnce => warn!(
                    source = %self.source,
                    filter = %filter,
                    "MQTT broker granted only QoS 0: messages can be lost in a crash"
                ),
                SubscribeReasonCode::Success(_) => {}
            }
        }
    }

    fn on_connection_error(&mut self, error: &ConnectionError) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.lost = true;
        self.parked.clear();
        if self.connected {
            self.connected = false;
            self.status.connected.store(false, Ordering::Relaxed);
            self.status.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        if !self.outage_logged {
            self.outage_logged = true;
            warn!(
                source = %self.source,
                broker = %self.broker,
                %error,
                "MQTT broker unreachable; retrying with backoff"
            );
        } else {
            debug!(source = %self.source, %error, "MQTT reconnect failed");
        }
    }

    /// Whether `p` is a resend (DUP) of a message still in flight, counted
    /// and logged as ignored if so.
    fn is_in_flight_copy(&self, p: &Publish) -> bool {
        let copy = p.qos != QoS::AtMostOnce
            && p.dup
            && self
                .in_flight
                .contains(self.generation.load(Ordering::Acquire), p.pkid);
        if copy {
            crate::emit!(MQTT_IN_FLIGHT_COPY, &self.status.ignored; source = %self.source, topic = %p.topic, pkid = p.pkid);
        }
        copy
    }

    async fn on_publish(
        &mut self,
        p: Publish,
        eventloop: &mut EventLoop,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Flow, MqttError> {
        self.status.received.fetch_add(1, Ordering::Relaxed);
        let received_at = Timestamp::now();
        // nats-server resends an unacked message on a live connection once
        // its `ack_wait` runs out. The original is still in ingest and its
        // ack covers both; a second PUBACK could hit a later message that
        // reused the packet id. So a copy of an in-flight message is
        // dropped; if the original is dropped unacked, the broker resends.
        // Only a resend (DUP set) can be a copy: a new message on a packet
        // id that is still in our books (its PUBACK queued, not yet sent)
        // must never be taken for one, or it is lost until the next
        // connection.
        if self.is_in_flight_copy(&p) {
            return Ok(Flow::Continue);
        }
        if p.payload.len() > self.max_payload {
            return self.oversized(&p, received_at, eventloop, shutdown).await;
        }
        // A retained message is the last value the broker saw, from an
        // unknown time; stamping it with the receive time would make an old
        // "motion" look current. Only a device timestamp makes it usable.
        if p.retain {
            let has_time = find_mappings(&self.mappings, &p.topic)
                .is_some_and(|(group, _)| group.iter().any(|m| m.timestamp.is_some()));
            if !has_time {
                crate::emit!(MQTT_RETAINED_WITHOUT_TIME, &self.status.ignored; source = %self.source, topic = %p.topic);
                self.ack(&p).fire();
                return Ok(Flow::Continue);
            }
        }
        let outcome = match self.espresense.as_mut() {
            Some(es) => es.handle(&self.source, &p.topic, &p.payload, received_at),
            None => Outcome::NotMine,
        };
        let results: Vec<Result<Observation, Rejected>> = match outcome {
            Outcome::NotMine => {
                match decode(
                    &self.source,
                    &self.mappings,
                    self.rules,
                    &p.topic,
                    &p.payload,
                    received_at,
                ) {
                    Some(r) => r,
                    None => {
                        crate::emit!(MQTT_UNMAPPED, &self.status.ignored; source = %self.source, topic = %p.topic);
                        self.ack(&p).fire();
                        return Ok(Flow::Continue);
                    }
                }
            }
            Outcome::Ignored => {
                crate::emit!(MQTT_ESPRESENSE_UNKNOWN, &self.status.ignored; source = %self.source, topic = %p.topic);
                self.ack(&p).fire();
                return Ok(Flow::Continue);
            }
            Outcome::Rejected(reason) => vec![Err(Rejected {
                source: self.source.clone(),
                origin: format!("mqtt topic {}", p.topic),
                reason,
                payload: p.payload.clone(),
                received_at,
                id: String::new(),
            })],
            Outcome::Observations(obs) => obs.into_iter().map(Ok).collect(),
        };
        if results.is_empty() {
            self.ack(&p).fire();
            return Ok(Flow::Continue);
        }
        let Some(results) = self.assign_ids(&p, results).await else {
            crate::emit!(MQTT_ALREADY_STORED, &self.status.redelivered; source = %self.source, topic = %p.topic, pkid = p.pkid);
            self.ack(&p).fire();
            return Ok(Flow::Continue);
        };
        // The upstream ack travels with the last item: the message is done
        // once everything it caused is stored.
        let mut ack = Some(self.ack(&p));
        let n = results.len();
        for (i, r) in results.into_iter().enumerate() {
            let a = if i + 1 == n {
                ack.take().unwrap_or_else(Ack::none)
            } else {
                Ack::none()
            };
            let item = match r {
                Ok(obs) => Item::Observation(obs, a),
                Err(rej) => {
                    crate::emit!(MQTT_REJECTED, &self.status.rejected; source = %self.source, topic = %p.topic, reason = %rej.reason);
                    Item::Rejected(rej, a)
                }
            };
            if let Flow::Stop = self.forward(item, eventloop, shutdown).await? {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// A payload over `max_payload`: acknowledged and kept in `REJECTED`
    /// with its size and first bytes, so one runaway device costs one
    /// record, not the connection.
    async fn oversized(
        &mut self,
        p: &Publish,
        received_at: Timestamp,
        eventloop: &mut EventLoop,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Flow, MqttError> {
        let head = p.payload.slice(..p.payload.len().min(OVERSIZED_HEAD));
        let rej = Rejected {
            source: self.source.clone(),
            origin: format!("mqtt topic {}", p.topic),
            reason: format!(
                "payload of {} bytes is larger than mqtt.{}.max_payload ({} bytes); its first {} bytes are kept",
                p.payload.len(),
                self.source,
                self.max_payload,
                head.len()
            ),
            payload: head,
            received_at,
            id: crate::observation::delivery_id(),
        };
        crate::emit!(MQTT_OVERSIZED, &self.status.rejected; source = %self.source, topic = %p.topic, size = p.payload.len(), max_payload = self.max_payload);
        let item = Item::Rejected(rej, self.ack(p));
        self.forward(item, eventloop, shutdown).await
    }

    /// Gives each item of one delivery its `Nats-Msg-Id`: a new one per
    /// delivery, except for a QoS 1 redelivery (DUP flag) of a message
    /// this process or an earlier one already handed to ingest, which gets
    /// the ids of that first delivery, so JetStream stores it once. `None`
    /// when an earlier process stored every item already: the message
    /// only needs its PUBACK.
    async fn assign_ids(
        &mut self,
        p: &Publish,
        mut results: Vec<Result<Observation, Rejected>>,
    ) -> Option<Vec<Result<Observation, Rejected>>> {
        if p.qos == QoS::AtMostOnce {
            for r in &mut results {
                set_id(r, crate::observation::delivery_id());
            }
            return Some(results);
        }
        let hash = input_id(&[p.topic.as_bytes(), &p.payload]);
        let keys: Vec<String> = (0..results.len())
            .map(|i| delivery_key(&self.source, p.pkid, &hash, i))
            .collect();
        let reused = if p.dup {
            let generation = self.generation.load(Ordering::Acquire);
            self.deliveries
                .find(&self.source, generation, p.pkid, &hash, &keys)
                .await
        } else {
            None
        };
        let ids: Vec<String> = match reused {
            Some(Found::Memory(ids)) => ids,
            Some(Found::Scan(stored)) => {
                let all_stored = results.iter().any(Result::is_ok)
                    && results
                        .iter()
                        .zip(&stored)
                        .all(|(r, id)| r.is_err() || id.is_some());
                if all_stored {
                    return None;
                }
                stored
                    .into_iter()
                    .map(|id| id.unwrap_or_else(crate::observation::delivery_id))
                    .collect()
            }
            None => (0..results.len())
                .map(|_| crate::observation::delivery_id())
                .collect(),
        };
        self.deliveries.remember(p.pkid, hash, ids.clone());
        for ((r, id), key) in results.iter_mut().zip(ids).zip(keys) {
            set_id(r, id);
            if let Ok(obs) = r {
                obs.delivery = Some(key);
            }
        }
        Some(results)
    }

    /// Hands the item to ingest. When ingest is behind, this waits instead
    /// of dropping, with the connection kept alive
    /// ([`Connection::keep_alive_until`]): the broker stops sending once
    /// its in-flight window is full and keeps the rest.
    async fn forward(
        &mut self,
        item: Item,
        eventloop: &mut EventLoop,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Flow, MqttError> {
        let item = match self.tx.try_send(item) {
            Ok(()) => return Ok(Flow::Continue),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(MqttError::IngestClosed),
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        self.note_held_back();
        let tx = self.tx.clone();
        match self
            .keep_alive_until(eventloop, shutdown, async move { tx.send(item).await })
            .await
        {
            None => Ok(Flow::Stop),
            Some(Ok(())) => Ok(Flow::Continue),
            Some(Err(_)) => Err(MqttError::IngestClosed),
        }
    }

    /// Waits for `done` while the connection stays alive: rumqttc sends
    /// its pings, and the PUBACKs queued meanwhile, only while its event
    /// loop is polled, and it reads the broker's ping response only after
    /// everything the broker sent before it. A source that stopped polling
    /// while ingest was behind was dropped by the broker (silent past 1.5
    /// keep-alives) or gave up on its own ping, and each reconnect cost
    /// redeliveries. Publishes read meanwhile are parked unread, up to
    /// [`PARK_MAX`]; past that, polling stops and TCP pushes back on the
    /// broker. A broker that keeps to its in-flight window (nats-server's
    /// MQTT `max_ack_pending`, Mosquitto's `max_inflight_messages`) never
    /// sends that much; Mosquitto with `max_queued_messages 0` sends past
    /// it in a burst, and a wait longer than 1.5 keep-alives with the
    /// reserve full still lets it drop the connection. `None` on shutdown.
    async fn keep_alive_until<T>(
        &mut self,
        eventloop: &mut EventLoop,
        shutdown: &mut watch::Receiver<bool>,
        done: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(done);
        loop {
            self.acks
                .hand_on(&self.client, self.generation.load(Ordering::Acquire));
            // Not while disconnected: a poll would reconnect, and the
            // serve loop owns the backoff.
            let polling = self.connected && !self.lost && self.parked.len() < PARK_MAX;
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return None,
                out = &mut done => return Some(out),
                // Dropping a poll that is waiting for input (where it
                // spends its time) loses nothing; one cut inside a write
                // to a full socket could drop a PUBACK or ping, which
                // costs a redelivery or a reconnect, never a reading.
                ev = eventloop.poll(), if polling => {
                    alive_while_behind(eventloop, &ev);
                    self.on_event_while_waiting(ev);
                }
            }
        }
    }

    fn on_event_while_waiting(&mut self, event: Result<Event, ConnectionError>) {
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // A resend of a message in flight is dropped as it is
                // read: by the time the parked copy came up, the original
                // could be acked and the copy taken for a new delivery,
                // with a second PUBACK.
                if self.is_in_flight_copy(&p) {
                    self.status.received.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.parked.push_back(p);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => self.on_suback(&s.return_codes),
            // A CONNACK only follows a reconnect, which the `polling`
            // guard of `keep_alive_until` leaves to the serve loop.
            Ok(_) => {}
            Err(e) => self.on_connection_error(&e),
        }
    }

    /// The PUBACK for `p`, to be fired once the item is stored. It must not
    /// block (ingest calls it inline), so a full request queue hands the
    /// ack to a spawned task.
    fn ack(&self, p: &Publish) -> Ack {
        if p.qos == QoS::AtMostOnce {
            return Ack::none();
        }
        // Only qos and pkid matter for the ack; don't keep the payload alive.
        let mut bare = Publish::new("", p.qos, Vec::new());
        bare.pkid = p.pkid;
        let client = self.client.clone();
        let generation = Arc::clone(&self.generation);
        let issued = generation.load(Ordering::Acquire);
        let acks = Arc::clone(&self.acks);
        let guard = self.in_flight.insert(issued, p.pkid);
        Ack::new(move || {
            if generation.load(Ordering::Acquire) != issued {
                debug!(
                    pkid = bare.pkid,
                    "MQTT connection changed since delivery; not acking, the broker redelivers"
                );
                return;
            }
            // The packet id leaves our books as the PUBACK is handed on,
            // before it is sent: the broker can reuse the id only once it
            // has the PUBACK. Keeping the entry until a spawned send
            // completes left it there for as long as the runtime took to
            // poll that task again: under a sustained burst tens of
            // thousands of entries stayed, and new messages reusing their
            // ids were taken for copies.
            drop(guard);
            acks.push(&client, issued, bare);
        })
    }

    /// Counts a pause of reading (full buffer, or [`UNACKED_MAX`] held),
    /// logging it at most every [`BUFFER_FULL_LOG_EVERY`].
    fn note_held_back(&mut self) {
        let due = self
            .last_full_warn
            .is_none_or(|t| t.elapsed() >= BUFFER_FULL_LOG_EVERY);
        crate::emit!(
            MQTT_BUFFER_FULL,
            &self.status.buffer_full,
            if due;
            source = %self.source,
            unacknowledged = self.status.unacknowledged.load(Ordering::Relaxed),
            times = self.status.buffer_full.load(Ordering::Relaxed)
        );
        if due {
            self.last_full_warn = Some(Instant::now());
        }
    }

    /// Takes nothing new until fewer than [`UNACKED_RESUME`] messages are
    /// held unacknowledged, with the connection kept alive
    /// ([`Connection::keep_alive_until`]). Counted and logged as a full
    /// buffer: ingest is behind.
    async fn hold_back(
        &mut self,
        eventloop: &mut EventLoop,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Flow {
        self.note_held_back();
        let status = Arc::clone(&self.status);
        let released = Arc::clone(&self.in_flight.released);
        let below_resume = async move {
            while status.unacknowledged.load(Ordering::Relaxed) >= UNACKED_RESUME {
                tokio::select! {
                    _ = released.notified() => {}
                    // A safety net only: every release below the mark notifies.
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        };
        match self
            .keep_alive_until(eventloop, shutdown, below_resume)
            .await
        {
            Some(()) => Flow::Continue,
            None => Flow::Stop,
        }
    }

    async fn disconnect(&mut self, eventloop: &mut EventLoop) {
        // The generation was bumped as the connection ended: the acks still
        // waiting are this connection's, sent before the DISCONNECT if they
        // fit (any others the broker redelivers, and ingest stores once).
        self.acks.hand_on(
            &self.client,
            self.generation.load(Ordering::Acquire).wrapping_sub(1),
        );
        if self.client.try_disconnect().is_err() {
            return;
        }
        // Poll until the broker closes the connection: the event for the
        // outgoing DISCONNECT comes before the socket is flushed, and
        // PUBACKs queued just before it would be lost (the broker would
        // redeliver messages that were already stored).
        let done = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
        if done.is_err() {
            debug!(source = %self.source, "MQTT disconnect timed out");
        }
        info!(source = %self.source, broker = %self.broker, "disconnected from MQTT broker");
    }
}

/// A publish from the broker shows the connection alive, as a ping
/// response would. rumqttc drops the connection when a ping goes
/// unanswered for a keep-alive, but the answer comes after everything the
/// broker sent before it: Mosquitto with `max_queued_messages 0` sends a
/// burst past its in-flight window, and a source reading at the pace of
/// ingest took longer than the keep-alive to reach the answer. Each such
/// drop cost thousands of redeliveries (a 50,000-message burst was
/// handed to ingest 110,000 times). A dead connection still shows: no
/// publish then arrives, and the next ping finds the last unanswered.
fn alive_while_behind(eventloop: &mut EventLoop, event: &Result<Event, ConnectionError>) {
    if let Ok(Event::Incoming(Packet::Publish(_))) = event {
        eventloop.state.await_pingresp = false;
    }
}

fn set_id(r: &mut Result<Observation, Rejected>, id: String) {
    match r {
        Ok(o) => o.id = id,
        Err(rej) => rej.id = id,
    }
}

/// A QoS 1 delivery as header [`crate::observation::DELIVERY_HEADER`]
/// records it: source, packet id, hash of topic and payload, and the
/// index of the item among those the message caused. The packet id alone
/// is not unique (the broker reuses it once acked, and after a reconnect);
/// with the content hash it names one unacknowledged message, which is all
/// a redelivery can be.
fn delivery_key(source: &str, pkid: u16, hash: &str, index: usize) -> String {
    format!("mqtt {source} {pkid} {hash} {index}")
}

/// How long the look-up of stored deliveries may hold up reading after a
/// reconnect; past it, the redelivery is stored again (at least once
/// beats losing it).
const SCAN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the ids of an earlier delivery were found.
enum Found {
    /// Handed to ingest by this process: reuse them (JetStream drops the
    /// copy if the first one was stored).
    Memory(Vec<String>),
    /// Per item, the id it was stored under by an earlier process, if any.
    Scan(Vec<Option<String>>),
}

/// The ids given to QoS 1 deliveries, so a redelivery (DUP flag) gets the
/// ids of its first delivery.
struct Deliveries {
    /// Per packet id, the last message delivered under it in this process:
    /// hash of topic and payload, and the ids it was given. A new message
    /// under the same packet id replaces the entry (the broker reuses an id
    /// only once it is acknowledged), so this holds at most 65,535 entries.
    by_pkid: HashMap<u16, (String, Vec<String>)>,
    /// Stream `SENSORS`, for redeliveries of what an earlier process
    /// stored before a crash.
    stored: Option<StoredLookup>,
    /// What the one look-up of this process found. Only an earlier
    /// process can have stored a delivery this process never received, and
    /// the broker redelivers those as soon as the session resumes, so one
    /// look-up serves every connection after it. (One per connection was a
    /// spiral under saturation: a source holding input back misses its
    /// pings, the broker drops it, and each reconnect read ten minutes of
    /// `SENSORS` again while nothing else was read, and was dropped again.)
    scanned: Option<HashMap<String, String>>,
}

impl Deliveries {
    fn new(stored: Option<StoredLookup>) -> Self {
        Deliveries {
            by_pkid: HashMap::new(),
            stored,
            scanned: None,
        }
    }

    fn remember(&mut self, pkid: u16, hash: String, ids: Vec<String>) {
        self.by_pkid.insert(pkid, (hash, ids));
    }

    async fn find(
        &mut self,
        source: &str,
        generation: u64,
        pkid: u16,
        hash: &str,
        keys: &[String],
    ) -> Option<Found> {
        if let Some((h, ids)) = self.by_pkid.get(&pkid) {
            if h == hash && ids.len() == keys.len() {
                return Some(Found::Memory(ids.clone()));
            }
        }
        let store = self.stored.as_ref()?;
        if self.scanned.is_none() {
            let started = Instant::now();
            let found = match tokio::time::timeout(SCAN_TIMEOUT, store(source.to_owned())).await {
                Ok(Ok(found)) => found,
                Ok(Err(error)) => {
                    warn!(source = %source, %error, "cannot look up stored MQTT deliveries; a redelivered message may be stored twice");
                    HashMap::new()
                }
                Err(_) => {
                    warn!(source = %source, timeout = ?SCAN_TIMEOUT, "looking up stored MQTT deliveries timed out; a redelivered message may be stored twice");
                    HashMap::new()
                }
            };
            debug!(source = %source, generation, deliveries = found.len(), elapsed_ms = started.elapsed().as_millis() as u64, "looked up stored MQTT deliveries");
            self.scanned = Some(found);
        }
        let map = self.scanned.as_ref()?;
        let stored: Vec<Option<String>> = keys.iter().map(|k| map.get(k).cloned()).collect();
        if stored.iter().all(Option::is_none) {
            return None;
        }
        Some(Found::Scan(stored))
    }
}

/// The set behind [`Connection::in_flight`]. Entries carry the connection
/// generation, so acks of an old connection never touch the new one's.
/// Each live guard also counts in `MqttStatus::unacknowledged` (a count,
/// not the set's size: a broker that reuses an id still in the set must
/// show as more, not fewer).
#[derive(Clone)]
struct InFlight {
    set: Arc<Mutex<HashSet<(u64, u16)>>>,
    status: Arc<MqttStatus>,
    /// Notified when a release leaves fewer than [`UNACKED_RESUME`] held
    /// (a source holding back waits on it).
    released: Arc<tokio::sync::Notify>,
}

impl InFlight {
    fn new(status: Arc<MqttStatus>) -> Self {
        InFlight {
            set: Arc::default(),
            status,
            released: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, u16)>> {
        // Nothing can leave the set inconsistent; a panic elsewhere while
        // holding the lock must not stop acks.
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn contains(&self, generation: u64, pkid: u16) -> bool {
        self.lock().contains(&(generation, pkid))
    }

    /// Marks the packet in flight until the returned guard is dropped
    /// (ack fired, or dropped unfired by ingest).
    fn insert(&self, generation: u64, pkid: u16) -> InFlightGuard {
        self.lock().insert((generation, pkid));
        self.status.unacknowledged.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            set: self.clone(),
            key: (generation, pkid),
        }
    }
}

struct InFlightGuard {
    set: InFlight,
    key: (u64, u16),
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
        let before = self
            .set
            .status
            .unacknowledged
            .fetch_sub(1, Ordering::Relaxed);
        if before <= UNACKED_RESUME {
            self.set.released.notify_one();
        }
    }
}

/// The supervisor asks the source itself (see [`MqttError::is_fatal`]).
impl crate::supervise::Failure for MqttError {
    fn is_fatal(&self) -> bool {
        MqttError::is_fatal(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::Reading;
    use crate::sources::config::{TopicMapping, Zigbee2Mqtt, Zigbee2MqttDevice};

    /// The stored deliveries are read once per process: a reconnect (a new
    /// generation) reuses what the first look-up found, and a redelivery
    /// found neither in memory nor there is new.
    #[tokio::test]
    async fn stored_deliveries_are_looked_up_once_per_process_not_per_connection() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let lookup: StoredLookup = Arc::new(move |_source: String| {
            counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                Ok(HashMap::from([(
                    "mqtt main 7 h 0".to_owned(),
                    "id-7".to_owned(),
                )]))
            })
        });
        let mut d = Deliveries::new(Some(lookup));
        let stored = ["mqtt main 7 h 0".to_owned()];
        let unseen = ["mqtt main 8 g 0".to_owned()];
        let found = d.find("main", 1, 7, "h", &stored).await;
        assert!(
            matches!(&found, Some(Found::Scan(ids)) if ids == &[Some("id-7".to_owned())]),
            "the first redelivery is found among the stored ones"
        );
        assert!(d.find("main", 2, 8, "g", &unseen).await.is_none());
        assert!(matches!(
            d.find("main", 3, 7, "h", &stored).await,
            Some(Found::Scan(_))
        ));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one look-up for three connections"
        );
    }

    /// Acks beyond the request queue's room wait in order, go out as the
    /// event loop takes requests, and are dropped once their connection
    /// is gone.
    #[tokio::test]
    async fn acks_that_find_the_request_queue_full_wait_their_turn() {
        let (client, mut eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1883), 2);
        let queue = AckQueue::default();
        let ack = |pkid: u16| {
            let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
            p.pkid = pkid;
            p
        };
        let waiting = |q: &AckQueue| -> Vec<u16> {
            q.0.lock().unwrap().iter().map(|(_, p)| p.pkid).collect()
        };
        for pkid in 1..=5 {
            queue.push(&client, 1, ack(pkid));
        }
        assert_eq!(waiting(&queue), [3, 4, 5], "two fit the request queue");
        // The event loop takes every queued request (and, with no
        // connection, drops the acks: the broker would redeliver).
        eventloop.clean();
        queue.push(&client, 1, ack(6));
        assert_eq!(waiting(&queue), [3, 4, 5, 6], "behind the older acks");
        queue.hand_on(&client, 1);
        assert_eq!(waiting(&queue), [5, 6]);
        eventloop.clean();
        queue.hand_on(&client, 2);
        assert!(waiting(&queue).is_empty(), "an ended connection's acks");
    }

    fn source(topics: Vec<TopicMapping>, devices: Vec<Zigbee2MqttDevice>) -> MqttSource {
        let toml = "";
        let mut s: MqttSource = toml::from_str(toml).unwrap();
        s.topics = topics;
        if !devices.is_empty() {
            s.zigbee2mqtt = Some(Zigbee2Mqtt {
                base_topic: "zigbee2mqtt".into(),
                devices,
            });
        }
        s
    }

    fn topic(filter: &str, sensor: &str, value: Option<&str>, ts: Option<&str>) -> TopicMapping {
        TopicMapping {
            filter: filter.into(),
            sensor: sensor.into(),
            value: value.map(Into::into),
            timestamp: ts.map(Into::into),
        }
    }

    fn device(name: &str, kind: Zigbee2MqttKind, sensor: Option<&str>) -> Zigbee2MqttDevice {
        Zigbee2MqttDevice {
            device: name.into(),
            kind,
            sensor: sensor.map(Into::into),
        }
    }

    fn sample() -> Vec<Mapping> {
        compile_mappings(&source(
            vec![
                topic("home/+/motion", "{1}_motion", None, None),
                topic("esp/+/state", "{1}", Some("/presence"), Some("/ts")),
            ],
            vec![
                device("hall_pir", Zigbee2MqttKind::Occupancy, None),
                device("Front Door", Zigbee2MqttKind::Contact, Some("front_door")),
                device("lux1", Zigbee2MqttKind::Illuminance, None),
            ],
        ))
        .unwrap()
    }

    const T0: Timestamp = Timestamp(1_795_000_000_000);

    const LAX: DecodeRules = DecodeRules {
        strict: false,
        max_clock_skew: Duration::from_secs(300),
    };

    /// The single item one publish becomes (the sample maps each topic once).
    #[allow(clippy::result_large_err)]
    fn dec(topic: &str, payload: &str, _pkid: u16) -> Option<Result<Observation, Rejected>> {
        decode("main", &sample(), LAX, topic, payload.as_bytes(), T0).map(|mut v| {
            assert_eq!(v.len(), 1, "{v:?}");
            v.remove(0)
        })
    }

    #[test]
    fn a_missing_secret_is_fatal_and_a_closed_ingest_is_not() {
        use crate::supervise::{classify, is_fatal};
        let missing = MqttError::PasswordFile {
            source_name: "home".into(),
            path: "/run/secret".into(),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(is_fatal(&classify(missing)));
        assert!(!is_fatal(&classify(MqttError::IngestClosed)));
    }

    #[test]
    fn compiles_explicit_then_zigbee2mqtt() {
        let m = sample();
        let filters: Vec<&str> = m.iter().map(|m| m.filter.as_str()).collect();
        assert_eq!(
            filters,
            [
                "home/+/motion",
                "esp/+/state",
                "zigbee2mqtt/hall_pir",
                "zigbee2mqtt/Front Door",
                "zigbee2mqtt/lux1"
            ]
        );
        assert_eq!(m[2].value, ValueSelector::Pointer("/occupancy".into()));
        assert_eq!(m[3].value, ValueSelector::Pointer("/contact".into()));
        assert_eq!(m[4].value, ValueSelector::Pointer("/illuminance".into()));
        assert_eq!(m[3].sensor.as_str(), "front_door");
        assert_eq!(m[1].timestamp, Some(ValueSelector::Pointer("/ts".into())));
    }

    #[test]
    fn compile_errors_name_the_entry() {
        let e =
            compile_mappings(&source(vec![topic("a/#/b", "x", None, None)], vec![])).unwrap_err();
        assert!(e.to_string().starts_with("topics[0].filter: "), "{e}");
        let e = compile_mappings(&source(
            vec![topic("a", "x", None, None), topic("b/+", "{2}", None, None)],
            vec![],
        ))
        .unwrap_err();
        assert!(e.to_string().starts_with("topics[1].sensor: "), "{e}");
        let e = compile_mappings(&source(
            vec![],
            vec![device("Living Room", Zigbee2MqttKind::Occupancy, None)],
        ))
        .unwrap_err();
        assert!(
            e.to_string().starts_with("zigbee2mqtt.devices[0].sensor: ")
                && e.to_string().contains("set `sensor`"),
            "{e}"
        );
        let e = compile_mappings(&source(
            vec![],
            vec![device("+", Zigbee2MqttKind::Contact, Some("x"))],
        ))
        .unwrap_err();
        assert!(e.to_string().contains("no `+` or `#`"), "{e}");
    }

    #[test]
    fn a_topic_mapped_twice_to_one_sensor_is_refused() {
        let e = compile_mappings(&source(
            vec![topic("zigbee2mqtt/pir", "pir", Some("/occupancy"), None)],
            vec![device("pir", Zigbee2MqttKind::Illuminance, Some("pir"))],
        ))
        .unwrap_err();
        assert!(
            e.to_string().starts_with("zigbee2mqtt.devices[0]: ")
                && e.to_string()
                    .contains("already mapped to sensor \"pir\" by topics[0]"),
            "{e}"
        );
        // Two sensors from one topic are fine.
        let m = compile_mappings(&source(
            vec![topic("zigbee2mqtt/pir", "pir", Some("/occupancy"), None)],
            vec![device("pir", Zigbee2MqttKind::Illuminance, Some("pir_lux"))],
        ))
        .unwrap();
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn subscriptions_are_deduplicated() {
        let m = compile_mappings(&source(
            vec![topic("a/+", "{1}", None, None), topic("b", "b", None, None)],
            vec![],
        ))
        .unwrap();
        let mut twice = m.clone();
        twice.extend(m);
        assert_eq!(subscriptions(&twice), ["a/+", "b"]);
    }

    #[test]
    fn zigbee2mqtt_occupancy_payload() {
        let o = dec(
            "zigbee2mqtt/hall_pir",
            r#"{"battery":100,"occupancy":true,"linkquality":120}"#,
            7,
        )
        .unwrap()
        .unwrap();
        assert_eq!(o.sensor, "hall_pir");
        assert_eq!(o.value, Reading::Bool(true));
        assert_eq!(o.observed_at, T0);
        assert_eq!(o.source, "main");
        assert_eq!(o.v, OBSERVATION_SCHEMA);
    }

    #[test]
    fn zigbee2mqtt_contact_and_illuminance() {
        let o = dec(
            "zigbee2mqtt/Front Door",
            r#"{"battery":91,"contact":false,"voltage":3005}"#,
            1,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (o.sensor.as_str(), o.value),
            ("front_door", Reading::Bool(false))
        );
        let o = dec(
            "zigbee2mqtt/lux1",
            r#"{"illuminance":381,"illuminance_lux":381}"#,
            2,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (o.sensor.as_str(), o.value),
            ("lux1", Reading::Number(381.0))
        );
    }

    #[test]
    fn captures_name_the_sensor() {
        let o = dec("home/kitchen/motion", "ON", 3).unwrap().unwrap();
        assert_eq!(o.sensor, "kitchen_motion");
        assert_eq!(o.value, Reading::Bool(true));
    }

    #[test]
    fn bad_sensor_from_topic_is_rejected() {
        let r = dec("home/Living Room/motion", "ON", 3)
            .unwrap()
            .unwrap_err();
        assert_eq!(r.origin, "mqtt topic home/Living Room/motion");
        assert!(
            r.reason
                .starts_with(r#"sensor id "Living Room_motion" from topic levels is invalid"#),
            "{}",
            r.reason
        );
        assert_eq!(r.source, "main");
        assert_eq!(&r.payload[..], b"ON");
        assert_eq!(r.received_at, T0);
    }

    #[test]
    fn bad_payload_is_rejected_with_offset() {
        let r = dec("zigbee2mqtt/hall_pir", r#"{"occupancy": ?}"#, 9)
            .unwrap()
            .unwrap_err();
        assert!(
            r.reason == "payload: invalid JSON at byte 14: expected value",
            "{}",
            r.reason
        );
        let r = dec("zigbee2mqtt/hall_pir", r#"{"battery":99}"#, 9)
            .unwrap()
            .unwrap_err();
        assert_eq!(r.reason, "payload: pointer /occupancy is missing");
    }

    #[test]
    fn unmatched_topics_depend_on_strict() {
        assert!(dec("elsewhere", "ON", 1).is_none());
        let strict = DecodeRules {
            strict: true,
            ..LAX
        };
        let r = decode("main", &sample(), strict, "elsewhere", b"ON", T0)
            .unwrap()
            .remove(0)
            .unwrap_err();
        assert!(r.reason.contains("no mapping"), "{}", r.reason);
        assert_eq!(r.origin, "mqtt topic elsewhere");
    }

    #[test]
    fn ids_are_left_to_the_connection() {
        let a = dec("home/hall/motion", "ON", 5).unwrap().unwrap();
        assert_eq!(a.id, "");
        assert_eq!(a.delivery, None);
        let r = dec("home/hall/motion", "bad", 5).unwrap().unwrap_err();
        assert_eq!(r.id, "");
    }

    #[test]
    fn one_topic_feeds_several_mappings() {
        let m = compile_mappings(&source(
            vec![],
            vec![
                device(
                    "kitchen_motion",
                    Zigbee2MqttKind::Occupancy,
                    Some("kitchen_pir"),
                ),
                device(
                    "kitchen_motion",
                    Zigbee2MqttKind::Illuminance,
                    Some("kitchen_lux"),
                ),
            ],
        ))
        .unwrap();
        assert_eq!(subscriptions(&m), ["zigbee2mqtt/kitchen_motion"]);
        let both = decode(
            "main",
            &m,
            LAX,
            "zigbee2mqtt/kitchen_motion",
            br#"{"occupancy":true,"illuminance":31}"#,
            T0,
        )
        .unwrap();
        let got: Vec<(String, Reading)> = both
            .into_iter()
            .map(|r| {
                let o = r.unwrap();
                (o.sensor, o.value)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("kitchen_pir".to_owned(), Reading::Bool(true)),
                ("kitchen_lux".to_owned(), Reading::Number(31.0))
            ]
        );
        // A report of one property only feeds that one.
        let one = decode(
            "main",
            &m,
            LAX,
            "zigbee2mqtt/kitchen_motion",
            br#"{"occupancy":false}"#,
            T0,
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].as_ref().unwrap().sensor, "kitchen_pir");
        // Neither: one rejection naming both.
        let none = decode(
            "main",
            &m,
            LAX,
            "zigbee2mqtt/kitchen_motion",
            br#"{"battery":90}"#,
            T0,
        )
        .unwrap();
        assert_eq!(none.len(), 1);
        let reason = &none[0].as_ref().unwrap_err().reason;
        assert_eq!(
            reason,
            "payload: none of pointer /occupancy, pointer /illuminance is present"
        );
        // A wrong type is still a rejection, beside the good reading.
        let mixed = decode(
            "main",
            &m,
            LAX,
            "zigbee2mqtt/kitchen_motion",
            br#"{"occupancy":true,"illuminance":"dark"}"#,
            T0,
        )
        .unwrap();
        assert_eq!(mixed.len(), 2);
        assert!(mixed[0].is_ok() && mixed[1].is_err(), "{mixed:?}");
    }

    #[test]
    fn device_timestamp_sets_time_and_id() {
        let p = r#"{"presence":true,"ts":"2026-11-18T11:06:40.123Z"}"#;
        let a = dec("esp/desk/state", p, 1).unwrap().unwrap();
        assert_eq!(a.observed_at, Timestamp(1_795_000_000_123));
        assert_eq!(a.sensor, "desk");
        let r = dec(
            "esp/desk/state",
            r#"{"presence":true,"ts":"2126-11-18T11:06:40Z"}"#,
            1,
        )
        .unwrap()
        .unwrap_err();
        assert!(
            r.reason
                .starts_with("timestamp: device time 2126-11-18T11:06:40.000Z is"),
            "{}",
            r.reason
        );
        let r = dec("esp/desk/state", r#"{"presence":true,"ts":-1}"#, 1)
            .unwrap()
            .unwrap_err();
        assert!(r.reason.contains("before 2000"), "{}", r.reason);
        let r = dec("esp/desk/state", r#"{"presence":true,"ts":"later"}"#, 1)
            .unwrap()
            .unwrap_err();
        assert!(
            r.reason
                .starts_with("timestamp: pointer /ts is not a timestamp"),
            "{}",
            r.reason
        );
        let r = dec("esp/desk/state", r#"{"presence":true}"#, 1)
            .unwrap()
            .unwrap_err();
        assert_eq!(r.reason, "timestamp: pointer /ts is missing");
    }

    #[test]
    fn first_matching_mapping_wins() {
        let m = compile_mappings(&source(
            vec![
                topic("a/b", "specific", None, None),
                topic("a/+", "{1}_generic", None, None),
            ],
            vec![],
        ))
        .unwrap();
        let o = decode("s", &m, LAX, "a/b", b"1", T0)
            .unwrap()
            .remove(0)
            .unwrap();
        assert_eq!(o.sensor, "specific");
        let o = decode("s", &m, LAX, "a/c", b"1", T0)
            .unwrap()
            .remove(0)
            .unwrap();
        assert_eq!(o.sensor, "c_generic");
    }

    #[test]
    fn options_check_what_would_panic_in_rumqttc() {
        let mut s = source(vec![], vec![]);
        assert!(matches!(options("main", &s, ""), Err(MqttError::Config(_))));
        s.keep_alive = Duration::from_millis(500);
        assert!(matches!(
            options("main", &s, "c"),
            Err(MqttError::Config(_))
        ));
        s.keep_alive = Duration::ZERO;
        assert!(options("main", &s, "c").is_ok());
    }

    #[test]
    fn password_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut s = source(vec![], vec![]);
        s.username = Some("presenced".into());
        s.password_file = Some(path);
        let o = options("main", &s, "c").unwrap();
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("presenced", "s3cret")
        );
        s.password_file = Some(dir.path().join("missing"));
        let e = options("main", &s, "c").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("mqtt.main.password_file: cannot read ")
                && e.to_string().contains("missing"),
            "{e}"
        );
        assert!(matches!(e, MqttError::PasswordFile { .. }));
        assert!(e.is_fatal() && !e.is_retryable());
        assert!(MqttError::IngestClosed.is_retryable());
        s.username = None;
        s.password_file = None;
        assert!(options("main", &s, "c").unwrap().credentials().is_none());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(
            topic in "[a-zA-Z0-9/+# $._-]{0,40}",
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            pkid in proptest::prelude::any::<u16>(),
        ) {
            let m = sample();
            let _ = pkid;
            let strict = DecodeRules { strict: true, ..LAX };
            let _ = decode("main", &m, strict, &topic, &payload, T0);
        }

        #[test]
        fn json_payloads_never_panic(payload in "[\\[\\]{}\":,0-9a-zA-Z./+ -]{0,48}") {
            let m = sample();
            for topic in ["zigbee2mqtt/hall_pir", "esp/x/state", "home/x/motion"] {
                let _ = decode("main", &m, LAX, topic, payload.as_bytes(), T0);
            }
        }

        #[test]
        fn filters_and_captures_never_panic(filter in "[a+#/$]{0,12}", topic in "[a+#/$]{0,12}") {
            if let Ok(f) = TopicFilter::parse(&filter) {
                if let Some(caps) = f.captures(&topic) {
                    proptest::prop_assert_eq!(caps.len(), f.wildcards());
                }
            }
        }
    }
}
