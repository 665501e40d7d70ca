//! MQTT source: subscribes to the configured topics and turns each publish
//! into an [`Item`] for ingest.
//!
//! Delivery is at-least-once end to end: the session is persistent
//! (`clean_session = false`) and the PUBACK is sent only when ingest fires
//! the item's [`Ack`], i.e. once the observation is stored in JetStream.
//! Until then the broker keeps the message and redelivers it after a crash
//! or a lost connection. Redeliveries carry the same packet id, so they get
//! the same observation id and JetStream's duplicate window stores them
//! once.
//!
//! Brokers differ in when they redeliver: Mosquitto resends unacked
//! messages when the session resumes; nats-server's MQTT listener resends
//! them after its `mqtt.ack_wait` (30 s by default), on a live connection
//! too. Both keep the packet id. Retained messages are skipped unless the
//! mapping reads a device timestamp: their age is unknown.
//!
//! [`decode`] is the pure part (topic and payload to observation or
//! rejection); [`run`] is the connection loop around it.

use crate::config::{MqttSource, Zigbee2MqttKind};
use crate::observation::{input_id, Observation, OBSERVATION_SCHEMA};
use crate::sources::espresense::{Espresense, Outcome};
use crate::sources::payload::{extract_timestamp, extract_value, ValueSelector};
use crate::sources::topic::{SensorTemplate, TopicError, TopicFilter};
use crate::sources::{Ack, Item, Rejected};
use crate::time::Timestamp;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Zigbee2MQTT and ESPresense payloads are small, but a misbehaving device
/// should be rejected with a reason rather than drop the connection.
const MAX_PACKET_SIZE: usize = 1024 * 1024;
/// Requests (acks, subscribes) queued for the event loop. Acks arrive in
/// bursts when ingest catches up; a full queue falls back to an awaiting
/// send on a spawned task, so this only sizes the fast path.
const REQUEST_CAPACITY: usize = 4096;
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
/// Zigbee2MQTT devices. Two mappings with the same filter are refused:
/// the first would always win and the second would be dead config.
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
    if let Some((first, _)) = out
        .iter()
        .find(|(_, m)| m.filter.as_str() == mapping.filter.as_str())
    {
        return Err(TopicError::Template {
            template: mapping.sensor.as_str().to_owned(),
            reason: format!(
                "topic {:?} is already mapped by {first}; only the first mapping of a topic is used",
                mapping.filter.as_str()
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

fn find_mapping<'m, 't>(
    mappings: &'m [Mapping],
    topic: &'t str,
) -> Option<(&'m Mapping, Vec<&'t str>)> {
    mappings
        .iter()
        .find_map(|m| m.filter.captures(topic).map(|c| (m, c)))
}

/// Turns one incoming publish into an observation or a rejection; `None`
/// when no mapping claims the topic and `strict` is off. The first
/// matching mapping wins.
///
/// The id is a hash of source, topic and payload, plus the packet id unless
/// the mapping reads the device's own timestamp (which already makes the
/// payload unique per reading). A QoS 1 redelivery after a crash or a lost
/// connection carries the same packet id, so it gets the same id and is
/// stored once. Residual risk: two identical payloads on the same topic
/// that happen to reuse the same packet id within the duplicate window
/// (the broker recycles ids once acked) are stored once; for presence
/// sensors, a repeated identical reading carries no new information.
pub fn decode(
    source: &str,
    mappings: &[Mapping],
    strict: bool,
    topic: &str,
    payload: &[u8],
    pkid: u16,
    received_at: Timestamp,
) -> Option<Result<Observation, Rejected>> {
    let pk = pkid.to_be_bytes();
    let reject = |reason: String, with_pkid: bool| {
        let mut parts: Vec<&[u8]> = vec![
            b"mqtt-rejected",
            source.as_bytes(),
            topic.as_bytes(),
            payload,
        ];
        if with_pkid {
            parts.push(&pk);
        }
        Rejected {
            source: source.to_owned(),
            origin: format!("mqtt topic {topic}"),
            reason,
            payload: bytes::Bytes::copy_from_slice(payload),
            received_at,
            id: input_id(&parts),
        }
    };
    let Some((mapping, caps)) = find_mapping(mappings, topic) else {
        if !strict {
            return None;
        }
        let reason = "no mapping for this topic (ingest.strict_topics is on)";
        return Some(Err(reject(reason.into(), true)));
    };
    let with_pkid = mapping.timestamp.is_none();
    let sensor = match mapping.sensor.render(&caps) {
        Ok(s) => s,
        Err(reason) => return Some(Err(reject(reason, with_pkid))),
    };
    let value = match extract_value(payload, &mapping.value) {
        Ok(v) => v,
        Err(e) => return Some(Err(reject(format!("payload: {e}"), with_pkid))),
    };
    let observed_at = match &mapping.timestamp {
        None => received_at,
        Some(sel) => match extract_timestamp(payload, sel) {
            Ok(t) => t,
            Err(e) => return Some(Err(reject(format!("timestamp: {e}"), with_pkid))),
        },
    };
    let id = if with_pkid {
        input_id(&[b"mqtt", source.as_bytes(), topic.as_bytes(), payload, &pk])
    } else {
        input_id(&[b"mqtt", source.as_bytes(), topic.as_bytes(), payload])
    };
    Some(Ok(Observation {
        v: OBSERVATION_SCHEMA,
        sensor,
        value,
        observed_at,
        id,
        source: source.to_owned(),
    }))
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
    /// Times the channel to ingest was full, so reading paused: ingest is
    /// behind and the broker holds the rest.
    pub buffer_full: AtomicU64,
    /// Publishes acknowledged and dropped on purpose: no mapping (and not
    /// strict), or a retained message without a device timestamp.
    pub ignored: AtomicU64,
}

/// Why the source stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT mapping: {0}")]
    Mapping(#[from] TopicError),
    #[error("cannot read MQTT password file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("MQTT config: {0}")]
    Config(String),
    #[error("ingest stopped accepting input")]
    IngestClosed,
}

/// Reads the broker until `shutdown` turns true (or its sender is gone),
/// then disconnects cleanly and returns `Ok`. Connection problems are
/// retried forever with capped exponential backoff; only problems that a
/// retry cannot fix are errors.
pub async fn run(
    source: String,
    cfg: MqttSource,
    client_id: String,
    strict: bool,
    tx: mpsc::Sender<Item>,
    status: Arc<MqttStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), MqttError> {
    let mappings = compile_mappings(&cfg)?;
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
    let opts = options(&cfg, &client_id)?;
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut conn = Connection {
        source,
        broker: format!("{}:{}", cfg.host, cfg.port),
        mappings,
        filters,
        espresense,
        strict,
        client,
        tx,
        status,
        generation: Arc::new(AtomicU64::new(0)),
        in_flight: InFlight::default(),
        runtime: tokio::runtime::Handle::current(),
        connected: false,
        outage_logged: false,
        ever_connected: false,
        last_full_warn: None,
    };
    let result = conn
        .serve(eventloop, &mut shutdown, cfg.reconnect_max)
        .await;
    conn.status.connected.store(false, Ordering::Relaxed);
    result
}

fn options(cfg: &MqttSource, client_id: &str) -> Result<MqttOptions, MqttError> {
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
        .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE);
    let password = match &cfg.password_file {
        None => None,
        Some(path) => Some(crate::store::connect::read_secret(path).map_err(|source| {
            MqttError::PasswordFile {
                path: path.clone(),
                source,
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

struct Connection {
    source: String,
    broker: String,
    mappings: Vec<Mapping>,
    filters: Vec<String>,
    /// The ESPresense preset; it keeps per-person state across messages.
    espresense: Option<Espresense>,
    strict: bool,
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
    /// Where acks that find the request queue full finish sending.
    runtime: tokio::runtime::Handle,
    connected: bool,
    /// Whether the current outage has been logged (once per outage).
    outage_logged: bool,
    ever_connected: bool,
    last_full_warn: Option<Instant>,
}

impl Connection {
    async fn serve(
        &mut self,
        mut eventloop: EventLoop,
        shutdown: &mut watch::Receiver<bool>,
        reconnect_max: Duration,
    ) -> Result<(), MqttError> {
        let mut backoff = Backoff::new(BACKOFF_START, reconnect_max);
        let result = loop {
            let event = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break Ok(()),
                ev = eventloop.poll() => ev,
            };
            let flow = match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    self.on_connected(ack.session_present);
                    Ok(Flow::Continue)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(p, shutdown).await,
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    self.on_suback(&s.return_codes);
                    Ok(Flow::Continue)
                }
                Ok(_) => Ok(Flow::Continue),
                Err(e) => {
                    self.on_connection_error(&e);
                    let delay = backoff.next();
                    tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|s| *s) => Ok(Flow::Stop),
                        _ = tokio::time::sleep(delay) => Ok(Flow::Continue),
                    }
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
        self.status.connects.fetch_add(1, Ordering::Relaxed);
        if self.outage_logged {
            info!(source = %self.source, broker = %self.broker, session_present, "MQTT broker reachable again");
        } else if !self.ever_connected {
            info!(source = %self.source, broker = %self.broker, session_present, "connected to MQTT broker");
        } else {
            debug!(source = %self.source, broker = %self.broker, session_present, "reconnected to MQTT broker");
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

    async fn on_publish(
        &mut self,
        p: Publish,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Flow, MqttError> {
        self.status.received.fetch_add(1, Ordering::Relaxed);
        let received_at = Timestamp::now();
        // nats-server resends an unacked message on a live connection once
        // its `ack_wait` runs out. The original is still in ingest and its
        // ack covers both; a second PUBACK could hit a later message that
        // reused the packet id. So a copy of an in-flight message is
        // dropped; if the original is dropped unacked, the broker resends.
        if p.qos != QoS::AtMostOnce
            && self
                .in_flight
                .contains(self.generation.load(Ordering::Acquire), p.pkid)
        {
            debug!(source = %self.source, topic = %p.topic, pkid = p.pkid, "MQTT redelivery of a message still in flight; dropped");
            self.status.ignored.fetch_add(1, Ordering::Relaxed);
            return Ok(Flow::Continue);
        }
        // A retained message is the last value the broker saw, from an
        // unknown time; stamping it with the receive time would make an old
        // "motion" look current. Only a device timestamp makes it usable.
        if p.retain {
            let has_time =
                find_mapping(&self.mappings, &p.topic).is_some_and(|(m, _)| m.timestamp.is_some());
            if !has_time {
                debug!(source = %self.source, topic = %p.topic, "ignoring retained MQTT message: no device timestamp");
                self.status.ignored.fetch_add(1, Ordering::Relaxed);
                self.ack(&p).fire();
                return Ok(Flow::Continue);
            }
        }
        let outcome = match self.espresense.as_mut() {
            Some(es) => es.handle(&self.source, &p.topic, &p.payload, received_at),
            None => Outcome::NotMine,
        };
        match outcome {
            Outcome::NotMine => {}
            Outcome::Ignored => {
                debug!(source = %self.source, topic = %p.topic, "ESPresense device not configured; ignored");
                self.status.ignored.fetch_add(1, Ordering::Relaxed);
                self.ack(&p).fire();
                return Ok(Flow::Continue);
            }
            Outcome::Rejected(reason) => {
                self.status.rejected.fetch_add(1, Ordering::Relaxed);
                let rej = Rejected {
                    source: self.source.clone(),
                    origin: format!("mqtt topic {}", p.topic),
                    reason,
                    payload: p.payload.clone(),
                    received_at,
                    id: input_id(&[
                        b"mqtt-rejected",
                        self.source.as_bytes(),
                        p.topic.as_bytes(),
                        &p.payload,
                        &p.pkid.to_be_bytes(),
                    ]),
                };
                let item = Item::Rejected(rej, self.ack(&p));
                return self.forward(item, shutdown).await;
            }
            Outcome::Observations(obs) => {
                // The upstream ack travels with the last item: the message
                // is done once everything it caused is stored.
                let mut ack = Some(self.ack(&p));
                let n = obs.len();
                if n == 0 {
                    if let Some(a) = ack.take() {
                        a.fire();
                    }
                    return Ok(Flow::Continue);
                }
                for (i, o) in obs.into_iter().enumerate() {
                    let a = if i + 1 == n {
                        ack.take().unwrap_or_else(Ack::none)
                    } else {
                        Ack::none()
                    };
                    if let Flow::Stop = self.forward(Item::Observation(o, a), shutdown).await? {
                        return Ok(Flow::Stop);
                    }
                }
                return Ok(Flow::Continue);
            }
        }
        let decoded = decode(
            &self.source,
            &self.mappings,
            self.strict,
            &p.topic,
            &p.payload,
            p.pkid,
            received_at,
        );
        let item = match decoded {
            None => {
                debug!(source = %self.source, topic = %p.topic, "no mapping for MQTT topic; ignored");
                self.status.ignored.fetch_add(1, Ordering::Relaxed);
                self.ack(&p).fire();
                return Ok(Flow::Continue);
            }
            Some(Ok(obs)) => Item::Observation(obs, self.ack(&p)),
            Some(Err(rej)) => {
                self.status.rejected.fetch_add(1, Ordering::Relaxed);
                debug!(source = %self.source, topic = %p.topic, reason = %rej.reason, "MQTT message rejected");
                Item::Rejected(rej, self.ack(&p))
            }
        };
        self.forward(item, shutdown).await
    }

    /// Hands the item to ingest. When ingest is behind, this waits instead
    /// of dropping: while it waits nothing is read, the broker stops
    /// sending once its in-flight window is full and keeps the rest.
    /// (A wait longer than the keep-alive lets the broker drop the
    /// connection; the unacked messages are then redelivered, and their
    /// ids make that harmless.)
    async fn forward(
        &mut self,
        item: Item,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Flow, MqttError> {
        let item = match self.tx.try_send(item) {
            Ok(()) => return Ok(Flow::Continue),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(MqttError::IngestClosed),
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        self.status.buffer_full.fetch_add(1, Ordering::Relaxed);
        if self
            .last_full_warn
            .is_none_or(|t| t.elapsed() >= BUFFER_FULL_LOG_EVERY)
        {
            self.last_full_warn = Some(Instant::now());
            warn!(
                source = %self.source,
                times = self.status.buffer_full.load(Ordering::Relaxed),
                "ingest is behind; holding back MQTT input (the broker keeps it)"
            );
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => Ok(Flow::Stop),
            sent = self.tx.send(item) => match sent {
                Ok(()) => Ok(Flow::Continue),
                Err(_) => Err(MqttError::IngestClosed),
            },
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
        let runtime = self.runtime.clone();
        let guard = self.in_flight.insert(issued, p.pkid);
        Ack::new(move || {
            if generation.load(Ordering::Acquire) != issued {
                debug!(
                    pkid = bare.pkid,
                    "MQTT connection changed since delivery; not acking, the broker redelivers"
                );
                return;
            }
            // The guard goes once the PUBACK is queued, so the packet id is
            // free in our books no earlier than in the broker's.
            if client.try_ack(&bare).is_err() {
                runtime.spawn(async move {
                    if let Err(error) = client.ack(&bare).await {
                        debug!(pkid = bare.pkid, %error, "MQTT ack not sent; the event loop is gone");
                    }
                    drop(guard);
                });
            }
        })
    }

    async fn disconnect(&mut self, eventloop: &mut EventLoop) {
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

/// The set behind [`Connection::in_flight`]. Entries carry the connection
/// generation, so acks of an old connection never touch the new one's.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<HashSet<(u64, u16)>>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, u16)>> {
        // Nothing can leave the set inconsistent; a panic elsewhere while
        // holding the lock must not stop acks.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn contains(&self, generation: u64, pkid: u16) -> bool {
        self.lock().contains(&(generation, pkid))
    }

    /// Marks the packet in flight until the returned guard is dropped
    /// (ack fired, or dropped unfired by ingest).
    fn insert(&self, generation: u64, pkid: u16) -> InFlightGuard {
        self.lock().insert((generation, pkid));
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
    }
}

/// Capped exponential backoff with "equal jitter": half the delay is fixed,
/// half random, so many daemons restarted together do not reconnect in
/// lockstep, and no delay is shorter than half its step.
struct Backoff {
    start: Duration,
    cap: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    fn new(start: Duration, cap: Duration) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let start = start.min(cap);
        Backoff {
            start,
            cap,
            current: start,
            rng: seed | 1,
        }
    }

    fn reset(&mut self) {
        self.current = self.start;
    }

    fn next(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.cap);
        // xorshift64: good enough for jitter, no extra dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = step / 2;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        half + half.mul_f64(frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TopicMapping, Zigbee2Mqtt, Zigbee2MqttDevice};
    use crate::observation::Reading;

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

    fn dec(topic: &str, payload: &str, pkid: u16) -> Option<Result<Observation, Rejected>> {
        decode(
            "main",
            &sample(),
            false,
            topic,
            payload.as_bytes(),
            pkid,
            T0,
        )
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
    fn duplicate_filters_are_refused() {
        let e = compile_mappings(&source(
            vec![topic("zigbee2mqtt/pir", "pir", Some("/occupancy"), None)],
            vec![device("pir", Zigbee2MqttKind::Illuminance, Some("pir_lux"))],
        ))
        .unwrap_err();
        assert!(
            e.to_string().starts_with("zigbee2mqtt.devices[0]: ")
                && e.to_string().contains("already mapped by topics[0]"),
            "{e}"
        );
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
        let r = decode("main", &sample(), true, "elsewhere", b"ON", 1, T0)
            .unwrap()
            .unwrap_err();
        assert!(r.reason.contains("no mapping"), "{}", r.reason);
        assert_eq!(r.origin, "mqtt topic elsewhere");
    }

    #[test]
    fn ids_follow_packet_id_without_device_timestamp() {
        let a = dec("home/hall/motion", "ON", 5).unwrap().unwrap();
        let redelivered = dec("home/hall/motion", "ON", 5).unwrap().unwrap();
        let next = dec("home/hall/motion", "ON", 6).unwrap().unwrap();
        assert_eq!(a.id, redelivered.id, "redelivery keeps the id");
        assert_ne!(a.id, next.id, "a new message with the same payload is new");
        let other_source = decode("other", &sample(), false, "home/hall/motion", b"ON", 5, T0)
            .unwrap()
            .unwrap();
        assert_ne!(a.id, other_source.id);
        let r1 = dec("home/hall/motion", "bad", 5).unwrap().unwrap_err();
        let r2 = dec("home/hall/motion", "bad", 6).unwrap().unwrap_err();
        assert_ne!(r1.id, r2.id);
        assert_ne!(r1.id, a.id);
    }

    #[test]
    fn device_timestamp_sets_time_and_id() {
        let p = r#"{"presence":true,"ts":"2026-11-18T11:06:40.123Z"}"#;
        let a = dec("esp/desk/state", p, 1).unwrap().unwrap();
        let b = dec("esp/desk/state", p, 2).unwrap().unwrap();
        assert_eq!(a.observed_at, Timestamp(1_795_000_000_123));
        assert_eq!(a.sensor, "desk");
        assert_eq!(
            a.id, b.id,
            "the payload with its timestamp identifies the reading"
        );
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
        let o = decode("s", &m, false, "a/b", b"1", 1, T0).unwrap().unwrap();
        assert_eq!(o.sensor, "specific");
        let o = decode("s", &m, false, "a/c", b"1", 1, T0).unwrap().unwrap();
        assert_eq!(o.sensor, "c_generic");
    }

    #[test]
    fn options_check_what_would_panic_in_rumqttc() {
        let mut s = source(vec![], vec![]);
        assert!(matches!(options(&s, ""), Err(MqttError::Config(_))));
        s.keep_alive = Duration::from_millis(500);
        assert!(matches!(options(&s, "c"), Err(MqttError::Config(_))));
        s.keep_alive = Duration::ZERO;
        assert!(options(&s, "c").is_ok());
    }

    #[test]
    fn password_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut s = source(vec![], vec![]);
        s.username = Some("presenced".into());
        s.password_file = Some(path);
        let o = options(&s, "c").unwrap();
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("presenced", "s3cret")
        );
        s.password_file = Some(dir.path().join("missing"));
        let e = options(&s, "c").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        s.username = None;
        s.password_file = None;
        assert!(options(&s, "c").unwrap().credentials().is_none());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(
            topic in "[a-zA-Z0-9/+# $._-]{0,40}",
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            pkid in proptest::prelude::any::<u16>(),
        ) {
            let m = sample();
            let _ = decode("main", &m, true, &topic, &payload, pkid, T0);
        }

        #[test]
        fn json_payloads_never_panic(payload in "[\\[\\]{}\":,0-9a-zA-Z./+ -]{0,48}") {
            let m = sample();
            for topic in ["zigbee2mqtt/hall_pir", "esp/x/state", "home/x/motion"] {
                let _ = decode("main", &m, false, topic, payload.as_bytes(), 1, T0);
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

    #[test]
    fn backoff_doubles_to_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let steps: Vec<Duration> = (0..6).map(|_| b.next()).collect();
        let nominal = [100u64, 200, 400, 800, 1000, 1000];
        for (d, n) in steps.iter().zip(nominal) {
            let n = Duration::from_millis(n);
            assert!(
                *d >= n / 2 && *d <= n,
                "{d:?} not within [{:?}, {n:?}]",
                n / 2
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
