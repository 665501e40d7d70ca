//! Learning each evidence rule's `p_true` and `p_false` (and each zone's
//! prior) from labelled time.
//!
//! The engine multiplies in, at every instant, the likelihood ratio of
//! what each rule says *at that instant*. So the number it needs is the
//! share of occupied time during which the rule says "true" (`p_true`) and
//! the share of vacant time during which it does (`p_false`). Tuning
//! measures exactly that: it runs the pure engine over the readings (so
//! `hold`, thresholds and staleness are evaluated by the engine itself,
//! not re-implemented) and looks at every rule once per `sample_every`
//! inside each labelled interval. A rule that is neutral at a sample (no
//! reading yet, or stale) is not counted.
//!
//! Each estimate comes with a Beta posterior interval (uniform prior,
//! samples as trials). Samples one interval apart are not independent
//! when a sensor reports less often than that, so the interval is a lower
//! bound on the real uncertainty; the hours behind each number are shown
//! beside it for that reason, and nothing is suggested below `min_hours`.

use super::labels::Label;
use super::{Options, Outcome, Record};
use crate::config::Config;
use crate::engine::{self, Input, Model};
use crate::time::Timestamp;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// How tuning samples and when it refuses.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// One look at every rule per this much labelled time.
    pub sample_every: Duration,
    /// Labelled hours (of the class the number is about) below which no
    /// value is suggested.
    pub min_hours: f64,
    /// Probability mass of the interval shown (0.9: 5 % either side).
    pub level: f64,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            sample_every: Duration::from_secs(60),
            min_hours: 2.0,
            level: 0.9,
        }
    }
}

/// One estimated probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    /// The value in the config now.
    pub current: f64,
    /// Samples in which the rule said true (or the zone was occupied,
    /// for the prior), and all samples counted.
    pub hits: u64,
    pub samples: u64,
    /// Labelled hours behind the estimate.
    pub hours: f64,
    /// Posterior mean and interval (Beta(1 + hits, 1 + misses)).
    pub mean: f64,
    pub low: f64,
    pub high: f64,
    /// The value to use, rounded; `None` when there is too little labelled
    /// time (see `needs_hours`).
    pub suggested: Option<f64>,
    /// More labelled hours needed before a value is suggested.
    pub needs_hours: Option<f64>,
}

/// The estimates of one evidence rule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleEstimate {
    /// Position in the zone's `evidence` list.
    pub index: usize,
    pub sensor: String,
    pub p_true: Estimate,
    pub p_false: Estimate,
}

/// The estimates of one zone.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ZoneEstimate {
    pub occupied_hours: f64,
    pub vacant_hours: f64,
    pub prior: Estimate,
    pub rules: Vec<RuleEstimate>,
}

#[derive(Default, Clone, Copy)]
struct Count {
    hits: u64,
    samples: u64,
}

impl Count {
    fn add(&mut self, hit: bool) {
        self.samples += 1;
        self.hits += u64::from(hit);
    }
}

