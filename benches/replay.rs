//! Replay benchmark: a generated week of a house (30 zones, about 5
//! million readings by default) replayed from a real SENSORS, printed
//! beside the raw rate of reading SENSORS with an ordered consumer in the
//! same run, and the pure engine's rate alone (in memory, one core).
//!
//! `cargo bench --bench replay`; the size comes from the environment so a
//! small run checks the bench itself: `PRESENCED_BENCH_REPLAY_READINGS`
//! (default 5,000,000) and `PRESENCED_BENCH_REPLAY_ZONES` (default 30).
//! `PRESENCED_BENCH_REPLAY_SERVER=0` stops after the pure engine (no
//! nats-server: what a profiler of the engine alone wants). The week is
//! stored pipelined (JSON encoded beside the publishing) and the time it
//! took is printed. See docs/PERFORMANCE.md.

#[path = "../tests/support/mod.rs"]
mod support;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use presenced::config::Config;
use presenced::engine::Model;
use presenced::naming::Site;
use presenced::observation::{Observation, Reading, OBSERVATION_SCHEMA};
use presenced::replay::source::{self, Range};
use presenced::replay::{self as replay, Options, Record};
use presenced::sandbox::simulator::Rng;
use presenced::time::Timestamp;
use std::time::{Duration, Instant};
use support::{NatsOptions, NatsServer};

const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// A house of `zones` rooms, each with a motion sensor (held), a light
/// level (threshold) and a door.
fn house(zones: u64) -> Config {
    let mut text = String::from("site = \"bench\"\n");
    for z in 0..zones {
        text.push_str(&format!(
            "[zones.room{z}]\narrive_after = \"5s\"\nleave_after = \"2m\"\nevidence = [\n  {{ sensor = \"room{z}_pir\", p_true = 0.9, p_false = 0.05, hold = \"30s\" }},\n  {{ sensor = \"room{z}_lux\", p_true = 0.7, p_false = 0.2, above = 100.0 }},\n  {{ sensor = \"room{z}_door\", p_true = 0.6, p_false = 0.4, stale_after = \"10m\" }},\n]\n"
        ));
    }
    let cfg: Config = toml::from_str(&text).expect("bench config");
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    cfg
}

/// `n` readings spread over a week, round robin over the sensors, with
/// runs of activity so zones do move.
fn week(zones: u64, n: u64, start: Timestamp) -> Vec<Record> {
    let mut rng = Rng::new(7);
    let sensors = zones * 3;
    let mut active = vec![false; zones as usize];
    (0..n)
        .map(|i| {
            let s = i % sensors;
            let zone = (s / 3) as usize;
            if s % 3 == 0 && rng.chance(0.02) {
                active[zone] = !active[zone];
            }
            let on = active[zone];
            let (sensor, value) = match s % 3 {
                0 => (
                    format!("room{zone}_pir"),
                    Reading::Bool(on && rng.chance(0.8)),
                ),
                1 => (
                    format!("room{zone}_lux"),
                    Reading::Number(if on { 300.0 } else { 10.0 } + rng.range(0, 40) as f64),
                ),
                _ => (format!("room{zone}_door"), Reading::Bool(rng.chance(0.1))),
            };
            Record {
                seq: i + 1,
                sensor,
                value,
                at: Timestamp(start.0 + (i as i64 * WEEK_MS) / n as i64),
            }
        })
        .collect()
}

