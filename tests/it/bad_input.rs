//! Bad input through the real binary never stops the pipeline: oversized
//! MQTT payloads (1, 2 and 16 MiB at QoS 0 and 1) are acknowledged and kept
//! in REJECTED while the connection stays up; a REJECTED record larger than
//! the server's max payload is cut to fit; an observation the stream
//! refuses for good is kept in REJECTED instead of retried forever; device
//! timestamps out of range are rejected with a reason. After each, the next
//! good reading is stored.

use crate::common;
use crate::support;

use async_nats::jetstream::Message;
use common::*;
use presenced::observation::{Observation, Reading};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

struct Site {
    nats: NatsServer,
    mqtt: Mosquitto,
    http: SocketAddr,
    daemon: Daemon,
}

/// A site whose `[mqtt.main]` gets `source_extra` lines and whose leaf
/// gets `nats_extra` config.
fn site(mapping: &str, source_extra: &str, nats_extra: &str) -> Site {
    let nats = NatsServer::start(NatsOptions {
        extra: nats_extra.into(),
        ..Default::default()
    });
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    let cfg = daemon_config("test", &nats.url(), mqtt.port, http_port, mapping, ZONES).replace(
        "reconnect_max = \"1s\"\n",
        &format!("reconnect_max = \"1s\"\n{source_extra}\n"),
    );
    let daemon = Daemon::start_provisioned(&cfg, http_port);
    Site {
        nats,
        mqtt,
        http: SocketAddr::from(([127, 0, 0, 1], http_port)),
        daemon,
    }
}

/// An MQTT client that may send messages up to MQTT's maximum size and
/// counts the broker's PUBACKs.
struct BigPublisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BigPublisher {
    fn connect(port: u16) -> BigPublisher {
        let mut opts = MqttOptions::new("big-pub", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(300 << 20, 300 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let acked = Arc::new(AtomicU64::new(0));
        let a = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        BigPublisher {
            client,
            acked,
            task,
        }
    }

    async fn publish(&self, topic: &str, qos: QoS, payload: Vec<u8>) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .expect("queue MQTT publish");
    }
}

impl Drop for BigPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header(m: &Message, name: &str) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.to_string())
        .unwrap_or_default()
}