fn estimate(current: f64, c: Count, step_h: f64, opts: &TuneOptions) -> Estimate {
    let (a, b) = (1.0 + c.hits as f64, 1.0 + (c.samples - c.hits) as f64);
    let tail = (1.0 - opts.level) / 2.0;
    let hours = c.samples as f64 * step_h;
    let enough = hours >= opts.min_hours;
    let mean = a / (a + b);
    Estimate {
        current,
        hits: c.hits,
        samples: c.samples,
        hours: round(hours, 2),
        mean: round(mean, 4),
        low: round(beta_quantile(a, b, tail), 4),
        high: round(beta_quantile(a, b, 1.0 - tail), 4),
        suggested: enough.then(|| round(mean, 2).clamp(0.01, 0.99)),
        needs_hours: (!enough).then(|| round((opts.min_hours - hours).max(0.01), 2)),
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Estimates every labelled zone's numbers from `records` (in stream
/// order) and `labels` (checked: per zone in order, not overlapping).
pub fn estimate_all(
    model: &Model,
    records: &[Record],
    labels: &[Label],
    opts: &TuneOptions,
) -> BTreeMap<String, ZoneEstimate> {
    let step = opts.sample_every.max(Duration::from_secs(1));
    let step_ms = step.as_millis() as i64;
    let step_h = step.as_secs_f64() / 3600.0;
    struct Zone {
        state: crate::engine::ZoneState,
        samples: Vec<(Timestamp, bool)>,
        next: usize,
        prior: Count,
        rules: Vec<(Count, Count)>,
        occupied_ms: i64,
        vacant_ms: i64,
    }
    let start = labels.iter().map(|l| l.start).min().unwrap_or_default();
    let mut zones: BTreeMap<&str, Zone> = BTreeMap::new();
    for (name, zm) in &model.zones {
        let mine: Vec<&Label> = labels.iter().filter(|l| &l.zone == name).collect();
        if mine.is_empty() {
            continue;
        }
        let mut samples = Vec::new();
        let (mut occupied_ms, mut vacant_ms) = (0, 0);
        for l in &mine {
            let mut t = l.start.0;
            while t < l.end.0 {
                samples.push((Timestamp(t), l.occupied));
                t += step_ms;
            }
            if l.occupied {
                occupied_ms += l.end.0 - l.start.0;
            } else {
                vacant_ms += l.end.0 - l.start.0;
            }
        }
        samples.sort_by_key(|s| s.0);
        let first = records.first().map_or(start, |r| r.at.min(start));
        zones.insert(
            name,
            Zone {
                state: engine::initial_state(zm, first),
                samples,
                next: 0,
                prior: Count::default(),
                rules: vec![(Count::default(), Count::default()); zm.rules.len()],
                occupied_ms,
                vacant_ms,
            },
        );
    }
    let sample_until = |model: &Model, name: &str, z: &mut Zone, until: Option<Timestamp>| {
        let Some(zm) = model.zones.get(name) else {
            return;
        };
        while let Some(&(t, occupied)) = z.samples.get(z.next) {
            if until.is_some_and(|u| t >= u) {
                break;
            }
            z.next += 1;
            // Time only moves forward: a sample before the zone's clock
            // (two readings at one instant) sees the state of the clock.
            engine::advance(zm, &mut z.state, t);
            z.prior.add(occupied);
            for (ev, (occ, vac)) in z.state.evidence.iter().zip(z.rules.iter_mut()) {
                if let Some(active) = ev.active {
                    if occupied {
                        occ.add(active);
                    } else {
                        vac.add(active);
                    }
                }
            }
        }
    };
    for r in records {
        for name in model.zones_for(&r.sensor) {
            let (Some(zm), Some(z)) = (model.zones.get(name), zones.get_mut(name.as_str())) else {
                continue;
            };
            sample_until(model, name, z, Some(r.at));
            let input = Input {
                seq: r.seq,
                sensor: &r.sensor,
                value: r.value,
                at: r.at,
            };
            engine::apply(zm, &mut z.state, &input);
        }
    }
    let mut out = BTreeMap::new();
    for (name, mut z) in zones {
        sample_until(model, name, &mut z, None);
        let Some(zm) = model.zones.get(name) else {
            continue;
        };
        let rules = zm
            .rules
            .iter()
            .zip(&z.rules)
            .enumerate()
            .map(|(index, (rule, (occ, vac)))| RuleEstimate {
                index,
                sensor: rule.sensor.clone(),
                p_true: estimate(rule.p_true, *occ, step_h, opts),
                p_false: estimate(rule.p_false, *vac, step_h, opts),
            })
            .collect();
        out.insert(
            name.to_owned(),
            ZoneEstimate {
                occupied_hours: round(z.occupied_ms as f64 / 3.6e6, 2),
                vacant_hours: round(z.vacant_ms as f64 / 3.6e6, 2),
                prior: estimate(zm.prior, z.prior, step_h, opts),
                rules,
            },
        );
    }
    out
}

/// `config` with every suggested value put in.
pub fn suggested_config(config: &Config, estimates: &BTreeMap<String, ZoneEstimate>) -> Config {
    let mut out = config.clone();
    for (name, est) in estimates {
        let zone = match out.zones.get_mut(name) {
            Some(z) => z,
            None => match out
                .persons
                .iter_mut()
                .find(|(id, _)| &crate::naming::person_key(id) == name)
            {
                Some((_, z)) => z,
                None => continue,
            },
        };
        if let Some(p) = est.prior.suggested {
            zone.prior = p;
        }
        for r in &est.rules {
            if let Some(rule) = zone.evidence.get_mut(r.index) {
                if let Some(p) = r.p_true.suggested {
                    rule.p_true = p;
                }
                if let Some(p) = r.p_false.suggested {
                    rule.p_false = p;
                }
            }
        }
    }
    out
}

/// The table name of a presence entry in the config file.
fn section(config: &Config, key: &str) -> String {
    if config.zones.contains_key(key) {
        return format!("zones.{key}");
    }
    config
        .persons
        .keys()
        .find(|id| crate::naming::person_key(id) == key)
        .map_or_else(|| format!("zones.{key}"), |id| format!("persons.{id}"))
}

/// The suggestion as a diff of the config's TOML: `-` the current value,
/// `+` the suggested one with its interval and hours; refusals as comments
/// saying how much more labelled time each number needs.
pub fn toml_diff(
    config: &Config,
    estimates: &BTreeMap<String, ZoneEstimate>,
    level: f64,
) -> String {
    let mut s = String::new();
    let pct = (level * 100.0).round();
    let line =
        |s: &mut String, key: &str, e: &Estimate, what: &str| match (e.suggested, e.needs_hours) {
            (Some(p), _) if (p - e.current).abs() > 1e-9 => {
                let _ = writeln!(s, "-{key} = {}", e.current);
                let _ = writeln!(
                    s,
                    "+{key} = {p}  # {pct}% {}..{}, {} h of {what}",
                    e.low, e.high, e.hours
                );
            }
            (Some(_), _) => {
                let _ = writeln!(
                    s,
                    " {key} = {}  # confirmed: {}..{}, {} h",
                    e.current, e.low, e.high, e.hours
                );
            }
            (None, Some(n)) => {
                let _ = writeln!(
                    s,
                    " {key} = {}  # kept: needs {n} more hours of {what} (has {} h)",
                    e.current, e.hours
                );
            }
            (None, None) => {}
        };
    for (name, est) in estimates {
        let table = section(config, name);
        let _ = writeln!(s, " [{table}]");
        line(&mut s, "prior", &est.prior, "labels");
        for r in &est.rules {
            let _ = writeln!(
                s,
                " [[{table}.evidence]]  # evidence[{}], sensor {:?}",
                r.index, r.sensor
            );
            line(&mut s, "p_true", &r.p_true, "occupied labels");
            line(&mut s, "p_false", &r.p_false, "vacant labels");
        }
    }
    s
}

/// How well a replay agrees with the labels of one zone.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Effect {
    pub flaps: u64,
    /// Labelled occupied, replayed not occupied.
    pub false_vacant_ms: i64,
    /// Labelled vacant, replayed occupied.
    pub false_occupied_ms: i64,
    pub detection_median_ms: Option<i64>,
}

impl Effect {
    pub fn wrong_ms(&self) -> i64 {
        self.false_vacant_ms + self.false_occupied_ms
    }
}

/// Per zone, how the replay's occupied time lines up with the labels.
pub fn effect(outcome: &Outcome, labels: &[Label]) -> BTreeMap<String, Effect> {
    let mut out = BTreeMap::new();
    for (name, z) in &outcome.zones {
        let mine: Vec<&Label> = labels.iter().filter(|l| &l.zone == name).collect();
        if mine.is_empty() {
            continue;
        }
        let mut e = Effect {
            flaps: z.flaps,
            detection_median_ms: super::median_ms(&z.detection_ms),
            ..Effect::default()
        };
        for l in mine {
            let overlap: i64 = z
                .occupied
                .iter()
                .map(|(a, b)| (b.0.min(l.end.0) - a.0.max(l.start.0)).max(0))
                .sum();
            if l.occupied {
                e.false_vacant_ms += (l.end.0 - l.start.0) - overlap;
            } else {
                e.false_occupied_ms += overlap;
            }
        }
        out.insert(name.clone(), e);
    }
    out
}

/// Replays `records` over the labelled span with `model`, and measures.
pub fn replay_effect(
    model: &Model,
    records: &[Record],
    labels: &[Label],
    flap_below: Duration,
) -> BTreeMap<String, Effect> {
    let (Some(from), Some(to)) = (
        labels.iter().map(|l| l.start).min(),
        labels.iter().map(|l| l.end).max(),
    ) else {
        return BTreeMap::new();
    };
    let opts = Options {
        from,
        to,
        flap_below,
        trace: false,
    };
    let inside: Vec<Record> = records.iter().filter(|r| r.at >= from).cloned().collect();
    effect(&super::run(model, &inside, &[], &opts), labels)
}

// Beta distribution quantiles: the regularised incomplete beta function
// by its continued fraction (modified Lentz), inverted by bisection. Plain
// numerics, accurate to ~1e-10 in the range used here (a, b >= 1).

fn ln_gamma(x: f64) -> f64 {
    // Lanczos approximation (g = 7, n = 9).
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-14 {
            break;
        }
    }
    h
}

