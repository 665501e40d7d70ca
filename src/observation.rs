//! What a source produces and the engine consumes: one sensor reading.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A sensor's value: motion, contact and presence flags are booleans;
/// illuminance, distance and energy are numbers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reading {
    Bool(bool),
    Number(f64),
}

/// Accepts exactly what `#[serde(untagged)]` on the two variants accepted
/// (a boolean, or any JSON number as `f64`), without buffering the value
/// first: replay and the engine decode millions of these (docs/PERFORMANCE.md).
impl<'de> Deserialize<'de> for Reading {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Reading;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a boolean or a number")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Reading, E> {
                Ok(Reading::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Reading, E> {
                Ok(Reading::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Reading, E> {
                Ok(Reading::Number(v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Reading, E> {
                Ok(Reading::Number(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Schema version of [`Observation`] payloads in `SENSORS`.
pub const OBSERVATION_SCHEMA: u32 = 1;

/// One reading of one sensor, as stored in `SENSORS` (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observation {
    /// Schema version, so stored messages stay readable after upgrades.
    pub v: u32,
    pub sensor: String,
    pub value: Reading,
    /// When the reading was taken: the device's own timestamp if the
    /// mapping names one, else the instant the daemon received it.
    pub observed_at: Timestamp,
    /// `Nats-Msg-Id` in `SENSORS`: one per delivery of one input (see
    /// [`delivery_id`]); a recognised redelivery of an MQTT QoS 1 message
    /// reuses the id its first delivery was stored under.
    pub id: String,
    /// Source name from the config (`mqtt.<name>`), for tracing a reading
    /// back to where it came from.
    pub source: String,
    /// Which MQTT QoS 1 delivery this came from (source, packet id, hash of
    /// topic and payload, index among the message's readings), stored as
    /// header [`DELIVERY_HEADER`] and not in the JSON: how a daemon
    /// restarted after a crash recognises a redelivery of a message it had
    /// stored but not acknowledged. `None` for input that is never
    /// redelivered (QoS 0, serial).
    #[serde(skip)]
    pub delivery: Option<String>,
}

/// Header of `SENSORS` messages naming the MQTT QoS 1 delivery they came
/// from; see [`Observation::delivery`].
pub const DELIVERY_HEADER: &str = "Presenced-Delivery";

/// A `Nats-Msg-Id` for one delivery of one input: a random session id
/// drawn once per process, then a counter.
///
/// Why not a hash of the input: sensors repeat themselves (`ON`, `ON`, ...
/// at QoS 0 with packet id 0), so a content hash made every repeat within
/// the server's two-minute duplicate window look like a duplicate and
/// dropped it. Why not a bare counter: it restarts at zero with the
/// process, and the first readings after a restart would collide with the
/// last ones before it. A random 64-bit session makes ids of different
/// processes distinct without writing anything to disk; the counter makes
/// them distinct within one. Duplicates that must still be dropped (an
/// MQTT QoS 1 redelivery) are recognised by their delivery, not their
/// content, and get their first id back (see `sources::mqtt`).
pub fn delivery_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SESSION: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let session = *SESSION.get_or_init(random_session);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{session:016x}-{n}")
}

/// 64 random bits: the standard library's per-process hash keys (seeded
/// from the OS) mixed with the clock and the process id.
fn random_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A stable id for an input: sha256 over the parts that identify it,
/// length-prefixed so that ("ab","c") and ("a","bc") differ. 128 bits in hex
/// keep `Nats-Msg-Id` short while collisions stay out of reach.
pub fn input_id(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_unambiguous() {
        assert_eq!(input_id(&[b"ab", b"c"]), input_id(&[b"ab", b"c"]));
        assert_ne!(input_id(&[b"ab", b"c"]), input_id(&[b"a", b"bc"]));
        assert_eq!(input_id(&[b"x"]).len(), 32);
    }

    #[test]
    fn delivery_ids_are_unique_within_a_process() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| delivery_id()).collect();
        assert_eq!(ids.len(), 10_000);
        let a = delivery_id();
        let (session, n) = a.split_once('-').unwrap();
        assert_eq!(session.len(), 16);
        assert!(n.parse::<u64>().is_ok());
    }

    #[test]
    fn json_shape() {
        let o = Observation {
            v: OBSERVATION_SCHEMA,
            sensor: "pir".into(),
            value: Reading::Bool(true),
            observed_at: Timestamp(0),
            id: "abc".into(),
            source: "main".into(),
            delivery: None,
        };
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j["value"], serde_json::json!(true));
        let back: Observation = serde_json::from_value(j).unwrap();
        assert_eq!(back, o);
    }
}
