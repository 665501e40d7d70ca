//! Sources turn device input into [`Observation`]s or rejections and hand
//! them to ingest through a bounded channel.
//!
//! Every item carries an [`Ack`]: the upstream acknowledgement (an MQTT
//! PUBACK) that ingest fires only once the item is durable in JetStream, so
//! a crash in between makes the broker redeliver instead of losing it.

pub mod check;
pub mod config;
pub mod espresense;
pub mod ld2410;
pub mod mqtt;
pub mod payload;
pub mod serial;
pub mod topic;

use crate::observation::Observation;
use crate::time::Timestamp;
use bytes::Bytes;

/// Fired once the item it travels with is stored; dropping it unfired
/// leaves the input unacknowledged upstream (it will be redelivered).
pub struct Ack(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Ack {
    pub fn new(f: impl FnOnce() + Send + Sync + 'static) -> Self {
        Ack(Some(Box::new(f)))
    }

    /// For inputs that have no upstream acknowledgement.
    pub fn none() -> Self {
        Ack(None)
    }

    pub fn fire(mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Ack(pending)"
        } else {
            "Ack(none)"
        })
    }
}

/// Input that could not become an observation, kept in `REJECTED`.
#[derive(Clone, Debug)]
pub struct Rejected {
    /// Source name from the config; the `REJECTED` subject token.
    pub source: String,
    /// Where it came from: MQTT topic, serial device and byte offset, ...
    pub origin: String,
    /// Why, in words an operator can act on.
    pub reason: String,
    /// The input exactly as received.
    pub payload: Bytes,
    pub received_at: Timestamp,
    /// Deterministic id, so a redelivered reject is stored once too.
    pub id: String,
}

/// What a source sends to ingest.
#[derive(Debug)]
pub enum Item {
    Observation(Observation, Ack),
    Rejected(Rejected, Ack),
}
