//! The MQTT source against real brokers: Mosquitto and nats-server's MQTT
//! listener. A rumqttc client in the test publishes QoS 1 messages; the
//! source under test turns them into items exactly as ingest would see them.

use crate::support;

use presenced::config::MqttSource;
use presenced::observation::{Observation, Reading};
use presenced::sources::mqtt::{run, DecodeRules, MqttError, MqttStatus, RunOptions};
use presenced::sources::{Ack, Item, Rejected};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use support::{wait_until_async, Mosquitto, NatsOptions, NatsServer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(15);

fn config(port: u16) -> MqttSource {
    let text = format!(
        r#"
        port = {port}
        keep_alive = "5s"
        reconnect_max = "500ms"

        [[topics]]
        filter = "test/+/motion"
        sensor = "{{1}}_motion"

        [[topics]]
        filter = "test/+/json"
        sensor = "{{1}}"
        value = "/occupancy"

        [zigbee2mqtt]
        base_topic = "z2m"
        devices = [
          {{ device = "hall_pir", kind = "occupancy" }},
          {{ device = "door", kind = "contact", sensor = "front_door" }},
          {{ device = "lux", kind = "illuminance" }},
        ]
        "#
    );
    toml::from_str(&text).unwrap()
}

/// The source under test, as the daemon runs it.
struct Source {
    rx: mpsc::Receiver<Item>,
    status: Arc<MqttStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), MqttError>>,
}

impl Source {
    fn start(port: u16, client_id: &str, buffer: usize) -> Source {
        Source::start_with(config(port), client_id, buffer)
    }

    fn start_with(cfg: MqttSource, client_id: &str, buffer: usize) -> Source {
        let (tx, rx) = mpsc::channel(buffer);
        let (stop, shutdown) = watch::channel(false);
        let status = Arc::new(MqttStatus::default());
        let task = tokio::spawn(run(
            "main".into(),
            cfg,
            client_id.into(),
            RunOptions {
                rules: DecodeRules {
                    strict: false,
                    max_clock_skew: Duration::from_secs(300),
                },
                stored: None,
            },
            tx,
            status.clone(),
            shutdown,
        ));
        Source {
            rx,
            status,
            stop,
            task,
        }
    }

    /// Waits until the broker confirmed `n` subscriptions in total: from
    /// then on, publishes reach the source.
    async fn wait_subscribed(&self, n: u64) {
        let status = self.status.clone();
        wait_until_async("the source is subscribed", DEADLINE, || {
            let s = status.subscribed.load(Ordering::Relaxed);
            async move { s >= n }
        })
        .await;
    }

    async fn next(&mut self) -> Item {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("an item within the deadline")
            .expect("the source is still running")
    }

    async fn next_observation(&mut self) -> (Observation, Ack) {
        match self.next().await {
            Item::Observation(o, a) => (o, a),
            Item::Rejected(r, _) => panic!("expected an observation, got reject {r:?}"),
        }
    }

    async fn shutdown(self) -> mpsc::Receiver<Item> {
        self.stop.send(true).unwrap();
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("source stops within the deadline")
            .expect("source task did not panic");
        assert!(result.is_ok(), "source ended with {result:?}");
        assert!(!self.status.connected.load(Ordering::Relaxed));
        self.rx
    }
}

