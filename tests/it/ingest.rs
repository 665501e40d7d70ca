//! Ingest through the real binary: exactly-once storage in SENSORS,
//! a 50,000-message QoS 1 burst through Mosquitto, and rejected input kept
//! in REJECTED while good input keeps flowing.

use crate::common;
use crate::support;

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

/// Publishes `{"occupancy":true}` on `topic` until one is stored: the
/// daemon has subscribed (messages before its first SUBACK are not its).
async fn warm_up(p: &mut Publisher, js: &async_nats::jetstream::Context, topic: &str) {
    let start = std::time::Instant::now();
    loop {
        p.publish(topic, r#"{"occupancy":true}"#).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if stream_messages(js, "SENSORS").await >= 1 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the daemon never read a message"
        );
    }
}

/// Messages stored on one subject of SENSORS.
async fn on_subject(js: &async_nats::jetstream::Context, subject: &str) -> u64 {
    use futures::TryStreamExt;
    let stream = js.get_stream("SENSORS").await.unwrap();
    let counts: Vec<(String, usize)> = stream
        .info_with_subjects(subject)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    counts.iter().map(|(_, n)| *n as u64).sum()
}

/// The value of an unlabelled metric in `/metrics`.
fn metric(http: SocketAddr, name: &str) -> u64 {
    let (_, text) = support::http_get(http, "/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

fn msg_ids(msgs: &[async_nats::jetstream::Message]) -> Vec<String> {
    msgs.iter()
        .map(|m| {
            m.headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// What a motion sensor that repeats itself sends (no device timestamp,
/// the same payload every time), at QoS 0 and at QoS 1: every message is
/// a reading, none is taken for a duplicate of the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_payload_1000_times_is_1000_readings_at_qos0_and_qos1() {
    let mqtt = Mosquitto::start();
    let (nats, _d, http) = setup(&mqtt, &motion_mapping(false));
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(mqtt.port, "repeat-pub").await;
    // Subscribed once a first reading is stored.
    warm_up(&mut p, &js, "test/warmup_pir").await;
    let lab = "sensors.test.lab_pir";

    for _ in 0..1000 {
        p.publish_qos0("test/lab_pir", r#"{"occupancy":true}"#)
            .await;
    }
    eventually(
        "1000 QoS 0 readings stored",
        Duration::from_secs(30),
        || async { on_subject(&js, lab).await >= 1000 },
    )
    .await;
    for _ in 0..1000 {
        p.publish("test/lab_pir", r#"{"occupancy":true}"#).await;
    }
    p.flush(Duration::from_secs(30)).await;
    eventually(
        "1000 QoS 1 readings stored",
        Duration::from_secs(30),
        || async { on_subject(&js, lab).await >= 2000 },
    )
    .await;
    let total = stream_messages(&js, "SENSORS").await;
    eventually("engine caught up", Duration::from_secs(30), || async {
        engine_caught_up(&js, total).await
    })
    .await;
    // Exactly one stored reading per message, each with its own id.
    assert_eq!(on_subject(&js, lab).await, 2000);
    let msgs = read_stream(&js, "SENSORS").await;
    assert_eq!(
        msgs_ids_unique(&msgs),
        msgs.len(),
        "every message has its own id"
    );
    let lab_msgs: Vec<_> = msgs.iter().filter(|m| m.subject.as_str() == lab).collect();
    // Only QoS 1 deliveries carry the delivery header (the second half).
    let delivery = |m: &&async_nats::jetstream::Message| {
        m.headers
            .as_ref()
            .is_some_and(|h| h.get("Presenced-Delivery").is_some())
    };
    assert!(lab_msgs[..1000].iter().all(|m| !delivery(m)));
    assert!(lab_msgs[1000..].iter().all(delivery));
    // Every message was counted once on the way in and once stored.
    assert_eq!(
        metric(http, "presenced_observations_received_total"),
        msgs.len() as u64
    );
    assert_eq!(
        metric(http, "presenced_observations_stored_total"),
        msgs.len() as u64
    );
}

fn msgs_ids_unique(msgs: &[async_nats::jetstream::Message]) -> usize {
    msg_ids(msgs)
        .into_iter()
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// A QoS 1 message stored in SENSORS whose PUBACK never reached the
/// broker (lost on the wire, then the daemon SIGKILLed): the broker
/// redelivers it to the next daemon with the DUP flag, which finds it in
/// SENSORS by its delivery and acknowledges it without storing it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_message_stored_before_a_sigkill_is_stored_once_after_redelivery() {
    let mqtt = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    stored_before_sigkill_is_stored_once(&nats, mqtt.port).await;
}

/// The same through the leaf's own MQTT listener (the sandbox's broker),
/// which redelivers after its `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_through_the_leafs_mqtt_listener() {
    let mqtt_port = support::free_port();
    let nats = NatsServer::start(NatsOptions {
        extra: format!("mqtt {{\n  listen: \"127.0.0.1:{mqtt_port}\"\n  ack_wait: \"2s\"\n}}\n"),
        ..Default::default()
    });
    stored_before_sigkill_is_stored_once(&nats, mqtt_port).await;
}

async fn stored_before_sigkill_is_stored_once(nats: &NatsServer, mqtt_port: u16) {
    let proxy = support::Proxy::start(SocketAddr::from(([127, 0, 0, 1], mqtt_port)));
    let http_port = support::free_port();
    let cfg = daemon_config(
        "test",
        &nats.url(),
        proxy.port,
        http_port,
        &motion_mapping(false),
        ZONES,
    );
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let mut d = Daemon::start_provisioned(&cfg, http_port);
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(mqtt_port, "crash-pub").await;
    warm_up(&mut p, &js, "test/lab_pir").await;
    p.flush(Duration::from_secs(5)).await;
    eventually("warm-up stored", Duration::from_secs(10), || async {
        engine_caught_up(&js, stream_messages(&js, "SENSORS").await).await
    })
    .await;
    let base = stream_messages(&js, "SENSORS").await;

    // From here the daemon's PUBACKs are lost.
    proxy.mute_upstream();
    p.publish("test/lab_pir", r#"{"occupancy":false}"#).await;
    p.flush(Duration::from_secs(5)).await;
    eventually("the reading is stored", Duration::from_secs(10), || async {
        stream_messages(&js, "SENSORS").await == base + 1
    })
    .await;
    d.kill9();
    proxy.cut();
    proxy.restore();

    d.restart();
    d.wait_healthy(http, Duration::from_secs(20));
    d.wait_for_log(
        "MQTT redelivery of a message already stored; acknowledged",
        Duration::from_secs(15),
    );
    // A new reading after the redelivery (the broker keeps the order).
    p.publish("test/lab_pir", r#"{"occupancy":true}"#).await;
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "the next reading is stored",
        Duration::from_secs(10),
        || async { stream_messages(&js, "SENSORS").await >= base + 2 },
    )
    .await;
    eventually("engine caught up", Duration::from_secs(10), || async {
        engine_caught_up(&js, base + 2).await
    })
    .await;
    assert_eq!(
        stream_messages(&js, "SENSORS").await,
        base + 2,
        "the redelivered message was stored once"
    );
    let msgs = read_stream(&js, "SENSORS").await;
    assert_eq!(msgs_ids_unique(&msgs), base as usize + 2);
    let values: Vec<bool> = msgs[base as usize..]
        .iter()
        .map(|m| {
            let o: presenced::observation::Observation =
                serde_json::from_slice(&m.payload).unwrap();
            o.value == presenced::observation::Reading::Bool(true)
        })
        .collect();
    assert_eq!(values, [false, true]);
    // This daemon stored only the new reading, not the redelivery.
    assert_eq!(metric(http, "presenced_observations_stored_total"), 1);
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

/// The look-up of stored deliveries (what a restarted daemon reads back to
/// recognise a redelivery) reads at most the last `REDELIVERY_SCAN_MAX`
/// messages of SENSORS, however many the lookback's ten minutes hold: a
/// busy site's start read over a million headers, hundreds of MB, and ran
/// past its time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_deliveries_look_up_reads_only_the_newest_messages() {
    use async_nats::jetstream::stream;
    use presenced::ingest::{StoredDeliveries, REDELIVERY_SCAN_MAX};
    use presenced::naming::Site;
    use presenced::observation::DELIVERY_HEADER;
    let nats = NatsServer::start(NatsOptions::default());
    let js = jetstream(&nats.url()).await;
    js.create_stream(stream::Config {
        name: "SENSORS".into(),
        subjects: vec!["sensors.test.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let older = 100;
    let total = REDELIVERY_SCAN_MAX + older;
    let mut acks = Vec::new();
    for i in 0..total {
        let mut h = async_nats::HeaderMap::new();
        h.insert(DELIVERY_HEADER, format!("mqtt main {i} h 0").as_str());
        h.insert("Nats-Msg-Id", format!("id-{i}").as_str());
        acks.push(
            js.publish_with_headers("sensors.test.s", h, "{}".into())
                .await
                .unwrap(),
        );
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    let found = StoredDeliveries::new(js.clone(), Site::new("test").unwrap())
        .recent("main")
        .await
        .unwrap();
    assert_eq!(found.len() as u64, REDELIVERY_SCAN_MAX);
    assert!(!found.contains_key(&format!("mqtt main {} h 0", older - 1)));
    assert_eq!(
        found
            .get(&format!("mqtt main {older} h 0"))
            .map(String::as_str),
        Some(format!("id-{older}").as_str())
    );
    assert!(found.contains_key(&format!("mqtt main {} h 0", total - 1)));
}
