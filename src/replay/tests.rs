use super::*;
use crate::config::Config;

const CONFIG: &str = r#"
site = "home"

[zones.kitchen]
occupied_above = 0.6
arrive_after = "2s"
leave_after = "5s"
evidence = [{ sensor = "pir", p_true = 0.95, p_false = 0.05, hold = "10s" }]
"#;

fn model(text: &str) -> Model {
    let cfg: Config = toml::from_str(text).unwrap();
    Model::from_config(&cfg)
}

fn rec(seq: u64, at_s: i64, on: bool) -> Record {
    Record {
        seq,
        sensor: "pir".into(),
        value: Reading::Bool(on),
        at: Timestamp(at_s * 1000),
    }
}

fn opts(to_s: i64) -> Options {
    Options {
        from: Timestamp(0),
        to: Timestamp(to_s * 1000),
        flap_below: Duration::from_secs(30),
        trace: true,
    }
}

#[test]
fn timers_fire_at_their_instants_and_stats_follow() {
    let m = model(CONFIG);
    // Motion at 100 s: arriving, occupied at 102 s (debounce); the hold
    // ends at 110 s: leaving, vacant at 115 s. A flap (13 s occupied).
    let out = run(
        &m,
        &[rec(1, 100, true), rec(2, 101, false)],
        &[],
        &opts(1000),
    );
    let k = &out.zones["kitchen"];
    let moves: Vec<(i64, &str, Option<u64>)> = k
        .transitions
        .iter()
        .map(|t| (t.at.0 / 1000, t.to.as_str(), t.seq))
        .collect();
    assert_eq!(
        moves,
        [
            (100, "arriving", Some(1)),
            (102, "occupied", None),
            (110, "leaving", None),
            (115, "vacant", None)
        ]
    );
    assert_eq!(k.occupied_ms, 13_000);
    assert_eq!(k.flaps, 1);
    assert_eq!(k.detection_ms, [2000]);
    assert_eq!(out.readings, 2);
    assert!(k.trace.len() >= 3);
}

#[test]
fn the_same_input_gives_the_same_outcome_and_the_end_of_the_range_cuts() {
    let m = model(CONFIG);
    let records: Vec<Record> = (0..200)
        .map(|i| rec(i + 1, (i as i64) * 7, i % 5 < 2))
        .collect();
    let a = run(&m, &records, &[], &opts(1500));
    let b = run(&m, &records, &[], &opts(1500));
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    assert!(a.zones["kitchen"].transitions.len() > 4);
    // Readings after `to` are not applied; a period still open at the
    // end counts as occupied time but not as a flap.
    let short = run(&m, &records, &[], &opts(103));
    assert!(short.readings < a.readings);
    assert!(short.zones["kitchen"]
        .transitions
        .iter()
        .all(|t| t.at <= Timestamp(103_000)));
}

#[test]
fn an_override_from_events_is_replayed_and_runs_out() {
    let m = model(CONFIG);
    let manual = [Manual::Override {
        zone: "kitchen".into(),
        at: Timestamp(50_000),
        state: Presence::Occupied,
        until: Timestamp(80_000),
        by: "me".into(),
        reason: None,
    }];
    let out = run(
        &m,
        &[rec(1, 10, false), rec(2, 60, false)],
        &manual,
        &opts(200),
    );
    let moves: Vec<(i64, &str, bool)> = out.zones["kitchen"]
        .transitions
        .iter()
        .map(|t| (t.at.0 / 1000, t.to.as_str(), t.cause.is_some()))
        .collect();
    assert_eq!(
        moves,
        [
            (50, "occupied", true),
            (80, "leaving", true),
            (85, "vacant", false)
        ]
    );
}

#[test]
fn diff_names_what_only_one_side_has() {
    let m = model(CONFIG);
    let out = run(&m, &[rec(1, 100, true)], &[], &opts(1000));
    let replayed = out.transitions();
    let mut recorded: Vec<Transition> = replayed.iter().map(|t| (*t).clone()).collect();
    assert!(diff(&replayed, &recorded).is_empty());
    recorded[1].at = Timestamp(recorded[1].at.0 + 1);
    let d = diff(&replayed, &recorded);
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].only_in, "replay");
    assert_eq!(d[1].only_in, "events");
    assert_eq!(median_ms(&[5, 1, 3]), Some(3));
}

#[test]
fn the_trace_is_thinned_but_keeps_its_extremes() {
    let m = model(CONFIG);
    // 200,000 readings over ~23 days: a motion blip every 1,000.
    let records: Vec<Record> = (0..200_000)
        .map(|i| rec(i + 1, i as i64 * 10, i % 1000 == 500))
        .collect();
    let out = run(&m, &records, &[], &opts(2_000_000));
    let trace = &out.zones["kitchen"].trace;
    assert!(
        trace.len() <= 3 * TRACE_BUCKETS as usize + 10,
        "{}",
        trace.len()
    );
    let blips = trace.iter().filter(|p| p.confidence > 0.6).count();
    assert!(blips >= 150, "spikes lost: {blips}");
    assert!(trace.windows(2).all(|w| w[0].at <= w[1].at));
}