/// P(X <= x) for X ~ Beta(a, b).
pub fn beta_cdf(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// The `q` quantile of Beta(a, b).
pub fn beta_quantile(a: f64, b: f64, q: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if beta_cdf(a, b, mid) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_quantiles_match_known_values() {
        // Beta(1, 1) is uniform; Beta(2, 1) has cdf x^2.
        assert!((beta_quantile(1.0, 1.0, 0.05) - 0.05).abs() < 1e-9);
        assert!((beta_quantile(2.0, 1.0, 0.25) - 0.5).abs() < 1e-9);
        // Beta(10, 30): 5 % and 95 % quantiles, reference values from a
        // midpoint-rule integration of the density (200k steps).
        assert!((beta_quantile(10.0, 30.0, 0.05) - 0.1462).abs() < 1e-3);
        assert!((beta_quantile(10.0, 30.0, 0.95) - 0.3682).abs() < 1e-3);
        assert!((beta_cdf(5.0, 5.0, 0.5) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn too_little_labelled_time_is_refused_with_what_is_missing() {
        let opts = TuneOptions::default();
        let e = estimate(
            0.9,
            Count {
                hits: 50,
                samples: 60,
            },
            1.0 / 60.0,
            &opts,
        );
        assert_eq!(e.suggested, None);
        assert_eq!(e.needs_hours, Some(1.0));
        let e = estimate(
            0.9,
            Count {
                hits: 100,
                samples: 120,
            },
            1.0 / 60.0,
            &opts,
        );
        assert_eq!(e.suggested, Some(0.83));
        assert!(e.low < e.mean && e.mean < e.high);
    }
}
