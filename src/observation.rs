//! What a source produces and the engine consumes: one sensor reading.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A sensor's value: motion, contact and presence flags are booleans;
/// illuminance, distance and energy are numbers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reading {
    Bool(bool),
    Number(f64),
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
    /// Deterministic id, used as `Nats-Msg-Id`: a redelivered input gets the
    /// same id and is stored once.
    pub id: String,
    /// Source name from the config (`mqtt.<name>`), for tracing a reading
    /// back to where it came from.
    pub source: String,
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
    fn json_shape() {
        let o = Observation {
            v: OBSERVATION_SCHEMA,
            sensor: "pir".into(),
            value: Reading::Bool(true),
            observed_at: Timestamp(0),
            id: "abc".into(),
            source: "main".into(),
        };
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j["value"], serde_json::json!(true));
        let back: Observation = serde_json::from_value(j).unwrap();
        assert_eq!(back, o);
    }
}
