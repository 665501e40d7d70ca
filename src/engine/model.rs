//! The zones of a config, compiled for the core: validated numbers, rules
//! indexed by sensor.

use super::config::{EvidenceRule, ZoneConfig};
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

impl Rule {
    /// Copies the numbers as they are: the config was validated, and the
    /// core guards against degenerate values itself so that a hand-built
    /// model cannot make it panic or store NaN either.
    pub fn from_config(cfg: &EvidenceRule) -> Rule {
        Rule {
            sensor: cfg.sensor.clone(),
            p_true: cfg.p_true,
            p_false: cfg.p_false,
            hold: cfg.hold,
            stale_after: cfg.stale_after,
            above: cfg.above,
            below: cfg.below,
        }
    }

    /// A rule with a threshold reads numbers; a boolean reading on it is of
    /// the wrong type and counts as neutral.
    pub fn is_numeric(&self) -> bool {
        self.above.is_some() || self.below.is_some()
    }
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

impl ZoneModel {
    pub fn from_config(zone: &str, cfg: &ZoneConfig) -> ZoneModel {
        ZoneModel {
            zone: zone.to_owned(),
            prior: cfg.prior,
            occupied_above: cfg.occupied_above,
            vacant_below: cfg.vacant_below,
            arrive_after: cfg.arrive_after,
            leave_after: cfg.leave_after,
            rules: cfg.evidence.iter().map(Rule::from_config).collect(),
        }
    }
}

/// Every zone, and for each sensor the zones that listen to it.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub zones: BTreeMap<String, ZoneModel>,
    pub by_sensor: BTreeMap<String, Vec<String>>,
}

impl Model {
    /// The model of `entries` (KV `presence` key, its section); a whole
    /// config's is `Model::from_config` (in `config`).
    pub fn from_entries<'a>(entries: impl Iterator<Item = (String, &'a ZoneConfig)>) -> Model {
        let zones: BTreeMap<String, ZoneModel> = entries
            .map(|(key, z)| {
                let model = ZoneModel::from_config(&key, z);
                (key, model)
            })
            .collect();
        let mut by_sensor: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, zone) in &zones {
            for rule in &zone.rules {
                by_sensor
                    .entry(rule.sensor.clone())
                    .or_default()
                    .push(name.clone());
            }
        }
        // Zones are visited in key order, so each list is already sorted;
        // a zone with several rules on one sensor appears in a run.
        for list in by_sensor.values_mut() {
            list.dedup();
        }
        Model { zones, by_sensor }
    }

    /// The zones an observation of `sensor` must be applied to, in a fixed
    /// order so the runner's output does not depend on hashing.
    pub fn zones_for(&self, sensor: &str) -> &[String] {
        self.by_sensor.get(sensor).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The zones' section of a config file.
    #[derive(serde::Deserialize)]
    struct Zones {
        zones: BTreeMap<String, ZoneConfig>,
    }

    fn model() -> Model {
        let z: Zones = toml::from_str(CONFIG).unwrap();
        Model::from_entries(z.zones.iter().map(|(k, v)| (k.clone(), v)))
    }

    const CONFIG: &str = r#"

[zones.kitchen]
arrive_after = "2s"
evidence = [
  { sensor = "pir", p_true = 0.9, p_false = 0.1, hold = "30s" },
  { sensor = "lux", p_true = 0.6, p_false = 0.3, above = 50.0 },
  { sensor = "lux", p_true = 0.2, p_false = 0.5, below = 5.0 },
]

[zones.hall]
evidence = [{ sensor = "pir", p_true = 0.7, p_false = 0.2 }]

[zones.bath]
evidence = [{ sensor = "door", p_true = 0.8, p_false = 0.4, stale_after = "10m" }]
"#;

    #[test]
    fn by_sensor_is_sorted_and_deduped() {
        let model = model();
        assert_eq!(model.zones_for("pir"), ["hall", "kitchen"]);
        assert_eq!(model.zones_for("lux"), ["kitchen"]);
        assert_eq!(model.zones_for("door"), ["bath"]);
        assert!(model.zones_for("nothing").is_empty());
    }

    #[test]
    fn zone_numbers_are_carried_over() {
        let model = model();
        let kitchen = &model.zones["kitchen"];
        assert_eq!(kitchen.zone, "kitchen");
        assert_eq!(kitchen.arrive_after, Duration::from_secs(2));
        assert_eq!(kitchen.leave_after, Duration::from_secs(60));
        assert_eq!(kitchen.rules.len(), 3);
        assert_eq!(kitchen.rules[0].hold, Some(Duration::from_secs(30)));
        assert!(!kitchen.rules[0].is_numeric());
        assert_eq!(kitchen.rules[2].below, Some(5.0));
        assert!(kitchen.rules[2].is_numeric());
        assert_eq!(
            model.zones["bath"].rules[0].stale_after,
            Some(Duration::from_secs(600))
        );
    }
}
