//! The test harness itself, against the real servers: if these fail, no
//! other integration test's result means anything.

use crate::support;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::TcpListener;
use std::time::{Duration, Instant};
use support::http::parse_response;
use support::{
    check_nats_version, http_get, parse_nats_version, wait_until, Mosquitto, NatsOptions,
    NatsServer,
};

const DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn parses_nats_server_versions() {
    assert_eq!(parse_nats_version("nats-server: v2.15.1"), Some((2, 15, 1)));
    assert_eq!(
        parse_nats_version("nats-server: v2.9.25\n"),
        Some((2, 9, 25))
    );
    assert_eq!(
        parse_nats_version("nats-server: v2.12.0-RC.3"),
        Some((2, 12, 0))
    );
    assert_eq!(parse_nats_version("nats-server: version unknown"), None);
}

#[test]
fn rejects_nats_server_below_2_11() {
    let error = check_nats_version("nats-server: v2.9.25").unwrap_err();
    assert!(
        error.contains("2.9.25"),
        "message names the version: {error}"
    );
    assert!(
        error.contains("setup.sh"),
        "message says what to do: {error}"
    );
    assert!(check_nats_version("nats-server: v2.10.29").is_err());
    assert_eq!(check_nats_version("nats-server: v2.11.0"), Ok((2, 11, 0)));
    assert_eq!(check_nats_version("nats-server: v2.15.1"), Ok((2, 15, 1)));
    assert!(check_nats_version("no version here").is_err());
}

#[test]
fn installed_nats_server_is_accepted() {
    let bin = support::nats_server_bin();
    let output = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(check_nats_version(&text).is_ok(), "{text}");
}

#[test]
fn parses_http_responses() {
    let raw = "HTTP/1.0 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno";
    assert_eq!(parse_response(raw), Some((503, "no".to_string())));
    assert_eq!(parse_response("INFO {}\r\n"), None);
}

#[test]
fn free_port_can_be_bound() {
    let port = support::free_port();
    assert_ne!(port, 0);
    TcpListener::bind(("127.0.0.1", port)).unwrap();
}

#[test]
#[should_panic(expected = "waiting until the impossible happens")]
fn wait_until_panics_with_what_on_timeout() {
    wait_until("the impossible happens", Duration::from_millis(100), || {
        false
    });
}

#[test]
fn wait_until_returns_once_condition_holds() {
    let start = Instant::now();
    let mut calls = 0;
    wait_until("third call", DEADLINE, || {
        calls += 1;
        calls == 3
    });
    assert_eq!(calls, 3);
    assert!(start.elapsed() < DEADLINE);
}

#[tokio::test]
async fn nats_server_runs_jetstream_in_the_given_domain() {
    let server = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        ..Default::default()
    });
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::with_domain(client, "leaf-test");
    let account = js.query_account().await.unwrap();
    assert_eq!(account.domain.as_deref(), Some("leaf-test"));

    let (status, body) = http_get(server.monitor_addr(), "/jsz").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"domain\": \"leaf-test\""), "{body}");
}

#[tokio::test]
async fn nats_sync_always_is_configured() {
    let server = NatsServer::start(NatsOptions {
        sync_always: true,
        ..Default::default()
    });
    let config = std::fs::read_to_string(server.config_path()).unwrap();
    assert!(config.contains("sync_interval: always"), "{config}");
    let (status, body) = http_get(server.monitor_addr(), "/varz").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"sync_always\": true"), "{body}");
}

