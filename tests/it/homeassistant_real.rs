//! presenced's discovery against a real Home Assistant Core (installed
//! from PyPI by `scripts/setup-ha.sh`, which `scripts/setup.sh` runs, into
//! the tools cache outside the checkout): the entity ids Home Assistant
//! gives the zones and persons are the documented ones, and their state,
//! attributes and availability follow the daemon.
//!
//! Part of the one test build and run (`scripts/test.sh`); the install is
//! made once per machine and kept. `scripts/test-ha.sh` runs this file
//! alone.

use crate::common;
use crate::support;

use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

[persons.alice]
occupied_above = 0.6
arrive_after = "0s"
leave_after = "0s"
[[persons.alice.evidence]]
sensor = "alice_phone"
p_true = 0.95
p_false = 0.05
"#;

type Entities = BTreeMap<String, serde_json::Value>;

/// Home Assistant in a child process, with the latest view it reported.
struct HomeAssistant {
    child: Child,
    latest: Arc<Mutex<Option<Entities>>>,
    _dir: tempfile::TempDir,
}

impl HomeAssistant {
    fn start(mqtt_port: u16) -> HomeAssistant {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        // scripts/env.sh names the interpreter of the Home Assistant that
        // scripts/setup.sh installs into the tools cache.
        let python = std::env::var_os("PRESENCED_HA_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                    });
                cache.join("presenced/tools/ha/bin/python")
            });
        assert!(
            python.exists(),
            "{} missing: run scripts/setup.sh (it installs Home Assistant Core) and source scripts/env.sh",
            python.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(python)
            .arg(root.join("tests/ha/ha_watch.py"))
            .arg(dir.path())
            .arg(mqtt_port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Home Assistant");
        let latest: Arc<Mutex<Option<Entities>>> = Arc::default();
        let l = latest.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(e) = v.get("entities").and_then(|e| e.as_object()) {
                    *l.lock().unwrap() = Some(e.clone().into_iter().collect());
                }
            }
        });
        HomeAssistant {
            child,
            latest,
            _dir: dir,
        }
    }

    fn entities(&self) -> Entities {
        self.latest.lock().unwrap().clone().unwrap_or_default()
    }

    fn state(&self, entity: &str) -> Option<String> {
        self.entities()
            .get(entity)
            .and_then(|e| e["state"].as_str().map(str::to_owned))
    }

    /// Waits until `done` holds for what Home Assistant shows.
    fn wait(&self, what: &str, deadline: Duration, done: impl Fn(&Entities) -> bool) {
        let end = std::time::Instant::now() + deadline;
        loop {
            let e = self.entities();
            if done(&e) {
                return;
            }
            assert!(
                std::time::Instant::now() < end,
                "timed out after {deadline:?} waiting until {what}; Home Assistant shows {e:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for HomeAssistant {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ENTITIES: [(&str, &str); 4] = [
    (
        "binary_sensor.lab_occupancy",
        "presenced_test_lab_occupancy",
    ),
    ("sensor.lab_confidence", "presenced_test_lab_confidence"),
    (
        "binary_sensor.person_alice_occupancy",
        "presenced_test_person_alice_occupancy",
    ),
    (
        "sensor.person_alice_confidence",
        "presenced_test_person_alice_confidence",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_shows_the_documented_entities_and_follows_them() {
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
    let started = std::time::Instant::now();
    let home = HomeAssistant::start(mqtt.port);
    let mut d = Daemon::start_provisioned(&cfg, http_port);

    // Each entity under the documented id, with presenced's unique id,
    // available and with a state (availability and state are separate
    // messages: an entity is `unknown` between the two).
    home.wait(
        "all four entities, available and with a state",
        Duration::from_secs(120),
        |e| {
            ENTITIES.iter().all(|(id, _)| {
                e.get(*id).is_some_and(|v| {
                    v["state"]
                        .as_str()
                        .is_some_and(|s| s != "unavailable" && s != "unknown")
                })
            })
        },
    );
    eprintln!(
        "Home Assistant up with the entities after {:?}",
        started.elapsed()
    );
    let e = home.entities();
    for (id, unique) in ENTITIES {
        assert_eq!(e[id]["unique_id"], unique, "{id}");
    }
    assert_eq!(
        e.len(),
        4,
        "no entity under another id: {:?}",
        e.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        home.state("binary_sensor.lab_occupancy").as_deref(),
        Some("off")
    );
    let lab = &e["binary_sensor.lab_occupancy"]["attributes"];
    assert_eq!(lab["device_class"], "occupancy");
    let conf = &e["sensor.lab_confidence"]["attributes"];
    assert_eq!(conf["unit_of_measurement"], "%");

    // Motion in the lab, Alice's phone at home: both follow, with the
    // zone's whole state as attributes of the confidence sensor.
    let mut p = Publisher::connect(mqtt.port, "ha-real-pub").await;
    p.publish("test/lab_pir", r#"{"occupancy": true}"#).await;
    p.publish("test/alice_phone", r#"{"occupancy": true}"#)
        .await;
    p.flush(Duration::from_secs(5)).await;
    let t = std::time::Instant::now();
    home.wait("lab and alice occupied", Duration::from_secs(20), |e| {
        e.get("binary_sensor.lab_occupancy")
            .is_some_and(|v| v["state"] == "on")
            && e.get("binary_sensor.person_alice_occupancy")
                .is_some_and(|v| v["state"] == "on")
            && e.get("sensor.lab_confidence")
                .is_some_and(|v| v["attributes"]["presence"] == "occupied")
    });
    eprintln!(
        "occupied in Home Assistant {:?} after the reading",
        t.elapsed()
    );
    let e = home.entities();
    let confidence: f64 = e["sensor.lab_confidence"]["state"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(confidence > 60.0 && confidence <= 100.0, "{confidence}");
    let attrs = &e["sensor.lab_confidence"]["attributes"];
    assert_eq!(attrs["occupancy"], "ON");
    assert!(attrs["since"].as_str().is_some(), "{attrs}");
    assert_eq!(
        e["sensor.person_alice_confidence"]["attributes"]["presence"],
        "occupied"
    );
    // Home Assistant drops a `state` attribute (reserved): the reason the
    // payload carries `presence` too.
    assert!(attrs.get("state").is_none(), "{attrs}");

    // The daemon dies: the broker's will makes every entity unavailable.
    d.kill9();
    home.wait("every entity unavailable", Duration::from_secs(30), |e| {
        ENTITIES
            .iter()
            .all(|(id, _)| e.get(*id).is_some_and(|v| v["state"] == "unavailable"))
    });
    // Back: available again, with the state KV still holds.
    d.restart();
    home.wait("available again", Duration::from_secs(30), |e| {
        e.get("binary_sensor.lab_occupancy")
            .is_some_and(|v| v["state"] == "on")
    });
    assert!(d.terminate().success());
    home.wait(
        "unavailable on a clean stop",
        Duration::from_secs(30),
        |e| {
            ENTITIES
                .iter()
                .all(|(id, _)| e.get(*id).is_some_and(|v| v["state"] == "unavailable"))
        },
    );
    let _ = std::io::stderr().flush();
}
