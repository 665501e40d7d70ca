//! Presence engine: a pure core ([`model`], [`core`]) that decides, and a
//! runner ([`runner`]) that does the I/O around it.
//!
//! The core's decisions are functions of (state, input, time) only, so the
//! same observations give the same transitions whether or not the daemon
//! was killed and restarted in between: the state is round-tripped through
//! the KV bucket and nothing else is remembered.

pub mod command;
pub mod config;
pub mod core;
pub mod feed;
mod fencing;
pub mod metrics;
pub mod model;
pub mod runner;
pub mod standby;
pub mod start;
#[cfg(test)]
mod tests;
mod writer;

pub use self::core::{
    advance, apply, clear_override, initial_state, next_deadline, reconcile, set_override,
};
pub use self::model::{Model, Rule, ZoneModel};

use crate::observation::Reading;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// Schema version of [`ZoneState`] and [`Transition`] JSON.
pub const STATE_SCHEMA: u32 = 1;

/// The state machine of a zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Vacant,
    Arriving,
    Occupied,
    Leaving,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Vacant => "vacant",
            Presence::Arriving => "arriving",
            Presence::Occupied => "occupied",
            Presence::Leaving => "leaving",
        }
    }
}

/// A debounce timer in flight: the state the zone moves to at `deadline`
/// unless confidence turns back first.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub to: Presence,
    pub deadline: Timestamp,
}

/// What one evidence rule currently says, stored so an operator can see why
/// a zone is occupied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvidenceState {
    pub sensor: String,
    /// Last reading of the sensor, if any.
    pub value: Option<Reading>,
    /// When that reading was taken.
    pub observed_at: Option<Timestamp>,
    /// Last truthy reading, for `hold` rules.
    pub last_true_at: Option<Timestamp>,
    /// The rule's current truth: `None` is neutral (no reading yet, stale,
    /// or a value of the wrong type).
    pub active: Option<bool>,
    /// Current contribution: likelihood ratio multiplied into the odds
    /// (1.0 when neutral).
    pub lr: f64,
}

/// A zone's durable state: the value of key `<zone>` in KV `presence`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZoneState {
    pub v: u32,
    pub zone: String,
    pub state: Presence,
    /// When the zone entered `state`.
    pub since: Timestamp,
    /// Posterior probability of occupancy, 0..1.
    pub confidence: f64,
    /// Logical time of the last step; time never runs backwards for a zone.
    pub clock: Timestamp,
    /// Last `SENSORS` stream sequence applied; redelivered messages at or
    /// below it are ignored.
    pub last_seq: u64,
    /// Number of transitions so far; the next one gets `transitions + 1`.
    pub transitions: u64,
    pub pending: Option<Pending>,
    /// A manual override in force: the FSM holds `state` until it expires.
    /// Absent from values written before overrides existed, hence optional
    /// on the wire as well.
    #[serde(rename = "override", default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<Override>,
    /// One entry per evidence rule, in config order.
    pub evidence: Vec<EvidenceState>,
}

/// A manual override, as recorded in the zone value.
///
/// While it is in force the zone stays in `state` whatever the sensors say
/// (their readings are still applied, so confidence stays current); at
/// `until` it ends by itself and the state machine resumes from the
/// evidence of that instant, through the normal debounce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// `occupied` or `vacant`.
    pub state: Presence,
    /// When the engine applied it.
    pub since: Timestamp,
    /// When it ends by itself: a durable deadline like a debounce one.
    pub until: Timestamp,
    /// Who asked, as the command said (informational: the server's ACL
    /// decides who may send commands at all).
    pub by: String,
    /// Why, as the command said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why a transition happened when it was not the evidence alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    /// A manual override was applied.
    Override {
        by: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        until: Timestamp,
    },
    /// An override ran out; the evidence decides again.
    OverrideExpired,
    /// An override was ended early by a `clear` command.
    OverrideCleared { by: String },
}

/// A state change, published to `EVENTS`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub v: u32,
    pub zone: String,
    /// 1-based per zone; with the site and zone it is the `Nats-Msg-Id`.
    pub number: u64,
    pub from: Presence,
    pub to: Presence,
    /// The instant the change took effect: an observation's time or a
    /// deadline, never the processing time.
    pub at: Timestamp,
    pub confidence: f64,
    /// `SENSORS` sequence of the observation that caused it; `None` when a
    /// timer or a command caused it.
    pub seq: Option<u64>,
    /// Set when an override (or its end) caused it; absent for the
    /// evidence and debounce moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
}

/// One reading as the core sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Input<'a> {
    /// `SENSORS` stream sequence.
    pub seq: u64,
    pub sensor: &'a str,
    pub value: Reading,
    pub at: Timestamp,
}