/// A device: publishes QoS 1, reconnecting on its own.
struct Publisher {
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Publisher {
    fn connect(port: u16, id: &str) -> Publisher {
        let opts = MqttOptions::new(id, "127.0.0.1", port);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let task = tokio::spawn(async move {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Publisher { client, task }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// nats-server with its MQTT listener. nats-server redelivers an unacked
/// QoS 1 message when its `ack_wait` runs out (30 s by default), not on
/// session resume, so the test shortens it. Setting it means writing the
/// whole `mqtt` block (a second block would replace the harness's).
fn nats_mqtt() -> (NatsServer, u16) {
    nats_mqtt_with_ack_wait("2s")
}

fn nats_mqtt_with_ack_wait(ack_wait: &str) -> (NatsServer, u16) {
    let port = support::free_port();
    let server = NatsServer::start(NatsOptions {
        extra: format!("mqtt {{\n  listen: \"127.0.0.1:{port}\"\n  ack_wait: \"{ack_wait}\"\n}}\n"),
        ..Default::default()
    });
    (server, port)
}

/// Messages delivered to MQTT subscribers and not yet acked, summed over
/// nats-server's MQTT consumers; `None` before any consumer exists.
fn mqtt_ack_pending(monitor: SocketAddr) -> Option<u64> {
    let (status, body) = support::http_get(monitor, "/jsz?accounts=true&consumers=true")?;
    assert_eq!(status, 200, "{body}");
    let jsz: serde_json::Value = serde_json::from_str(&body).unwrap();
    let consumers: Vec<&serde_json::Value> = jsz["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .filter(|s| s["name"] == "$MQTT_msgs")
        .flat_map(|s| s["consumer_detail"].as_array().into_iter().flatten())
        .collect();
    if consumers.is_empty() {
        return None;
    }
    Some(
        consumers
            .iter()
            .filter_map(|c| c["num_ack_pending"].as_u64())
            .sum(),
    )
}

/// Good and bad payloads on every kind of mapping; all acks fired; a
/// restart with the same client id then gets nothing redelivered.
async fn decodes_and_acks(port: u16, nats_monitor: Option<SocketAddr>) {
    let mut source = Source::start(port, "presenced-test-decode", 100);
    source.wait_subscribed(1).await;
    let device = Publisher::connect(port, "device-decode");
    let sent = [
        ("test/kitchen/motion", "ON"),
        (
            "z2m/hall_pir",
            r#"{"battery":100,"occupancy":true,"linkquality":120}"#,
        ),
        (
            "z2m/door",
            r#"{"battery":91,"contact":false,"voltage":3005}"#,
        ),
        ("z2m/lux", r#"{"illuminance":412,"linkquality":54}"#),
        ("test/desk/json", r#"{"occupancy": ?}"#),
        ("test/Kitchen/motion", "ON"),
        ("test/attic/json", r#"{"occupancy":"maybe"}"#),
    ];
    for (t, p) in sent {
        device.publish(t, p).await;
    }
    let mut observations = Vec::new();
    let mut rejects: Vec<Rejected> = Vec::new();
    let mut acks = Vec::new();
    for _ in 0..7 {
        match source.next().await {
            Item::Observation(o, ack) => {
                acks.push(ack);
                observations.push((o.sensor, o.value));
            }
            Item::Rejected(r, ack) => {
                acks.push(ack);
                rejects.push(r);
            }
        }
    }
    if let Some(monitor) = nats_monitor {
        assert_eq!(mqtt_ack_pending(monitor), Some(7), "nothing acked yet");
    }
    for ack in acks {
        ack.fire();
    }
    if let Some(monitor) = nats_monitor {
        wait_until_async("nats-server has every message acked", DEADLINE, || {
            let pending = mqtt_ack_pending(monitor);
            async move { pending == Some(0) }
        })
        .await;
    }
    observations.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        observations,
        [
            ("front_door".to_owned(), Reading::Bool(false)),
            ("hall_pir".to_owned(), Reading::Bool(true)),
            ("kitchen_motion".to_owned(), Reading::Bool(true)),
            ("lux".to_owned(), Reading::Number(412.0)),
        ]
    );
    rejects.sort_by(|a, b| a.origin.cmp(&b.origin));
    let got: Vec<(&str, &str)> = rejects
        .iter()
        .map(|r| (r.origin.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "mqtt topic test/Kitchen/motion",
                "sensor id \"Kitchen_motion\" from topic levels is invalid: \
                 use [a-z0-9_-], 1 to 64 characters, no dots"
            ),
            (
                "mqtt topic test/attic/json",
                "payload: pointer /occupancy is the string \"maybe\", \
                 not a boolean (true/false, ON/OFF) or a number"
            ),
            (
                "mqtt topic test/desk/json",
                "payload: invalid JSON at byte 14: expected value"
            ),
        ]
    );
    assert_eq!(&rejects[2].payload[..], br#"{"occupancy": ?}"#);
    assert!(rejects.iter().all(|r| r.source == "main"));
    let status = source.status.clone();
    assert_eq!(status.received.load(Ordering::Relaxed), 7);
    assert_eq!(status.rejected.load(Ordering::Relaxed), 3);
    let mut rx = source.shutdown().await;
    assert!(rx.try_recv().is_err(), "more items than messages sent");

    // Same client id again: the session survives, but every message was
    // acked, so the first thing on the topic is the new one.
    let mut source = Source::start(port, "presenced-test-decode", 100);
    source.wait_subscribed(1).await;
    device.publish("test/kitchen/motion", "OFF").await;
    let (o, ack) = source.next_observation().await;
    assert_eq!(
        (o.sensor.as_str(), o.value),
        ("kitchen_motion", Reading::Bool(false)),
        "an acked message was redelivered"
    );
    ack.fire();
    source.shutdown().await;
}

/// An ack not fired before the source stops: the broker keeps the message
/// and redelivers it to the next run, with the same packet id and so the
/// same delivery key, which is what a daemon finds in `SENSORS` to give
/// the redelivery its first id (tests/it/daemon.rs checks that end to end).
async fn unacked_is_redelivered_with_same_id(port: u16) {
    let mut source = Source::start(port, "presenced-test-redeliver", 100);
    source.wait_subscribed(1).await;
    let device = Publisher::connect(port, "device-redeliver");
    device.publish("test/hall/motion", "ON").await;
    let (first, unfired) = source.next_observation().await;
    assert_eq!(first.sensor, "hall_motion");
    let status = source.status.clone();
    source.shutdown().await;
    drop(unfired);
    assert_eq!(status.connects.load(Ordering::Relaxed), 1);

    let mut source = Source::start(port, "presenced-test-redeliver", 100);
    let (again, ack) = source.next_observation().await;
    assert!(first.delivery.is_some(), "QoS 1 carries its delivery");
    assert_eq!(
        again.delivery, first.delivery,
        "redelivery must keep the delivery key"
    );
    assert_eq!((again.sensor, again.value), (first.sensor, first.value));
    ack.fire();
    source.wait_subscribed(1).await;
    // A new message with the same payload is a new observation.
    device.publish("test/hall/motion", "ON").await;
    let (next, ack) = source.next_observation().await;
    assert_ne!(next.id, first.id);
    ack.fire();
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_decodes_and_acks() {
    let broker = Mosquitto::start();
    decodes_and_acks(broker.port, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mqtt_decodes_and_acks() {
    let (server, port) = nats_mqtt();
    decodes_and_acks(port, Some(server.monitor_addr())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_redelivers_unacked_with_same_id() {
    let broker = Mosquitto::start();
    unacked_is_redelivered_with_same_id(broker.port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mqtt_redelivers_unacked_with_same_id() {
    let (_server, port) = nats_mqtt();
    unacked_is_redelivered_with_same_id(port).await;
}

/// nats-server resends an unacked message on the live connection after
/// `ack_wait`; the copy is dropped (the original's ack covers it) instead of
/// going to ingest with a second ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mqtt_live_redelivery_is_dropped_while_in_flight() {
    let (server, port) = nats_mqtt();
    let monitor = server.monitor_addr();
    let mut source = Source::start(port, "presenced-test-live", 100);
    source.wait_subscribed(1).await;
    let device = Publisher::connect(port, "device-live");
    device.publish("test/hall/motion", "ON").await;
    let (_, held) = source.next_observation().await;
    let status = source.status.clone();
    wait_until_async("the redelivered copy was dropped", DEADLINE, || {
        let n = status.ignored.load(Ordering::Relaxed);
        async move { n >= 1 }
    })
    .await;
    assert!(source.rx.try_recv().is_err(), "the copy reached ingest");
    held.fire();
    wait_until_async("nats-server has the message acked", DEADLINE, || {
        let pending = mqtt_ack_pending(monitor);
        async move { pending == Some(0) }
    })
    .await;
    device.publish("test/hall/motion", "OFF").await;
    let (o, ack) = source.next_observation().await;
    assert_eq!(o.value, Reading::Bool(false));
    ack.fire();
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_broker_restart() {
    let mut broker = Mosquitto::start();
    let mut source = Source::start(broker.port, "presenced-test-restart", 100);
    source.wait_subscribed(1).await;
    let device = Publisher::connect(broker.port, "device-restart");
    device.publish("test/hall/motion", "ON").await;
    let (o, ack) = source.next_observation().await;
    assert_eq!(o.value, Reading::Bool(true));
    ack.fire();

    broker.restart();
    // The restarted broker has no sessions: only the resubscription on the
    // new connection makes later messages arrive.
    source.wait_subscribed(2).await;
    let status = source.status.clone();
    assert!(status.connects.load(Ordering::Relaxed) >= 2);
    assert!(status.disconnects.load(Ordering::Relaxed) >= 1);
    assert!(status.connected.load(Ordering::Relaxed));
    // The device reconnects on its own schedule and drops what it could not
    // send, so it repeats until the source has the reading.
    let start = std::time::Instant::now();
    let (o, ack) = loop {
        device.publish("test/hall/motion", "OFF").await;
        match tokio::time::timeout(Duration::from_millis(500), source.rx.recv()).await {
            Ok(Some(Item::Observation(o, ack))) => break (o, ack),
            Ok(other) => panic!("expected an observation, got {other:?}"),
            Err(_) => assert!(
                start.elapsed() < DEADLINE,
                "nothing arrived after the restart"
            ),
        }
    };
    assert_eq!(
        (o.sensor.as_str(), o.value),
        ("hall_motion", Reading::Bool(false))
    );
    ack.fire();
    source.shutdown().await;
}

/// Publishes illuminance readings 0..n and waits until the source (its
/// buffer smaller than n) has held input back.
async fn publish_until_held_back(device: &Publisher, source: &Source, n: u32) {
    for i in 0..n {
        device
            .publish("z2m/lux", &format!(r#"{{"illuminance":{i}}}"#))
            .await;
    }
    let status = source.status.clone();
    wait_until_async("the source saw the buffer full", DEADLINE, || {
        let n = status.buffer_full.load(Ordering::Relaxed);
        async move { n >= 1 }
    })
    .await;
}

/// Ingest behind: the source waits instead of dropping, counts it, and
/// everything arrives in order once ingest reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_holds_input_back_without_loss() {
    let broker = Mosquitto::start();
    let mut source = Source::start(broker.port, "presenced-test-full", 1);
    source.wait_subscribed(1).await;
    let device = Publisher::connect(broker.port, "device-full");
    publish_until_held_back(&device, &source, 5).await;
    for i in 0..5 {
        let (o, ack) = source.next_observation().await;
        assert_eq!(o.value, Reading::Number(f64::from(i)));
        ack.fire();
    }
    source.shutdown().await;
}

/// Ingest behind for longer than the keep-alive: the source keeps its
/// connection while it waits. rumqttc sends pings (and the PUBACKs queued
/// meanwhile) only when its event loop is polled, and reads the broker's
/// answer only after what came before it; a source that stopped polling
/// was dropped by the broker (silent past 1.5 × keep-alive) or gave up
/// on its own ping, and every reconnect cost a redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_waiting_on_ingest_keeps_its_connection_to_mosquitto() {
    let broker = Mosquitto::start();
    waiting_on_ingest_keeps_the_connection(broker.port, &|| broker.log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_waiting_on_ingest_keeps_its_connection_to_nats_mqtt() {
    // Its default `ack_wait`: a wait shorter than that sees no resends.
    let (server, port) = nats_mqtt_with_ack_wait("30s");
    waiting_on_ingest_keeps_the_connection(port, &|| server.log()).await;
}

async fn waiting_on_ingest_keeps_the_connection(port: u16, broker_log: &dyn Fn() -> String) {
    let mut cfg = config(port);
    // nats-server allows a silence of 1.5 keep-alives in whole seconds: one
    // second for a keep-alive of 1 s, as long as rumqttc's ping interval.
    cfg.keep_alive = Duration::from_secs(2);
    let mut source = Source::start_with(cfg, "presenced-test-keepalive", 1);
    source.wait_subscribed(1).await;
    let device = Publisher::connect(port, "device-keepalive");
    let n = 50;
    publish_until_held_back(&device, &source, n).await;
    let status = source.status.clone();
    // Five keep-alives with nothing taken from the source. A lost
    // connection shows only once the source polls again, so the counts
    // are read after everything was taken.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for i in 0..n {
        let (o, ack) = source.next_observation().await;
        assert_eq!(o.value, Reading::Number(f64::from(i)));
        ack.fire();
    }
    // One more reading after the wait, taken only once the source read on.
    device.publish("z2m/lux", r#"{"illuminance":-1}"#).await;
    let (o, ack) = source.next_observation().await;
    assert_eq!(o.value, Reading::Number(-1.0));
    ack.fire();
    assert_eq!(
        (
            status.disconnects.load(Ordering::Relaxed),
            status.connects.load(Ordering::Relaxed)
        ),
        (0, 1),
        "(disconnects, connects) after the source waited on ingest; broker log:\n{}",
        broker_log()
    );
    source.shutdown().await;
}

/// Two sources with one client id: the broker accepts each connection and
/// then drops it when the other one connects (a session takeover), forever.
/// The reconnect backoff must keep growing, since no connection stays up
/// long enough to count as stable; restarting it at every CONNACK would
/// reconnect every 100 ms or faster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_drops_every_connection_is_not_hammered() {
    let broker = Mosquitto::start();
    let mut cfg = config(broker.port);
    cfg.reconnect_max = Duration::from_secs(2);
    let a = Source::start_with(cfg.clone(), "presenced-test-twin", 100);
    let b = Source::start_with(cfg, "presenced-test-twin", 100);
    let window = Duration::from_secs(6);
    tokio::time::sleep(window).await;
    let connects = |s: &Source| s.status.connects.load(Ordering::Relaxed);
    let (ca, cb) = (connects(&a), connects(&b));
    // Backoff 100 ms doubling to 2 s with equal jitter: at most about nine
    // connections each in 6 s. At a fixed 100 ms it would be 30 or more.
    assert!(ca >= 2 && cb >= 2, "the takeover happened: {ca}, {cb}");
    assert!(
        ca + cb <= 24,
        "reconnects not backed off: {ca} + {cb} in {window:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// More QoS 1 messages on one connection than there are packet ids, at
/// full speed, the source's consumer acknowledging in batches as ingest
/// does: every message comes through once, none is taken for a copy of
/// one still in flight when the broker reuses its packet id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_ids_wrapping_around_lose_nothing() {
    const N: usize = 100_000;
    let broker = Mosquitto::start();
    let mut source = Source::start(broker.port, "presenced-test-wrap", 100_000);
    source.wait_subscribed(1).await;
    let device = Publisher::connect(broker.port, "device-wrap");
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            device
                .publish("z2m/lux", &format!(r#"{{"illuminance":{i}}}"#))
                .await;
        }
        device
    });
    // A message's first id; a broker redelivery (DUP) of it comes again
    // with the same id, which JetStream stores once.
    let mut seen: Vec<Option<String>> = vec![None; N];
    let mut redelivered = 0;
    let mut other_id = 0;
    let mut held = Vec::new();
    let mut got = 0;
    while got < N {
        let item = tokio::time::timeout(Duration::from_secs(30), source.rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{got} of {N} messages after 30 s; ignored as copies: {}; first missing: {:?}",
                    source.status.ignored.load(Ordering::Relaxed),
                    seen.iter().position(Option::is_none)
                )
            })
            .expect("the source is still running");
        let Item::Observation(o, ack) = item else {
            panic!("a reject")
        };
        let Reading::Number(v) = o.value else {
            panic!("{o:?}")
        };
        match &seen[v as usize] {
            Some(first) => {
                // A broker redelivery: with the first id JetStream stores
                // it once; with another (the source no longer knew it) it
                // is stored twice, at least once and never lost. Counted,
                // not refused: this test is about losing nothing.
                if first != &o.id {
                    other_id += 1;
                }
                redelivered += 1;
            }
            None => {
                seen[v as usize] = Some(o.id.clone());
                got += 1;
            }
        }
        // Acknowledged in batches, as ingest does once a chunk is stored.
        held.push(ack);
        if held.len() >= 500 {
            for a in held.drain(..) {
                a.fire();
            }
        }
    }
    for a in held {
        a.fire();
    }
    assert_eq!(source.status.ignored.load(Ordering::Relaxed), 0);
    eprintln!(
        "{N} messages, {redelivered} broker redeliveries ({other_id} under another id), {} connection(s)",
        source.status.connects.load(Ordering::Relaxed)
    );
    drop(publishing.await);
    source.shutdown().await;
}

/// Publishes `n` QoS 1 messages to `broker` and acknowledges none until
/// the source has held exactly `held` of them for 2 s (more would have
/// arrived by then if anything let them), then acknowledges each as it
/// comes: all `n` arrive, in order, and nothing stays unacknowledged.
/// Returns the source's status.
async fn holds_then_delivers_all(
    broker: &Mosquitto,
    id: &str,
    n: usize,
    held: usize,
) -> Arc<MqttStatus> {
    let mut source = Source::start(broker.port, &format!("presenced-test-{id}"), 100_000);
    source.wait_subscribed(1).await;
    let device = Publisher::connect(broker.port, &format!("device-{id}"));
    for i in 0..n {
        device
            .publish("z2m/lux", &format!(r#"{{"illuminance":{i}}}"#))
            .await;
    }
    let start = std::time::Instant::now();
    while source.rx.len() < held {
        assert!(
            start.elapsed() < DEADLINE,
            "{} of {held} buffered",
            source.rx.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(source.rx.len(), held, "messages held by the source");
    assert_eq!(
        source.status.unacknowledged.load(Ordering::Relaxed),
        held as u64,
        "the source's own count of what it holds unacknowledged"
    );
    for i in 0..n {
        let (o, ack) = source.next_observation().await;
        assert_eq!(o.value, Reading::Number(i as f64));
        ack.fire();
    }
    assert_eq!(source.status.unacknowledged.load(Ordering::Relaxed), 0);
    drop(device);
    let status = source.status.clone();
    source.shutdown().await;
    status
}

/// What the daemon holds unacknowledged is bounded by the broker's
/// in-flight window (`max_inflight_messages 1000` in the Mosquitto the
/// daemon expects), not by the ingest buffer (here 100,000): while
/// nothing is stored (ingest behind, the leaf away) the broker keeps the
/// rest, and the daemon's memory stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_input_is_bounded_by_the_brokers_window_not_the_buffer() {
    let broker = Mosquitto::start();
    holds_then_delivers_all(&broker, "window", 5000, 1000).await;
}

/// A broker without an in-flight window (`max_inflight_messages 0`) would
/// hand the daemon everything it has: the source stops reading at
/// `UNACKED_MAX` messages held unacknowledged, whatever the buffer's room,
/// and reads on as ingest acknowledges, losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_window_the_source_holds_at_most_its_own() {
    use presenced::sources::mqtt::UNACKED_MAX;
    let broker = Mosquitto::start_with("max_inflight_messages 0");
    let max = UNACKED_MAX as usize;
    let status = holds_then_delivers_all(&broker, "own-window", max * 2 + 500, max).await;
    assert!(status.buffer_full.load(Ordering::Relaxed) >= 1);
}
