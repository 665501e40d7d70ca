//! A site's leaf linked to a 3-node hub, with the real daemon writing:
//! provisioning the hub mirrors, a cut leaf link and its fast catch-up,
//! and the loss of hub nodes, each checked sequence by sequence.

use crate::common;
use crate::support;

use async_nats::jetstream;
use common::*;
use presenced::naming::{self, Site};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::daemon::run_presenced;
use support::{http_get, leaf_of, wait_until, Daemon, Hub, LinkProxies, Mosquitto, NatsServer};

const SITE: &str = "home";
const DEADLINE: Duration = Duration::from_secs(60);
/// How long the link-cut test keeps the link down. After 20 s the server's
/// own retry backoff resumes a mirror only 30-40 s after the link's return
/// (docs/PERFORMANCE.md), far beyond [`CATCH_UP_BOUND`], so the bound holds
/// only when the daemon's nudge works.
const CUT: Duration = Duration::from_secs(20);
/// How soon after the link's return the hub must hold everything the leaf
/// wrote while it was cut: about 1-2 s when idle (one poll of the daemon
/// plus the leader step-down, measured in `benches/topology.rs`); the rest
/// is slack for a loaded machine. Not a speed test: it separates "nudged"
/// from "left to the server's backoff".
const CATCH_UP_BOUND: Duration = Duration::from_secs(12);

const ZONES: &str = r#"
[zones.hall]
occupied_above = 0.6
vacant_below = 0.3
[[zones.hall.evidence]]
sensor = "hall_pir"
p_true = 0.95
p_false = 0.05
"#;

struct Topology {
    hub: Hub,
    link: LinkProxies,
    leaf: NatsServer,
    _mqtt: Mosquitto,
    daemon: Daemon,
    http: SocketAddr,
    config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn hub_args(hub: &Hub) -> String {
    hub.client_urls().join(",")
}

fn provision_hub(hub: &Hub, extra: &[&str]) -> String {
    let servers = hub_args(hub);
    let mut args = vec!["provision-hub", "--server", &servers, "--site", SITE];
    args.extend_from_slice(extra);
    let out = run_presenced(&args, &[]);
    assert!(
        out.status.success(),
        "provision-hub failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn topology() -> Topology {
    let hub = Hub::start();
    let link = hub.link_proxies();
    let site = Site::new(SITE).unwrap();
    let leaf = leaf_of(&site, link.urls());
    wait_until("the leaf is linked", DEADLINE, || hub.leafnode_count() == 1);
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    let config = daemon_config(
        SITE,
        &leaf.url(),
        mqtt.port,
        http_port,
        &motion_mapping(false),
        ZONES,
    )
        + "\n[hub]\npoll_interval = \"500ms\"\nstall_after = \"3s\"\nnudge_after = \"1s\"\n";
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("presenced.toml");
    std::fs::write(&config_path, config).unwrap();
    provision(&config_path);
    provision_hub(&hub, &[]);
    let daemon = Daemon::start_at(&config_path, &[]);
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    daemon.wait_healthy(http, Duration::from_secs(30));
    Topology {
        hub,
        link,
        leaf,
        _mqtt: mqtt,
        daemon,
        http,
        config_path,
        _dir: dir,
    }
}

/// Publishes a reading every 5 ms (alternating values, so each is a new
/// observation) until `stop`; the daemon stores each into SENSORS.
fn writer(port: u16, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut p = Publisher::connect(port, "hub-test-writer").await;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let v = if n % 2 == 0 { "true" } else { "false" };
            p.publish("test/hall_pir", format!("{{\"occupancy\":{v},\"n\":{n}}}"))
                .await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        p.flush(Duration::from_secs(20)).await;
        n
    })
}

async fn last_seq(js: &jetstream::Context, stream: &str) -> Option<u64> {
    let mut s = js.get_stream(stream).await.ok()?;
    Some(s.info().await.ok()?.state.last_sequence)
}

async fn state(js: &jetstream::Context, stream: &str) -> jetstream::stream::State {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone()
}

/// Every sequence in `from..=to` holds the same message on the hub mirror
/// as on the leaf (subject, payload, Nats-Msg-Id), and no Nats-Msg-Id
/// appears twice: each observation of the window is there exactly once.
async fn same_messages(leaf: &jetstream::Context, hub: &jetstream::Context, from: u64, to: u64) {
    let src = leaf.get_stream(naming::SENSORS_STREAM).await.unwrap();
    let dst = hub
        .get_stream(format!("{}-{SITE}", naming::SENSORS_STREAM))
        .await
        .unwrap();
    let mut ids = std::collections::HashSet::new();
    for seq in from..=to {
        let a = src
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("leaf seq {seq}: {e}"));
        let b = dst
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("hub mirror lacks seq {seq}: {e}"));
        assert_eq!(
            (&a.subject, &a.payload),
            (&b.subject, &b.payload),
            "seq {seq}"
        );
        let id = |m: &jetstream::message::StreamMessage| {
            m.headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        assert_eq!(id(&a), id(&b), "seq {seq}");
        assert!(
            ids.insert(id(&b)),
            "Nats-Msg-Id {} twice in the window",
            id(&b)
        );
    }
}

