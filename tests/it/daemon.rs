//! The real `presenced` binary against real nats-server and Mosquitto:
//! presence end to end, debounce timing, crash equivalence under SIGKILL,
//! and a nats-server restart under a running daemon.

use crate::common;
use crate::support;

use common::*;
use presenced::engine::{Presence, Transition};
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::time::Duration;
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

struct Site {
    nats: NatsServer,
    mqtt: Mosquitto,
    http: SocketAddr,
    config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn site(mapping: &str, zones: &str) -> Site {
    let nats = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        ..Default::default()
    });
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    // The crash test dates its readings 30 minutes ahead (so neither
    // run's start is later than them): allow that much device clock skew.
    let config = daemon_config("test", &nats.url(), mqtt.port, http_port, mapping, zones)
        .replace("[ingest]\n", "[ingest]\nmax_clock_skew = \"1h\"\n");
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("presenced.toml");
    std::fs::write(&config_path, config).unwrap();
    provision(&config_path);
    Site {
        nats,
        mqtt,
        http: SocketAddr::from(([127, 0, 0, 1], http_port)),
        config_path,
        _dir: dir,
    }
}

fn start(site: &Site) -> Daemon {
    let daemon = Daemon::start_at(&site.config_path, &[]);
    daemon.wait_healthy(site.http, Duration::from_secs(20));
    daemon
}

fn restart(site: &Site, d: &mut Daemon) {
    d.restart();
    d.wait_healthy(site.http, Duration::from_secs(20));
}

