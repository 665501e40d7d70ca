//! ESPresense through Mosquitto and the real binary: a phone on the
//! boundary of two rooms does not bounce, a real move changes the room
//! once, after the dwell.

use crate::common;
use crate::support;

use common::*;
use std::time::Duration;
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

const PRESET: &str = r#"
[mqtt.main.espresense]
margin = 1.0
dwell = "1s"
max_distance = 8.0
timeout = "30s"
[[mqtt.main.espresense.people]]
device = "irk:0123abcd"
person = "alice"
"#;

const ZONES: &str = r#"
[zones.office]
occupied_above = 0.6
arrive_after = "0s"
leave_after = "0s"
[[zones.office.evidence]]
sensor = "alice_in_office"
p_true = 0.95
p_false = 0.05
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boundary_phone_stays_put_and_a_real_move_switches_once() {
    let mqtt = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let cfg = daemon_config("test", &nats.url(), mqtt.port, http_port, PRESET, ZONES);
    let _d = Daemon::start_provisioned(&cfg, http_port);
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(mqtt.port, "espresense-pub").await;
    let report = |d: f64| format!(r#"{{"id":"irk:0123abcd","distance":{d},"rssi":-70}}"#);
    let office = "espresense/devices/irk:0123abcd/office";
    let kitchen = "espresense/devices/irk:0123abcd/kitchen";
    // Somebody else's phone: ignored.
    p.publish("espresense/devices/irk:ffff/office", report(0.5))
        .await;
    p.publish(office, report(1.0)).await;
    // Two seconds on the desk by the wall: both stations see 2.5 to 3.2 m.
    for i in 0..20 {
        let wobble = if i % 3 == 0 { 0.35 } else { -0.2 };
        p.publish(office, report(2.8 + wobble)).await;
        p.publish(kitchen, report(2.9 - wobble)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Walks into the kitchen and stays (three seconds, so the one-second
    // dwell passes even if the daemon reads the burst late).
    for _ in 0..30 {
        p.publish(office, report(5.5)).await;
        p.publish(kitchen, report(1.0)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "four person observations",
        Duration::from_secs(10),
        || async { stream_messages(&js, "SENSORS").await >= 4 },
    )
    .await;
    let got: Vec<(String, serde_json::Value)> = read_stream(&js, "SENSORS")
        .await
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (v["sensor"].as_str().unwrap().to_owned(), v["value"].clone())
        })
        .collect();
    let want: Vec<(String, serde_json::Value)> = [
        ("alice_in_office", true),
        ("alice_home", true),
        ("alice_in_office", false),
        ("alice_in_kitchen", true),
    ]
    .iter()
    .map(|(s, v)| (s.to_string(), serde_json::json!(v)))
    .collect();
    assert_eq!(got, want, "entered the office, no bouncing, one move");
    assert_eq!(stream_messages(&js, "REJECTED").await, 0);
    // The preset gave alice a presence entry of her own, under person.alice.
    eventually("person.alice occupied", Duration::from_secs(10), || async {
        zone(&js, "person.alice")
            .await
            .is_some_and(|z| z.state.as_str() == "occupied")
    })
    .await;
}
