//! Ingest: observations into stream `SENSORS`, rejects into `REJECTED`.
//!
//! Items are taken from the sources' bounded channel in chunks and published
//! pipelined (every publish of a chunk is sent before any ack is awaited).
//! Each item's upstream [`Ack`](crate::sources::Ack) fires only once
//! JetStream has acknowledged it, and a failed publish is retried with the
//! same `Nats-Msg-Id` until it is stored, so nothing is lost and nothing is
//! stored twice while the leaf is away.

use crate::metrics::Metrics;
use crate::naming::Site;
use crate::observation::{Observation, DELIVERY_HEADER};
use crate::sources::{Item, Rejected};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Header carrying why an input was rejected.
pub const REASON_HEADER: &str = "Presenced-Reason";
/// Header carrying where a rejected input came from.
pub const ORIGIN_HEADER: &str = "Presenced-Origin";
/// Header carrying when a rejected input was received.
pub const RECEIVED_HEADER: &str = "Presenced-Received-At";

/// Turns an item into (subject, message) for JetStream.
fn message(site: &Site, item: &Item) -> (String, PublishMessage) {
    match item {
        Item::Observation(obs, _) => (site.sensors_subject(&obs.sensor), observation_message(obs)),
        Item::Rejected(rej, _) => (site.rejected_subject(&rej.source), rejected_message(rej)),
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

fn rejected_message(rej: &Rejected) -> PublishMessage {
    PublishMessage::build()
        .payload(rej.payload.clone())
        .message_id(&rej.id)
        .header(REASON_HEADER, header_text(&rej.reason).as_str())
        .header(ORIGIN_HEADER, header_text(&rej.origin).as_str())
        .header(RECEIVED_HEADER, rej.received_at.to_string().as_str())
}

/// Logs rejections at WARN, at most once per interval and source; the rest
/// are counted and mentioned in the next line.
struct RejectLog {
    every: Duration,
    last: HashMap<String, (Instant, u64)>,
}

impl RejectLog {
    fn note(&mut self, rej: &Rejected) {
        let now = Instant::now();
        let entry = self
            .last
            .entry(rej.source.clone())
            .or_insert((now - self.every - Duration::from_millis(1), 0));
        if now.duration_since(entry.0) > self.every {
            tracing::warn!(
                source = %rej.source,
                origin = %rej.origin,
                reason = %rej.reason,
                suppressed = entry.1,
                "input rejected; kept in stream REJECTED"
            );
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
    metrics: Arc<Metrics>,
) {
    let mut log = RejectLog {
        every: reject_log_every,
        last: HashMap::new(),
    };
    let mut chunk: Vec<Item> = Vec::with_capacity(max_in_flight);
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
        store_chunk(&js, &site, &chunk, &metrics).await;
        for item in chunk.drain(..) {
            match item {
                Item::Observation(_, ack) => {
                    Metrics::inc(&metrics.observations_stored);
                    ack.fire();
                }
                Item::Rejected(rej, ack) => {
                    Metrics::inc(&metrics.rejects);
                    log.note(&rej);
                    ack.fire();
                }
            }
        }
    }
}

/// Publishes every item of the chunk, retrying failures (same message id, so
/// a publish that was stored but whose ack was lost is not stored twice)
/// with capped backoff until all are stored.
async fn store_chunk(js: &jetstream::Context, site: &Site, chunk: &[Item], metrics: &Metrics) {
    let mut todo: Vec<usize> = (0..chunk.len()).collect();
    let mut delay = Duration::from_millis(50);
    let mut outage_logged = false;
    while !todo.is_empty() {
        let messages = todo.iter().map(|&i| message(site, &chunk[i])).collect();
        let results = crate::store::publish::publish_all(js, messages).await;
        let mut failed = Vec::new();
        let mut last_error = None;
        for (&i, r) in todo.iter().zip(results) {
            if let Err(e) = r {
                failed.push(i);
                last_error = Some(e.to_string());
            }
        }
        if failed.is_empty() {
            if outage_logged {
                tracing::info!("stream SENSORS reachable again; buffered input stored");
            }
            return;
        }
        Metrics::add(&metrics.publish_retries, failed.len() as u64);
        if !outage_logged {
            tracing::warn!(
                failed = failed.len(),
                error = last_error.as_deref().unwrap_or("unknown"),
                "cannot store input in JetStream; holding it and retrying"
            );
            outage_logged = true;
        }
        todo = failed;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// How far back [`StoredDeliveries::recent`] looks. A broker redelivers
/// a session's unacknowledged messages as soon as the daemon reconnects,
/// so this only has to cover a restart; a message first stored longer ago
/// than this and redelivered after a crash is stored a second time.
pub const REDELIVERY_LOOKBACK: Duration = Duration::from_secs(600);

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

    /// Delivery header -> `Nats-Msg-Id` of this source's messages stored
    /// in the last [`REDELIVERY_LOOKBACK`]. Reads headers only, through an
    /// ordered consumer: what the owner's ACL grant on `SENSORS` allows.
    pub async fn recent(&self, source: &str) -> Result<HashMap<String, String>, String> {
        use futures::StreamExt as _;
        let stream = self
            .js
            .get_stream(crate::naming::SENSORS_STREAM)
            .await
            .map_err(|e| format!("stream SENSORS: {e}"))?;
        let since = time::OffsetDateTime::now_utc() - REDELIVERY_LOOKBACK;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: self.site.sensors_filter(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartTime {
                    start_time: since,
                },
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
            if let Some(h) = m.headers.as_ref() {
                if let (Some(d), Some(id)) = (h.get(DELIVERY_HEADER), h.get("Nats-Msg-Id")) {
                    if d.as_str().starts_with(&prefix) {
                        found.insert(d.as_str().to_owned(), id.as_str().to_owned());
                    }
                }
            }
            let pending = m
                .info()
                .map_err(|e| format!("reading SENSORS: {e}"))?
                .pending;
            if pending == 0 {
                return Ok(found);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_is_one_line() {
        assert_eq!(header_text("bad\r\nvalue\t!"), "bad  value !");
    }
}
