//! Every file in examples/ works as deployed: the real servers it needs
//! (nats-server as the site's leaf, Mosquitto or the leaf's own MQTT
//! listener, ptys for serial devices, SeaweedFS for the archive), the file
//! with only its ports and paths rewritten, `presenced provision`, the
//! daemon, then one reading of every sensor an entry of KV `presence`
//! uses, and each of those readings must show up in that entry's evidence.
//!
//! `every_example_has_a_test` fails when a new example has no test here.

use crate::common;
use crate::support;

use async_nats::jetstream;
use common::{eventually, jetstream, Publisher};
use presenced::config::Config;
use presenced::engine::ZoneState;
use presenced::sources::ld2410::{report_frame, Report, TargetState};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use support::daemon::run_presenced;
use support::pty::{self, Pty};
use support::{Daemon, Mosquitto, NatsOptions, NatsServer, Seaweed};
use toml::{Table, Value};

/// The examples this file tests, by file stem.
const COVERED: &[&str] = &[
    "archive",
    "demo",
    "espresense",
    "ld2410",
    "minimal",
    "sandbox",
    "zigbee2mqtt",
];

const DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn every_example_has_a_test() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(
        found, COVERED,
        "each file in examples/ needs a test in tests/it/examples.rs (and COVERED lists it)"
    );
}

fn example(name: &str) -> Table {
    let path = format!("{}/examples/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    toml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The table at `path`, created if absent (only `[http]` can be).
fn table<'t>(doc: &'t mut Table, path: &[&str]) -> &'t mut Table {
    let mut t = doc;
    for key in path {
        t = t
            .entry(key.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("{key} is not a table"));
    }
    t
}

/// The example as the test runs it: the leaf's URL and a free HTTP port.
/// Everything else is rewritten by the caller, ports and paths only.
struct Deployed {
    doc: Table,
    http: SocketAddr,
    dir: tempfile::TempDir,
}

