//! The zones of a config, compiled for the core: validated numbers, rules
//! indexed by sensor.

use std::collections::BTreeMap;
use std::time::Duration;

/// One evidence rule, ready for the core.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub sensor: String,
    pub p_true: f64,
    pub p_false: f64,
    pub hold: Option<Duration>,
    pub stale_after: Option<Duration>,
    pub above: Option<f64>,
    pub below: Option<f64>,
}

/// One zone, ready for the core.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneModel {
    pub zone: String,
    pub prior: f64,
    pub occupied_above: f64,
    pub vacant_below: f64,
    pub arrive_after: Duration,
    pub leave_after: Duration,
    pub rules: Vec<Rule>,
}

/// Every zone, and for each sensor the zones that listen to it.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub zones: BTreeMap<String, ZoneModel>,
    pub by_sensor: BTreeMap<String, Vec<String>>,
}

impl Model {
    pub fn from_config(_cfg: &crate::config::Config) -> Model {
        unimplemented!()
    }
}
