//! Leases and staleness through the real binary and a real nats-server:
//! the lease value, stale at once after a graceful stop, stale within the
//! TTL (+1 s) after a SIGKILL, cleared by a restart; seen both by `get`
//! and by a running `watch`.

use crate::common;
use crate::support;

use common::watch::Watch;
use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

const TTL: Duration = Duration::from_secs(3);

const ZONES: &str = r#"
[lease]
ttl = "3s"

[zones.hall]
arrive_after = "0s"
leave_after = "0s"
[[zones.hall.evidence]]
sensor = "hall_pir"
p_true = 0.95
p_false = 0.05
"#;

fn get_json(config: &Path, zone: &str) -> serde_json::Value {
    let out = support::daemon::run_presenced(
        &["get", "--config", config.to_str().unwrap(), zone, "--json"],
        &[],
    );
    assert!(
        out.status.success(),
        "get failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("get --json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_at_once_on_graceful_stop_within_ttl_on_sigkill_and_cleared_by_restart() {
    let nats = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        ..Default::default()
    });
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let cfg = daemon_config(
        "test",
        &nats.url(),
        mqtt.port,
        http_port,
        &motion_mapping(false),
        ZONES,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, &cfg).unwrap();
    provision(&path);
    let mut d = Daemon::start_at(&path, &[]);
    d.wait_healthy(http, Duration::from_secs(20));

    // The lease value says who runs what.
    let js = jetstream(&nats.url()).await;
    let owners = js.get_key_value("owners").await.unwrap();
    let lease = owners
        .get("presenced")
        .await
        .unwrap()
        .expect("the daemon's lease owners.presenced");
    let lease: serde_json::Value = serde_json::from_slice(&lease).unwrap();
    assert_eq!(lease["v"], 1);
    assert_eq!(lease["service"], "presenced");
    assert_eq!(lease["components"], serde_json::json!(["ingest", "engine"]));
    assert!(
        lease["writes"]
            .as_array()
            .is_some_and(|w| w.contains(&"presence".into()) && w.contains(&"sensors".into())),
        "{lease}"
    );
    assert_eq!(lease["pid"], d.pid());
    assert!(lease["host"].as_str().is_some_and(|h| !h.is_empty()));
    for field in ["started", "renewed", "expires"] {
        assert!(lease[field].is_string(), "lease has {field}: {lease}");
    }

    let mut p = Publisher::connect(mqtt.port, "lease-pub").await;
    p.publish("test/hall_pir", r#"{"occupancy":true}"#).await;
    p.flush(Duration::from_secs(5)).await;
    eventually("hall has a state", Duration::from_secs(10), || async {
        zone(&js, "hall").await.is_some()
    })
    .await;
    let got = get_json(&path, "hall");
    assert_eq!(got["stale"], false, "owner alive: {got}");
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    assert!(metrics.contains("presenced_lease_held 1\n"), "{metrics}");

    let watch = Watch::start(&path, &["--json"]);
    watch
        .wait_json(
            "the snapshot of hall, fresh",
            Duration::from_secs(10),
            |v| v["event"] == "snapshot" && v["key"] == "hall" && v["stale"] == false,
        )
        .await;

    // Graceful stop: the lease is gone by the time the process has exited.
    let stopped = Instant::now();
    assert!(d.terminate().success(), "{}", d.log_tail());
    let got = get_json(&path, "hall");
    assert_eq!(
        got["stale"], true,
        "stale at once after a graceful stop: {got}"
    );
    assert_eq!(got["value"]["zone"], "hall", "stale is not absent: {got}");
    let (at, line) = watch
        .wait_json("hall turns stale", Duration::from_secs(5), |v| {
            v["event"] == "owner" && v["key"] == "hall" && v["stale"] == true
        })
        .await;
    assert!(
        line["value"]["zone"] == "hall",
        "the last value stays: {line}"
    );
    eprintln!(
        "graceful stop: watch saw stale {:?} after SIGTERM",
        at - stopped
    );

    // A restart clears it.
    let from = watch.json().len();
    d.restart();
    d.wait_healthy(http, Duration::from_secs(20));
    assert_eq!(
        get_json(&path, "hall")["stale"],
        false,
        "restart clears stale"
    );
    watch
        .wait_json_from(from, "hall fresh again", Duration::from_secs(10), |v| {
            v["event"] == "owner" && v["key"] == "hall" && v["stale"] == false
        })
        .await;

    // SIGKILL: nothing deletes the lease; its TTL runs out.
    let from = watch.json().len();
    d.kill9();
    let killed = Instant::now();
    let (at, _) = watch
        .wait_json_from(
            from,
            "hall stale after SIGKILL",
            TTL + Duration::from_secs(10),
            |v| v["event"] == "owner" && v["key"] == "hall" && v["stale"] == true,
        )
        .await;
    let took = at - killed;
    eprintln!("SIGKILL: watch saw stale {took:?} after the kill (TTL {TTL:?})");
    assert!(
        took <= TTL + Duration::from_secs(1),
        "stale {took:?} after SIGKILL, more than TTL + 1 s"
    );
    assert_eq!(get_json(&path, "hall")["stale"], true);

    d.restart();
    d.wait_healthy(http, Duration::from_secs(20));
    assert_eq!(
        get_json(&path, "hall")["stale"],
        false,
        "restart clears stale"
    );
}

/// The server side of the design: a lease put with `Nats-TTL` into the
/// provisioned bucket disappears with a delete marker a watcher sees,
/// within TTL + 1 s of the put (the server's expiry tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_gets_a_delete_marker_within_ttl_plus_one_second() {
    use futures::StreamExt;
    let nats = NatsServer::start(NatsOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, crate::common::client_config("test", &nats.url())).unwrap();
    provision(&path);
    let js = jetstream(&nats.url()).await;
    let owners = js.get_key_value("owners").await.unwrap();
    let mut watch = owners.watch("probe").await.unwrap();
    for round in 0..3 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-TTL", "3s");
        js.publish_with_headers("$KV.owners.probe", headers, "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let put = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.operation, async_nats::jetstream::kv::Operation::Put);
        let marker = tokio::time::timeout(TTL + Duration::from_secs(5), watch.next())
            .await
            .expect("a delete marker after the TTL")
            .unwrap()
            .unwrap();
        let took = put.elapsed();
        eprintln!("round {round}: lease with TTL {TTL:?} removed after {took:?}");
        assert_ne!(marker.operation, async_nats::jetstream::kv::Operation::Put);
        assert!(
            took >= TTL - Duration::from_millis(100) && took <= TTL + Duration::from_secs(1),
            "removed {took:?} after the put"
        );
    }
}
