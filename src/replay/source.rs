//! Reading a range of `SENSORS` and `EVENTS` for a replay: ordered pull
//! consumers only (what a reader identity's grant allows), so nothing is
//! written to the site's streams or buckets.

use super::{Manual, Record};
use crate::engine::Transition;
use crate::naming::{self, Site};
use crate::time::Timestamp;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use std::time::Duration;

/// How long a consumer may stay silent while messages are still pending.
const IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("stream {stream}: {reason}")]
    Nats {
        stream: &'static str,
        reason: String,
    },
}

fn nats(stream: &'static str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Nats {
        stream,
        reason: e.to_string(),
    }
}

/// Which part of `SENSORS` to read.
#[derive(Clone, Debug, PartialEq)]
pub enum Range {
    /// Messages stored from `from` (stream time) on, up to `to`.
    Time { from: Timestamp, to: Timestamp },
    /// Stream sequences `from..=to` (`to` None: up to the last).
    Seq { from: u64, to: Option<u64> },
}

/// What was read.
#[derive(Debug, Default)]
pub struct Read {
    pub records: Vec<Record>,
    /// Messages that were not observations (skipped, as the engine does).
    pub unreadable: u64,
    /// Stream sequence of the last message read (0: none).
    pub last_seq: u64,
}

fn to_offset(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.0) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// An [`crate::observation::Observation`] as stored, decoded as strictly (the same fields,
/// of the same types, nothing else) but without copying the strings
/// replay does not keep: decoding was most of a replay's time.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored<'a> {
    #[serde(rename = "v")]
    _v: u32,
    #[serde(borrow)]
    sensor: std::borrow::Cow<'a, str>,
    value: crate::observation::Reading,
    observed_at: Timestamp,
    #[serde(rename = "id")]
    _id: Text,
    #[serde(rename = "source")]
    _source: Text,
}

/// A JSON string, checked and dropped.
struct Text;

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, _: &str) -> Result<Text, E> {
                Ok(Text)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Reads `range` of this site's `SENSORS` in stream order.
pub async fn read_sensors(
    js: &jetstream::Context,
    site: &Site,
    range: &Range,
) -> Result<Read, SourceError> {
    const S: &str = naming::SENSORS_STREAM;
    let stream = js.get_stream(S).await.map_err(|e| nats(S, e))?;
    let (deliver_policy, to_time, to_seq) = match range {
        Range::Time { from, to } => (
            consumer::DeliverPolicy::ByStartTime {
                start_time: to_offset(*from),
            },
            Some(*to),
            None,
        ),
        Range::Seq { from, to } => (
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: (*from).max(1),
            },
            None,
            *to,
        ),
    };
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            // Named: readers of SENSORS may create named consumers only.
            name: Some(crate::store::consumer_name(js.client(), "replay")),
            filter_subject: site.sensors_filter(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| nats(S, e))?;
    let mut read = Read::default();
    if c.cached_info().num_pending == 0 {
        return Ok(read);
    }
    let mut messages = c.messages().await.map_err(|e| nats(S, e))?;
    loop {
        let m = match tokio::time::timeout(IDLE, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(nats(S, e)),
            Ok(None) | Err(_) => {
                return Err(nats(
                    S,
                    format!(
                        "the consumer stopped delivering after sequence {}",
                        read.last_seq
                    ),
                ))
            }
        };
        let info = m.info().map_err(|e| nats(S, e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        let stored = Timestamp((info.published.unix_timestamp_nanos() / 1_000_000) as i64);
        if to_seq.is_some_and(|t| seq > t) || to_time.is_some_and(|t| stored > t) {
            break;
        }
        read.last_seq = seq;
        match serde_json::from_slice::<Stored<'_>>(&m.payload) {
            Ok(obs) => read.records.push(Record {
                seq,
                sensor: obs.sensor.into_owned(),
                value: obs.value,
                at: obs.observed_at,
            }),
            Err(_) => read.unreadable += 1,
        }
        if pending == 0 || to_seq.is_some_and(|t| seq >= t) {
            break;
        }
    }
    Ok(read)
}

/// Reads this site's `EVENTS` stored from `from` on: the transitions (and
/// the manual commands behind some of them). Only the zones' subjects are
/// read: the engine's takeover records (`events.<site>.takeover.<service>`)
/// are no transitions, so `--diff` never sees them. Removal records of
/// `forget-zone` are not transitions either and are skipped.
pub async fn read_events(
    js: &jetstream::Context,
    site: &Site,
    from: Timestamp,
) -> Result<Vec<Transition>, SourceError> {
    const S: &str = naming::EVENTS_STREAM;
    let stream = js.get_stream(S).await.map_err(|e| nats(S, e))?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: site.transitions_filter(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime {
                start_time: to_offset(from),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| nats(S, e))?;
    let mut out = Vec::new();
    if c.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = c.messages().await.map_err(|e| nats(S, e))?;
    loop {
        let m = match tokio::time::timeout(IDLE, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(nats(S, e)),
            Ok(None) | Err(_) => return Err(nats(S, "the consumer stopped delivering")),
        };
        let pending = m.info().map_err(|e| nats(S, e))?.pending;
        if let Ok(t) = serde_json::from_slice::<Transition>(&m.payload) {
            out.push(t);
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// The manual commands behind recorded transitions.
pub fn manual_of(events: &[Transition]) -> Vec<Manual> {
    events.iter().filter_map(Manual::from_transition).collect()
}
