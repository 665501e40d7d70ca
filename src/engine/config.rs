//! The zones' section (`[zones.<zone>]`, `[persons.<id>]` and their
//! evidence rules) and its checks: the engine's slice of the config.

use crate::base::naming;
use crate::base::problems::{Problems, TOKEN_FORM};
use crate::sources::check::Producers;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A zone: a prior, evidence rules, thresholds and debounce.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Probability the zone is occupied with no evidence at all.
    #[serde(default = "default_prior")]
    pub prior: f64,
    /// Confidence at or above which a vacant zone starts arriving.
    #[serde(default = "default_occupied_above")]
    pub occupied_above: f64,
    /// Confidence at or below which an occupied zone starts leaving.
    #[serde(default = "default_vacant_below")]
    pub vacant_below: f64,
    /// How long confidence must stay high before `arriving` becomes
    /// `occupied`.
    #[serde(default, with = "humantime_serde")]
    pub arrive_after: Duration,
    /// How long confidence must stay low before `leaving` becomes `vacant`.
    #[serde(default = "default_leave_after", with = "humantime_serde")]
    pub leave_after: Duration,
    /// The sensors that have a say, each with its likelihoods; a zone
    /// without any stays at its prior.
    pub evidence: Vec<EvidenceRule>,
}

pub(crate) fn default_prior() -> f64 {
    0.1
}
pub(crate) fn default_occupied_above() -> f64 {
    0.7
}
pub(crate) fn default_vacant_below() -> f64 {
    0.3
}
pub(crate) fn default_leave_after() -> Duration {
    Duration::from_secs(60)
}

/// One sensor's say in a zone, as likelihoods.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceRule {
    /// Sensor id; some source must produce it (checked unless another
    /// instance runs ingest).
    pub sensor: String,
    /// P(evidence true | zone occupied).
    pub p_true: f64,
    /// P(evidence true | zone vacant).
    pub p_false: f64,
    /// For momentary sensors (motion): a true reading counts as true for
    /// this long after it, then as false, whatever arrives in between.
    #[serde(default, with = "humantime_serde")]
    pub hold: Option<Duration>,
    /// A sensor silent for longer than this counts as neutral (no say).
    #[serde(default, with = "humantime_serde")]
    pub stale_after: Option<Duration>,
    /// For numeric sensors: evidence is true when the value is above this.
    pub above: Option<f64>,
    /// For numeric sensors: evidence is true when the value is below this.
    pub below: Option<f64>,
}

/// Checks a zone (`section` = "zones") or a person ("persons"): both are
/// entries of KV `presence` with the same state machine.
pub fn check_zone(
    section: &str,
    name: &str,
    zone: &ZoneConfig,
    producers: &Producers,
    p: &mut Problems,
) {
    let at = format!("{section}.{name}");
    if !naming::is_token(name) {
        let kind = if section == "persons" {
            "person id"
        } else {
            "zone name"
        };
        p.push(
            at.clone(),
            format!(
                "{kind} {name:?} is invalid (it is part of a KV key and subject): {TOKEN_FORM}"
            ),
        );
    }
    probability(p, format!("{at}.prior"), zone.prior);
    let above_ok = probability(p, format!("{at}.occupied_above"), zone.occupied_above);
    let below_ok = probability(p, format!("{at}.vacant_below"), zone.vacant_below);
    if above_ok && below_ok && zone.vacant_below >= zone.occupied_above {
        p.push(
            format!("{at}.vacant_below"),
            format!(
                "must be below occupied_above ({}), got {}: the gap between them is the hysteresis",
                zone.occupied_above, zone.vacant_below
            ),
        );
    }
    if zone.evidence.is_empty() {
        p.push(
            format!("{at}.evidence"),
            "is empty: a zone without evidence stays at its prior forever",
        );
    }
    for (i, rule) in zone.evidence.iter().enumerate() {
        check_rule(&format!("{at}.evidence[{i}]"), rule, producers, p);
    }
}