#[tokio::test]
async fn nats_restart_keeps_port_and_jetstream_data() {
    let mut server = NatsServer::start(NatsOptions::default());
    let port = server.port;
    {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "KEEP".into(),
            subjects: vec!["keep.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish("keep.one", "1".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    server.restart();
    assert_eq!(server.port, port);
    assert!(server.is_running());

    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("KEEP").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 1);
    assert!(server.log().contains("Server is ready"));
}

#[tokio::test]
async fn nats_kill_and_restart_after_crash() {
    let mut server = NatsServer::start(NatsOptions::default());
    server.kill();
    assert!(!server.is_running());
    assert!(async_nats::connect(server.url()).await.is_err());
    server.restart();
    async_nats::connect(server.url()).await.unwrap();
}

#[tokio::test]
async fn nats_mqtt_listener_acks_qos1_publish() {
    let server = NatsServer::start(NatsOptions {
        mqtt: true,
        ..Default::default()
    });
    let port = server.mqtt_port.expect("mqtt port");
    let mut options = MqttOptions::new("harness-nats-mqtt", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .publish("harness/mqtt", QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    let acked = tokio::time::timeout(DEADLINE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(error) => panic!("mqtt connection to nats-server failed: {error}"),
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "no PubAck; log:\n{}", server.log());
}

/// nats-server binds its client, monitoring, MQTT and leafnode ports
/// itself (port -1), so no other test can take one between a pick and
/// the bind; the harness reads them back, and a restart keeps them.
#[tokio::test]
async fn nats_server_picks_its_own_ports_and_keeps_them_on_restart() {
    let mut server = NatsServer::start(NatsOptions {
        domain: Some("hub".into()),
        mqtt: false,
        leafnode_listen: true,
        ..Default::default()
    });
    let mut leaf = NatsServer::start(NatsOptions {
        mqtt: true,
        ..Default::default()
    });
    let first = std::fs::read_to_string(leaf.config_path()).unwrap();
    assert!(
        !first.contains(":-1"),
        "the config names the ports chosen:\n{first}"
    );
    for port in [
        server.port,
        server.monitor_port,
        server.leafnode_port.unwrap(),
        leaf.port,
        leaf.monitor_port,
        leaf.mqtt_port.unwrap(),
    ] {
        assert_ne!(port, 0);
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "nothing listens on {port}"
        );
    }
    let varz = |s: &NatsServer| http_get(s.monitor_addr(), "/varz").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(&varz(&leaf)).unwrap();
    assert_eq!(v["port"].as_u64(), Some(u64::from(leaf.port)));
    assert_eq!(v["mqtt"]["port"].as_u64(), leaf.mqtt_port.map(u64::from));
    let v: serde_json::Value = serde_json::from_str(&varz(&server)).unwrap();
    assert_eq!(
        v["leaf"]["port"].as_u64(),
        server.leafnode_port.map(u64::from)
    );
    let before = (leaf.port, leaf.monitor_port, leaf.mqtt_port);
    leaf.restart();
    assert_eq!((leaf.port, leaf.monitor_port, leaf.mqtt_port), before);
    let v: serde_json::Value = serde_json::from_str(&varz(&leaf)).unwrap();
    assert_eq!(v["mqtt"]["port"].as_u64(), leaf.mqtt_port.map(u64::from));
    server.stop();
}

#[tokio::test]
async fn leaf_connects_to_hub() {
    let hub = NatsServer::start(NatsOptions {
        domain: Some("hub".into()),
        leafnode_listen: true,
        ..Default::default()
    });
    let leaf = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        leaf_remotes: vec![hub.leafnode_url().unwrap()],
        ..Default::default()
    });
    wait_until("the hub lists one leafnode", DEADLINE, || {
        http_get(hub.monitor_addr(), "/leafz")
            .map(|(_, body)| body.contains("\"leafnodes\": 1"))
            .unwrap_or(false)
    });
    let client = async_nats::connect(leaf.url()).await.unwrap();
    let hub_js = async_nats::jetstream::with_domain(client, "hub");
    let account = hub_js.query_account().await.unwrap();
    assert_eq!(account.domain.as_deref(), Some("hub"));
}

/// Subscribes, publishes one QoS 1 message and waits for it to come back.
async fn mqtt_round_trip(port: u16, client_id: &str, topic: &str) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let received = tokio::time::timeout(DEADLINE, async {
        let mut puback = false;
        let mut message = None;
        loop {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) => {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, "round trip")
                        .await
                        .unwrap();
                }
                Event::Incoming(Packet::PubAck(_)) => puback = true,
                Event::Incoming(Packet::Publish(publish)) => {
                    message = Some(publish.payload.to_vec())
                }
                _ => {}
            }
            if puback && message.is_some() {
                return message;
            }
        }
    })
    .await
    .expect("round trip within the deadline");
    assert_eq!(received.as_deref(), Some(&b"round trip"[..]));
}

#[tokio::test]
async fn mosquitto_round_trip_and_restart_on_same_port() {
    let mut broker = Mosquitto::start();
    let port = broker.port;
    mqtt_round_trip(port, "harness-mosq-1", "harness/one").await;

    broker.restart();
    assert_eq!(broker.port, port);
    assert!(broker.is_running());
    mqtt_round_trip(port, "harness-mosq-2", "harness/two").await;
    let log = broker.log();
    assert!(log.matches("running").count() >= 2, "{log}");
}

