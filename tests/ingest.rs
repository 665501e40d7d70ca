//! Ingest through the real binary: exactly-once storage in SENSORS,
//! a 50,000-message QoS 1 burst through Mosquitto, and rejected input kept
//! in REJECTED while good input keeps flowing.

mod common;
mod support;

use common::*;
use presenced::engine::Presence;
use std::net::SocketAddr;
use std::time::Duration;
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

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

fn setup(mqtt: &Mosquitto, mapping: &str) -> (NatsServer, Daemon, SocketAddr) {
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let cfg = daemon_config("test", &nats.url(), mqtt.port, http_port, mapping, ZONES);
    let d = Daemon::start_provisioned(&cfg, http_port);
    (nats, d, SocketAddr::from(([127, 0, 0, 1], http_port)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_mqtt_message_twice_is_stored_once() {
    let mqtt = Mosquitto::start();
    let (nats, _d, _) = setup(&mqtt, &motion_mapping(true));
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(mqtt.port, "dup-pub").await;
    let ts = now_ms();
    let same = format!(r#"{{"occupancy":true,"ts":{ts}}}"#);
    p.publish("test/lab_pir", same.clone()).await;
    p.publish("test/lab_pir", same).await;
    // A different reading after them proves both were processed.
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":false,"ts":{}}}"#, ts + 1),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually("last reading applied", Duration::from_secs(10), || async {
        zone(&js, "lab")
            .await
            .is_some_and(|z| z.evidence[0].observed_at.map(|t| t.0) == Some(ts + 1))
    })
    .await;
    assert_eq!(
        stream_messages(&js, "SENSORS").await,
        2,
        "duplicate stored once"
    );
    let msgs = read_stream(&js, "SENSORS").await;
    let ids: Vec<String> = msgs
        .iter()
        .map(|m| {
            m.headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert!(
        ids.iter().all(|i| i.len() == 32),
        "deterministic ids set: {ids:?}"
    );
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50k_qos1_burst_through_mosquitto_is_stored_completely() {
    // Configured as docs/OPERATIONS.md tells operators: max_queued_messages 0.
    let mqtt = Mosquitto::start();
    let (nats, d, http) = setup(&mqtt, &motion_mapping(true));
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(mqtt.port, "burst-pub").await;
    let base = now_ms();
    for i in 0..50_000i64 {
        p.publish(
            "test/lab_pir",
            format!(r#"{{"occupancy":{},"ts":{}}}"#, i % 3 == 0, base + i),
        )
        .await;
    }
    p.flush(Duration::from_secs(120)).await;
    eventually("50,000 in SENSORS", Duration::from_secs(120), || async {
        stream_messages(&js, "SENSORS").await == 50_000
    })
    .await;
    eventually("engine caught up", Duration::from_secs(60), || async {
        engine_caught_up(&js, 50_000).await
    })
    .await;
    let z = zone(&js, "lab").await.unwrap();
    assert_eq!(z.last_seq, 50_000);
    assert_eq!(z.evidence[0].observed_at.unwrap().0, base + 49_999);
    let (_, metrics) = support::http_get(http, "/metrics").expect("metrics");
    assert!(
        metrics.contains("presenced_observations_stored_total 50000"),
        "{metrics}"
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_land_in_rejected_with_a_reason_and_good_ones_still_flow() {
    let mqtt = Mosquitto::start();
    let (nats, d, http) = setup(&mqtt, &motion_mapping(false));
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(mqtt.port, "bad-pub").await;
    p.publish("test/lab_pir", r#"{"occupancy": tru"#).await;
    p.publish("test/lab_pir", r#"{"battery": 90}"#).await;
    p.publish("test/lab_pir", r#"{"occupancy": [1]}"#).await;
    p.publish("test/Lab.PIR", r#"{"occupancy": true}"#).await;
    p.publish("test/lab_pir", r#"{"occupancy": true}"#).await;
    p.flush(Duration::from_secs(5)).await;
    eventually("good reading applied", Duration::from_secs(10), || async {
        zone(&js, "lab")
            .await
            .is_some_and(|z| z.state == Presence::Occupied)
    })
    .await;
    eventually("four rejects stored", Duration::from_secs(10), || async {
        stream_messages(&js, "REJECTED").await == 4
    })
    .await;
    let rejected = read_stream(&js, "REJECTED").await;
    let reasons: Vec<String> = rejected
        .iter()
        .map(|m| {
            m.headers
                .as_ref()
                .and_then(|h| h.get("Presenced-Reason"))
                .map(|v| v.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert!(
        reasons[0].contains("byte"),
        "JSON error says where: {}",
        reasons[0]
    );
    assert!(
        reasons[1].contains("/occupancy"),
        "missing field named: {}",
        reasons[1]
    );
    assert!(
        reasons[2].contains("/occupancy"),
        "wrong type named: {}",
        reasons[2]
    );
    assert!(
        reasons[3].to_lowercase().contains("sensor"),
        "bad sensor id explained: {}",
        reasons[3]
    );
    assert_eq!(
        &rejected[0].payload[..],
        br#"{"occupancy": tru"#,
        "the input is kept as received"
    );
    assert!(rejected
        .iter()
        .all(|m| m.subject.as_str() == "rejected.test.main"));
    let origin = rejected[3]
        .headers
        .as_ref()
        .and_then(|h| h.get("Presenced-Origin"))
        .map(|v| v.to_string());
    assert!(origin.unwrap_or_default().contains("test/Lab.PIR"));
    assert_eq!(stream_messages(&js, "SENSORS").await, 1);
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    assert!(metrics.contains("presenced_rejects_total 4"), "{metrics}");
    assert!(d.log().contains("input rejected"), "a WARN line was logged");
}