/// Pushes a problem unless `v` is a finite number strictly inside (0, 1);
/// returns whether it is.
fn probability(p: &mut Problems, path: String, v: f64) -> bool {
    let ok = v.is_finite() && v > 0.0 && v < 1.0;
    if !ok {
        p.push(path, format!("must be strictly between 0 and 1, got {v}"));
    }
    ok
}

fn check_rule(at: &str, rule: &EvidenceRule, producers: &Producers, p: &mut Problems) {
    let sensor_at = format!("{at}.sensor");
    if !naming::is_token(&rule.sensor) {
        p.push(
            sensor_at,
            format!("sensor id {:?} is invalid: {TOKEN_FORM}", rule.sensor),
        );
    } else if producers.elsewhere {
        // Checked where the sensors are read.
    } else if !producers.any_source {
        p.push(
            sensor_at,
            format!(
                "no source is configured, so nothing produces sensor {:?}: add an `[mqtt.<name>]` or `[serial.<name>]` source",
                rule.sensor
            ),
        );
    } else if !producers.statics.contains_key(&rule.sensor)
        && !producers
            .templates
            .iter()
            .any(|(t, _)| t.can_produce(&rule.sensor))
    {
        p.push(
            sensor_at,
            format!(
                "no source produces sensor {:?}: map it in `mqtt.<name>.topics`, `zigbee2mqtt.devices` or a `[serial.<name>]` source",
                rule.sensor
            ),
        );
    }

    let t_ok = probability(p, format!("{at}.p_true"), rule.p_true);
    let f_ok = probability(p, format!("{at}.p_false"), rule.p_false);
    if t_ok && f_ok && rule.p_true == rule.p_false {
        p.push(
            format!("{at}.p_false"),
            format!(
                "equals p_true ({}): the likelihood ratio is 1, so the rule never moves the confidence",
                rule.p_true
            ),
        );
    }

    if let (Some(what), None, None) = (producers.numeric.get(&rule.sensor), rule.above, rule.below)
    {
        p.push(
            at.to_owned(),
            format!(
                "sensor {:?} reports numbers ({what}), so the rule needs a threshold: set `above` (e.g. `above = 50`), `below`, or both for a band",
                rule.sensor
            ),
        );
    }

    let mut bounds_ok = true;
    for (field, v) in [("above", rule.above), ("below", rule.below)] {
        if let Some(v) = v {
            if !v.is_finite() {
                bounds_ok = false;
                p.push(
                    format!("{at}.{field}"),
                    format!("must be a finite number, got {v}"),
                );
            }
        }
    }
    if let (true, Some(above), Some(below)) = (bounds_ok, rule.above, rule.below) {
        if above >= below {
            p.push(
                format!("{at}.below"),
                format!(
                    "with both set the rule is a band (above < value < below), so below must exceed above ({above}), got {below}"
                ),
            );
        }
    }

    if let Some(hold) = rule.hold {
        p.positive(format!("{at}.hold"), hold);
    }
    if let Some(stale) = rule.stale_after {
        p.positive(format!("{at}.stale_after"), stale);
    }
    if let (Some(hold), Some(stale)) = (rule.hold, rule.stale_after) {
        if !stale.is_zero() && stale < hold {
            p.push(
                format!("{at}.stale_after"),
                format!(
                    "is shorter than hold ({}), got {}: a true reading would turn neutral before its hold ends",
                    humantime::format_duration(hold),
                    humantime::format_duration(stale)
                ),
            );
        }
    }
}

/// The most observations one batch may apply.
const MAX_BATCH: usize = 100_000;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Most observations applied per batch; KV writes are coalesced per
    /// zone within a batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Longest wait for in-flight work on SIGTERM before exiting.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch: default_batch(),
            drain_timeout: default_drain(),
        }
    }
}

fn default_batch() -> usize {
    1000
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}

/// Checks `[engine]`, pushing every problem found.
pub fn check_engine(engine: &EngineConfig, p: &mut Problems) {
    if !(1..=MAX_BATCH).contains(&engine.batch) {
        p.push(
            "engine.batch",
            format!("must be between 1 and {MAX_BATCH}, got {}", engine.batch),
        );
    }
    p.positive("engine.drain_timeout", engine.drain_timeout);
}