#[test]
fn mosquitto_extra_config_replaces_a_default() {
    let mut broker = Mosquitto::start_with("max_queued_messages 1000");
    let config = std::fs::read_to_string(broker.config_path()).unwrap();
    let queue_lines: Vec<&str> = config
        .lines()
        .filter(|line| line.starts_with("max_queued_messages"))
        .collect();
    assert_eq!(queue_lines, ["max_queued_messages 1000"], "{config}");
    assert!(broker.is_running());

    broker.stop();
    assert!(!broker.is_running());
    assert!(
        std::net::TcpStream::connect(broker.addr()).is_err(),
        "port still open after stop"
    );
}

#[test]
fn mosquitto_default_config_never_drops_queued_messages() {
    let broker = Mosquitto::start();
    let config = std::fs::read_to_string(broker.config_path()).unwrap();
    assert!(config.contains("max_queued_messages 0\n"), "{config}");
    assert!(config.contains("persistence false\n"), "{config}");
}

/// Holds a port from the range the harness picks from and hands it to
/// Mosquitto as its first choice: Mosquitto cannot take it, says so and
/// exits, and the harness starts it on a fresh port that carries MQTT.
/// (A bare connect to the held port would succeed: readiness must come
/// from the broker itself.)
#[tokio::test]
async fn mosquitto_starts_on_a_fresh_port_when_the_one_picked_is_taken() {
    let held = TcpListener::bind(("127.0.0.1", support::free_port())).unwrap();
    let taken = held.local_addr().unwrap().port();
    let broker = Mosquitto::start_first_on("", Some(taken));
    assert_ne!(broker.port, taken);
    let log = broker.log();
    assert!(log.contains("Address already in use"), "{log}");
    assert!(
        log.contains(&format!("listen socket on port {taken}")),
        "{log}"
    );
    mqtt_round_trip(broker.port, "harness-mosq-taken", "harness/taken").await;
    drop(held);
}

/// The same for SeaweedFS: its S3 port held, it exits on `address already
/// in use` and starts again on fresh ports, answering signed S3 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaweedfs_starts_on_fresh_ports_when_the_s3_port_picked_is_taken() {
    use object_store::ObjectStore as _;
    let held = TcpListener::bind(("127.0.0.1", support::free_port())).unwrap();
    let taken = held.local_addr().unwrap().port();
    let sw = support::Seaweed::start_first_on(Some(taken));
    assert_ne!(sw.s3_port, taken);
    let log = sw.log();
    assert!(
        log.contains(&format!("127.0.0.1:{taken}: bind: address already in use")),
        "{log}"
    );
    let s3 = crate::archive::s3_ready(&sw).await;
    let key = object_store::path::Path::from("after-a-taken-port");
    s3.put(&key, object_store::PutPayload::from_static(b"ok"))
        .await
        .unwrap();
    let body = s3.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(&body[..], b"ok");
    drop(held);
}

/// The hub's route ports are picked ahead (each node lists its peers'):
/// with one held, its node exits on `address already in use`, and the
/// harness starts the whole cluster again on fresh route ports, which
/// then runs replicated JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_starts_again_on_fresh_route_ports_when_one_picked_is_taken() {
    let held = TcpListener::bind(("127.0.0.1", support::free_port())).unwrap();
    let taken = held.local_addr().unwrap().port();
    let hub = support::Hub::start_first_on(3, "", Some(taken));
    let why = &hub.restarted_because;
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(
        why[0].contains("address already in use") && why[0].contains(&taken.to_string()),
        "{why:?}"
    );
    for node in &hub.nodes {
        let (_, body) = support::http_get(node.monitor_addr(), "/varz").unwrap();
        let varz: serde_json::Value = serde_json::from_str(&body).unwrap();
        let port = varz["cluster"]["cluster_port"].as_u64();
        assert!(port.is_some_and(|p| p != u64::from(taken)), "{varz}");
    }
    let js = async_nats::jetstream::new(async_nats::connect(hub.nodes[0].url()).await.unwrap());
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "R3".into(),
            subjects: vec!["r3.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("an R3 stream on the restarted cluster");
    assert_eq!(stream.cached_info().config.num_replicas, 3);
    drop(held);
}
