//! End-to-end benchmark of the real daemon against a real nats-server and
//! Mosquitto, each figure printed next to the ceilings measured in the same
//! run: Mosquitto's QoS 1 delivery rate to one subscriber, and the raw
//! pipelined KV put and JetStream publish rates of the same nats-server.
//!
//! `cargo bench --bench e2e` (see docs/PERFORMANCE.md). Workloads, each at
//! saturation (published as fast as the broker takes QoS 1 messages):
//!
//! - spread: readings round robin over 100, then 1,000 zones (one sensor
//!   each, JSON payloads): few readings cause a transition;
//! - flip: 10 zones x 3 sensors, bare `ON`/`OFF` payloads that flip every
//!   zone every few readings (issue 17's comparison workload);
//! - house: 30 zones with motion, door and light sensors in
//!   Zigbee2MQTT's JSON, a few readings per zone per (simulated) second
//!   with bursts;
//! - pages: the 1,000-zone spread again with status pages open (each
//!   reading `/events`), beside the run without, and the daemon's RSS;
//! - drain: the engine applying a stored backlog (no publisher) of the
//!   flip and the spread workloads;
//! - latency at a fixed 1,000 readings/s, and rehydration of 10,000 zones;
//! - paths: the flip and 100-zone spread workloads through Mosquitto, then
//!   through the leaf nats-server's own MQTT listener (no broker process),
//!   same nats-server, zones and workloads, each against its own broker's
//!   QoS 1 delivery rate, and every reading counted in `SENSORS` (stored
//!   exactly once, or the path loses or duplicates).
//!
//! Sizes come from the environment so a small run checks the bench
//! itself (defaults in brackets):
//!
//! - `PRESENCED_BENCH_READINGS` [200000]: readings per spread run;
//! - `PRESENCED_BENCH_ZONES` [1000]: zones of the wide spread and page runs;
//! - `PRESENCED_BENCH_FLIP_READINGS` [20000]: readings of the flip run and
//!   of its drain;
//! - `PRESENCED_BENCH_HOUSE_READINGS` [60000]: readings of the house run;
//! - `PRESENCED_BENCH_CEILING` [100000]: messages of each ceiling;
//! - `PRESENCED_BENCH_PAGES` [10]: status pages of the second 1,000-zone
//!   run (0: none, the two runs then show the noise between two runs);
//! - `PRESENCED_BENCH_LATENCY` [10000]: readings of the latency run;
//! - `PRESENCED_BENCH_REHYD_ZONES` [10000]: zones of the rehydration run;
//! - `PRESENCED_BENCH_REHYD_HOLD_S` [0]: how long the rehydrated daemon
//!   stays up after it was measured, to look at it by hand;
//! - `PRESENCED_BENCH_RUNS` [all]: which runs, comma-separated, of
//!   `spread,flip,house,latency,pages,drain,rehyd,paths` (the ceilings
//!   always run), e.g. `flip,drain` to profile the engine on the flip
//!   workload;
//! - `PRESENCED_BENCH_STALL_S` [600]: how long a run may take to be
//!   applied before the benchmark stops and prints how far `SENSORS` and
//!   the engine consumer got;
//! - `PRESENCED_BENCH_DAEMON_LOG` [warn]: the daemon's `RUST_LOG`;
//! - `PRESENCED_BENCH_ENGINE_BATCH` [the default]: the daemon's
//!   `engine.batch`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use async_nats::jetstream::{self, consumer::pull, kv, stream};
use common::*;
use futures::StreamExt;
use presenced::engine::ZoneState;
use presenced::naming::Site;
use presenced::observation::{Observation, Reading, OBSERVATION_SCHEMA};
use presenced::sandbox::simulator::Rng;
use presenced::store::publish::publish_all;
use presenced::time::Timestamp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::process::proc_usage;
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The spread zones: one sensor each, `s<i>` on `test/s<i>`.
fn spread_toml(n: usize) -> String {
    let mut out = String::with_capacity(n * 160);
    for i in 0..n {
        out.push_str(&format!(
            "[zones.z{i:05}]\narrive_after = \"0s\"\nleave_after = \"0s\"\n[[zones.z{i:05}.evidence]]\nsensor = \"s{i:05}\"\np_true = 0.95\np_false = 0.05\n"
        ));
    }
    out
}

/// Zones of the flip workload: three bare ON/OFF sensors each, at an even
/// prior so that two sensors of three decide: every zone crosses both
/// thresholds each time its sensors turn, with no debounce.
const FLIP_ZONES: usize = 10;
/// Zones of the house workload.
const HOUSE_ZONES: usize = 30;

fn flip_toml() -> String {
    let mut out = String::new();
    for z in 0..FLIP_ZONES {
        out.push_str(&format!(
            "[zones.flip{z}]\nprior = 0.5\narrive_after = \"0s\"\nleave_after = \"0s\"\nevidence = [\n  {{ sensor = \"flip{z}_a\", p_true = 0.95, p_false = 0.05 }},\n  {{ sensor = \"flip{z}_b\", p_true = 0.95, p_false = 0.05 }},\n  {{ sensor = \"flip{z}_c\", p_true = 0.95, p_false = 0.05 }},\n]\n"
        ));
    }
    out
}

/// A house: per room a held motion sensor, a door contact that goes stale
/// and a light level with a threshold, with a short arrive and a longer
/// leave debounce.
fn house_toml() -> String {
    let mut out = String::new();
    for z in 0..HOUSE_ZONES {
        out.push_str(&format!(
            "[zones.room{z:02}]\narrive_after = \"2s\"\nleave_after = \"30s\"\nevidence = [\n  {{ sensor = \"room{z:02}_motion\", p_true = 0.9, p_false = 0.05, hold = \"20s\" }},\n  {{ sensor = \"room{z:02}_door\", p_true = 0.6, p_false = 0.4, stale_after = \"10m\" }},\n  {{ sensor = \"room{z:02}_lux\", p_true = 0.7, p_false = 0.2, above = 100.0 }},\n]\n"
        ));
    }
    out
}

