//! Sources turn device input into [`Observation`]s or rejections and hand
//! them to ingest through a bounded channel.
//!
//! Every item carries an [`Ack`]: the upstream acknowledgement (an MQTT
//! PUBACK) that ingest fires only once the item is durable in JetStream, so
//! a crash in between makes the broker redeliver instead of losing it.

pub mod espresense;
pub mod ld2410;
pub mod mqtt;
pub mod payload;
pub mod serial;
pub mod topic;

use crate::observation::Observation;
use crate::time::Timestamp;
use bytes::Bytes;
use std::time::Duration;

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

/// Capped exponential backoff with "equal jitter": half the delay is fixed,
/// half random, so many daemons restarted together do not reconnect in
/// lockstep, and no delay is shorter than half its step.
pub(crate) struct Backoff {
    start: Duration,
    cap: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(start: Duration, cap: Duration) -> Self {
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

    pub(crate) fn reset(&mut self) {
        self.current = self.start;
    }

    pub(crate) fn next(&mut self) -> Duration {
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
