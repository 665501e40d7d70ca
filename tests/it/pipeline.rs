//! The engine's pipelined writes (`engine::writer`): a stored backlog in
//! which every reading flips a zone, drained by the real daemon in
//! batches of what the consumer has delivered. Each batch's KV writes share a round of writes with the next
//! batch's EVENTS publishes instead of following them, and nothing of
//! the order, the chain of revisions or the acknowledgements is lost.

use crate::common::*;
use crate::support;

use presenced::engine::{Presence, Transition};
use presenced::observation::{Observation, Reading, OBSERVATION_SCHEMA};
use presenced::time::Timestamp;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

const ZONES: usize = 10;
const ROUNDS: usize = 300;
const READINGS: usize = ZONES * 3 * ROUNDS;
/// The default `engine.batch`: the most a batch can hold, so the least
/// number of batches. (Smaller pull batches make async-nats' pull stream
/// stall now and then for its 30 s expiry, with or without pipelining.)
const BATCH: usize = 1000;

/// Ten zones of three sensors at an even prior with no debounce: when a
/// zone's three sensors turn together it moves vacant → arriving →
/// occupied (or back) at once, two transitions per turn.
fn flip_zones() -> String {
    let mut out = String::new();
    for z in 0..ZONES {
        out.push_str(&format!(
            "[zones.f{z}]\nprior = 0.5\noccupied_above = 0.6\nvacant_below = 0.4\narrive_after = \"0s\"\nleave_after = \"0s\"\n"
        ));
        for s in ["a", "b", "c"] {
            out.push_str(&format!(
                "[[zones.f{z}.evidence]]\nsensor = \"f{z}_{s}\"\np_true = 0.9\np_false = 0.1\n"
            ));
        }
        out.push('\n');
    }
    out
}

/// Stores the readings in SENSORS as ingest would: round r turns every
/// zone's three sensors to `r` even, zone after zone.
async fn store_backlog(
    js: &async_nats::jetstream::Context,
    base_ms: i64,
    rounds: std::ops::Range<usize>,
) {
    let mut acks = Vec::new();
    let mut i = (rounds.start * ZONES * 3) as i64;
    for round in rounds {
        for z in 0..ZONES {
            for s in ["a", "b", "c"] {
                let obs = Observation {
                    v: OBSERVATION_SCHEMA,
                    sensor: format!("f{z}_{s}"),
                    value: Reading::Bool(round % 2 == 0),
                    observed_at: Timestamp(base_ms + i),
                    id: format!("flip-{i}"),
                    source: "bench".into(),
                    delivery: None,
                };
                i += 1;
                let ack = js
                    .publish(
                        format!("sensors.test.f{z}_{s}"),
                        serde_json::to_vec(&obs).unwrap().into(),
                    )
                    .await
                    .expect("publish to SENSORS");
                acks.push(ack);
                // Within the client's limit of acks in flight.
                if acks.len() >= 500 {
                    for a in acks.drain(..) {
                        a.await.expect("SENSORS ack");
                    }
                }
            }
        }
    }
    for a in acks {
        a.await.expect("SENSORS ack");
    }
}