/// Stores `records` in `SENSORS` as ingest does (one observation each), in
/// order on one connection: JSON is encoded by a task of its own while
/// the previous chunk is published with the daemon's windowed publisher,
/// so storing runs at the server's pipelined rate. (Four connections,
/// each zone on one of them, were slower on two cores.)
async fn store(js: &jetstream::Context, site: &Site, records: Vec<Record>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let site = site.clone();
    let encoder = tokio::task::spawn_blocking(move || {
        for chunk in records.chunks(20_000) {
            let msgs: Vec<_> = chunk
                .iter()
                .map(|r| {
                    let obs = Observation {
                        v: OBSERVATION_SCHEMA,
                        sensor: r.sensor.clone(),
                        value: r.value,
                        observed_at: r.at,
                        id: format!("b{}", r.seq),
                        source: "bench".into(),
                        delivery: None,
                    };
                    (
                        site.sensors_subject(&r.sensor),
                        jetstream::message::PublishMessage::build()
                            .payload(serde_json::to_vec(&obs).expect("JSON").into()),
                    )
                })
                .collect();
            if tx.blocking_send(msgs).is_err() {
                return;
            }
        }
    });
    while let Some(msgs) = rx.recv().await {
        for ack in presenced::store::publish::publish_all(js, msgs).await {
            ack.expect("stored");
        }
    }
    encoder.await.expect("encoder");
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env("PRESENCED_BENCH_REPLAY_READINGS", 5_000_000);
    let zones = env("PRESENCED_BENCH_REPLAY_ZONES", 30).max(1);
    let cfg = house(zones);
    let model = Model::from_config(&cfg);
    let start = Timestamp(Timestamp::now().0 - WEEK_MS);
    let records = week(zones, n, start);
    let opts = Options {
        from: start,
        to: Timestamp(start.0 + WEEK_MS),
        flap_below: Duration::from_secs(120),
        trace: false,
    };
    println!("replay bench: {n} readings, {zones} zones, one simulated week");

    // The pure engine alone, in memory.
    let t = Instant::now();
    let outcome = replay::run(&model, &records, &[], &opts);
    let pure = t.elapsed();
    let transitions: usize = outcome.zones.values().map(|z| z.transitions.len()).sum();
    println!(
        "pure engine (in memory, one core): {:>10.0} readings/s ({n} in {:.2}s, {transitions} transitions)",
        rate(n, pure),
        pure.as_secs_f64()
    );

    if env("PRESENCED_BENCH_REPLAY_SERVER", 1) == 0 {
        // The pure engine alone (for a profiler): no server, no store.
        return;
    }

    // Store the week in a real SENSORS.
    let server = NatsServer::start(NatsOptions::default());
    let client = async_nats::connect(server.url()).await.expect("connect");
    let site = Site::new("bench").unwrap();
    presenced::store::provision::provision(&client, &site)
        .await
        .expect("provision");
    let js = jetstream::new(client.clone());
    let t = Instant::now();
    store(&js, &site, records).await;
    let stored = t.elapsed();
    println!(
        "stored in SENSORS:                 {:>10.0} readings/s ({:.1}s; setup, not a result)",
        rate(n, stored),
        stored.as_secs_f64()
    );

    // Raw: an ordered consumer over SENSORS, counting messages.
    let stream = js.get_stream("SENSORS").await.unwrap();
    let t = Instant::now();
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: site.sensors_filter(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = c.messages().await.unwrap();
    let mut seen = 0u64;
    while seen < n {
        match tokio::time::timeout(Duration::from_secs(10), msgs.next()).await {
            Ok(Some(Ok(_))) => seen += 1,
            other => panic!("raw read stopped at {seen}: {other:?}"),
        }
    }
    let raw = t.elapsed();
    println!(
        "raw ordered-consumer read:         {:>10.0} readings/s",
        rate(n, raw)
    );

    // Replay as `presenced replay` does it: read and decode, then run.
    let t = Instant::now();
    let read = source::read_sensors(&js, &site, &Range::Seq { from: 1, to: None })
        .await
        .expect("read");
    let read_done = t.elapsed();
    let replayed = replay::run(&model, &read.records, &[], &opts);
    let total = t.elapsed();
    assert_eq!(read.records.len() as u64, n);
    assert_eq!(
        replayed, outcome,
        "replay from SENSORS differs from in memory"
    );
    println!(
        "replay (read + decode + engine):   {:>10.0} readings/s ({:.2}s: read {:.2}s, engine {:.2}s); {:.0}% of raw",
        rate(n, total),
        total.as_secs_f64(),
        read_done.as_secs_f64(),
        (total - read_done).as_secs_f64(),
        100.0 * rate(n, total) / rate(n, raw)
    );
    drop(server);
}
