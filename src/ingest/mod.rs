//! Ingest: observations into stream `SENSORS`, rejects into `REJECTED`.
//!
//! Items are taken from the sources' bounded channel in chunks and published
//! pipelined (every publish of a chunk is sent before any ack is awaited).
//! Each item's upstream [`Ack`](crate::sources::Ack) fires only once
//! JetStream has acknowledged it, and a publish that failed for a reason
//! that can pass (leaf away, timeout) is retried with the same
//! `Nats-Msg-Id`, with jittered capped backoff, until it is stored, so
//! nothing is lost and nothing is stored twice while the leaf is away.
//!
//! A publish the server will refuse every time ([`is_retryable`] false:
//! over the server's max payload, over the stream's message size) is not
//! retried: an observation is kept in `REJECTED` with the error as its
//! reason, a rejection is logged at ERROR, and either is acknowledged
//! upstream, so one bad item never stalls the pipeline. `REJECTED` records
//! are cut to fit the server's max payload before they are sent (header
//! [`TRUNCATED_HEADER`] says how much was kept).
//!
//! With several instances of one service ([`Gate`]), a chunk is published
//! only while this instance may read: it holds the service's lease with a
//! fresh renewal, or the holder runs no ingest. An instance that finds
//! another holder running ingest (it was frozen, or cut from its leaf,
//! while the other took over) drops its unstored MQTT QoS 1 readings
//! without acknowledging them: the broker hands them to the new holder
//! with the session, which stores them once. Publishing them too would
//! store each twice under two ids.

pub mod metrics;
pub mod start;

use crate::base::backoff::Backoff;
use crate::base::ownership::Role;
use crate::metrics::Metrics;
use crate::naming::Site;
use crate::observation::{Observation, DELIVERY_HEADER};
use crate::sources::{Ack, Item, Rejected};
use crate::store::leader::Fence;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use metrics::IngestMetrics;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Whether this instance may store what its sources read now (see the
/// module doc): the service's lease fence and role.
pub struct Gate {
    pub fence: Fence,
    pub role: watch::Receiver<Role>,
}

/// What [`Gate::clear`] found.
#[derive(Debug, PartialEq)]
enum Clear {
    Publish,
    /// Another instance running ingest holds the lease.
    HandedOver,
}

impl Gate {
    /// Waits until it is clear whether this instance may publish: its
    /// fence is valid, or the role says who else holds the lease. While
    /// neither (a lapse not yet resolved: just thawed, or cut from the
    /// leaf) it waits, as the keeper decides within one look.
    async fn clear(&mut self) -> Clear {
        loop {
            if self.fence.valid() {
                return Clear::Publish;
            }
            let r = self.role.borrow_and_update().clone();
            if r.another_runs_ingest() {
                return Clear::HandedOver;
            }
            // A holder without ingest leaves the reading here; no
            // election yet or the lease released at shutdown: nobody
            // else reads this session.
            if (!r.active && r.holder.is_some()) || r.since.is_none() {
                return Clear::Publish;
            }
            let changed = tokio::time::timeout(Duration::from_millis(100), self.role.changed());
            if let Ok(Err(_)) = changed.await {
                // The keeper is gone (shutdown): drain.
                return Clear::Publish;
            }
        }
    }
}

/// Indices of the chunk's MQTT QoS 1 readings not in `done`: the ones
/// the broker redelivers to the next holder when left unacknowledged.
fn redeliverable(chunk: &[Item], todo: &[usize]) -> HashSet<usize> {
    todo.iter()
        .copied()
        .filter(|&i| matches!(&chunk[i], Item::Observation(obs, _) if obs.delivery.is_some()))
        .collect()
}

/// Header carrying why an input was rejected.
pub const REASON_HEADER: &str = "Presenced-Reason";
/// Header carrying where a rejected input came from.
pub const ORIGIN_HEADER: &str = "Presenced-Origin";
/// Header carrying when a rejected input was received.
pub const RECEIVED_HEADER: &str = "Presenced-Received-At";
/// Header on a `REJECTED` record whose input was cut to fit the server's
/// max payload: `kept the first <n> of <m> bytes`.
pub const TRUNCATED_HEADER: &str = "Presenced-Truncated";
/// Longest reason or origin kept in a header (a topic can be 64 KiB).
const MAX_HEADER_TEXT: usize = 1024;
/// Room for the header block's framing (`NATS/1.0`, separators) and the
/// `Nats-Msg-Id` header name, beyond the values counted one by one.
const HEADER_OVERHEAD: usize = 256;

/// Turns an item into (subject, message) for JetStream; `max_payload` is
/// the server's limit for headers and payload together.
fn message(site: &Site, item: &Item, max_payload: usize) -> (String, PublishMessage) {
    match item {
        Item::Observation(obs, _) => (site.sensors_subject(&obs.sensor), observation_message(obs)),
        Item::Rejected(rej, _) => (
            site.rejected_subject(&rej.source),
            rejected_message(rej, max_payload),
        ),
    }
}

/// Whether a failed publish can succeed later unchanged. Size refusals
/// (client-side max payload, the stream's `max_msg_size`) and expectation
/// failures fail the same way every time; a timeout, a broken connection,
/// a missing stream (not provisioned yet) or a full store can pass.
pub fn is_retryable(e: &PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => false,
        PublishErrorKind::Other => !std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|js| {
                js.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
            }),
        _ => true,
    }
}