/// The mappings of all workloads: spread (`test/<sensor>`, JSON with a
/// timestamp), flip (`flip/<sensor>`, bare payload) and house
/// (`house/<room>/<kind>`, Zigbee2MQTT's JSON with a timestamp).
fn mappings() -> String {
    let mut m = motion_mapping(true);
    m.push_str("\n[[mqtt.main.topics]]\nfilter = \"flip/+\"\nsensor = \"{1}\"\n");
    for (kind, sensor, value) in [
        ("motion", "motion", "/occupancy"),
        ("door", "door", "/contact"),
        ("light", "lux", "/illuminance"),
    ] {
        m.push_str(&format!(
            "\n[[mqtt.main.topics]]\nfilter = \"house/+/{kind}\"\nsensor = \"{{1}}_{sensor}\"\nvalue = \"{value}\"\ntimestamp = \"/ts\"\n"
        ));
    }
    m
}

/// One MQTT message of a workload: topic, payload.
type Msg = (String, Vec<u8>);

/// `n` readings round robin over `spread` zones; each zone turns every
/// time round.
fn spread_workload(spread: usize, n: u64, base: i64) -> Vec<Msg> {
    (0..n as i64)
        .map(|i| {
            let z = i as usize % spread;
            let on = (i / spread as i64) % 2 == 0;
            (
                format!("test/s{z:05}"),
                format!(r#"{{"occupancy":{on},"ts":{}}}"#, base + i).into_bytes(),
            )
        })
        .collect()
}

/// The flip workload as (sensor, value): zone after zone, its three
/// sensors in turn, all ON one round and all OFF the next, so each zone
/// moves (vacant → arriving → occupied, or occupied → leaving → vacant) on
/// every second reading of its round.
fn flip_readings(n: u64) -> Vec<(String, bool)> {
    (0..n)
        .map(|i| {
            let zone = (i / 3) as usize % FLIP_ZONES;
            let sensor = ["a", "b", "c"][(i % 3) as usize];
            let on = (i / (3 * FLIP_ZONES as u64)) % 2 == 0;
            (format!("flip{zone}_{sensor}"), on)
        })
        .collect()
}

fn flip_workload(n: u64) -> Vec<Msg> {
    flip_readings(n)
        .into_iter()
        .map(|(s, on)| (format!("flip/{s}"), if on { "ON" } else { "OFF" }.into()))
        .collect()
}

/// A house in simulated time from `base`: every room reports a few times
/// per second (motion while someone is in, the light level, now and then
/// the door), someone moves from room to room, and a room sometimes bursts
/// (a dozen readings within 100 ms, as a chatty sensor or a person passing
/// several sensors does).
fn house_workload(n: u64, base: i64) -> Vec<Msg> {
    let mut rng = Rng::new(17);
    let mut out = Vec::with_capacity(n as usize);
    let mut occupied = [false; HOUSE_ZONES];
    let mut t = base;
    let push = |out: &mut Vec<Msg>, rng: &mut Rng, room: usize, occupied: bool, t: i64| {
        let (kind, payload) = match rng.range(0, 9) {
            0..=4 => (
                "motion",
                format!(
                    r#"{{"occupancy":{},"battery":97,"linkquality":120,"ts":{t}}}"#,
                    occupied && rng.chance(0.8)
                ),
            ),
            5..=8 => (
                "light",
                format!(
                    r#"{{"illuminance":{},"linkquality":98,"ts":{t}}}"#,
                    if occupied { 250 } else { 20 } + rng.range(0, 60)
                ),
            ),
            _ => (
                "door",
                format!(
                    r#"{{"contact":{},"battery":88,"ts":{t}}}"#,
                    !rng.chance(0.2)
                ),
            ),
        };
        out.push((format!("house/room{room:02}/{kind}"), payload.into_bytes()));
    };
    while (out.len() as u64) < n {
        // One simulated 100 ms step: each room reports with probability
        // 0.3 (three readings per room per second on average).
        t += 100;
        if rng.chance(0.05) {
            let room = rng.range(0, HOUSE_ZONES as u64 - 1) as usize;
            occupied[room] = !occupied[room];
        }
        for (room, &occ) in occupied.iter().enumerate() {
            if rng.chance(0.3) {
                push(&mut out, &mut rng, room, occ, t);
            }
        }
        if rng.chance(0.02) {
            let room = rng.range(0, HOUSE_ZONES as u64 - 1) as usize;
            for k in 0..12 {
                push(&mut out, &mut rng, room, occupied[room], t + k * 8);
            }
        }
    }
    out.truncate(n as usize);
    out
}

/// Milliseconds of simulated time `n` house readings span (about 9 per
/// 100 ms step), with room to spare.
fn house_span(n: u64) -> i64 {
    (n as i64 / 9 + 100) * 100 * 2
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The ceilings every figure is read against, measured in the same run.
struct Ceilings {
    /// Mosquitto's QoS 1 delivery rate to one subscriber.
    broker: f64,
    /// The publisher's side of that run.
    broker_publish: f64,
    /// Raw pipelined KV put rate.
    kv: f64,
    /// Raw pipelined JetStream publish rate.
    js: f64,
}

impl Ceilings {
    fn ratios(&self, rate: f64) -> String {
        format!(
            "= {:>3.0}% of broker QoS 1 delivery, {:>3.0}% of raw KV put, {:>3.0}% of raw JS publish",
            rate / self.broker * 100.0,
            rate / self.kv * 100.0,
            rate / self.js * 100.0
        )
    }
}

/// Raw pipelined KV put, and one put at a time with its p99.
async fn raw_kv(js: &jetstream::Context, n: u64) -> (f64, f64, f64) {
    let store = js
        .create_key_value(kv::Config {
            bucket: "bench".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .expect("bench bucket");
    // Pipelined: the same windowed publisher the daemon uses.
    let msgs: Vec<_> = (0..n)
        .map(|i| {
            (
                format!("$KV.bench.k{}", i % 10_000),
                jetstream::message::PublishMessage::build()
                    .payload(format!("{{\"v\":{i}}}").into()),
            )
        })
        .collect();
    let t = Instant::now();
    let results = publish_all(js, msgs).await;
    let pipelined = n as f64 / t.elapsed().as_secs_f64();
    assert!(results.iter().all(|r| r.is_ok()));
    let serial_n = (n / 20).max(100);
    let mut lat = Vec::with_capacity(serial_n as usize);
    let t = Instant::now();
    for i in 0..serial_n {
        let s = Instant::now();
        store.put(format!("k{i}"), "x".into()).await.expect("put");
        lat.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    let serial = serial_n as f64 / t.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    (pipelined, serial, percentile(&lat, 0.99))
}

/// Raw pipelined JetStream publish of observation-sized messages into a
/// plain file stream (what ingest's `SENSORS` publish is, without
/// presenced).
async fn raw_js(js: &jetstream::Context, n: u64) -> f64 {
    js.create_stream(stream::Config {
        name: "BENCHJS".into(),
        subjects: vec!["benchjs.>".into()],
        ..Default::default()
    })
    .await
    .expect("bench stream");
    let msgs: Vec<_> = (0..n)
        .map(|i| {
            (
                format!("benchjs.s{:05}", i % 1000),
                jetstream::message::PublishMessage::build().payload(
                    format!(
                        r#"{{"v":1,"sensor":"s{:05}","value":true,"observed_at":1700000000000,"id":"mqtt:{i}","source":"main"}}"#,
                        i % 1000
                    )
                    .into(),
                ),
            )
        })
        .collect();
    let t = Instant::now();
    let results = publish_all(js, msgs).await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    assert!(results.iter().all(|r| r.is_ok()));
    rate
}

/// Mosquitto's QoS 1 delivery rate to one subscriber that acknowledges on
/// receipt: `n` messages from the same kind of publisher as the workloads,
/// from the first publish until the subscriber has the last. Returns
/// (delivery rate, publisher-side rate).
async fn raw_broker(port: u16, n: u64) -> (f64, f64) {
    let mut opts = MqttOptions::new("bench-ceiling-sub", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(true);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    client
        .subscribe("ceiling/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("ceiling subscriber: {e}"),
        }
    }
    let got = Arc::new(AtomicU64::new(0));
    let got2 = got.clone();
    let sub = tokio::spawn(async move {
        while got2.load(Ordering::Relaxed) < n {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    got2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => panic!("ceiling subscriber: {e}"),
            }
        }
        // Keeps the connection (and its acknowledgements) going.
        eventloop
    });
    let mut p = Publisher::connect(port, "bench-ceiling-pub").await;
    let t = Instant::now();
    for i in 0..n {
        p.publish(
            &format!("ceiling/s{:05}", i % 1000),
            format!(
                r#"{{"occupancy":{},"ts":{}}}"#,
                i % 2 == 0,
                1_700_000_000_000u64 + i
            ),
        )
        .await;
    }
    p.flush(Duration::from_secs(300)).await;
    let publish = n as f64 / t.elapsed().as_secs_f64();
    let eventloop = tokio::time::timeout(Duration::from_secs(300), sub)
        .await
        .expect("subscriber got every message")
        .expect("subscriber task");
    let delivery = n as f64 / t.elapsed().as_secs_f64();
    drop(eventloop);
    let _ = client.disconnect().await;
    (delivery, publish)
}

/// One open status page: `/` once, then `/events` read until the daemon
/// closes it or `closing` is set, counting the bytes (a thread, like a
/// browser's own process: it does not compete with the benchmark's
/// runtime).
fn open_page(http: SocketAddr, bytes: Arc<AtomicU64>, closing: Arc<AtomicBool>) {
    use std::io::{Read, Write};
    let _ = support::http_get(http, "/");
    std::thread::spawn(move || {
        let Ok(mut s) = std::net::TcpStream::connect(http) else {
            return;
        };
        let req =
            format!("GET /events HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return;
        }
        // Health comes every second: a read never waits longer.
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 65536];
        while !closing.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let readings = env("PRESENCED_BENCH_READINGS", 200_000);
    let zones = env("PRESENCED_BENCH_ZONES", 1000).max(100) as usize;
    let flip_n = env("PRESENCED_BENCH_FLIP_READINGS", 20_000);
    let house_n = env("PRESENCED_BENCH_HOUSE_READINGS", 60_000);
    let ceiling_n = env("PRESENCED_BENCH_CEILING", 100_000);
    let pages = env("PRESENCED_BENCH_PAGES", 10) as usize;
    let latency_n = env("PRESENCED_BENCH_LATENCY", 10_000) as i64;
    let rehyd_zones = env("PRESENCED_BENCH_REHYD_ZONES", 10_000) as usize;
    let runs = std::env::var("PRESENCED_BENCH_RUNS")
        .unwrap_or_else(|_| "spread,flip,house,latency,pages,drain,rehyd,paths".into());
    let on = |run: &str| runs.split(',').any(|r| r.trim() == run);

    let nats = NatsServer::start(NatsOptions::default());
    let mqtt = Mosquitto::start();
    let js = jetstream(&nats.url()).await;

    println!("presenced end-to-end benchmark (nats-server and Mosquitto on this host)\n");
    println!("--    ceilings, same servers, same run");
    let (broker, broker_publish) = raw_broker(mqtt.port, ceiling_n).await;
    println!(
        "raw   Mosquitto QoS 1 delivery to one subscriber: {broker:>9.0} /s   (publisher side {broker_publish:.0} /s; {ceiling_n} messages)"
    );
    let (raw_pipelined, raw_serial, raw_p99) = raw_kv(&js, ceiling_n).await;
    println!(
        "raw   KV put, pipelined (window {}):  {raw_pipelined:>9.0} /s",
        presenced::store::publish::WINDOW
    );
    println!("raw   KV put, one at a time:          {raw_serial:>9.0} /s   p99 {raw_p99:.2} ms");
    let raw_publish = raw_js(&js, ceiling_n).await;
    println!("raw   JetStream publish, pipelined:   {raw_publish:>9.0} /s");
    let ceil = Ceilings {
        broker,
        broker_publish,
        kv: raw_pipelined,
        js: raw_publish,
    };

    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let all_zones = format!("{}{}{}", spread_toml(zones), flip_toml(), house_toml());
    let cfg = daemon_config(
        "bench",
        &nats.url(),
        mqtt.port,
        http_port,
        &mappings(),
        &all_zones,
    );
    // Readings carry their own timestamps, run after run ahead of the
    // clock (the house's simulated minutes pass in seconds): allowed an
    // hour's lead instead of the default five minutes.
    let cfg = cfg.replace("[ingest]\n", "[ingest]\nmax_clock_skew = \"1h\"\n");
    // The engine's batch (default 1,000), to compare sizes.
    let cfg = match std::env::var("PRESENCED_BENCH_ENGINE_BATCH") {
        Ok(b) => cfg.replace("[engine]\n", &format!("[engine]\nbatch = {b}\n")),
        Err(_) => cfg,
    };
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg_path = cfg_dir.path().join("presenced.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    provision(&cfg_path);
    let daemon_log = std::env::var("PRESENCED_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into());
    let mut daemon = Daemon::start(&cfg, &[("RUST_LOG", daemon_log.as_str())]);
    daemon.wait_healthy(http, Duration::from_secs(30));
    let pid = daemon.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, cpu0) = proc_usage(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss_idle, cpu1) = proc_usage(pid);
    let idle_cpu = (cpu1 - cpu0) / 5.0 * 100.0;
    println!(
        "\nthe daemon: {} zones ({zones} spread, {FLIP_ZONES} flip, {HOUSE_ZONES} house)",
        zones + FLIP_ZONES + HOUSE_ZONES
    );

    let mut p = Publisher::connect(mqtt.port, "bench-pub").await;
    // Each run's readings are stamped after the last run's, so no zone's
    // clock runs backwards between runs.
    let mut base = now_ms();
    let mut rss_load = 0;
    let mut load_line = String::new();
    let run = |name: String, sat: Saturation, rss_load: &mut u64, load_line: &mut String| {
        *rss_load = (*rss_load).max(sat.rss_max);
        println!("--    {name}");
        println!(
            "mqtt  QoS 1 publish into Mosquitto:   {:>9.0} /s   (publisher side, same run)",
            sat.mqtt_rate
        );
        println!(
            "ingest MQTT in → stored in SENSORS:   {:>9.0} /s   (all stored after {:.1} s, all applied after {:.1} s)",
            sat.n as f64 / sat.stored_at,
            sat.stored_at,
            sat.elapsed
        );
        println!(
            "e2e   MQTT in → presence KV written:   {:>9.0} /s   {}  ({} readings, {} transitions)",
            sat.e2e,
            ceil.ratios(sat.e2e),
            sat.n,
            sat.transitions
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "cpu   the machine: {:.2} of {cores} cores busy (daemon {:.2}, nats-server {:.2}, mosquitto {:.2}, the publisher and the rest {:.2}; steal {:.2})",
            sat.machine.0,
            sat.cpu[0] / 100.0,
            sat.cpu[1] / 100.0,
            sat.cpu[2] / 100.0,
            (sat.machine.0 - (sat.cpu[0] + sat.cpu[1] + sat.cpu[2]) / 100.0).max(0.0),
            sat.machine.1
        );
        println!(
            "held  peaks: ingest buffer {}, MQTT unacknowledged {}, engine pending {}; daemon RSS {:.1} MB",
            sat.held.buffer,
            sat.held.unacked,
            sat.held.pending,
            sat.held.rss as f64 / 1024.0
        );
        *load_line = format!(
            "under saturation ({name}) {:.0}% (of one core); nats-server {:.0}%, mosquitto {:.0}% in the same window",
            sat.cpu[0], sat.cpu[1], sat.cpu[2]
        );
        sat.e2e
    };
    let others = [nats.pid(), mqtt.pid()];

    // Spread over 100 zones: few readings cause a transition.
    if on("spread") {
        let w = spread_workload(100, readings, base);
        base += readings as i64;
        let sat = saturate(&js, &mut p, pid, others, &w).await;
        run(
            "readings spread over 100 zones".into(),
            sat,
            &mut rss_load,
            &mut load_line,
        );
    }

    // Flip: every zone moves every few readings.
    if on("flip") {
        let w = flip_workload(flip_n);
        let sat = saturate(&js, &mut p, pid, others, &w).await;
        run(
            format!("flip: {FLIP_ZONES} zones x 3 sensors, bare ON/OFF, every zone turning"),
            sat,
            &mut rss_load,
            &mut load_line,
        );
    }

    // A house in Zigbee2MQTT's JSON, with bursts.
    if on("house") {
        let w = house_workload(house_n, base);
        base += house_span(house_n);
        let sat = saturate(&js, &mut p, pid, others, &w).await;
        run(
            format!("house: {HOUSE_ZONES} rooms, motion/door/light, ~3 readings per room per simulated second, bursts"),
            sat,
            &mut rss_load,
            &mut load_line,
        );
    }

    // Latency at a moderate fixed rate: 1,000/s over 100 zones.
    if on("latency") {
        let lat = latency(&js, mqtt.port, latency_n, base).await;
        base += latency_n + 1000;
        println!(
            "lat   MQTT publish → KV update @1k/s:  p50 {:.2} ms  p99 {:.2} ms  ({} samples; raw KV put p99 {raw_p99:.2} ms)",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.len()
        );
    }

    // Spread over every spread zone without, then with, status pages open.
    if on("pages") {
        // A first run warms the daemon up on these zones (its heap grew by
        // about 5 MB from one run to the next otherwise), then the two
        // runs compared.
        let w = spread_workload(zones, readings, base);
        base += readings as i64;
        let sat = saturate(&js, &mut p, pid, others, &w).await;
        run(
            format!("readings spread over {zones} zones, warm-up"),
            sat,
            &mut rss_load,
            &mut load_line,
        );
        // Rounds alternate: no page open, then `pages` open, then closed
        // again. One run against the next varies by up to a quarter on
        // this machine, so one pair decides nothing; the median of the
        // rounds' ratios is the figure. The first round's "without" is a
        // daemon whose page was never asked for; later ones have the
        // page's follower running with no page open (what stays after a
        // page was looked at once).
        let rounds = env("PRESENCED_BENCH_PAGE_ROUNDS", 3).max(1);
        let mut ratios = Vec::new();
        let mut page_bytes_all = 0u64;
        let rss_before = proc_usage(pid).0;
        let mut rss_growth = Vec::new();
        for round in 1..=rounds {
            let w = spread_workload(zones, readings, base);
            base += readings as i64;
            let sat = saturate(&js, &mut p, pid, others, &w).await;
            let rss_no_pages = sat.rss_max;
            let no_pages = run(
                format!("readings spread over {zones} zones, no status page open (round {round} of {rounds})"),
                sat,
                &mut rss_load,
                &mut load_line,
            );
            // With PRESENCED_BENCH_PAGES=0 the second run has no page
            // either: the noise floor of the comparison.
            let page_bytes = Arc::new(AtomicU64::new(0));
            let closing = Arc::new(AtomicBool::new(false));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss_pages_before = proc_usage(pid).0;
            for _ in 0..pages {
                open_page(http, page_bytes.clone(), closing.clone());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let w = spread_workload(zones, readings, base);
            base += readings as i64;
            let sat = saturate(&js, &mut p, pid, others, &w).await;
            let rss_with_pages = sat.rss_max;
            let with_pages = run(
                format!("readings spread over {zones} zones, {pages} status pages open on /events (round {round} of {rounds})"),
                sat,
                &mut rss_load,
                &mut load_line,
            );
            closing.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss_pages_after = proc_usage(pid).0;
            let bytes = page_bytes.load(Ordering::Relaxed);
            page_bytes_all += bytes;
            ratios.push(with_pages / no_pages);
            rss_growth.push(rss_with_pages as f64 - rss_no_pages as f64);
            println!(
                "page  round {round}: {pages} pages: e2e {with_pages:.0} /s against {no_pages:.0} /s without = {:.1}% ({:+.1}%); {:.1} MB of events received",
                with_pages / no_pages * 100.0,
                (with_pages / no_pages - 1.0) * 100.0,
                bytes as f64 / 1e6
            );
            println!(
                "page  round {round} RSS: peak without pages {:.1} MB, with pages {:.1} MB (growth {:+.1} MB); idle before opening {:.1} MB, after the run {:.1} MB (growth {:+.1} MB)",
                rss_no_pages as f64 / 1024.0,
                rss_with_pages as f64 / 1024.0,
                (rss_with_pages as f64 - rss_no_pages as f64) / 1024.0,
                rss_pages_before as f64 / 1024.0,
                rss_pages_after as f64 / 1024.0,
                (rss_pages_after as f64 - rss_pages_before as f64) / 1024.0,
            );
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ratio = median(&mut ratios);
        let growth = median(&mut rss_growth);
        println!(
            "page  {pages} pages, median of {rounds} rounds: e2e {:.1}% of the rate without ({:+.1}%); RSS peak growth {:+.1} MB (before the rounds {:.1} MB); {:.1} MB of events received in all",
            ratio * 100.0,
            (ratio - 1.0) * 100.0,
            growth / 1024.0,
            rss_before as f64 / 1024.0,
            page_bytes_all as f64 / 1e6
        );
    }
    println!("cpu   daemon idle {idle_cpu:.1}%  {load_line}");
    println!(
        "rss   daemon idle {:.1} MB  under saturation {:.1} MB  ({} zones)",
        rss_idle as f64 / 1024.0,
        rss_load as f64 / 1024.0,
        zones + FLIP_ZONES + HOUSE_ZONES
    );
    drop(p);

    // The engine draining a stored backlog, no publisher: the daemon is
    // stopped, the readings are stored in SENSORS as ingest stores them,
    // and the daemon is started again.
    if on("drain") {
        drain_runs(&js, &mut daemon, &ceil, base, flip_n, readings, zones).await;
    }
    drop(daemon);
    let _ = ceil.broker_publish;

    if on("rehyd") {
        rehydration(rehyd_zones).await;
    }
    drop(mqtt);
    drop(nats);

    if on("paths") {
        paths(ceiling_n, readings.min(100_000), flip_n).await;
    }
}

/// How sensors reach the daemon: through a separate broker (Mosquitto),
/// or straight into the leaf nats-server's MQTT listener, with the daemon
/// an MQTT client of either. One fresh nats-server with its MQTT listener
/// on and one Mosquitto, the same zones and workloads through each path in
/// turn, the daemon started again for each; each path's figures against
/// its own broker's QoS 1 delivery rate measured in the same run.
async fn paths(ceiling_n: u64, spread_n: u64, flip_n: u64) {
    let nats = NatsServer::start(NatsOptions {
        mqtt: true,
        ..Default::default()
    });
    let leaf_mqtt = nats.mqtt_port.expect("the leaf's MQTT port");
    let mosquitto = Mosquitto::start();
    let js = jetstream(&nats.url()).await;
    println!(
        "\n--    paths: sensors → Mosquitto → daemon, and sensors → the leaf's own MQTT listener → daemon"
    );
    let (via_broker, _) = raw_broker(mosquitto.port, ceiling_n).await;
    println!("raw   Mosquitto QoS 1 delivery to one subscriber:        {via_broker:>9.0} /s");
    let (via_leaf, _) = raw_broker(leaf_mqtt, ceiling_n).await;
    println!("raw   leaf MQTT listener QoS 1 delivery to one subscriber: {via_leaf:>9.0} /s");
    let zones = format!("{}{}", spread_toml(100), flip_toml());
    let mut base = now_ms();
    for (path, port, ceiling) in [
        ("mosquitto", mosquitto.port, via_broker),
        ("leaf-mqtt", leaf_mqtt, via_leaf),
    ] {
        let http_port = support::free_port();
        let cfg = daemon_config("bench", &nats.url(), port, http_port, &mappings(), &zones)
            .replace("[ingest]\n", "[ingest]\nmax_clock_skew = \"1h\"\n");
        let cfg_dir = tempfile::tempdir().expect("config dir");
        let cfg_path = cfg_dir.path().join("presenced.toml");
        std::fs::write(&cfg_path, &cfg).expect("write config");
        provision(&cfg_path);
        let daemon = Daemon::start(&cfg, &[("RUST_LOG", "warn")]);
        daemon.wait_healthy(
            SocketAddr::from(([127, 0, 0, 1], http_port)),
            Duration::from_secs(30),
        );
        let mut p = Publisher::connect(port, &format!("bench-path-{path}")).await;
        let others = [nats.pid(), mosquitto.pid()];
        let spread = spread_workload(100, spread_n, base);
        base += spread_n as i64;
        for (name, w) in [("flip", flip_workload(flip_n)), ("spread", spread)] {
            let before = stream_messages(&js, "SENSORS").await;
            let sat = saturate(&js, &mut p, daemon.pid(), others, &w).await;
            let stored = stream_messages(&js, "SENSORS").await - before;
            println!(
                "path  {path:<9} {name:<6} e2e {:>9.0} /s = {:>3.0}% of its broker's QoS 1 delivery; stored {stored} of {} ({}); cpu daemon {:.0}%, nats-server {:.0}%, mosquitto {:.0}%",
                sat.e2e,
                sat.e2e / ceiling * 100.0,
                sat.n,
                if stored == sat.n { "none lost or doubled" } else { "LOST OR DOUBLED" },
                sat.cpu[0],
                sat.cpu[1],
                sat.cpu[2],
            );
        }
        drop(p);
        drop(daemon);
    }
}

async fn drain_runs(
    js: &jetstream::Context,
    daemon: &mut Daemon,
    ceil: &Ceilings,
    base: i64,
    flip_n: u64,
    readings: u64,
    zones: usize,
) {
    let site = Site::new("bench").expect("site");
    let mut at = base;
    let flip_obs: Vec<(String, Reading)> = flip_readings(flip_n)
        .into_iter()
        .map(|(s, on)| (s, Reading::Bool(on)))
        .collect();
    let d = drain(js, &site, daemon, &flip_obs, &mut at).await;
    println!("--    backlog drained by the engine (no publisher)");
    println!(
        "drain flip ({flip_n} readings, {} transitions):     {:>9.0} /s   = {:.1}% of raw KV put, {:.1}% of raw JS publish",
        d.1,
        d.0,
        d.0 / ceil.kv * 100.0,
        d.0 / ceil.js * 100.0
    );
    let spread_obs: Vec<(String, Reading)> = (0..readings)
        .map(|i| {
            let z = i as usize % zones;
            let on = (i / zones as u64) % 2 == 0;
            (format!("s{z:05}"), Reading::Bool(on))
        })
        .collect();
    let d = drain(js, &site, daemon, &spread_obs, &mut at).await;
    println!(
        "drain spread over {zones} zones ({readings} readings, {} transitions): {:>9.0} /s   = {:.1}% of raw KV put, {:.1}% of raw JS publish",
        d.1,
        d.0,
        d.0 / ceil.kv * 100.0,
        d.0 / ceil.js * 100.0
    );
}

/// Rehydration of many zones, and memory with them: a leaf and a broker
/// of their own (the other runs' readings, stamped ahead of the clock,
/// would leave zone clocks ahead and the daemon unhealthy, and their
/// broker session would hand it readings: it would not be idle), the
/// broker reachable (a source that cannot connect is unhealthy too).
async fn rehydration(rehyd_zones: usize) {
    let nats = NatsServer::start(NatsOptions::default());
    let broker = Mosquitto::start();
    let mqtt_port = broker.port;
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let cfg = daemon_config(
        "bench",
        &nats.url(),
        mqtt_port,
        http_port,
        &motion_mapping(true),
        &spread_toml(rehyd_zones),
    );
    let cfg_dir = tempfile::tempdir().expect("temp dir");
    let cfg_path = cfg_dir.path().join("presenced.toml");
    std::fs::write(&cfg_path, &cfg).expect("write config");
    provision(&cfg_path);
    let mut d = Daemon::start(&cfg, &[("RUST_LOG", "info")]);
    d.wait_healthy(http, Duration::from_secs(60));
    d.restart();
    d.wait_healthy(http, Duration::from_secs(60));
    let log = d.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("state rehydrated"))
        .unwrap_or("");
    let ms: f64 = line
        .split("elapsed_ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_many, _) = proc_usage(d.pid());
    let (anon, file) = support::process::proc_rss_split(d.pid());
    println!("rehyd {rehyd_zones} zones from KV:            {ms:>9.0} ms");
    println!(
        "rss   daemon idle with {rehyd_zones} zones:   {:>9.1} MB   (anonymous {:.1} MB, file-backed {:.1} MB)",
        rss_many as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );
    // For a look at the idle daemon by hand (/proc/<pid>/smaps, perf).
    let hold = env("PRESENCED_BENCH_REHYD_HOLD_S", 0);
    if hold > 0 {
        println!("rehyd daemon pid {} held for {hold} s", d.pid());
        tokio::time::sleep(Duration::from_secs(hold)).await;
    }
}

/// Publishes at a fixed 1,000 readings/s over 100 zones and returns the
/// sorted latencies (ms) from publish to the KV update seen by a watcher.
async fn latency(js: &jetstream::Context, port: u16, n: i64, base: i64) -> Vec<f64> {
    let kvp = js.get_key_value("presence").await.unwrap();
    let mut watch = kvp.watch_all().await.unwrap();
    let sent: Arc<std::sync::Mutex<HashMap<(String, i64), Instant>>> = Default::default();
    let sent2 = sent.clone();
    let pubber = tokio::spawn(async move {
        let mut p = Publisher::connect(port, "bench-lat").await;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for i in 0..n {
            tick.tick().await;
            let z = (i % 100) as usize;
            let ts = base + i;
            sent2
                .lock()
                .unwrap()
                .insert((format!("z{z:05}"), ts), Instant::now());
            p.publish(
                &format!("test/s{z:05}"),
                format!(r#"{{"occupancy":{},"ts":{ts}}}"#, i % 7 < 3),
            )
            .await;
        }
        p.flush(Duration::from_secs(30)).await;
    });
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40 + n as u64 / 1000);
    while Instant::now() < deadline && (lat.len() as i64) < n {
        let Ok(Some(Ok(entry))) = tokio::time::timeout(Duration::from_secs(3), watch.next()).await
        else {
            break;
        };
        let seen = Instant::now();
        let Ok(z) = serde_json::from_slice::<ZoneState>(&entry.value) else {
            continue;
        };
        let Some(at) = z.evidence.first().and_then(|e| e.observed_at) else {
            continue;
        };
        if let Some(s) = sent.lock().unwrap().get(&(entry.key.clone(), at.0)) {
            lat.push(seen.duration_since(*s).as_secs_f64() * 1000.0);
        }
    }
    pubber.await.unwrap();
    lat.sort_by(|a, b| a.total_cmp(b));
    lat
}

struct Saturation {
    n: u64,
    mqtt_rate: f64,
    stored_at: f64,
    elapsed: f64,
    e2e: f64,
    /// Transitions the run caused (messages added to EVENTS).
    transitions: u64,
    /// CPU % of one core: daemon, then the other processes given.
    cpu: [f64; 3],
    /// Peaks of what the daemon held during the run.
    held: HeldPeaks,
    /// The whole machine over the run: cores busy, and cores' worth of
    /// time the hypervisor gave to others (steal).
    machine: (f64, f64),
    rss_max: u64,
}

/// Peaks, read from the daemon's /metrics every 250 ms during a run.
#[derive(Default, Clone, Copy)]
struct HeldPeaks {
    /// `presenced_ingest_buffer_depth`: readings waiting to be stored.
    buffer: u64,
    /// `presenced_mqtt_unacknowledged`: QoS 1 messages not yet acknowledged.
    unacked: u64,
    /// `presenced_consumer_pending`: stored readings the engine has not applied.
    pending: u64,
    /// The daemon's RSS, KiB.
    rss: u64,
}

/// Samples a daemon's gauges in a thread until stopped: where memory
/// goes when RSS climbs under load.
struct Held {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<HeldPeaks>>,
}

impl Held {
    fn sample(target: Option<(u32, SocketAddr)>) -> Held {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = target.map(|(pid, http)| {
            std::thread::spawn(move || {
                let mut peaks = HeldPeaks::default();
                while !flag.load(Ordering::Relaxed) {
                    if let Some((200, body)) = support::http_get(http, "/metrics") {
                        let gauge = |name: &str| -> u64 {
                            body.lines()
                                .filter(|l| l.starts_with(name))
                                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                                .map(|v| v as u64)
                                .sum()
                        };
                        peaks.buffer = peaks.buffer.max(gauge("presenced_ingest_buffer_depth"));
                        peaks.unacked = peaks.unacked.max(gauge("presenced_mqtt_unacknowledged"));
                        peaks.pending = peaks.pending.max(gauge("presenced_consumer_pending"));
                    }
                    peaks.rss = peaks.rss.max(proc_usage(pid).0);
                    std::thread::sleep(Duration::from_millis(250));
                }
                peaks
            })
        });
        Held { stop, thread }
    }

    fn stop(mut self) -> HeldPeaks {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// The HTTP listener of daemon `pid`, read from its config file (the
/// argument after `--config`).
fn http_of(pid: u32) -> Option<(u32, SocketAddr)> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let path = args.iter().skip_while(|a| *a != "--config").nth(1)?;
    let text = std::fs::read_to_string(path).ok()?;
    let listen = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen = \""))?
        .trim_end_matches('"');
    Some((pid, listen.parse().ok()?))
}

/// Jiffies of every CPU from /proc/stat: (busy, steal, all).
fn machine_jiffies() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let all: u64 = (0..8).map(get).sum();
    let idle = get(3) + get(4);
    let steal = get(7);
    (all - idle - steal, steal, all)
}

/// Publishes `msgs` as fast as the broker takes them and waits until the
/// engine has applied and acknowledged them all.
async fn saturate(
    js: &jetstream::Context,
    p: &mut Publisher,
    pid: u32,
    others: [u32; 2],
    msgs: &[Msg],
) -> Saturation {
    let held = Held::sample(http_of(pid));
    let n = msgs.len() as u64;
    let sensors0 = stream_messages(js, "SENSORS").await;
    let events0 = stream_messages(js, "EVENTS").await;
    let cpu_a = [
        proc_usage(pid).1,
        proc_usage(others[0]).1,
        proc_usage(others[1]).1,
    ];
    let m_a = machine_jiffies();
    let t = Instant::now();
    for (topic, payload) in msgs {
        p.publish(topic, payload.clone()).await;
    }
    p.flush(Duration::from_secs(300)).await;
    let mqtt_rate = n as f64 / t.elapsed().as_secs_f64();
    let total = sensors0 + n;
    let mut stored_at = None;
    let mut rss_max = 0;
    loop {
        rss_max = rss_max.max(proc_usage(pid).0);
        if stored_at.is_none() && stream_messages(js, "SENSORS").await >= total {
            stored_at = Some(t.elapsed().as_secs_f64());
        }
        if engine_caught_up(js, total).await {
            break;
        }
        if t.elapsed() > Duration::from_secs(env("PRESENCED_BENCH_STALL_S", 600)) {
            let stored = stream_messages(js, "SENSORS").await;
            let consumer = match js.get_stream("SENSORS").await {
                Ok(s) => match s.get_consumer::<pull::Config>("engine").await {
                    Ok(mut c) => c.info().await.map(|i| format!("{i:?}")).unwrap_or_default(),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            panic!(
                "daemon did not catch up: SENSORS holds {stored} of {total}; engine consumer: {consumer}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let cpu_b = [
        proc_usage(pid).1,
        proc_usage(others[0]).1,
        proc_usage(others[1]).1,
    ];
    let mut cpu = [0.0; 3];
    for i in 0..3 {
        cpu[i] = (cpu_b[i] - cpu_a[i]) / elapsed * 100.0;
    }
    let m_b = machine_jiffies();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let machine = (
        (m_b.0 - m_a.0) as f64 / hz / elapsed,
        (m_b.1 - m_a.1) as f64 / hz / elapsed,
    );
    let held = held.stop();
    Saturation {
        held,
        n,
        mqtt_rate,
        stored_at: stored_at.unwrap_or(elapsed),
        elapsed,
        e2e: n as f64 / elapsed,
        transitions: stream_messages(js, "EVENTS").await - events0,
        cpu,
        machine,
        rss_max,
    }
}

/// Stops the daemon, stores `readings` in SENSORS as ingest would (one
/// observation each, stamped a millisecond apart from `*at`), starts the
/// daemon again and measures the engine from its first acknowledgement
/// of the backlog to its last. Returns (readings/s, transitions).
async fn drain(
    js: &jetstream::Context,
    site: &Site,
    daemon: &mut Daemon,
    readings: &[(String, Reading)],
    at: &mut i64,
) -> (f64, u64) {
    daemon.kill9();
    let floor0 = engine_floor(js).await;
    let events0 = stream_messages(js, "EVENTS").await;
    let msgs: Vec<_> = readings
        .iter()
        .map(|(sensor, value)| {
            *at += 1;
            let obs = Observation {
                v: OBSERVATION_SCHEMA,
                sensor: sensor.clone(),
                value: *value,
                observed_at: Timestamp(*at),
                id: format!("drain-{}", *at),
                source: "bench".into(),
                delivery: None,
            };
            (
                site.sensors_subject(sensor),
                jetstream::message::PublishMessage::build()
                    .payload(serde_json::to_vec(&obs).expect("observation JSON").into()),
            )
        })
        .collect();
    for r in publish_all(js, msgs).await {
        r.expect("stored in SENSORS");
    }
    let total = stream_messages(js, "SENSORS").await;
    daemon.restart();
    let wait = Instant::now();
    // The first acknowledgement past the backlog's start: from here the
    // engine is running (rehydration and start-up are not counted).
    let (t0, floor1) = loop {
        let f = engine_floor(js).await;
        if f > floor0 {
            break (Instant::now(), f);
        }
        assert!(
            wait.elapsed() < Duration::from_secs(120),
            "engine did not start"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    while !engine_caught_up(js, total).await {
        assert!(
            wait.elapsed() < Duration::from_secs(600),
            "engine did not drain"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = (total - floor1) as f64 / t0.elapsed().as_secs_f64();
    (rate, stream_messages(js, "EVENTS").await - events0)
}

/// Stream sequence of the engine consumer's ack floor.
async fn engine_floor(js: &jetstream::Context) -> u64 {
    let Ok(stream) = js.get_stream("SENSORS").await else {
        return 0;
    };
    let Ok(mut c) = stream.get_consumer::<pull::Config>("engine").await else {
        return 0;
    };
    c.info().await.map_or(0, |i| i.ack_floor.stream_sequence)
}
