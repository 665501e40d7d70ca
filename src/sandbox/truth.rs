//! A world that knows the truth: rooms occupied and vacant in turns, and
//! sensors with an explicit, seeded model of how they err (a miss while
//! someone is there, a false trigger while nobody is). It yields the
//! readings, as `SENSORS` would hold them, and the true occupancy of every
//! room as labels, so `presenced tune` can be checked against the numbers
//! that made the data. Pure and stepped: a simulated day takes
//! milliseconds, not a day.

use super::simulator::Rng;
use crate::observation::Reading;
use crate::replay::labels::Label;
use crate::replay::Record;
use crate::time::Timestamp;
use std::fmt::Write as _;
use std::time::Duration;

/// How one kind of sensor errs.
#[derive(Clone, Debug, PartialEq)]
pub struct SensorModel {
    /// Suffix of the sensor id: `<room>_<kind>`.
    pub kind: String,
    /// P(reports false | room occupied).
    pub miss: f64,
    /// P(reports true | room vacant).
    pub false_trigger: f64,
    /// It reports this often (a heartbeat with its current reading).
    pub every: Duration,
}

impl SensorModel {
    /// The likelihoods a perfect tuner would find: `p_true = 1 - miss`,
    /// `p_false = false_trigger`.
    pub fn likelihoods(&self) -> (f64, f64) {
        (1.0 - self.miss, self.false_trigger)
    }
}

/// How long rooms stay occupied and vacant (uniform in each range).
#[derive(Clone, Debug)]
pub struct Habits {
    pub occupied: (Duration, Duration),
    pub vacant: (Duration, Duration),
}

impl Default for Habits {
    fn default() -> Self {
        Habits {
            occupied: (Duration::from_secs(10 * 60), Duration::from_secs(90 * 60)),
            vacant: (Duration::from_secs(20 * 60), Duration::from_secs(150 * 60)),
        }
    }
}

/// What a simulated span produced.
#[derive(Clone, Debug, Default)]
pub struct Day {
    /// In time order, numbered as stream sequences from 1.
    pub records: Vec<Record>,
    /// The true occupancy of every room, back to back.
    pub labels: Vec<Label>,
}

/// Simulates `rooms` with one sensor of each model per room for `span`
/// from `start`, seeded.
pub fn simulate(
    rooms: &[&str],
    sensors: &[SensorModel],
    habits: &Habits,
    start: Timestamp,
    span: Duration,
    seed: u64,
) -> Day {
    let mut rng = Rng::new(seed);
    let end = start.plus(span);
    let draw = |rng: &mut Rng, (lo, hi): (Duration, Duration)| {
        Duration::from_secs(rng.range(lo.as_secs(), hi.as_secs().max(lo.as_secs())))
    };
    let mut day = Day::default();
    let mut readings: Vec<(Timestamp, usize, String, bool)> = Vec::new();
    for (r, room) in rooms.iter().enumerate() {
        // Truth first: alternating periods, starting vacant.
        let mut periods: Vec<(Timestamp, Timestamp, bool)> = Vec::new();
        let mut t = start;
        let mut occupied = rng.chance(0.3);
        while t < end {
            let len = draw(
                &mut rng,
                if occupied {
                    habits.occupied
                } else {
                    habits.vacant
                },
            );
            let until = t.plus(len).min(end);
            periods.push((t, until, occupied));
            day.labels.push(Label {
                zone: (*room).to_owned(),
                start: t,
                end: until,
                occupied,
            });
            t = until;
            occupied = !occupied;
        }
        // Then each sensor's heartbeat, at its own phase, erring as its
        // model says.
        for (k, s) in sensors.iter().enumerate() {
            let every = s.every.as_millis().max(1000) as i64;
            let mut t = start.0 + (rng.range(0, every as u64 - 1) as i64);
            let mut p = 0;
            while t < end.0 {
                while periods[p].1 .0 <= t {
                    p += 1;
                }
                let truth = periods[p].2;
                let says = if truth {
                    !rng.chance(s.miss)
                } else {
                    rng.chance(s.false_trigger)
                };
                readings.push((
                    Timestamp(t),
                    r * sensors.len() + k,
                    format!("{room}_{}", s.kind),
                    says,
                ));
                t += every;
            }
        }
    }
    readings.sort_by_key(|(t, order, _, _)| (*t, *order));
    day.records = readings
        .into_iter()
        .enumerate()
        .map(|(i, (at, _, sensor, on))| Record {
            seq: i as u64 + 1,
            sensor,
            value: Reading::Bool(on),
            at,
        })
        .collect();
    day
}

