//! `/metrics` tells the truth: every family this instance exports is
//! there and moves when the test causes what it counts; families of
//! components the instance does not run are absent; transitions are
//! counted once each, also after a publish whose ack was lost.

use crate::common;
use crate::support;

use common::*;
use presenced::engine::Presence;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

/// Every sample of `/metrics`, by its name with labels.
fn scrape(http: SocketAddr) -> BTreeMap<String, f64> {
    let (_, body) = support::http_get(http, "/metrics").expect("/metrics answers");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The families of `/metrics` by the name of their samples (OpenMetrics
/// names a counter family without the `_total` its samples carry).
fn families(http: SocketAddr) -> Vec<String> {
    let (_, body) = support::http_get(http, "/metrics").expect("/metrics answers");
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [name, "counter"] => Some(format!("{name}_total")),
            [name, _] => Some(name.to_owned()),
            _ => None,
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, k: &str) -> f64 {
    *m.get(k)
        .unwrap_or_else(|| panic!("no sample {k} in {m:#?}"))
}

const ZONES: &str = r#"
[zones.lab]
occupied_above = 0.6
arrive_after = "0s"
leave_after = "0s"
[[zones.lab.evidence]]
sensor = "lab_pir"
p_true = 0.95
p_false = 0.05
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_family_is_there_and_moves_when_caused() {
    let broker = Mosquitto::start();
    let mut nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let cfg = daemon_config(
        "test",
        &nats.url(),
        broker.port,
        http_port,
        &motion_mapping(true),
        ZONES,
    );
    let d = Daemon::start_provisioned(&cfg, http_port);

    let want = [
        "presenced_observations_received_total",
        "presenced_observations_stored_total",
        "presenced_rejects_total",
        "presenced_publish_retries_total",
        "presenced_ingest_buffer_full_total",
        "presenced_ingest_buffer_depth",
        "presenced_ingest_buffer_capacity",
        "presenced_engine_observations_total",
        "presenced_engine_redeliveries_total",
        "presenced_engine_batches_total",
        "presenced_engine_write_rounds_total",
        "presenced_kv_writes_total",
        "presenced_kv_conflicts_total",
        "presenced_engine_active",
        "presenced_engine_takeovers_total",
        "presenced_transitions_total",
        "presenced_consumer_pending",
        "presenced_zones",
        "presenced_zones_occupied",
        "presenced_engine_feed_readers",
        "presenced_nats_connected",
        "presenced_nats_reconnects_total",
        "presenced_permission_violations_total",
        "presenced_mqtt_connected",
        "presenced_mqtt_unacknowledged",
        "presenced_lease_held",
        "presenced_ready",
        "presenced_component_up",
        "presenced_component_failures_total",
        "presenced_source_up",
        "presenced_source_last_reading_age_seconds",
    ];
    let have = families(http);
    for f in want {
        assert!(have.iter().any(|h| h == f), "family {f} missing: {have:?}");
    }
    // Nothing of what this instance does not run.
    for f in &have {
        assert!(
            !f.starts_with("presenced_archive_")
                && !f.starts_with("presenced_serial_")
                && !f.starts_with("presenced_mirror_")
                && f != "presenced_hub_reachable",
            "{f} exported without its component"
        );
    }
    assert_eq!(have.len(), want.len(), "unexpected families: {have:?}");

    let before = scrape(http);
    assert_eq!(get(&before, "presenced_ready"), 1.0);
    assert_eq!(get(&before, "presenced_nats_connected"), 1.0);
    assert_eq!(get(&before, "presenced_mqtt_connected"), 1.0);
    assert_eq!(get(&before, "presenced_mqtt_unacknowledged"), 0.0);
    assert_eq!(get(&before, "presenced_lease_held"), 1.0);
    // A lone engine instance holds the leader lease: active, taken once.
    assert_eq!(get(&before, "presenced_engine_active"), 1.0);
    assert_eq!(get(&before, "presenced_engine_takeovers_total"), 1.0);
    assert_eq!(get(&before, "presenced_zones"), 1.0);
    assert_eq!(get(&before, "presenced_ingest_buffer_capacity"), 100_000.0);
    assert_eq!(get(&before, "presenced_source_up{source=\"main\"}"), 1.0);
    for c in [
        "engine",
        "ingest",
        "lease",
        "http",
        "source.mqtt.main",
        "gauges",
    ] {
        assert_eq!(
            get(
                &before,
                &format!("presenced_component_up{{component=\"{c}\"}}")
            ),
            1.0,
            "{c}"
        );
        assert_eq!(
            get(
                &before,
                &format!("presenced_component_failures_total{{component=\"{c}\"}}")
            ),
            0.0
        );
    }

    // A reading and a reject.
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(broker.port, "metrics-pub").await;
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.publish("test/lab_pir", "not json").await;
    p.flush(Duration::from_secs(5)).await;
    eventually("lab occupied", Duration::from_secs(10), || async {
        zone(&js, "lab")
            .await
            .is_some_and(|z| z.state == Presence::Occupied)
    })
    .await;
    eventually("the gauges catch up", Duration::from_secs(10), || async {
        let m = scrape(http);
        m.contains_key("presenced_source_last_reading_age_seconds{source=\"main\"}")
            && get(&m, "presenced_zones_occupied") == 1.0
            && get(&m, "presenced_rejects_total") == 1.0
    })
    .await;
    let after = scrape(http);
    for (k, by) in [
        ("presenced_observations_stored_total", 1.0),
        ("presenced_rejects_total", 1.0),
        ("presenced_engine_observations_total", 1.0),
    ] {
        assert_eq!(get(&after, k) - get(&before, k), by, "{k}");
    }
    assert!(get(&after, "presenced_kv_writes_total") > get(&before, "presenced_kv_writes_total"));
    // The reading made a batch of its own, which made a transition: one
    // round for its EVENTS publishes, one for its KV writes (no next
    // batch to share one with).
    assert!(
        get(&after, "presenced_engine_batches_total")
            > get(&before, "presenced_engine_batches_total")
    );
    assert!(
        get(&after, "presenced_engine_write_rounds_total")
            >= get(&before, "presenced_engine_write_rounds_total") + 2.0
    );
    let events = events(&js).await.len() as f64;
    assert!(events >= 1.0);
    assert_eq!(get(&after, "presenced_transitions_total"), events);
    // The status page, once asked for, takes the engine's commits in
    // memory.
    assert_eq!(get(&after, "presenced_engine_feed_readers"), 0.0);
    let _ = support::http_get(http, "/");
    eventually(
        "the page reads the engine's feed",
        Duration::from_secs(10),
        || async { get(&scrape(http), "presenced_engine_feed_readers") == 1.0 },
    )
    .await;

    // The leaf restarts: disconnected, then one reconnect.
    nats.stop();
    eventually("nats_connected drops", Duration::from_secs(10), || async {
        get(&scrape(http), "presenced_nats_connected") == 0.0
    })
    .await;
    nats.restart();
    eventually("reconnected once", Duration::from_secs(20), || async {
        let m = scrape(http);
        get(&m, "presenced_nats_connected") == 1.0
            && get(&m, "presenced_nats_reconnects_total") == 1.0
    })
    .await;
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_is_counted_once_when_its_publish_is_retried_after_a_lost_ack() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let zones = ZONES.replace("leave_after = \"0s\"", "leave_after = \"3s\"");
    let cfg = daemon_config(
        "test",
        &nats.url(),
        broker.port,
        http_port,
        &motion_mapping(true),
        &zones,
    )
    .replace("request_timeout = \"2s\"", "request_timeout = \"1s\"");
    let d = Daemon::start_provisioned(&cfg, http_port);
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(broker.port, "retry-pub").await;
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually("lab occupied", Duration::from_secs(10), || async {
        zone(&js, "lab")
            .await
            .is_some_and(|z| z.state == Presence::Occupied)
    })
    .await;
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":false,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually("lab leaving", Duration::from_secs(10), || async {
        zone(&js, "lab")
            .await
            .is_some_and(|z| z.state == Presence::Leaving)
    })
    .await;
    // Freeze the leaf across the leave deadline: the engine's publish of
    // the vacant transition reaches the server but its ack does not come
    // in time, so the engine retries; the server then stores the first
    // and answers the retry as a duplicate.
    let pid = nats.pid() as libc::pid_t;
    // SAFETY: signals to a process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let frozen = Instant::now();
    d.wait_for_log(
        "cannot publish transitions to EVENTS; retrying",
        Duration::from_secs(15),
    );
    while frozen.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(pid, libc::SIGCONT) };
    eventually("lab vacant", Duration::from_secs(20), || async {
        zone(&js, "lab")
            .await
            .is_some_and(|z| z.state == Presence::Vacant)
    })
    .await;
    let events = events(&js).await.len() as f64;
    eventually(
        "the count equals EVENTS",
        Duration::from_secs(10),
        || async { get(&scrape(http), "presenced_transitions_total") == events },
    )
    .await;
    assert!(events >= 2.0, "{events}");
}