impl Deployed {
    fn new(name: &str, nats: &NatsServer) -> Deployed {
        let mut doc = example(name);
        table(&mut doc, &["nats"]).insert("url".into(), Value::String(nats.url()));
        let port = support::free_port();
        table(&mut doc, &["http"])
            .insert("listen".into(), Value::String(format!("127.0.0.1:{port}")));
        Deployed {
            doc,
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Points every `[mqtt.<name>]` (and Home Assistant's broker) at `port`.
    fn mqtt_port(&mut self, port: u16) {
        let names: Vec<String> = self
            .doc
            .get("mqtt")
            .and_then(Value::as_table)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        for n in names {
            table(&mut self.doc, &["mqtt", &n]).insert("port".into(), Value::Integer(port.into()));
        }
        if self.doc.contains_key("homeassistant") {
            table(&mut self.doc, &["homeassistant"])
                .insert("port".into(), Value::Integer(port.into()));
        }
    }

    /// Writes the file, provisions the leaf with the real CLI and starts
    /// the daemon on it; returns it once `/healthz` answers 200.
    fn start(&self, env: &[(&str, &str)]) -> (Daemon, Config) {
        let text = toml::to_string(&self.doc).unwrap();
        let path = self.dir.path().join("presenced.toml");
        std::fs::write(&path, &text).unwrap();
        let out = run_presenced(&["check-config", path.to_str().unwrap()], env);
        assert!(
            out.status.success(),
            "check-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run_presenced(&["provision", "--config", path.to_str().unwrap()], env);
        assert!(
            out.status.success(),
            "provision: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let daemon = Daemon::start_at(&path, env);
        daemon.wait_healthy(self.http, DEADLINE);
        (daemon, Config::from_toml(&text, &path).unwrap())
    }
}

fn leaf(site: &str, mqtt: bool) -> NatsServer {
    NatsServer::start(NatsOptions {
        domain: Some(format!("leaf-{site}")),
        mqtt,
        server_name: mqtt.then(|| format!("leaf-{site}")),
        ..Default::default()
    })
}

/// Every (KV key, sensor) pair the config's presence entries use.
fn expected(config: &Config) -> Vec<(String, String)> {
    config
        .presence_entries()
        .flat_map(|(key, z)| {
            z.evidence
                .iter()
                .map(move |r| (key.clone(), r.sensor.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn zone(js: &jetstream::Context, key: &str) -> Option<ZoneState> {
    let kv = js.get_key_value("presence").await.ok()?;
    let v = kv.get(key).await.ok()??;
    serde_json::from_slice(&v).ok()
}

/// Which of `wanted` have not yet had a reading applied in KV `presence`.
async fn missing(js: &jetstream::Context, wanted: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (key, sensor) in wanted {
        let seen = zone(js, key).await.is_some_and(|z| {
            z.evidence
                .iter()
                .any(|e| &e.sensor == sensor && e.observed_at.is_some())
        });
        if !seen {
            out.push(format!("{key}/{sensor}"));
        }
    }
    out
}

/// Sends one reading of every sensor (`mqtt` through the publisher, then
/// `serial`) until every entry shows every one of its sensors' readings:
/// the first rounds may come before the sources subscribed or opened their
/// devices.
async fn each_reading_reaches_presence(
    js: &jetstream::Context,
    config: &Config,
    daemon: &Daemon,
    mut publisher: Option<&mut Publisher>,
    mqtt: &[(String, String)],
    mut serial: impl FnMut(),
) {
    let wanted = expected(config);
    assert!(!wanted.is_empty());
    let start = std::time::Instant::now();
    loop {
        if let Some(p) = publisher.as_deref_mut() {
            for (topic, payload) in mqtt {
                p.publish(topic, payload.as_bytes()).await;
            }
        }
        serial();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left = missing(js, &wanted).await;
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no reading applied for {left:?}; daemon log tail:\n{}",
            daemon.log_tail()
        );
    }
}

fn metric(http: SocketAddr, name: &str) -> u64 {
    let (_, text) = support::http_get(http, "/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// An example read from one Mosquitto: `readings` are (topic, payload).
async fn mqtt_example(name: &str, readings: &[(&str, &str)]) -> (Daemon, SocketAddr) {
    let site = example(name)["site"].as_str().unwrap().to_owned();
    let nats = leaf(&site, false);
    let broker = Mosquitto::start();
    let mut d = Deployed::new(name, &nats);
    d.mqtt_port(broker.port);
    let (daemon, config) = d.start(&[]);
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(broker.port, &format!("{name}-devices")).await;
    let readings: Vec<(String, String)> = readings
        .iter()
        .map(|(t, m)| (t.to_string(), m.to_string()))
        .collect();
    each_reading_reaches_presence(&js, &config, &daemon, Some(&mut p), &readings, || {}).await;
    assert!(metric(d.http, "presenced_observations_received_total") >= readings.len() as u64);
    (daemon, d.http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal() {
    mqtt_example("minimal", &[("home/hall/pir", "ON")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo() {
    mqtt_example(
        "demo",
        &[
            ("demo/hall/motion", r#"{"occupancy":true}"#),
            ("demo/kitchen/motion", r#"{"occupancy":true}"#),
        ],
    )
    .await;
}

/// One subscription, several mappings: `kitchen_motion` carries occupancy
/// and illuminance in one payload, and both reach the kitchen zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zigbee2mqtt() {
    mqtt_example(
        "zigbee2mqtt",
        &[
            (
                "zigbee2mqtt/hallway_motion",
                r#"{"battery":97,"occupancy":true,"linkquality":120}"#,
            ),
            (
                "zigbee2mqtt/Front Door",
                r#"{"battery":91,"contact":false,"voltage":3005}"#,
            ),
            (
                "zigbee2mqtt/kitchen_motion",
                r#"{"occupancy":true,"illuminance":64,"illuminance_lux":64}"#,
            ),
            ("zigbee2mqtt/office_motion", r#"{"occupancy":true}"#),
            ("zigbee2mqtt/office_door", r#"{"contact":true}"#),
            ("zigbee2mqtt/office/desk_lux", r#"{"illuminance":240}"#),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn espresense() {
    let report = r#"{"id":"x","distance":1.2,"rssi":-70}"#;
    let (daemon, http) = mqtt_example(
        "espresense",
        &[
            (
                "espresense/devices/irk:0123456789abcdef0123456789abcdef/office",
                report,
            ),
            ("espresense/devices/phone:bob/office", report),
        ],
    )
    .await;
    // Home Assistant output runs against the same broker.
    daemon.wait_for_log("homeassistant: publishing discovery", DEADLINE);
    eventually("the source reports its link up", DEADLINE, || async move {
        metric(http, "presenced_mqtt_connected") == 1
    })
    .await;
}

/// The sandbox's site config reads the leaf nats-server's own MQTT
/// listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox() {
    let nats = leaf("sandbox", true);
    let mqtt_port = nats.mqtt_port.expect("the leaf serves MQTT");
    let mut d = Deployed::new("sandbox", &nats);
    d.mqtt_port(mqtt_port);
    let (daemon, config) = d.start(&[]);
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(mqtt_port, "sandbox-devices").await;
    let mut readings = Vec::new();
    for room in ["hall", "kitchen", "living", "office"] {
        for (kind, payload) in [
            ("motion", r#"{"occupancy":true}"#),
            ("door", r#"{"contact":false}"#),
            ("light", r#"{"illuminance":300}"#),
        ] {
            readings.push((format!("sandbox/{room}/{kind}"), payload.to_owned()));
        }
    }
    each_reading_reaches_presence(&js, &config, &daemon, Some(&mut p), &readings, || {}).await;
}

/// Both serial devices of the example, as ptys behind the example's
/// by-id paths moved into a temp dir: an LD2410 radar and a JSON-lines
/// microcontroller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ld2410() {
    let nats = leaf("home", false);
    let mut d = Deployed::new("ld2410", &nats);
    let radar = Pty::open();
    let mcu = Pty::open();
    let links = d.dir.path().join("by-id");
    std::fs::create_dir_all(&links).unwrap();
    for (source, pty) in [("living_radar", &radar), ("study_mcu", &mcu)] {
        let t = table(&mut d.doc, &["serial", source]);
        let original = PathBuf::from(t["device"].as_str().unwrap());
        let link = links.join(original.file_name().unwrap());
        pty.link_at(&link);
        t.insert(
            "device".into(),
            Value::String(link.to_string_lossy().into_owned()),
        );
    }
    let (daemon, config) = d.start(&[]);
    let js = jetstream(&nats.url()).await;
    let frame = report_frame(&Report {
        engineering: false,
        target: TargetState::Moving,
        moving_distance: 120,
        moving_energy: 60,
        still_distance: 0,
        still_energy: 0,
        detection_distance: 120,
        extra: vec![],
    });
    let mut radar_out = radar.master();
    let mut mcu_out = mcu.master();
    each_reading_reaches_presence(&js, &config, &daemon, None, &[], || {
        pty::send(&mut radar_out, &frame);
        pty::send(
            &mut mcu_out,
            b"{\"sensor\":\"study_pir\",\"value\":true}\n{\"sensor\":\"study_lux\",\"value\":212.5}\n",
        );
    })
    .await;
    let http = d.http;
    eventually("both devices report open", DEADLINE, || async move {
        metric(http, "presenced_serial_connected") == 2
    })
    .await;
}

/// The archive example with SeaweedFS standing in for Wasabi: the
/// endpoint becomes the local one (path-style, as a loopback address
/// cannot be a virtual host) and the key files are systemd credentials, as
/// the example names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive() {
    let nats = leaf("home", false);
    let broker = Mosquitto::start();
    let s3 = Seaweed::start();
    let mut d = Deployed::new("archive", &nats);
    d.mqtt_port(broker.port);
    let creds = d.dir.path().join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("s3-access-key-id"), &s3.access_key).unwrap();
    std::fs::write(creds.join("s3-secret-access-key"), &s3.secret_key).unwrap();
    let t = table(&mut d.doc, &["archive", "s3"]);
    t.insert("endpoint".into(), Value::String(s3.endpoint()));
    t.insert("path_style".into(), Value::Boolean(true));
    let creds_dir = creds.to_string_lossy().into_owned();
    let (daemon, config) = d.start(&[("CREDENTIALS_DIRECTORY", creds_dir.as_str())]);
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(broker.port, "archive-devices").await;
    let readings = [("home/hall/pir".to_owned(), "ON".to_owned())];
    each_reading_reaches_presence(&js, &config, &daemon, Some(&mut p), &readings, || {}).await;
    let http = d.http;
    eventually("a snapshot uploaded to S3", DEADLINE, || async move {
        metric(http, "presenced_archive_uploads_total") >= 1
    })
    .await;
}
