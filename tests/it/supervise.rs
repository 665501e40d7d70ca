//! Supervised components, against the real binary and real servers: a
//! source that cannot start stops the daemon before READY and names
//! itself; a source link down past `health.source_grace` makes `/healthz`
//! and `presenced status` say degraded, and both recover by themselves.

use crate::common;
use crate::support;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
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

fn health(http: SocketAddr) -> Option<(u16, serde_json::Value)> {
    let (code, body) = support::http_get(http, "/healthz")?;
    Some((code, serde_json::from_str(&body).ok()?))
}

fn status(config: &std::path::Path) -> (i32, serde_json::Value, String) {
    let out = support::daemon::run_presenced(
        &["status", "--json", "--config", config.to_str().unwrap()],
        &[],
    );
    let json = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_mqtt_password_file_stops_the_daemon_before_ready_and_names_why() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    // A credential the unit was meant to hand over and did not: the
    // config names it under $CREDENTIALS_DIRECTORY, which is unset here.
    // The file check at load leaves such paths to the start (check-config
    // runs at build time, where no credential exists), so it is the
    // source's start that fails, and the supervisor that must say so.
    // (A plain path that is missing is refused at load: tests/it/cli.rs.)
    let mapping = format!(
        "username = \"sensor\"\npassword_file = \"$CREDENTIALS_DIRECTORY/mqtt-password\"\n{}",
        motion_mapping(true)
    );
    let cfg = daemon_config("test", &nats.url(), broker.port, http_port, &mapping, ZONES);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, &cfg).unwrap();
    provision(&path);
    let mut d = Daemon::start_at(&path, &[]);
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let start = Instant::now();
    let status = loop {
        if let Some((code, h)) = health(http) {
            assert_ne!(code, 200, "healthy with a source that cannot start: {h:#}");
        }
        if let Some(s) = d.exit_status() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the daemon keeps running without its source; log:\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "exit status {status:?}");
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("component failed") && l.contains("source.mqtt.main"))
        .unwrap_or_else(|| panic!("no ERROR line naming the component:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("mqtt-password"), "{line}");
    assert!(line.contains("fatal=true"), "{line}");
    assert!(!log.contains("daemon: ready"), "READY was reported:\n{log}");
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("cannot carry on"))
        .unwrap_or_default();
    assert!(
        last.contains("source.mqtt.main"),
        "the exit names the source: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_link_down_past_its_grace_is_degraded_then_healthy_again() {
    let mut broker = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let cfg = format!(
        "{}\n[health]\nsource_grace = \"2s\"\n",
        daemon_config(
            "test",
            &nats.url(),
            broker.port,
            http_port,
            &motion_mapping(true),
            ZONES
        )
    );
    let mut d = Daemon::start_provisioned(&cfg, http_port);
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let config = d.config_path.clone();

    // Healthy: everything the site has is in the report.
    let (code, h) = health(http).unwrap();
    assert_eq!(code, 200, "{h:#}");
    assert_eq!(h["status"], "healthy", "{h:#}");
    assert_eq!(h["runs"], serde_json::json!(["ingest", "engine"]), "{h:#}");
    for c in ["engine", "ingest", "lease", "http", "source.mqtt.main"] {
        assert_eq!(h["components"][c]["state"], "running", "{c}: {h:#}");
    }
    assert_eq!(h["sources"][0]["name"], "main", "{h:#}");
    assert_eq!(h["sources"][0]["up"], true, "{h:#}");
    assert!(h["ingest"]["buffer_capacity"].as_u64() > Some(0), "{h:#}");
    assert!(h["engine"]["pending"].is_u64(), "{h:#}");
    assert_eq!(h["lease"]["held"], true, "{h:#}");
    assert!(
        h.get("archive").is_none(),
        "archive shown without [archive]: {h:#}"
    );
    let (code, st, err) = status(&config);
    assert_eq!(code, 0, "status of a healthy site: {st:#} {err}");
    assert_eq!(st["zones"]["configured"], 1, "{st:#}");

    // A reading: the source's count and age move.
    let mut p = Publisher::connect(broker.port, "supervise-pub").await;
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "the source's last reading shows",
        Duration::from_secs(10),
        || async {
            health(http).is_some_and(|(_, h)| {
                h["sources"][0]["readings"] == 1 && h["sources"][0]["last_reading_seconds"].is_f64()
            })
        },
    )
    .await;

    // The broker goes away: within the grace nothing changes, past it the
    // daemon is degraded and says which source.
    broker.stop();
    let down_at = Instant::now();
    let mut seen = None;
    while down_at.elapsed() < Duration::from_secs(15) {
        if let Some((503, h)) = health(http) {
            seen = Some(h);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let h = seen.unwrap_or_else(|| panic!("never degraded; log:\n{}", d.log_tail()));
    assert!(
        down_at.elapsed() >= Duration::from_secs(2),
        "degraded before the grace ran out: {h:#}"
    );
    assert_eq!(h["status"], "degraded", "{h:#}");
    let causes = h["causes"].to_string();
    assert!(causes.contains("source main (mqtt) link down"), "{h:#}");
    assert_eq!(h["sources"][0]["up"], false, "{h:#}");
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    assert!(
        metrics.contains("presenced_source_up{source=\"main\"} 0"),
        "{metrics}"
    );
    let (code, st, err) = status(&config);
    assert_eq!(code, 1, "status of a degraded site: {st:#} {err}");

    // Back by itself.
    broker.restart();
    d.wait_healthy(http, Duration::from_secs(20));
    assert!(d.is_running());

    // The daemon gone: status says the site is down.
    assert!(d.terminate().success());
    let (code, st, err) = status(&config);
    assert_eq!(code, 2, "status with the daemon stopped: {st:#} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_component_that_fails_leaves_the_pipeline_running_degraded() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    // An ingest-only instance with Home Assistant output; KV presence is
    // gone, so the output cannot start (not a problem of its own files:
    // it is not fatal).
    let cfg = format!(
        "runs = [\"ingest\"]\n{}\n[homeassistant]\nhost = \"127.0.0.1\"\nport = {}\n",
        daemon_config(
            "test",
            &nats.url(),
            broker.port,
            http_port,
            &motion_mapping(true),
            ""
        ),
        broker.port
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, &cfg).unwrap();
    provision(&path);
    let js = jetstream(&nats.url()).await;
    js.delete_key_value("presence").await.unwrap();
    let mut d = Daemon::start_at(&path, &[]);
    let mut last = None;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Some((code, h)) = health(http) {
            if h["components"]["homeassistant"]["state"] == "failed" && h["ready"] == true {
                last = Some((code, h));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, h) =
        last.unwrap_or_else(|| panic!("no failed homeassistant; log:\n{}", d.log_tail()));
    assert_eq!(code, 503, "{h:#}");
    assert_eq!(h["status"], "degraded", "{h:#}");
    assert!(
        h["causes"]
            .to_string()
            .contains("component homeassistant failed"),
        "{h:#}"
    );
    assert_eq!(
        h["components"]["homeassistant"]["essential"], false,
        "{h:#}"
    );
    assert!(
        d.log().contains("carrying on without it"),
        "{}",
        d.log_tail()
    );
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    assert!(
        metrics.contains("presenced_component_up{component=\"homeassistant\"} 0")
            && metrics
                .contains("presenced_component_failures_total{component=\"homeassistant\"} 1"),
        "{metrics}"
    );

    // The pipeline still works: a reading is stored.
    let mut p = Publisher::connect(broker.port, "optional-pub").await;
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually("the reading stored", Duration::from_secs(10), || async {
        stream_messages(&js, "SENSORS").await == 1
    })
    .await;
    assert!(d.is_running());
    assert!(d.terminate().success());
}

#[test]
fn ready_waits_for_a_sources_first_connection_at_most_source_start_wait() {
    let mut broker = Mosquitto::start();
    broker.stop();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let cfg = format!(
        "{}\n[health]\nsource_start_wait = \"3s\"\n",
        daemon_config(
            "test",
            &nats.url(),
            broker.port,
            http_port,
            &motion_mapping(true),
            ZONES
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, &cfg).unwrap();
    provision(&path);
    let d = Daemon::start_at(&path, &[]);
    let start = Instant::now();
    // Not ready while the source has neither connected nor waited out
    // source_start_wait (the engine is ready within a second here).
    let mut first_200 = None;
    while start.elapsed() < Duration::from_secs(20) {
        if let Some((200, h)) = health(http) {
            first_200 = Some((start.elapsed(), h));
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let (at, h) = first_200.unwrap_or_else(|| panic!("never ready; log:\n{}", d.log_tail()));
    assert!(at >= Duration::from_secs(3), "ready after {at:?}: {h:#}");
    // Ready, healthy within the grace, and the link shown down.
    assert_eq!(h["status"], "healthy", "{h:#}");
    assert_eq!(h["sources"][0]["up"], false, "{h:#}");
    assert_eq!(
        h["components"]["source.mqtt.main"]["state"], "running",
        "{h:#}"
    );

    // The broker comes: the link goes up by itself.
    broker.restart();
    let start = Instant::now();
    while health(http).is_none_or(|(_, h)| h["sources"][0]["up"] != true) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "link never up; log:\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