/// The labels as a file `presenced tune --labels` reads.
pub fn labels_csv(labels: &[Label]) -> String {
    let mut s = String::from("zone,start,end,state\n");
    for l in labels {
        let _ = writeln!(
            s,
            "{},{},{},{}",
            l.zone,
            l.start,
            l.end,
            if l.occupied { "occupied" } else { "vacant" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::Model;
    use crate::replay::tune;
    use std::collections::BTreeSet;

    fn sensors() -> Vec<SensorModel> {
        vec![
            SensorModel {
                kind: "pir".into(),
                miss: 0.25,
                false_trigger: 0.04,
                every: Duration::from_secs(20),
            },
            SensorModel {
                kind: "radar".into(),
                miss: 0.08,
                false_trigger: 0.12,
                every: Duration::from_secs(20),
            },
        ]
    }

    const ROOMS: [&str; 4] = ["kitchen", "living", "office", "bedroom"];

    /// The shipped guesses: wrong for both sensors of this house.
    fn shipped() -> Config {
        let mut text = String::from("site = \"sim\"\n");
        for room in ROOMS {
            text.push_str(&format!(
                "[zones.{room}]\narrive_after = \"30s\"\nleave_after = \"2m\"\nevidence = [\n  {{ sensor = \"{room}_pir\", p_true = 0.9, p_false = 0.3 }},\n  {{ sensor = \"{room}_radar\", p_true = 0.6, p_false = 0.4 }},\n]\n"
            ));
        }
        let cfg: Config = toml::from_str(&text).unwrap();
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        cfg
    }

    #[test]
    fn the_same_seed_gives_the_same_day_and_labels_tile_it() {
        let day = |seed| {
            simulate(
                &ROOMS,
                &sensors(),
                &Habits::default(),
                Timestamp(0),
                Duration::from_secs(6 * 3600),
                seed,
            )
        };
        let (a, b) = (day(7), day(7));
        assert_eq!(a.records, b.records);
        assert_eq!(a.labels, b.labels);
        assert_ne!(a.records, day(8).records);
        for room in ROOMS {
            let mine: Vec<&Label> = a.labels.iter().filter(|l| l.zone == room).collect();
            assert_eq!(mine.first().unwrap().start, Timestamp(0));
            assert_eq!(mine.last().unwrap().end, Timestamp(6 * 3600 * 1000));
            assert!(mine
                .windows(2)
                .all(|w| w[0].end == w[1].start && w[0].occupied != w[1].occupied));
        }
        // Round trip through the labels file format.
        let zones: BTreeSet<String> = ROOMS.iter().map(|s| s.to_string()).collect();
        let parsed =
            crate::replay::labels::parse_csv("sim.csv", &labels_csv(&a.labels), &zones).unwrap();
        assert_eq!(parsed, a.labels);
    }

    /// A simulated day, through the pure world: tune recovers every
    /// sensor's likelihoods within 0.05, and the tuned config is wrong
    /// for fewer minutes than the shipped one.
    #[test]
    fn tune_recovers_the_simulators_likelihoods_and_the_tuned_config_is_right_more_often() {
        for seed in [1, 2, 3] {
            tune_one_day(seed);
        }
    }

    fn tune_one_day(seed: u64) {
        let models = sensors();
        let day = simulate(
            &ROOMS,
            &models,
            &Habits::default(),
            Timestamp(1_800_000_000_000),
            Duration::from_secs(24 * 3600),
            seed,
        );
        let cfg = shipped();
        let model = Model::from_config(&cfg);
        // One look per heartbeat: each sample sees a fresh reading.
        let opts = tune::TuneOptions {
            sample_every: Duration::from_secs(20),
            ..tune::TuneOptions::default()
        };
        let est = tune::estimate_all(&model, &day.records, &day.labels, &opts);
        assert_eq!(est.len(), ROOMS.len());
        for (room, e) in &est {
            for r in &e.rules {
                let kind = r.sensor.rsplit('_').next().unwrap();
                let m = models.iter().find(|m| m.kind == kind).unwrap();
                let (pt, pf) = m.likelihoods();
                let (st, sf) = (r.p_true.suggested.unwrap(), r.p_false.suggested.unwrap());
                assert!(
                    (st - pt).abs() <= 0.05,
                    "seed {seed}, {room} {}: p_true {st} vs true {pt}",
                    r.sensor
                );
                assert!(
                    (sf - pf).abs() <= 0.05,
                    "seed {seed}, {room} {}: p_false {sf} vs true {pf}",
                    r.sensor
                );
                assert!(r.p_true.low <= r.p_true.mean && r.p_true.mean <= r.p_true.high);
                assert!(r.p_true.hours >= 2.0 && r.p_false.hours >= 2.0);
            }
            let occupied_share = e.occupied_hours / (e.occupied_hours + e.vacant_hours);
            assert!(
                (e.prior.mean - occupied_share).abs() < 0.02,
                "{room}: prior {}",
                e.prior.mean
            );
        }
        let tuned = tune::suggested_config(&cfg, &est);
        assert!(tuned.validate().is_empty(), "{:?}", tuned.validate());
        let flap = Duration::from_secs(120);
        let before = tune::replay_effect(&model, &day.records, &day.labels, flap);
        let after =
            tune::replay_effect(&Model::from_config(&tuned), &day.records, &day.labels, flap);
        let wrong = |e: &std::collections::BTreeMap<String, tune::Effect>| {
            e.values().map(tune::Effect::wrong_ms).sum::<i64>()
        };
        assert!(
            wrong(&after) < wrong(&before),
            "wrong-state ms: shipped {} tuned {}",
            wrong(&before),
            wrong(&after)
        );
        let diff = tune::toml_diff(&cfg, &est, opts.level);
        assert!(
            diff.contains("-p_false = 0.3\n+p_false = 0.0")
                || diff.contains("-p_false = 0.3\n+p_false = 0.1"),
            "{diff}"
        );
        assert!(diff.contains(" [zones.kitchen]"), "{diff}");
    }

    #[test]
    fn half_a_day_of_labels_is_refused_with_the_hours_it_lacks() {
        let day = simulate(
            &["kitchen"],
            &sensors(),
            &Habits::default(),
            Timestamp(0),
            Duration::from_secs(3600),
            3,
        );
        let mut text = String::from("site = \"sim\"\n");
        text.push_str("[zones.kitchen]\nevidence = [{ sensor = \"kitchen_pir\", p_true = 0.9, p_false = 0.3 }]\n");
        let cfg: Config = toml::from_str(&text).unwrap();
        let est = tune::estimate_all(
            &Model::from_config(&cfg),
            &day.records,
            &day.labels,
            &tune::TuneOptions::default(),
        );
        let k = &est["kitchen"];
        assert_eq!(k.rules[0].p_true.suggested, None);
        assert!(k.rules[0].p_true.needs_hours.unwrap() > 1.0);
        let diff = tune::toml_diff(&cfg, &est, 0.9);
        assert!(
            diff.contains("kept: needs") && diff.contains("more hours of occupied labels"),
            "{diff}"
        );
    }
}
