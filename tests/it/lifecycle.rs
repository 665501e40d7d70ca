//! Signals and lifecycle with the real binary: SIGHUP reloads zones and
//! evidence in place, refuses an invalid file and names fields that need
//! a restart; zones the config no longer has are reported at start,
//! shown unconfigured by `watch`/`get`, and removed by `cmd forget` with
//! the removal recorded in EVENTS.

use crate::common;
use crate::support;

use common::watch::Watch;
use common::*;
use futures::StreamExt;
use presenced::engine::Presence;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

fn zones(threshold: f64, extra: &str) -> String {
    format!(
        r#"
[zones.lab]
occupied_above = {threshold}
arrive_after = "0s"
leave_after = "0s"
[[zones.lab.evidence]]
sensor = "lab_pir"
p_true = 0.95
p_false = 0.05
{extra}"#
    )
}

const OLD_ZONE: &str = r#"
[zones.attic]
arrive_after = "0s"
leave_after = "0s"
[[zones.attic.evidence]]
sensor = "attic_pir"
p_true = 0.95
p_false = 0.05
"#;

fn metric(http: SocketAddr, prefix: &str) -> Option<u64> {
    let (_, body) = support::http_get(http, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn hup(d: &Daemon) {
    // SAFETY: kill(2) with a pid this test started.
    let rc = unsafe { libc::kill(d.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0);
}

fn presenced(args: &[&str], config: &Path) -> std::process::Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    support::daemon::run_presenced(&all, &[])
}

async fn motion(p: &mut Publisher) {
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_threshold_and_refuses_an_invalid_file() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let base = |z: &str| {
        daemon_config(
            "test",
            &nats.url(),
            broker.port,
            http_port,
            &motion_mapping(true),
            z,
        )
    };
    // 0.95 never reaches 0.99: the zone stays vacant on motion.
    let mut d = Daemon::start_provisioned(&base(&zones(0.99, "")), http_port);
    let js = jetstream(&nats.url()).await;
    let mut p = Publisher::connect(broker.port, "hup-pub").await;
    motion(&mut p).await;
    eventually("the motion is applied", Duration::from_secs(10), || async {
        zone(&js, "lab").await.is_some_and(|z| z.confidence > 0.6)
    })
    .await;
    assert_eq!(zone(&js, "lab").await.unwrap().state, Presence::Vacant);

    // An invalid file: refused with its errors, the daemon runs on.
    std::fs::write(&d.config_path, base(&zones(1.5, ""))).unwrap();
    hup(&d);
    d.wait_for_log("the new config is refused", Duration::from_secs(10));
    assert!(d.log().contains("occupied_above"), "{}", d.log_tail());
    assert!(d.is_running());
    d.wait_healthy(http, Duration::from_secs(5));

    // A field that needs a restart beside the new threshold: named, and
    // nothing is applied.
    std::fs::write(
        &d.config_path,
        base(&zones(0.6, "")).replace("reject_log_every = \"1s\"", "reject_log_every = \"2s\""),
    )
    .unwrap();
    hup(&d);
    d.wait_for_log("need a restart", Duration::from_secs(10));
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("need a restart"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(line.contains("WARN") && line.contains("ingest"), "{line}");
    motion(&mut p).await;
    eventually(
        "the second motion is applied",
        Duration::from_secs(10),
        || async { metric(http, "presenced_engine_observations_total ").is_some_and(|n| n >= 2) },
    )
    .await;
    assert_eq!(
        zone(&js, "lab").await.unwrap().state,
        Presence::Vacant,
        "a refused reload changed the threshold"
    );

    // Only the threshold: swapped in place, the next reading uses it.
    std::fs::write(&d.config_path, base(&zones(0.6, ""))).unwrap();
    hup(&d);
    d.wait_for_log(
        "zone and evidence configuration reloaded",
        Duration::from_secs(10),
    );
    motion(&mut p).await;
    eventually(
        "lab occupied under the new threshold",
        Duration::from_secs(10),
        || async {
            zone(&js, "lab")
                .await
                .is_some_and(|z| z.state == Presence::Occupied)
        },
    )
    .await;
    assert!(d.is_running());
    assert!(d.terminate().success());
    let log = d.log();
    assert!(log.contains("lease released"), "{}", d.log_tail());
    assert!(log.contains("stopped cleanly"), "{}", d.log_tail());
    assert!(
        !log.contains("component failed"),
        "a graceful stop reported a failure:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_dropped_from_the_config_are_reported_shown_unconfigured_and_forgotten() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let base = |z: &str| {
        daemon_config(
            "test",
            &nats.url(),
            broker.port,
            http_port,
            &motion_mapping(true),
            z,
        )
    };
    let mut d = Daemon::start_provisioned(&base(&zones(0.6, OLD_ZONE)), http_port);
    let js = jetstream(&nats.url()).await;
    eventually("attic stored", Duration::from_secs(10), || async {
        zone(&js, "attic").await.is_some()
    })
    .await;
    assert!(d.terminate().success());

    // The attic leaves the config: reported at start.
    std::fs::write(&d.config_path, base(&zones(0.6, ""))).unwrap();
    d.restart();
    d.wait_healthy(http, Duration::from_secs(20));
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("no longer has"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no report of the unconfigured zone:\n{}", d.log_tail()));
    assert!(line.contains("WARN") && line.contains("attic"), "{line}");
    let config = d.config_path.clone();

    // get and watch say so; a configured zone is not marked.
    let out = presenced(&["get", "attic", "--json"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["unconfigured"], true, "{v}");
    assert_eq!(v["stale"], true, "{v}");
    let out = presenced(&["get", "attic"], &config);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unconfigured"));
    let out = presenced(&["get", "lab", "--json"], &config);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("unconfigured").is_none(), "{v}");
    assert_eq!(v["stale"], false, "{v}");
    let w = Watch::start(&config, &["--json"]);
    w.wait_json("attic is unconfigured", Duration::from_secs(10), |v| {
        v["key"] == "attic" && v["unconfigured"] == true && v["stale"] == true
    })
    .await;
    let out = presenced(&["status", "--json"], &config);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["zones"]["unconfigured"],
        serde_json::json!(["attic"]),
        "{v:#}"
    );

    // A configured zone cannot be forgotten; the unconfigured one is,
    // with its removal in EVENTS.
    let out = presenced(&["cmd", "forget", "lab"], &config);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is configured"));
    let out = presenced(&["cmd", "forget", "attic", "--by", "ops"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(zone(&js, "attic").await.is_none());
    let out = presenced(&["get", "attic"], &config);
    assert!(!out.status.success());
    let stream = js.get_stream("EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "events.test.presence.attic".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut removed = Vec::new();
    while let Some(Ok(m)) = msgs.next().await {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if v["removed"] == true {
            removed.push(v);
        }
    }
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0]["by"], "ops");
    assert_eq!(removed[0]["zone"], "attic");
    assert!(d.is_running());
}

/// `cmd forget` as deployed: under the generated ACL, sent by an
/// operator identity granted `commands`; the engine's own writes (EVENTS
/// record, purges) draw no violation, and the admin, which may only use
/// the JetStream API, cannot send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_works_under_the_generated_acl_for_the_operator() {
    use presenced::acl::identity;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = |s: &str| identity::keygen(s, &d.join(format!("{s}.seed"))).unwrap();
    let (admin, svc, op) = (key("admin"), key("presenced"), key("operator"));
    let access = format!(
        "admin = {{ nkey = \"{}\" }}\n[services.presenced]\nnkey = \"{}\"\nruns = [\"ingest\", \"engine\"]\n[services.operator]\nnkey = \"{}\"\nreads = [\"commands\"]\n",
        admin.public_key, svc.public_key, op.public_key
    );
    std::fs::write(d.join("access.toml"), access).unwrap();
    let out = support::daemon::run_presenced(
        &[
            "acl",
            "--access",
            d.join("access.toml").to_str().unwrap(),
            "--site",
            "test",
        ],
        &[],
    );
    assert!(out.status.success());
    let nats = NatsServer::start(NatsOptions {
        extra: String::from_utf8(out.stdout).unwrap(),
        ..Default::default()
    });
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let file = |service: &str, z: &str| {
        daemon_config(
            "test",
            &nats.url(),
            broker.port,
            http_port,
            &motion_mapping(true),
            z,
        )
        .replace(
            "[nats]\n",
            &format!(
                "service = \"{service}\"\n\n[nats]\nnkey_seed_file = \"{}\"\n",
                d.join(format!("{service}.seed")).display()
            ),
        )
    };
    let write = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    provision(&write("admin.toml", file("admin", &zones(0.6, OLD_ZONE))));
    let svc_cfg = write("presenced.toml", file("presenced", &zones(0.6, OLD_ZONE)));
    let mut daemon = Daemon::start_at(&svc_cfg, &[]);
    daemon.wait_healthy(http, Duration::from_secs(20));
    let seed = identity::read_seed(&d.join("admin.seed")).unwrap();
    let admin_js = async_nats::jetstream::new(
        async_nats::ConnectOptions::new()
            .nkey(seed)
            .connect(nats.url())
            .await
            .unwrap(),
    );
    eventually("attic stored", Duration::from_secs(10), || async {
        zone(&admin_js, "attic").await.is_some()
    })
    .await;
    assert!(daemon.terminate().success());
    std::fs::write(&svc_cfg, file("presenced", &zones(0.6, ""))).unwrap();
    daemon.restart();
    daemon.wait_healthy(http, Duration::from_secs(20));

    let admin_cfg = write("admin2.toml", file("admin", &zones(0.6, "")));
    let out = presenced(&["cmd", "forget", "attic", "--timeout", "2s"], &admin_cfg);
    assert!(!out.status.success(), "the admin sent a command");
    let op_cfg = write("operator.toml", file("operator", &zones(0.6, "")));
    let out = presenced(&["cmd", "forget", "attic"], &op_cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(zone(&admin_js, "attic").await.is_none());
    assert!(
        !daemon.log().contains("permission violation"),
        "{}",
        daemon.log_tail()
    );
    assert!(daemon.is_running());
}
