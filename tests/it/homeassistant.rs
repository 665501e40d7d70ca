//! Home Assistant discovery through the real binary and a real Mosquitto:
//! retained discovery configs with the fields Home Assistant needs, state
//! updates that follow KV presence, and availability going offline when
//! the daemon stops.

use crate::common;
use crate::support;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::{Arc, Mutex};
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

/// (topic, payload, retained) of every message seen, in order.
type Seen = Arc<Mutex<Vec<(String, String, bool)>>>;

async fn subscribe(port: u16) -> (Seen, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new("ha-test-sub", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client
        .subscribe("homeassistant/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe("presenced/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => s.lock().unwrap().push((
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.retain,
                )),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    (seen, task)
}

fn last(seen: &Seen, topic: &str) -> Option<(String, bool)> {
    seen.lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(t, _, _)| t == topic)
        .map(|(_, p, r)| (p.clone(), *r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_appear_in_home_assistant_and_follow_presence() {
    let mqtt = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let ha = format!(
        "\n[homeassistant]\nport = {}\nkeep_alive = \"5s\"\n",
        mqtt.port
    );
    let cfg = daemon_config(
        "test",
        &nats.url(),
        mqtt.port,
        http_port,
        &motion_mapping(false),
        &format!("{ZONES}{ha}"),
    );
    let mut d = Daemon::start_provisioned(&cfg, http_port);
    d.wait_for_log(
        "homeassistant: publishing discovery",
        Duration::from_secs(10),
    );

    // Subscribing after the daemon published: only retained messages arrive.
    let (seen, _sub) = subscribe(mqtt.port).await;
    let occupancy_topic = "homeassistant/binary_sensor/presenced_test/lab_occupancy/config";
    let confidence_topic = "homeassistant/sensor/presenced_test/lab_confidence/config";
    eventually(
        "retained discovery and availability",
        Duration::from_secs(10),
        || async {
            last(&seen, occupancy_topic).is_some()
                && last(&seen, confidence_topic).is_some()
                && last(&seen, "presenced/test/availability").is_some()
        },
    )
    .await;
    let (config, retained) = last(&seen, occupancy_topic).unwrap();
    assert!(retained, "discovery configs are retained");
    let c: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(c["device_class"], "occupancy");
    assert_eq!(c["state_topic"], "presenced/test/lab/state");
    assert_eq!(c["availability_topic"], "presenced/test/availability");
    assert_eq!(c["unique_id"], "presenced_test_lab_occupancy");
    // The entity id Home Assistant gives it: binary_sensor.lab_occupancy.
    assert_eq!(c["object_id"], "lab_occupancy");
    assert_eq!(c["default_entity_id"], "binary_sensor.lab_occupancy");
    assert_eq!(c["payload_on"], "ON");
    assert_eq!(c["value_template"], "{{ value_json.occupancy }}");
    assert_eq!(c["device"]["identifiers"][0], "presenced_test");
    assert!(c["name"].as_str().is_some_and(|n| n.contains("lab")));
    let (config, retained) = last(&seen, confidence_topic).unwrap();
    assert!(retained);
    let c: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(c["state_topic"], "presenced/test/lab/state");
    assert_eq!(c["unit_of_measurement"], "%");
    assert_eq!(c["object_id"], "lab_confidence");
    assert_eq!(c["default_entity_id"], "sensor.lab_confidence");
    // Online once the engine's lease is held (it may say offline for the
    // moment between the MQTT connection and the first lease write).
    eventually("availability online", Duration::from_secs(10), || async {
        last(&seen, "presenced/test/availability") == Some(("online".into(), true))
    })
    .await;

    // State follows KV presence.
    let mut p = Publisher::connect(mqtt.port, "ha-test-pub").await;
    p.publish("test/lab_pir", r#"{"occupancy": true}"#).await;
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "occupancy ON published",
        Duration::from_secs(10),
        || async {
            last(&seen, "presenced/test/lab/state").is_some_and(|(s, _)| {
                let v: serde_json::Value = serde_json::from_str(&s).unwrap();
                v["occupancy"] == "ON" && v["state"] == "occupied"
            })
        },
    )
    .await;
    let (state, _) = last(&seen, "presenced/test/lab/state").unwrap();
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    let kv = zone(&jetstream(&nats.url()).await, "lab").await.unwrap();
    assert_eq!(
        v["confidence"].as_f64().unwrap(),
        (kv.confidence * 1000.0).round() / 10.0,
        "the published confidence is the KV's, in percent"
    );

    // A clean stop takes the zones offline at once.
    let availability = |seen: &Seen| last(seen, "presenced/test/availability").map(|(p, _)| p);
    assert!(d.terminate().success());
    eventually("availability offline", Duration::from_secs(10), || async {
        availability(&seen).as_deref() == Some("offline")
    })
    .await;

    // A crash: the broker publishes the will.
    d.restart();
    eventually(
        "availability online again",
        Duration::from_secs(20),
        || async { availability(&seen).as_deref() == Some("online") },
    )
    .await;
    d.kill9();
    eventually(
        "availability offline after a crash",
        Duration::from_secs(15),
        || async { availability(&seen).as_deref() == Some("offline") },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_follows_the_engine_lease_while_the_daemon_runs() {
    let mqtt = Mosquitto::start();
    let mut nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let ha = format!(
        "\n[lease]\nttl = \"3s\"\n\n[homeassistant]\nport = {}\nkeep_alive = \"5s\"\n",
        mqtt.port
    );
    let cfg = daemon_config(
        "test",
        &nats.url(),
        mqtt.port,
        http_port,
        &motion_mapping(false),
        &format!("{ZONES}{ha}"),
    );
    let mut d = Daemon::start_provisioned(&cfg, http_port);
    let (seen, _sub) = subscribe(mqtt.port).await;
    let availability = |seen: &Seen| last(seen, "presenced/test/availability").map(|(p, _)| p);
    eventually("online with the lease", Duration::from_secs(10), || async {
        availability(&seen).as_deref() == Some("online")
    })
    .await;
    // Renewals (every second with this TTL) are not news: debug only, and
    // availability is not republished; the change to held is info, once.
    support::wait_until("three renewals seen", Duration::from_secs(10), || {
        d.log().matches("engine lease still held").count() >= 3
    });
    let log = d.log();
    let info_held: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("homeassistant: engine lease held"))
        .collect();
    assert_eq!(info_held.len(), 1, "{info_held:#?}");
    assert!(info_held[0].contains("INFO"), "{}", info_held[0]);
    assert!(log
        .lines()
        .filter(|l| l.contains("engine lease still held"))
        .all(|l| l.contains("DEBUG")));
    let online_publishes = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, p, _)| t == "presenced/test/availability" && p == "online")
        .count();
    assert_eq!(
        online_publishes, 1,
        "online is published once, not per renewal"
    );

    // The leaf goes away: the daemon and its MQTT connection stay up, but
    // the lease cannot be renewed and runs out.
    let stopped = std::time::Instant::now();
    nats.stop();
    eventually(
        "offline once the lease ran out",
        Duration::from_secs(15),
        || async { availability(&seen).as_deref() == Some("offline") },
    )
    .await;
    let took = stopped.elapsed();
    // The last renewal came at most a third of the TTL (1 s) before the
    // stop: the lease runs out no earlier than 2 s after it.
    assert!(
        took >= Duration::from_secs(2),
        "offline only when the lease ran out, not at the first failed renewal ({took:?})"
    );
    let log = d.log();
    let warned = log
        .find("cannot renew the lease")
        .expect("renewal failure logged");
    let lost = log.find("engine lease lost").expect("lease loss logged");
    assert!(
        warned < lost,
        "the renewal failed before the lease was lost"
    );
    assert!(d.is_running(), "the daemon keeps running: {}", d.log_tail());
    d.wait_for_log("engine lease lost", Duration::from_secs(1));

    // The leaf returns: the lease is renewed and the zones come back.
    nats.start_again();
    eventually(
        "online again with the lease",
        Duration::from_secs(20),
        || async { availability(&seen).as_deref() == Some("online") },
    )
    .await;
    assert!(d.terminate().success());
    eventually(
        "offline on a clean stop",
        Duration::from_secs(10),
        || async { availability(&seen).as_deref() == Some("offline") },
    )
    .await;
}