fn pairs(ts: &[Transition], zone: &str) -> Vec<(Presence, Presence)> {
    ts.iter()
        .filter(|t| t.zone == zone)
        .map(|t| (t.from, t.to))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn motion_makes_a_zone_occupied_and_silence_vacant_with_exact_debounce() {
    let zones = r#"
[zones.hall]
prior = 0.1
occupied_above = 0.6
vacant_below = 0.3
arrive_after = "1s"
leave_after = "2s"
[[zones.hall.evidence]]
sensor = "hall_pir"
p_true = 0.95
p_false = 0.05
hold = "2s"
"#;
    let s = site(&motion_mapping(false), zones);
    let _d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    let mut p = Publisher::connect(s.mqtt.port, "test-pub").await;
    p.publish("test/hall_pir", r#"{"occupancy":true}"#).await;
    p.flush(Duration::from_secs(5)).await;

    eventually("hall occupied", Duration::from_secs(10), || async {
        zone(&js, "hall")
            .await
            .is_some_and(|z| z.state == Presence::Occupied)
    })
    .await;
    eventually("hall vacant again", Duration::from_secs(15), || async {
        zone(&js, "hall")
            .await
            .is_some_and(|z| z.state == Presence::Vacant)
    })
    .await;

    let ev = events(&js).await;
    assert_eq!(
        pairs(&ev, "hall"),
        vec![
            (Presence::Vacant, Presence::Arriving),
            (Presence::Arriving, Presence::Occupied),
            (Presence::Occupied, Presence::Leaving),
            (Presence::Leaving, Presence::Vacant),
        ],
        "EVENTS holds exactly the four transitions"
    );
    let at: Vec<i64> = ev.iter().map(|t| t.at.0).collect();
    assert_eq!(
        at[1] - at[0],
        1000,
        "occupied exactly arrive_after after arriving"
    );
    assert_eq!(
        at[2] - at[0],
        2000,
        "leaving exactly when the 2 s hold of the reading ends"
    );
    assert_eq!(
        at[3] - at[2],
        2000,
        "vacant exactly leave_after after leaving"
    );
    let numbers: Vec<u64> = ev.iter().map(|t| t.number).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_leaving_then_restart_after_deadline_turns_vacant_once_at_once() {
    let zones = r#"
[zones.office]
prior = 0.1
occupied_above = 0.6
vacant_below = 0.3
arrive_after = "0s"
leave_after = "3s"
[[zones.office.evidence]]
sensor = "office_pir"
p_true = 0.95
p_false = 0.05
"#;
    let s = site(&motion_mapping(false), zones);
    let mut d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    let mut p = Publisher::connect(s.mqtt.port, "test-pub").await;
    p.publish("test/office_pir", r#"{"occupancy":true}"#).await;
    eventually("office occupied", Duration::from_secs(10), || async {
        zone(&js, "office")
            .await
            .is_some_and(|z| z.state == Presence::Occupied)
    })
    .await;
    p.publish("test/office_pir", r#"{"occupancy":false}"#).await;
    eventually("office leaving", Duration::from_secs(10), || async {
        zone(&js, "office")
            .await
            .is_some_and(|z| z.state == Presence::Leaving)
    })
    .await;
    d.kill9();
    let leaving = zone(&js, "office").await.expect("state");
    let deadline = leaving
        .pending
        .expect("a pending deadline is stored")
        .deadline;
    // The debounce projection holds the same deadline.
    let kv = js.get_key_value("debounce").await.unwrap();
    let rec: serde_json::Value =
        serde_json::from_slice(&kv.get("office").await.unwrap().unwrap()).unwrap();
    assert_eq!(rec["deadline"], serde_json::json!(deadline.to_string()));

    // Stay down until well past the deadline.
    while now_ms() < deadline.0 + 1500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        zone(&js, "office").await.unwrap().state,
        Presence::Leaving,
        "nothing fires while down"
    );
    let restarted_at = now_ms();
    restart(&s, &mut d);
    eventually(
        "office vacant after restart",
        Duration::from_secs(5),
        || async {
            zone(&js, "office")
                .await
                .is_some_and(|z| z.state == Presence::Vacant)
        },
    )
    .await;
    assert!(
        now_ms() - restarted_at < 5000,
        "overdue deadline fired at once"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ev = events(&js).await;
    let vacant: Vec<&Transition> = ev
        .iter()
        .filter(|t| t.to == Presence::Vacant && t.from == Presence::Leaving)
        .collect();
    assert_eq!(vacant.len(), 1, "exactly one leaving→vacant: {ev:?}");
    assert_eq!(
        vacant[0].at, deadline,
        "the transition is dated at its deadline, not at the restart"
    );
    assert_eq!(pairs(&ev, "office").len(), 4);
    let kv_after: Option<bytes::Bytes> = kv.get("office").await.unwrap();
    assert!(
        kv_after.is_none(),
        "debounce entry removed once the timer fired"
    );
}

/// Zones z00..z49, each with one sensor; even zones switch at once, odd
/// zones debounce for an hour (their deadlines stay pending and must be
/// identical). Readings carry their own timestamps so two runs see the
/// same inputs.
fn burst_zones() -> String {
    let mut out = String::new();
    for i in 0..50 {
        let debounce = if i % 2 == 0 { "0s" } else { "1h" };
        out.push_str(&format!(
            "[zones.z{i:02}]\nprior = 0.1\noccupied_above = 0.6\nvacant_below = 0.3\narrive_after = \"{debounce}\"\nleave_after = \"{debounce}\"\n[[zones.z{i:02}.evidence]]\nsensor = \"s{i:02}\"\np_true = 0.95\np_false = 0.05\n\n"
        ));
    }
    out
}

fn burst_inputs(base_ms: i64) -> Vec<(String, String)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut seen = [false; 50];
    (0..5000)
        .map(|i| {
            let z = rng.gen_range(0..50usize);
            // Every zone's first reading is true, so every zone transitions.
            let v = if seen[z] { rng.gen_bool(0.5) } else { true };
            seen[z] = true;
            (
                format!("test/s{z:02}"),
                format!(r#"{{"occupancy":{v},"ts":{}}}"#, base_ms + i as i64),
            )
        })
        .collect()
}

struct Outcome {
    zones: Vec<serde_json::Value>,
    events: Vec<Transition>,
    sensors: u64,
    /// Readings (sensor, device time, value) in stream order.
    order: Vec<String>,
}

async fn outcome(js: &async_nats::jetstream::Context) -> Outcome {
    let kv = js.get_key_value("presence").await.unwrap();
    let mut zones = Vec::new();
    for i in 0..50 {
        let v = kv
            .get(format!("z{i:02}"))
            .await
            .unwrap()
            .expect("zone stored");
        zones.push(serde_json::from_slice(&v).unwrap());
    }
    Outcome {
        zones,
        events: events(js).await,
        sensors: stream_messages(js, "SENSORS").await,
        // Ids are per delivery (random per process), so two runs are
        // compared by what was read: sensor, device time and value.
        order: read_stream(js, "SENSORS")
            .await
            .iter()
            .map(|m| {
                let o = serde_json::from_slice::<presenced::observation::Observation>(&m.payload)
                    .unwrap();
                format!("{} {} {:?}", o.sensor, o.observed_at, o.value)
            })
            .collect(),
    }
}

async fn burst_run(base_ms: i64, kills: usize) -> Outcome {
    let s = site(&motion_mapping(true), &burst_zones());
    let mut d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    let inputs = burst_inputs(base_ms);
    let port = s.mqtt.port;
    let publisher = tokio::spawn(async move {
        let mut p = Publisher::connect(port, "burst-pub").await;
        for (i, (topic, payload)) in inputs.into_iter().enumerate() {
            p.publish(&topic, payload).await;
            if i % 50 == 49 {
                // Paced, so that kills land in the middle of the burst.
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
        p.flush(Duration::from_secs(60)).await;
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..700))).await;
        d.kill9();
        restart(&s, &mut d);
    }
    publisher.await.unwrap();
    eventually(
        "all 5000 observations applied",
        Duration::from_secs(60),
        || async {
            stream_messages(&js, "SENSORS").await >= 5000 && engine_caught_up(&js, 5000).await
        },
    )
    .await;
    let out = outcome(&js).await;
    drop(d);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_during_a_burst_gives_the_uninterrupted_outcome() {
    // Far enough ahead that neither run's start-up instant is later than
    // the readings (a zone's clock never runs backwards).
    let base = now_ms() + 30 * 60 * 1000;
    let calm = burst_run(base, 0).await;
    let crashed = burst_run(base, 6).await;
    assert_eq!(
        calm.sensors, 5000,
        "every reading stored once (uninterrupted)"
    );
    assert_eq!(
        crashed.sensors, 5000,
        "every reading stored exactly once despite SIGKILLs"
    );
    assert!(
        calm.events.len() > 100,
        "the burst produced transitions: {}",
        calm.events.len()
    );
    let first_diff = calm
        .order
        .iter()
        .zip(&crashed.order)
        .position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "SENSORS holds the readings in the same order"
    );
    for i in 0..50 {
        let zone = format!("z{i:02}");
        let a: Vec<_> = calm.events.iter().filter(|t| t.zone == zone).collect();
        let b: Vec<_> = crashed.events.iter().filter(|t| t.zone == zone).collect();
        if a != b {
            let k = a
                .iter()
                .zip(&b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            panic!(
                "zone {zone} diverges at transition {k}: calm {:?}\ncrashed {:?}\ncalm state {}\ncrashed state {}",
                a.get(k),
                b.get(k),
                calm.zones[i],
                crashed.zones[i]
            );
        }
    }
    assert_eq!(
        crashed.events.len(),
        calm.events.len(),
        "no transition lost or duplicated"
    );
    assert_eq!(
        crashed.events, calm.events,
        "same transitions, same order, same instants"
    );
    assert_eq!(crashed.zones, calm.zones, "same final state of every zone");
    let pending = calm
        .zones
        .iter()
        .filter(|z| !z["pending"].is_null())
        .count();
    assert!(pending > 0, "some odd zones end with a pending deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_under_a_running_daemon_loses_nothing() {
    let zones = r#"
[zones.den]
arrive_after = "0s"
leave_after = "1h"
[[zones.den.evidence]]
sensor = "den_pir"
p_true = 0.95
p_false = 0.05
"#;
    let mut s = site(&motion_mapping(true), zones);
    let _d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    let mut p = Publisher::connect(s.mqtt.port, "test-pub").await;
    let base = now_ms();
    for i in 0..100 {
        p.publish(
            "test/den_pir",
            format!(r#"{{"occupancy":true,"ts":{}}}"#, base + i),
        )
        .await;
    }
    eventually("first 100 stored", Duration::from_secs(10), || async {
        stream_messages(&js, "SENSORS").await == 100
    })
    .await;

    assert_eq!(
        support::http_get(s.http, "/healthz").map(|r| r.0),
        Some(200),
        "healthy before the outage"
    );
    s.nats.stop();
    eventually(
        "healthz reports the outage",
        Duration::from_secs(10),
        || async { support::http_get(s.http, "/healthz").is_some_and(|r| r.0 == 503) },
    )
    .await;
    // Readings during the outage wait in the daemon and the broker.
    for i in 100..300 {
        p.publish(
            "test/den_pir",
            format!(r#"{{"occupancy":{},"ts":{}}}"#, i % 2 == 0, base + i),
        )
        .await;
    }
    p.flush(Duration::from_secs(10)).await;
    s.nats.restart();
    let js = jetstream(&s.nats.url()).await;
    eventually("healthz back to 200", Duration::from_secs(20), || async {
        support::http_get(s.http, "/healthz").is_some_and(|r| r.0 == 200)
    })
    .await;
    eventually(
        "all 300 readings stored and applied",
        Duration::from_secs(30),
        || async {
            stream_messages(&js, "SENSORS").await == 300 && engine_caught_up(&js, 300).await
        },
    )
    .await;
    let z = zone(&js, "den").await.unwrap();
    assert_eq!(
        z.evidence[0].value,
        Some(presenced::observation::Reading::Bool(false)),
        "last reading (i=299, odd) applied"
    );
    assert_eq!(z.evidence[0].observed_at.unwrap().0, base + 299);
    assert_eq!(z.last_seq, 300);
}
