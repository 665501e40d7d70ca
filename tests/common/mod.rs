//! Helpers shared by the daemon's integration tests: config text, MQTT
//! publishing, and reading JetStream state back.
#![allow(dead_code)]

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use presenced::engine::{Transition, ZoneState};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A daemon config on the given ports; `zones` is raw TOML appended.
pub fn daemon_config(
    site: &str,
    nats_url: &str,
    mqtt_port: u16,
    http_port: u16,
    mapping: &str,
    zones: &str,
) -> String {
    format!(
        r#"site = "{site}"

[nats]
url = "{nats_url}"
request_timeout = "2s"

[http]
listen = "127.0.0.1:{http_port}"

[ingest]
reject_log_every = "1s"

[engine]
drain_timeout = "5s"

[mqtt.main]
host = "127.0.0.1"
port = {mqtt_port}
keep_alive = "5s"
reconnect_max = "1s"
{mapping}

{zones}
"#
    )
}

/// A client's or an admin's config: the site and its leaf, no sources and
/// no zones (`provision`, `watch`, `get`).
pub fn client_config(site: &str, nats_url: &str) -> String {
    format!("site = \"{site}\"\n\n[nats]\nurl = \"{nats_url}\"\nrequest_timeout = \"2s\"\n")
}

/// Mapping `test/<sensor>` → sensor, value `/occupancy`, optional `/ts`.
pub fn motion_mapping(with_ts: bool) -> String {
    let ts = if with_ts { "timestamp = \"/ts\"\n" } else { "" };
    format!(
        "[[mqtt.main.topics]]\nfilter = \"test/+\"\nsensor = \"{{1}}\"\nvalue = \"/occupancy\"\n{ts}"
    )
}

pub async fn jetstream(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url)
        .await
        .expect("connect to nats-server");
    jetstream::new(client)
}

/// Runs `presenced provision` against the config file; its report.
pub fn provision(config_path: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(["provision", "--config"])
        .arg(config_path)
        .output()
        .expect("run presenced provision");
    assert!(
        out.status.success(),
        "provision failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub async fn zone(js: &jetstream::Context, zone: &str) -> Option<ZoneState> {
    let kv = js.get_key_value("presence").await.ok()?;
    let entry = kv.get(zone).await.ok()??;
    serde_json::from_slice(&entry).ok()
}

pub async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of a stream, in order, with its headers.
pub async fn read_stream(
    js: &jetstream::Context,
    name: &str,
) -> Vec<async_nats::jetstream::Message> {
    let stream = js.get_stream(name).await.expect("stream exists");
    let total = stream.cached_info().state.messages;
    if total == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("ephemeral consumer");
    let mut out = Vec::new();
    let mut msgs = consumer.messages().await.expect("messages");
    while (out.len() as u64) < total {
        match tokio::time::timeout(Duration::from_secs(10), msgs.next()).await {
            Ok(Some(Ok(m))) => out.push(m),
            other => panic!(
                "reading {name}: got {} of {total}, then {other:?}",
                out.len()
            ),
        }
    }
    out
}

/// The transitions in EVENTS (the zones' subjects; takeover records under
/// `events.<site>.takeover.<service>` are not transitions).
pub async fn events(js: &jetstream::Context) -> Vec<Transition> {
    read_stream(js, "EVENTS")
        .await
        .iter()
        .filter(|m| m.subject.split('.').nth(2) == Some("presence"))
        .map(|m| serde_json::from_slice(&m.payload).expect("transition JSON"))
        .collect()
}

/// True once the engine consumer has applied and acked everything.
pub async fn engine_caught_up(js: &jetstream::Context, expected_in_sensors: u64) -> bool {
    let Ok(stream) = js.get_stream("SENSORS").await else {
        return false;
    };
    let Ok(mut c) = stream.get_consumer::<pull::Config>("engine").await else {
        return false;
    };
    let Ok(info) = c.info().await else {
        return false;
    };
    info.num_pending == 0
        && info.num_ack_pending == 0
        && info.ack_floor.stream_sequence >= expected_in_sensors
}

pub async fn sensors_config(js: &jetstream::Context) -> stream::Config {
    js.get_stream("SENSORS")
        .await
        .expect("SENSORS")
        .cached_info()
        .config
        .clone()
}

/// A QoS 1 MQTT publisher that counts PUBACKs.
pub struct Publisher {
    pub client: AsyncClient,
    acked: Arc<AtomicU64>,
    sent: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub async fn connect(port: u16, id: &str) -> Publisher {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
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
        Publisher {
            client,
            acked,
            sent: 0,
            task,
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue MQTT publish");
        self.sent += 1;
    }

    /// Publishes at QoS 0 (no PUBACK, packet id 0): how many sensors and
    /// Home Assistant send. Follow with a QoS 1 publish and
    /// [`Publisher::flush`] to know the broker has them all (it keeps the
    /// order of one connection).
    pub async fn publish_qos0(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.into())
            .await
            .expect("queue MQTT publish");
    }

    /// Waits until the broker has acknowledged everything sent.
    pub async fn flush(&self, deadline: Duration) {
        let start = std::time::Instant::now();
        while self.acked.load(Ordering::Relaxed) < self.sent {
            assert!(
                start.elapsed() < deadline,
                "broker acked {} of {} publishes",
                self.acked.load(Ordering::Relaxed),
                self.sent
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls an async condition every 25 ms until it holds; panics with `what`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if f().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn now_ms() -> i64 {
    presenced::time::Timestamp::now().0
}

pub mod watch;