fn observation_message(obs: &Observation) -> PublishMessage {
    // Serializing plain data into JSON cannot fail; an empty payload would
    // be rejected by the engine rather than crash anything.
    let payload = serde_json::to_vec(obs).unwrap_or_default();
    let m = PublishMessage::build()
        .payload(Bytes::from(payload))
        .message_id(&obs.id);
    match &obs.delivery {
        Some(d) => m.header(DELIVERY_HEADER, header_text(d).as_str()),
        None => m,
    }
}

/// Header values are one line of text.
fn header_text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn rejected_message(rej: &Rejected, max_payload: usize) -> PublishMessage {
    let (headers, payload) = rejected_parts(rej, max_payload);
    let mut m = PublishMessage::build().payload(payload).message_id(&rej.id);
    for (name, value) in headers {
        m = m.header(name, value.as_str());
    }
    m
}

/// The headers (beside `Nats-Msg-Id`) and payload of a `REJECTED` record,
/// the payload cut so that the whole stays within `max_payload`.
fn rejected_parts(rej: &Rejected, max_payload: usize) -> (Vec<(&'static str, String)>, Bytes) {
    let mut headers = vec![
        (
            REASON_HEADER,
            clip(header_text(&rej.reason), MAX_HEADER_TEXT),
        ),
        (
            ORIGIN_HEADER,
            clip(header_text(&rej.origin), MAX_HEADER_TEXT),
        ),
        (RECEIVED_HEADER, rej.received_at.to_string()),
    ];
    let used: usize = headers
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + rej.id.len()
        + TRUNCATED_HEADER.len()
        + 64
        + HEADER_OVERHEAD;
    let room = max_payload.saturating_sub(used);
    if rej.payload.len() > room {
        headers.push((
            TRUNCATED_HEADER,
            format!("kept the first {room} of {} bytes", rej.payload.len()),
        ));
        (headers, rej.payload.slice(..room))
    } else {
        (headers, rej.payload.clone())
    }
}

/// Logs rejections at WARN, at most once per interval and source; the rest
/// are counted and mentioned in the next line.
struct RejectLog {
    every: Duration,
    last: HashMap<String, (Instant, u64)>,
}

impl RejectLog {
    /// Counts `rej` (one [`metrics::INPUT_REJECTED`]) and logs it if its
    /// source's line is due, with the number left out since the last.
    fn note(&mut self, rej: &Rejected, metrics: &IngestMetrics) {
        let now = Instant::now();
        let entry = self
            .last
            .entry(rej.source.clone())
            .or_insert((now - self.every - Duration::from_millis(1), 0));
        let due = now.duration_since(entry.0) > self.every;
        crate::emit!(
            metrics::INPUT_REJECTED,
            &metrics.rejects,
            if due;
            source = %rej.source,
            origin = %rej.origin,
            reason = %rej.reason,
            suppressed = entry.1
        );
        if due {
            *entry = (now, 0);
        } else {
            entry.1 += 1;
        }
    }
}

/// Runs until every sender of `rx` is dropped and the channel is drained.
pub async fn run(
    js: jetstream::Context,
    site: Site,
    max_in_flight: usize,
    reject_log_every: Duration,
    mut rx: mpsc::Receiver<Item>,
    metrics: Arc<IngestMetrics>,
    mut gate: Option<Gate>,
) {
    let mut log = RejectLog {
        every: reject_log_every,
        last: HashMap::new(),
    };
    let mut chunk: Vec<Item> = Vec::with_capacity(max_in_flight);
    let core = js.client();
    loop {
        chunk.clear();
        if rx.recv_many(&mut chunk, max_in_flight.max(1)).await == 0 {
            tracing::debug!("ingest: all sources closed");
            return;
        }
        Metrics::set(&metrics.buffer_depth, rx.len() as u64);
        let received = chunk
            .iter()
            .filter(|i| matches!(i, Item::Observation(..)))
            .count();
        Metrics::add(&metrics.observations_in, received as u64);
        let (refused, handed) = store_chunk(&js, &site, &chunk, &metrics, gate.as_mut()).await;
        if !handed.is_empty() {
            tracing::warn!(readings = handed.len(), "another instance of this service took its lease and runs ingest: unstored MQTT QoS 1 readings left unacknowledged for the broker to hand to it");
        }
        for (i, item) in chunk.drain(..).enumerate() {
            if handed.contains(&i) {
                // Dropped unfired: not acknowledged upstream.
                continue;
            }
            let refusal = refused.get(&i);
            match (item, refusal) {
                (Item::Observation(obs, ack), None) => {
                    Metrics::inc(&metrics.observations_stored);
                    ack.fire();
                    publish_live(&core, &site, &obs, &metrics).await;
                }
                (Item::Rejected(rej, ack), None) => {
                    metrics.note_reject(last_reject(&rej));
                    log.note(&rej, &metrics);
                    ack.fire();
                }
                (Item::Observation(obs, ack), Some(error)) => {
                    let rej = refused_observation(&obs, error);
                    let (kept, _) = store_chunk(
                        &js,
                        &site,
                        &[Item::Rejected(rej.clone(), Ack::none())],
                        &metrics,
                        None,
                    )
                    .await;
                    if kept.is_empty() {
                        metrics.note_reject(last_reject(&rej));
                        log.note(&rej, &metrics);
                    } else {
                        tracing::error!(source = %obs.source, sensor = %obs.sensor, %error, "observation refused by SENSORS and cannot be kept in REJECTED either; dropped");
                    }
                    ack.fire();
                }
                (Item::Rejected(rej, ack), Some(error)) => {
                    tracing::error!(source = %rej.source, origin = %rej.origin, reason = %rej.reason, %error, "rejected input refused by REJECTED; dropped");
                    ack.fire();
                }
            }
        }
    }
}

/// An observation `SENSORS` refused for good, as a `REJECTED` record.
fn refused_observation(obs: &Observation, error: &str) -> Rejected {
    Rejected {
        source: obs.source.clone(),
        origin: format!("sensor {} (refused by stream SENSORS)", obs.sensor),
        reason: format!("cannot be stored in SENSORS: {error}"),
        payload: Bytes::from(serde_json::to_vec(obs).unwrap_or_default()),
        received_at: crate::time::Timestamp::now(),
        id: crate::observation::delivery_id(),
    }
}

/// Publishes every item of the chunk, retrying failures that can pass
/// (same message id, so a publish that was stored but whose ack was lost
/// is not stored twice) with jittered capped backoff until all are stored
/// or refused for good. Returns the refused ones: index and error.
/// Sends an accepted reading on `live.<site>.<sensor>` (core NATS, no
/// persistence, nobody acks): the status page and `watch`ers see readings
/// as they arrive. Best effort: a failed send is not the pipeline's
/// problem, the reading is in SENSORS. Kept as the sensor's last reading
/// in `metrics.live` too, for the status page in this process.
async fn publish_live(
    core: &async_nats::Client,
    site: &Site,
    obs: &crate::observation::Observation,
    metrics: &IngestMetrics,
) {
    let body = serde_json::json!({
        "v": crate::observation::OBSERVATION_SCHEMA,
        "sensor": obs.sensor,
        "value": obs.value,
        "observed_at": obs.observed_at,
        "source": obs.source,
    });
    let _ = core
        .publish(site.live_subject(&obs.sensor), body.to_string().into())
        .await;
    let mut live = metrics.live.write().unwrap_or_else(|p| p.into_inner());
    match live.get_mut(&obs.sensor) {
        Some(last) => *last = body,
        None => {
            live.insert(obs.sensor.clone(), body);
        }
    }
}

/// With a `gate`, each attempt first waits until it is clear whether this
/// instance may publish; handed over, the chunk's unstored MQTT QoS 1
/// readings are returned (second) instead of published.
async fn store_chunk(
    js: &jetstream::Context,
    site: &Site,
    chunk: &[Item],
    metrics: &IngestMetrics,
    mut gate: Option<&mut Gate>,
) -> (HashMap<usize, String>, HashSet<usize>) {
    let mut refused = HashMap::new();
    let mut handed = HashSet::new();
    let mut todo: Vec<usize> = (0..chunk.len()).collect();
    let mut backoff = Backoff::new(RETRY_START, RETRY_MAX);
    let mut outage_logged = false;
    while !todo.is_empty() {
        if let Some(g) = gate.as_deref_mut() {
            if g.clear().await == Clear::HandedOver {
                handed.extend(redeliverable(chunk, &todo));
                todo.retain(|i| !handed.contains(i));
                if todo.is_empty() {
                    break;
                }
            }
        }
        let max_payload = js.client().server_info().max_payload;
        let messages = todo
            .iter()
            .map(|&i| message(site, &chunk[i], max_payload))
            .collect();
        let results = crate::store::publish::publish_all(js, messages).await;
        let mut failed = Vec::new();
        let mut last_error = None;
        for (&i, r) in todo.iter().zip(results) {
            match r {
                Ok(_) => {}
                Err(e) if !is_retryable(&e) => {
                    refused.insert(i, e.to_string());
                }
                Err(e) => {
                    failed.push(i);
                    last_error = Some(e.to_string());
                }
            }
        }
        if failed.is_empty() {
            if outage_logged {
                tracing::info!("stream SENSORS reachable again; buffered input stored");
                crate::metrics::unstalled(&metrics.stalled);
            }
            return (refused, handed);
        }
        Metrics::add(&metrics.publish_retries, failed.len() as u64);
        crate::metrics::stalled(&metrics.stalled, last_error.clone().unwrap_or_default());
        if !outage_logged {
            tracing::warn!(
                failed = failed.len(),
                error = last_error.as_deref().unwrap_or("unknown"),
                "cannot store input in JetStream; holding it and retrying"
            );
            outage_logged = true;
        }
        todo = failed;
        tokio::time::sleep(backoff.next_delay()).await;
    }
    (refused, handed)
}

/// First retry delay of a failed publish; doubles (jittered) up to
/// [`RETRY_MAX`].
const RETRY_START: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How far back [`StoredDeliveries::recent`] looks. A broker redelivers
/// a session's unacknowledged messages as soon as the daemon reconnects,
/// so this only has to cover a restart; a message first stored longer ago
/// than this and redelivered after a crash is stored a second time.
pub const REDELIVERY_LOOKBACK: Duration = Duration::from_secs(600);

/// Most messages [`StoredDeliveries::recent`] reads back, newest last. A
/// source holds at most [`crate::sources::mqtt::UNACKED_MAX`] deliveries
/// unacknowledged, so the ones an earlier process stored and could not
/// acknowledge are among its last stored messages; this leaves room for
/// other sources' messages in between. Without it, a site storing 2,000
/// readings a second had 1.2 million messages in the lookback to read at
/// every start (hundreds of MB, and past the look-up's time limit).
pub const REDELIVERY_SCAN_MAX: u64 = 16 * crate::sources::mqtt::UNACKED_MAX;

/// Most time one message of the look-up may take to arrive.
const LOOKUP_IDLE: Duration = Duration::from_secs(5);

/// The MQTT QoS 1 deliveries stored in `SENSORS`: how the MQTT source
/// recognises a redelivery of a message an earlier process stored but
/// could not acknowledge (killed in between), so that it is stored once.
#[derive(Clone)]
pub struct StoredDeliveries {
    js: jetstream::Context,
    site: Site,
}

impl StoredDeliveries {
    pub fn new(js: jetstream::Context, site: Site) -> Self {
        StoredDeliveries { js, site }
    }

    /// [`recent`](Self::recent) as the MQTT source takes it.
    pub fn lookup(self) -> crate::sources::mqtt::StoredLookup {
        std::sync::Arc::new(move |source: String| {
            let this = self.clone();
            Box::pin(async move { this.recent(&source).await })
        })
    }

    /// Delivery header -> `Nats-Msg-Id` of this source's messages stored
    /// in the last [`REDELIVERY_LOOKBACK`], among the last
    /// [`REDELIVERY_SCAN_MAX`] messages of the stream. Reads headers only,
    /// through a named ordered consumer: what the owner's ACL grant on
    /// `SENSORS` allows.
    pub async fn recent(&self, source: &str) -> Result<HashMap<String, String>, String> {
        use futures::StreamExt as _;
        let stream = self
            .js
            .get_stream(crate::naming::SENSORS_STREAM)
            .await
            .map_err(|e| format!("stream SENSORS: {e}"))?;
        let last = stream.cached_info().state.last_sequence;
        let since = time::OffsetDateTime::now_utc() - REDELIVERY_LOOKBACK;
        let deliver_policy = if last > REDELIVERY_SCAN_MAX {
            jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: last - REDELIVERY_SCAN_MAX + 1,
            }
        } else {
            jetstream::consumer::DeliverPolicy::ByStartTime { start_time: since }
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                // Named: the ACL lets readers of SENSORS create named
                // consumers only (that keeps them off the engine's durable).
                name: Some(crate::store::consumer_name(
                    self.js.client(),
                    "ingest-redelivery",
                )),
                filter_subject: self.site.sensors_filter(),
                deliver_policy,
                headers_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("reading SENSORS: {e}"))?;
        let mut found = HashMap::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(found);
        }
        let prefix = format!("mqtt {source} ");
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| format!("reading SENSORS: {e}"))?;
        loop {
            let m = match tokio::time::timeout(LOOKUP_IDLE, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(format!("reading SENSORS: {e}")),
                Ok(None) | Err(_) => return Err("reading SENSORS: no message in time".into()),
            };
            let info = m.info().map_err(|e| format!("reading SENSORS: {e}"))?;
            let recent = info.published >= since;
            if let Some(h) = m.headers.as_ref().filter(|_| recent) {
                if let (Some(d), Some(id)) = (h.get(DELIVERY_HEADER), h.get("Nats-Msg-Id")) {
                    if d.as_str().starts_with(&prefix) {
                        found.insert(d.as_str().to_owned(), id.as_str().to_owned());
                    }
                }
            }
            let pending = info.pending;
            if pending == 0 {
                return Ok(found);
            }
        }
    }
}