fn healthz(http: SocketAddr) -> serde_json::Value {
    http_get(http, "/healthz")
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or_default()
}

/// The state `/healthz` gives hub mirror `mirror` (`current`, `stalled`...).
fn mirror_state(health: &serde_json::Value, mirror: &str) -> Option<String> {
    health["hub"]["mirrors"]
        .as_array()?
        .iter()
        .find(|m| m["mirror"] == mirror)
        .and_then(|m| m["state"].as_str().map(str::to_owned))
}

fn metric(http: SocketAddr, line_start: &str) -> Option<u64> {
    let (_, body) = http_get(http, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_hub_is_idempotent_and_the_kv_mirror_serves_the_leafs_values() {
    let t = topology().await;
    let again = provision_hub(&t.hub, &[]);
    for name in [
        "SENSORS-home",
        "EVENTS-home",
        "presence-home",
        "owners-home",
    ] {
        assert!(
            again.contains(&format!("mirror {name}: unchanged")),
            "{again}"
        );
    }
    let scaled = provision_hub(&t.hub, &["--replicas", "1"]);
    assert!(
        scaled.contains("mirror EVENTS-home: updated (replicas 3 -> 1)"),
        "{scaled}"
    );
    let back = provision_hub(&t.hub, &[]);
    assert!(
        back.contains("mirror EVENTS-home: updated (replicas 1 -> 3)"),
        "{back}"
    );

    // The daemon writes zone hall; the hub's KV mirror serves the same
    // value at the same revision.
    let mut p = Publisher::connect(t._mqtt.port, "hub-test-kv").await;
    p.publish("test/hall_pir", r#"{"occupancy":true}"#).await;
    p.flush(Duration::from_secs(10)).await;
    let leaf_js = jetstream::new(async_nats::connect(t.leaf.url()).await.unwrap());
    let hub_js = jetstream::new(async_nats::connect(t.hub.client_urls()).await.unwrap());
    let leaf_kv = leaf_js
        .get_key_value(naming::PRESENCE_BUCKET)
        .await
        .unwrap();
    let mirror_kv = hub_js.get_key_value("presence-home").await.unwrap();
    eventually(
        "the hub mirror has the leaf's latest hall",
        DEADLINE,
        || async {
            let a = leaf_kv.entry("hall").await.ok().flatten();
            let b = mirror_kv.entry("hall").await.ok().flatten();
            matches!((a, b), (Some(a), Some(b)) if a.revision == b.revision && a.value == b.value)
        },
    )
    .await;
    let health = healthz(t.http);
    assert_eq!(health["hub"]["reachable"], true, "{health}");

    // `presenced status` reads the same through the leaf link.
    let config = t.config_path.to_str().unwrap();
    eventually("status shows every mirror current", DEADLINE, || async {
        let out = run_presenced(&["status", "--config", config, "--json"], &[]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mirrors = report["hub"].as_array().cloned().unwrap_or_default();
        out.status.success()
            && mirrors.len() == 4
            && mirrors
                .iter()
                .all(|v| v["state"] == "current" && v["lag_messages"] == 0)
    })
    .await;
    let out = run_presenced(&["status", "--config", config], &[]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("site home: healthy"), "{table}");
    assert!(
        table.contains("\nmirror ") && table.contains("presence-home"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_every_reading_of_the_window_reaches_the_hub_once_and_fast() {
    let t = topology().await;
    let leaf_js = jetstream::new(async_nats::connect(t.leaf.url()).await.unwrap());
    let hub_js = jetstream::new(async_nats::connect(t.hub.client_urls()).await.unwrap());
    let mirror = format!("{}-{SITE}", naming::SENSORS_STREAM);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(t._mqtt.port, stop.clone());

    eventually("the mirror follows the leaf", DEADLINE, || async {
        let l = last_seq(&leaf_js, naming::SENSORS_STREAM)
            .await
            .unwrap_or(0);
        l > 50 && last_seq(&hub_js, &mirror).await.unwrap_or(0) + 50 >= l
    })
    .await;
    let before = last_seq(&leaf_js, naming::SENSORS_STREAM).await.unwrap();
    t.link.cut();
    wait_until("the link is down", DEADLINE, || t.hub.leafnode_count() == 0);
    tokio::time::sleep(CUT).await;
    let during = last_seq(&hub_js, &mirror).await.unwrap();
    let written = last_seq(&leaf_js, naming::SENSORS_STREAM).await.unwrap();
    assert!(
        written > before + 100,
        "the daemon kept writing during the cut ({before} -> {written})"
    );
    assert!(during < written, "the hub could not follow during the cut");

    t.link.restore();
    let restored = Instant::now();
    eventually(
        "the hub holds everything written during the cut",
        DEADLINE,
        || async { last_seq(&hub_js, &mirror).await.unwrap_or(0) >= written },
    )
    .await;
    let caught_up = restored.elapsed();
    println!(
        "link cut {CUT:?}: hub caught up {caught_up:?} after the link's return ({} readings behind)",
        written - during
    );

    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    eventually("the mirror holds the final state", DEADLINE, || async {
        last_seq(&hub_js, &mirror).await == last_seq(&leaf_js, naming::SENSORS_STREAM).await
    })
    .await;
    same_messages(
        &leaf_js,
        &hub_js,
        before.saturating_sub(10).max(1),
        written + 10,
    )
    .await;
    let (l, h) = (
        state(&leaf_js, naming::SENSORS_STREAM).await,
        state(&hub_js, &mirror).await,
    );
    assert_eq!(
        (l.messages, l.first_sequence, l.last_sequence),
        (h.messages, h.first_sequence, h.last_sequence)
    );

    // The server sometimes resumes a mirror by itself at once; when it
    // does not, the daemon's nudge is what makes the bound hold.
    let nudges = metric(
        t.http,
        "presenced_mirror_nudges_total{mirror=\"SENSORS-home\"}",
    );
    println!("nudges of SENSORS-home: {nudges:?}");
    assert!(
        caught_up < CATCH_UP_BOUND,
        "hub caught up only {caught_up:?} after the link's return; log:\n{}",
        t.daemon.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_node_loss_one_keeps_up_two_stall_loudly_restart_converges() {
    let mut t = topology().await;
    let leaf_js = jetstream::new(async_nats::connect(t.leaf.url()).await.unwrap());
    let hub_js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(async_nats::connect(t.hub.client_urls()).await.unwrap());
    let mirror = format!("{}-{SITE}", naming::SENSORS_STREAM);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(t._mqtt.port, stop.clone());
    eventually("the mirror follows the leaf", DEADLINE, || async {
        let l = last_seq(&leaf_js, naming::SENSORS_STREAM)
            .await
            .unwrap_or(0);
        l > 50 && last_seq(&hub_js, &mirror).await.unwrap_or(0) + 50 >= l
    })
    .await;

    // One node of three lost: the mirror keeps up.
    t.hub.nodes[0].kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mark = last_seq(&leaf_js, naming::SENSORS_STREAM).await.unwrap();
    eventually(
        "the mirror keeps up with one hub node lost",
        DEADLINE,
        || async { last_seq(&hub_js, &mirror).await.unwrap_or(0) >= mark },
    )
    .await;
    // The daemon polls the hub on its own clock: a poll that fell in the
    // election after the kill may still be the latest, so its health
    // converges rather than being right at this instant.
    wait_until("the daemon reports no stalled mirror", DEADLINE, || {
        healthz(t.http)["hub"]["mirrors_stalled"] == 0
    });

    // Two lost: no quorum, the mirror stalls, and the daemon says so.
    t.hub.nodes[1].kill();
    wait_until("the daemon reports the stall", DEADLINE, || {
        mirror_state(&healthz(t.http), "SENSORS-home").as_deref() == Some("stalled")
    });
    assert_eq!(
        metric(t.http, "presenced_mirror_stalled{mirror=\"SENSORS-home\"}"),
        Some(1)
    );
    t.daemon.wait_for_log("hub mirror stalled", DEADLINE);

    // Both back: it converges, nothing missing.
    t.hub.nodes[0].restart();
    t.hub.nodes[1].restart();
    t.hub.wait_healthy();
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    eventually("the mirror converges", Duration::from_secs(120), || async {
        let l = last_seq(&leaf_js, naming::SENSORS_STREAM).await;
        l.is_some() && last_seq(&hub_js, &mirror).await == l
    })
    .await;
    let (l, h) = (
        state(&leaf_js, naming::SENSORS_STREAM).await,
        state(&hub_js, &mirror).await,
    );
    assert_eq!(
        (l.messages, l.first_sequence, l.last_sequence),
        (h.messages, h.first_sequence, h.last_sequence),
        "leaf and hub differ"
    );
    same_messages(&leaf_js, &hub_js, 1, l.last_sequence).await;
    wait_until("the daemon reports the mirror current", DEADLINE, || {
        mirror_state(&healthz(t.http), "SENSORS-home").as_deref() == Some("current")
    });
}