fn metric(http: SocketAddr, name: &str) -> u64 {
    let (_, text) = support::http_get(http, "/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipping_backlog_is_drained_with_one_round_of_writes_per_batch_in_order() {
    let nats = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        ..Default::default()
    });
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let config = daemon_config(
        "test",
        &nats.url(),
        mqtt.port,
        http_port,
        &motion_mapping(false),
        &flip_zones(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("presenced.toml");
    std::fs::write(&config_path, config).unwrap();
    provision(&config_path);
    let js = jetstream(&nats.url()).await;
    // Dated after the daemon's start, so no zone clock is ahead of them.
    store_backlog(&js, now_ms() + 60_000, 0..ROUNDS).await;

    let started = Instant::now();
    let daemon = Daemon::start_at(&config_path, &[]);
    daemon.wait_healthy(http, Duration::from_secs(20));
    eventually("backlog applied", Duration::from_secs(60), || async {
        engine_caught_up(&js, READINGS as u64).await
    })
    .await;
    let took = started.elapsed();

    let batches = metric(http, "presenced_engine_batches_total");
    let rounds = metric(http, "presenced_engine_write_rounds_total");
    let applied = metric(http, "presenced_engine_observations_total");
    eprintln!(
        "{READINGS} readings in {batches} batches, {rounds} rounds of writes, drained {:.0}/s from the daemon's start (debug build)",
        READINGS as f64 / took.as_secs_f64()
    );
    assert_eq!(applied, READINGS as u64, "every reading applied once");
    assert!(
        batches >= (READINGS / BATCH) as u64,
        "batches of at most {BATCH}: {batches}"
    );
    // Written one wave after the other every batch costs two rounds (its
    // EVENTS publishes, then its KV writes); pipelined, a batch's KV
    // writes go with the next batch's EVENTS publishes.
    assert!(
        rounds * 4 < batches * 6,
        "at most about one round of writes per batch: {rounds} rounds for {batches} batches"
    );

    check_chains(&js, ROUNDS).await;
    let kv = js.get_key_value("debounce").await.unwrap();
    let mut keys = kv.keys().await.unwrap();
    use futures::StreamExt;
    assert!(
        keys.next().await.is_none(),
        "no debounce deadline left behind (none is ever pending)"
    );
    drop(daemon);
}

/// Per zone: EVENTS holds 1, 2, 3, ... in order, two per round, each
/// transition starting where the one before ended, and the zone's stored
/// state is where the last one ended: what a run written one wave after
/// the other gives.
async fn check_chains(js: &async_nats::jetstream::Context, rounds: usize) {
    let events = events(js).await;
    let mut per_zone: BTreeMap<&str, Vec<&Transition>> = BTreeMap::new();
    for t in &events {
        per_zone.entry(t.zone.as_str()).or_default().push(t);
    }
    assert_eq!(per_zone.len(), ZONES, "every zone transitioned");
    for z in 0..ZONES {
        let name = format!("f{z}");
        let ts = &per_zone[name.as_str()];
        assert_eq!(ts.len(), 2 * rounds, "zone {name}: {ts:?}");
        let mut state = Presence::Vacant;
        for (k, t) in ts.iter().enumerate() {
            assert_eq!(t.number, k as u64 + 1, "zone {name}: numbers in order");
            assert_eq!(
                t.from, state,
                "zone {name}: transition {} starts where the one before ended",
                t.number
            );
            state = t.to;
        }
        let stored = zone(js, &name).await.expect("zone stored");
        assert_eq!(
            stored.transitions,
            ts.len() as u64,
            "zone {name}: stored count"
        );
        assert_eq!(stored.state, state, "zone {name}: stored state");
    }
}

/// Another writer rewrites zone f0's key (its current value again, a new
/// revision) ten times while the engine drains: a pipelined write of f0
/// meets a compare-and-set conflict and hands it to the sequential
/// commit, which meets it again and, under the daemon's leader lease,
/// takes it for another holder: the engine stops writing and acking,
/// stands by, takes the lease again and applies the readings from the
/// consumer's ack floor. The trajectory is the undisturbed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_met_by_pipelined_writes_leave_the_trajectory_unchanged() {
    let nats = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        ..Default::default()
    });
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let config = daemon_config(
        "test",
        &nats.url(),
        mqtt.port,
        http_port,
        &motion_mapping(false),
        &flip_zones(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("presenced.toml");
    std::fs::write(&config_path, config).unwrap();
    provision(&config_path);
    let js = jetstream(&nats.url()).await;
    let base = now_ms() + 60_000;
    store_backlog(&js, base, 0..ROUNDS).await;

    let daemon = Daemon::start_at(&config_path, &[]);
    daemon.wait_healthy(http, Duration::from_secs(20));
    // A few rewrites while the drain runs (a writer that never stops
    // would starve any compare-and-set writer: each retry meets a newer
    // revision).
    let rewriter = tokio::spawn({
        let js = js.clone();
        async move {
            let kv = js.get_key_value("presence").await.unwrap();
            let mut rewrites = 0u32;
            for _ in 0..10 {
                // Compare-and-set at the revision read: the current value
                // again, never an older one put back over the engine's
                // newer write (that would undo readings already
                // acknowledged, which no engine could replay).
                if let Ok(Some(e)) = kv.entry("f0").await {
                    if kv.update("f0", e.value, e.revision).await.is_ok() {
                        rewrites += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            rewrites
        }
    });
    eventually("backlog applied", Duration::from_secs(60), || async {
        engine_caught_up(&js, READINGS as u64).await
    })
    .await;
    let rewrites = rewriter.await.unwrap();
    // One more round, so that every zone is written once more after the
    // last foreign rewrite.
    store_backlog(&js, base, ROUNDS..ROUNDS + 1).await;
    eventually("last round applied", Duration::from_secs(30), || async {
        engine_caught_up(&js, (READINGS + ZONES * 3) as u64).await
    })
    .await;

    let conflicts = metric(http, "presenced_kv_conflicts_total");
    eprintln!("{rewrites} foreign rewrites of f0, {conflicts} conflicts met");
    assert!(
        conflicts >= 1,
        "the engine met a conflict ({rewrites} rewrites)"
    );
    assert!(
        metric(http, "presenced_engine_takeovers_total") >= 2,
        "the engine stood down at the conflict and took the lease again"
    );
    check_chains(&js, ROUNDS + 1).await;
    drop(daemon);
}