/// The `[ingest]` section: how observations are buffered and stored.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Observations held in memory while the leaf is unreachable. When
    /// full, sources wait for room: MQTT input is not acknowledged
    /// meanwhile (the broker keeps it; each wait counts in
    /// `presenced_ingest_buffer_full_total`), a serial port is not read
    /// (the device's and the kernel's buffers hold what arrives). An MQTT
    /// source also stops reading at 4,096 QoS 1 messages held
    /// unacknowledged (`sources::mqtt::UNACKED_MAX`), whatever the
    /// broker's window.
    #[serde(default = "default_buffer")]
    pub buffer: usize,
    /// Most observations taken from the buffer as one batch: the batch is
    /// published to `SENSORS` and every ack of it awaited before the next
    /// batch (and before the sources' own acks fire). Acks outstanding on
    /// the wire are bounded separately, by a fixed window of 1024.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Reject (into `REJECTED`) messages on subscribed topics that no
    /// mapping claims, instead of ignoring them.
    #[serde(default)]
    pub strict_topics: bool,
    /// Least time between two rejection WARN lines of one source; the
    /// rest are counted, and all are kept in `REJECTED`.
    #[serde(default = "default_reject_log_every", with = "humantime_serde")]
    pub reject_log_every: Duration,
    /// How far ahead of the receive time a device's own timestamp may be.
    /// Beyond it (or before 2000-01-01) the reading is rejected into
    /// `REJECTED`: a reading from the future would move its zone's clock
    /// forward. Default 5 minutes: NTP-synced devices are within a second,
    /// a drifting RTC within a few.
    #[serde(default = "default_max_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            buffer: default_buffer(),
            max_in_flight: default_max_in_flight(),
            strict_topics: false,
            reject_log_every: default_reject_log_every(),
            max_clock_skew: default_max_clock_skew(),
        }
    }
}