fn metric(http: SocketAddr, name: &str) -> u64 {
    let (_, text) = support::http_get(http, "/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// Publishes a good reading until the daemon stores it: it has subscribed.
async fn warm_up(port: u16, js: &async_nats::jetstream::Context) {
    let mut p = Publisher::connect(port, "warm-up").await;
    let start = std::time::Instant::now();
    while stream_messages(js, "SENSORS").await == 0 {
        p.publish("test/warmup", r#"{"occupancy":false}"#).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the daemon never read a message"
        );
    }
}

async fn last_lab_reading(js: &async_nats::jetstream::Context) -> Option<Observation> {
    read_stream(js, "SENSORS")
        .await
        .iter()
        .rev()
        .find(|m| m.subject.as_str() == "sensors.test.lab_pir")
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_up_to_16_mib_are_rejected_and_the_next_reading_flows() {
    let s = site(&motion_mapping(false), "", "");
    let js = jetstream(&s.nats.url()).await;
    warm_up(s.mqtt.port, &js).await;
    let p = BigPublisher::connect(s.mqtt.port);
    let sizes = [1usize << 20, 2 << 20, 16 << 20];
    let mut sent = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        for size in sizes {
            p.publish("test/lab_pir", qos, vec![b'{'; size]).await;
            sent.push(size);
        }
    }
    eventually(
        "the broker took the QoS 1 ones",
        Duration::from_secs(60),
        || async { p.acked.load(Ordering::Relaxed) >= 3 },
    )
    .await;
    p.publish(
        "test/lab_pir",
        QoS::AtLeastOnce,
        br#"{"occupancy":true}"#.to_vec(),
    )
    .await;
    eventually(
        "the next good reading is stored",
        Duration::from_secs(60),
        || async {
            last_lab_reading(&js)
                .await
                .is_some_and(|o| o.value == Reading::Bool(true))
        },
    )
    .await;
    eventually(
        "six records in REJECTED",
        Duration::from_secs(10),
        || async { stream_messages(&js, "REJECTED").await == 6 },
    )
    .await;
    for (m, size) in read_stream(&js, "REJECTED").await.iter().zip(sent) {
        let reason = header(m, "Presenced-Reason");
        assert_eq!(
            reason,
            format!(
                "payload of {size} bytes is larger than mqtt.main.max_payload (65536 bytes); its first 1024 bytes are kept"
            )
        );
        assert_eq!(header(m, "Presenced-Origin"), "mqtt topic test/lab_pir");
        assert_eq!(m.payload.len(), 1024, "a bounded head of the payload");
    }
    // One connection throughout: nothing dropped it.
    assert_eq!(metric(s.http, "presenced_mqtt_connected"), 1);
    let log = s.daemon.log();
    assert!(
        !log.contains("MQTT broker unreachable"),
        "{}",
        s.daemon.log_tail()
    );
    assert_eq!(log.matches("connected to MQTT broker").count(), 1);
    assert_eq!(metric(s.http, "presenced_rejects_total"), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_record_over_the_servers_max_payload_is_cut_to_fit() {
    // A leaf with a 64 KiB max payload and a source that reads up to 1 MiB:
    // a 200 KiB payload that is not a reading would not fit as it is.
    let s = site(
        &motion_mapping(false),
        "max_payload = 1048576",
        "max_payload: 65536",
    );
    let js = jetstream(&s.nats.url()).await;
    warm_up(s.mqtt.port, &js).await;
    let p = BigPublisher::connect(s.mqtt.port);
    let big: Vec<u8> = (0..200 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    p.publish("test/lab_pir", QoS::AtLeastOnce, big.clone())
        .await;
    p.publish(
        "test/lab_pir",
        QoS::AtLeastOnce,
        br#"{"occupancy":true}"#.to_vec(),
    )
    .await;
    eventually(
        "the next good reading is stored",
        Duration::from_secs(20),
        || async {
            last_lab_reading(&js)
                .await
                .is_some_and(|o| o.value == Reading::Bool(true))
        },
    )
    .await;
    assert_eq!(stream_messages(&js, "REJECTED").await, 1);
    let rej = read_stream(&js, "REJECTED").await.remove(0);
    let kept = rej.payload.len();
    assert!(kept < 65_536 && kept > 60_000, "kept {kept} bytes");
    assert_eq!(
        &rej.payload[..],
        &big[..kept],
        "the head is kept as received"
    );
    assert_eq!(
        header(&rej, "Presenced-Truncated"),
        format!("kept the first {kept} of {} bytes", big.len())
    );
    assert!(header(&rej, "Presenced-Reason").starts_with("payload: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observation_the_stream_refuses_is_kept_in_rejected_and_not_retried() {
    let s = site(
        "[[mqtt.main.topics]]\nfilter = \"test/+\"\nsensor = \"{1}\"\nvalue = \"/occupancy\"\n",
        "",
        "",
    );
    let js = jetstream(&s.nats.url()).await;
    warm_up(s.mqtt.port, &js).await;
    // The stream takes at most 256 bytes per message (headers included):
    // an observation of a 64-character sensor id is larger (~290), one of
    // `lab_pir` is not (~230).
    let mut stream = js.get_stream("SENSORS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 256;
    js.update_stream(config).await.unwrap();
    let long = "s".repeat(64);
    let mut p = Publisher::connect(s.mqtt.port, "refused-pub").await;
    p.publish(&format!("test/{long}"), r#"{"occupancy":true}"#)
        .await;
    p.publish("test/lab_pir", r#"{"occupancy":true}"#).await;
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "the next good reading is stored",
        Duration::from_secs(20),
        || async {
            last_lab_reading(&js)
                .await
                .is_some_and(|o| o.value == Reading::Bool(true))
        },
    )
    .await;
    eventually(
        "the refused one is in REJECTED",
        Duration::from_secs(10),
        || async { stream_messages(&js, "REJECTED").await == 1 },
    )
    .await;
    let rej = read_stream(&js, "REJECTED").await.remove(0);
    let reason = header(&rej, "Presenced-Reason");
    assert!(
        reason.starts_with("cannot be stored in SENSORS: "),
        "{reason}"
    );
    let kept: Observation = serde_json::from_slice(&rej.payload).unwrap();
    assert_eq!(kept.sensor, long);
    assert_eq!(
        header(&rej, "Presenced-Origin"),
        format!("sensor {long} (refused by stream SENSORS)")
    );
    // Not retried: no publish retry was counted for it.
    assert_eq!(metric(s.http, "presenced_publish_retries_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_timestamps_out_of_range_are_rejected_with_a_reason() {
    let s = site(&motion_mapping(true), "", "");
    let js = jetstream(&s.nats.url()).await;
    let mut p = Publisher::connect(s.mqtt.port, "ts-pub").await;
    let start = std::time::Instant::now();
    // Subscribed once a dated reading is stored.
    while stream_messages(&js, "SENSORS").await == 0 {
        p.publish(
            "test/warmup",
            format!(r#"{{"occupancy":false,"ts":{}}}"#, now_ms()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(start.elapsed() < Duration::from_secs(15), "nothing read");
    }
    let now = now_ms();
    let bad = [
        r#"{"occupancy":true,"ts":-1}"#.to_string(),
        r#"{"occupancy":true,"ts":"1999-12-31T23:59:59Z"}"#.to_string(),
        r#"{"occupancy":true,"ts":"2126-11-18T11:06:40Z"}"#.to_string(),
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now + 86_400_000),
    ];
    for b in &bad {
        p.publish("test/lab_pir", b.clone()).await;
    }
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{now}}}"#),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "the good reading applied",
        Duration::from_secs(10),
        || async {
            zone(&js, "lab")
                .await
                .is_some_and(|z| z.evidence[0].observed_at.map(|t| t.0) == Some(now))
        },
    )
    .await;
    eventually("four rejected", Duration::from_secs(10), || async {
        stream_messages(&js, "REJECTED").await == 4
    })
    .await;
    let reasons: Vec<String> = read_stream(&js, "REJECTED")
        .await
        .iter()
        .map(|m| header(m, "Presenced-Reason"))
        .collect();
    assert!(
        reasons[0].contains("1 ms before 1970-01-01") && reasons[0].contains("not set"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("1999-12-31T23:59:59.000Z is before 2000-01-01"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("ahead of the receive time")
            && reasons[2].contains("max_clock_skew (5m)"),
        "{reasons:?}"
    );
    assert!(
        reasons[3].contains("1day ahead") || reasons[3].contains("23h"),
        "{reasons:?}"
    );
    // Only the good ones are readings; none is dated in the future.
    for m in read_stream(&js, "SENSORS").await {
        let o: Observation = serde_json::from_slice(&m.payload).unwrap();
        assert!(o.observed_at.0 <= now_ms(), "{o:?}");
    }
}