fn default_buffer() -> usize {
    100_000
}
fn default_max_in_flight() -> usize {
    1024
}
fn default_reject_log_every() -> Duration {
    Duration::from_secs(10)
}
fn default_max_clock_skew() -> Duration {
    Duration::from_secs(300)
}

/// Checks `[ingest]`, pushing every problem found.
pub fn check_config(ingest: &IngestConfig, p: &mut crate::base::problems::Problems) {
    if ingest.buffer < 1 {
        p.push("ingest.buffer", "must be at least 1, got 0");
    }
    p.positive("ingest.max_clock_skew", ingest.max_clock_skew);
    if ingest.max_in_flight < 1 {
        p.push("ingest.max_in_flight", "must be at least 1, got 0");
    }
}

/// What health shows of a reject: plain values, not the source's type.
fn last_reject(r: &crate::sources::Rejected) -> metrics::LastReject {
    metrics::LastReject {
        source: r.source.clone(),
        origin: r.origin.clone(),
        reason: r.reason.clone(),
        at_ms: r.received_at.millis(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reject is counted; within the interval only the first of a
    /// source is logged, and the next line says how many it left out.
    #[test]
    fn every_reject_is_counted_and_its_line_is_rate_limited() {
        let metrics = IngestMetrics::default();
        let mut log = RejectLog {
            every: Duration::from_secs(60),
            last: HashMap::new(),
        };
        let text = crate::metrics::captured(|| {
            for _ in 0..3 {
                log.note(&rejected(4, "not a number"), &metrics);
            }
        });
        assert_eq!(
            metrics.rejects.load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(
            lines[0].contains("WARN")
                && lines[0].contains("input rejected; kept in stream REJECTED")
                && lines[0].contains("event=\"input_rejected\"")
                && lines[0].contains("reason=not a number")
                && lines[0].contains("suppressed=0"),
            "{text}"
        );
        // Due again (any time since the last line is enough now): the
        // line says two were left out.
        log.every = Duration::ZERO;
        let text = crate::metrics::captured(|| log.note(&rejected(4, "again"), &metrics));
        assert!(text.contains("suppressed=2"), "{text}");
    }

    #[test]
    fn header_text_is_one_line() {
        assert_eq!(header_text("bad\r\nvalue\t!"), "bad  value !");
    }

    fn rejected(payload: usize, reason: &str) -> Rejected {
        Rejected {
            source: "main".into(),
            origin: "mqtt topic a/b".into(),
            reason: reason.into(),
            payload: Bytes::from(vec![b'x'; payload]),
            received_at: crate::time::Timestamp(1_795_000_000_000),
            id: "0123456789abcdef-1".into(),
        }
    }

    /// Header block and payload as nats-server counts them against
    /// `max_payload` (`NATS/1.0`, `Name: value` lines, `Nats-Msg-Id`).
    fn wire_size(rej: &Rejected, headers: &[(&str, String)], payload: &Bytes) -> usize {
        let mut n = "NATS/1.0\r\n\r\n".len() + "Nats-Msg-Id: \r\n".len() + rej.id.len();
        for (k, v) in headers {
            n += k.len() + 2 + v.len() + 2;
        }
        n + payload.len()
    }

    #[test]
    fn rejected_records_fit_the_servers_max_payload() {
        let (h, p) = rejected_parts(&rejected(100, "bad"), 1024 * 1024);
        assert_eq!(p.len(), 100, "small records are kept whole");
        assert!(h.iter().all(|(k, _)| *k != TRUNCATED_HEADER));
        for (size, max) in [(2 << 20, 1 << 20), (70_000, 65_536), (5000, 4096)] {
            let rej = rejected(size, &"r".repeat(10_000));
            let (h, p) = rejected_parts(&rej, max);
            assert!(
                wire_size(&rej, &h, &p) <= max,
                "{} > {max}",
                wire_size(&rej, &h, &p)
            );
            let marker = &h.iter().find(|(k, _)| *k == TRUNCATED_HEADER).unwrap().1;
            assert_eq!(
                marker,
                &format!("kept the first {} of {size} bytes", p.len())
            );
            assert!(p.len() > max / 2, "most of the room is payload");
            assert_eq!(&p[..], &rej.payload[..p.len()], "the head is kept");
        }
    }

    #[test]
    fn size_refusals_are_not_retried() {
        assert!(!is_retryable(&PublishError::new(
            PublishErrorKind::MaxPayloadExceeded
        )));
        assert!(is_retryable(&PublishError::new(PublishErrorKind::TimedOut)));
        assert!(is_retryable(&PublishError::new(
            PublishErrorKind::StreamNotFound
        )));
        assert!(is_retryable(&PublishError::new(
            PublishErrorKind::BrokenPipe
        )));
        assert!(is_retryable(&PublishError::new(PublishErrorKind::Other)));
    }
}
