//! The daemon under the generated ACL: the whole pipeline (commands
//! included) with no violation, and a missing grant that is logged,
//! audited and fatal.

use crate::common;
use crate::support;

use common::*;
use presenced::acl::identity;
use presenced::naming::Site;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use support::acl_site::as_service;
use support::{AclSite, Daemon, Mosquitto};

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

struct Site1 {
    acl: AclSite,
    admin_js: async_nats::jetstream::Context,
    base: String,
    http_port: u16,
}

/// A nats-server with the ACL generated for `runs`, provisioned by admin.
async fn site(mqtt: &Mosquitto, runs: &str) -> Site1 {
    let acl = AclSite::start(&[
        ("presenced", &format!("runs = {runs}")),
        ("operator", r#"reads = ["commands"]"#),
    ]);
    let http_port = support::free_port();
    let base = daemon_config(
        "test",
        &acl.url(),
        mqtt.port,
        http_port,
        &motion_mapping(true),
        ZONES,
    );
    acl.provision(&base);
    Site1 {
        admin_js: acl.js("admin").await,
        acl,
        base,
        http_port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_under_the_generated_acl_without_violation() {
    let mqtt = Mosquitto::start();
    let s = site(&mqtt, r#"["ingest", "engine"]"#).await;
    let cfg = s.acl.as_identity(&s.base, "presenced");
    let d = Daemon::start(&cfg, &[]);
    let http = SocketAddr::from(([127, 0, 0, 1], s.http_port));
    d.wait_healthy(http, Duration::from_secs(20));
    let mut p = Publisher::connect(mqtt.port, "acl-pub").await;
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually("lab occupied", Duration::from_secs(15), || async {
        zone(&s.admin_js, "lab")
            .await
            .is_some_and(|z| z.state == presenced::engine::Presence::Occupied)
    })
    .await;
    // A command from an identity granted `commands` is answered; the
    // engine's own identity may answer but not ask.
    let op_cfg = s.acl.config_file(&s.base, "operator");
    let cmd = |config: &Path| {
        support::daemon::run_presenced(
            &[
                "cmd",
                "override",
                "lab",
                "vacant",
                "--for",
                "1h",
                "--timeout",
                "3s",
                "--config",
                config.to_str().unwrap(),
            ],
            &[],
        )
    };
    let out = cmd(&op_cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lab: vacant, held until"));
    let svc_cfg = s.acl.file("presenced.toml", &cfg);
    let out = cmd(&svc_cfg);
    assert!(
        !out.status.success(),
        "the engine's identity sent a command"
    );
    // Named as the refusal it is, with the grant that would allow it.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused the publish to \"cmd.test.presence.lab\"")
            && err.contains("reads = [\"commands\"] in [services.presenced]"),
        "{err}"
    );
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    assert!(
        metrics.contains("presenced_permission_violations_total 0"),
        "{metrics}"
    );
    assert!(
        !d.log().contains("permission violation"),
        "{}",
        d.log_tail()
    );

    // The lease: written and released with exactly the granted operations.
    let owners = s.admin_js.get_key_value("owners").await.unwrap();
    assert!(
        owners.get("presenced").await.unwrap().is_some(),
        "the daemon holds owners.presenced under the ACL"
    );
    // `get` as the service: its identity may not read owners, so the stale
    // flag is unknown, said once, and the value is still shown.
    let cfg_path = s.acl.file("service.toml", &cfg);
    let out = support::daemon::run_presenced(
        &[
            "get",
            "--config",
            cfg_path.to_str().unwrap(),
            "lab",
            "--json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["stale"].is_null(), "{v}");
    assert_eq!(v["value"]["zone"], "lab");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stale flags are unknown") && err.contains("reads = [\"owners\"]"),
        "{err}"
    );
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log_tail());
    assert!(
        owners.get("presenced").await.unwrap().is_none(),
        "a graceful stop releases the lease"
    );
    assert!(
        d.log().contains("lease released") && !d.log().contains("permission violation"),
        "{}",
        d.log_tail()
    );
    drop(s.acl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_grant_is_logged_audited_and_stops_the_daemon() {
    let mqtt = Mosquitto::start();
    // The service runs ingest only, but its config runs the engine too.
    let s = site(&mqtt, r#"["ingest"]"#).await;
    let cfg = s.acl.as_identity(&s.base, "presenced");
    let mut d = Daemon::start(&cfg, &[]);
    support::wait_until("daemon exits", Duration::from_secs(20), || {
        d.exit_status().is_some()
    });
    let status = d.exit_status().unwrap();
    assert!(!status.success());
    let log = d.log();
    assert!(
        log.contains("ERROR")
            && log.contains("permission violation")
            && log.contains("KV_presence"),
        "{log}"
    );
    assert!(log.contains("refused to let service presenced"), "{log}");
    let site = Site::new("test").unwrap();
    // The service's AUDIT subject also has its takeover record, written
    // in the background at start, and the violations of the engine's
    // other missing grants (KV debounce), in no fixed order: the one of
    // KV presence among them.
    let subject = site.audit_subject("presenced");
    let record: serde_json::Value = read_stream(&s.admin_js, "AUDIT")
        .await
        .iter()
        .filter(|m| m.subject.as_str() == subject)
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
        .filter(|r| r["kind"] == "permission_violation")
        .find(|r| {
            r["subject"]
                .as_str()
                .is_some_and(|x| x.contains("KV_presence"))
        })
        .expect("an audit record of the violation");
    assert_eq!(record["service"], "presenced");
    assert_eq!(record["site"], "test");
    assert_eq!(record["operation"], "publish");
    assert_eq!(record["count"], 1);
    assert!(
        record["subject"].as_str().unwrap().contains("KV_presence"),
        "{record}"
    );
    assert!(record["time"].is_string());
}

#[test]
fn a_seed_readable_by_others_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("presenced.seed");
    identity::keygen("presenced", &seed).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let base = daemon_config(
        "test",
        "nats://127.0.0.1:1",
        1,
        1,
        &motion_mapping(false),
        ZONES,
    );
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, as_service(&base, "presenced", &seed)).unwrap();
    let out = support::daemon::run_presenced(&["run", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("presenced.seed") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn keygen_cli_prints_the_public_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("x.seed");
    let p = out_path.to_str().unwrap();
    let out = support::daemon::run_presenced(&["keygen", "ingest", "--out", p], &[]);
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap();
    identity::check_public_key(key.trim()).unwrap();
    let again = support::daemon::run_presenced(&["keygen", "ingest", "--out", p], &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

/// A QoS 1 message stored before a SIGKILL but never acknowledged to the
/// broker is recognised on redelivery under the generated ACL: the look-up
/// of stored deliveries (an ordered consumer on SENSORS, headers only)
/// uses only the owner's read grant, and nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_sigkill_is_recognised_under_the_generated_acl() {
    let mqtt = Mosquitto::start();
    let proxy = support::Proxy::start(mqtt.addr());
    let s = site(&mqtt, r#"["ingest", "engine"]"#).await;
    let base = s.base.replace(
        &format!("port = {}\n", mqtt.port),
        &format!("port = {}\n", proxy.port),
    );
    let cfg = s.acl.as_identity(&base, "presenced");
    let mut d = Daemon::start(&cfg, &[]);
    let http = SocketAddr::from(([127, 0, 0, 1], s.http_port));
    d.wait_healthy(http, Duration::from_secs(20));
    let js = &s.admin_js;
    let mut p = Publisher::connect(mqtt.port, "acl-crash-pub").await;
    let start = std::time::Instant::now();
    while stream_messages(js, "SENSORS").await == 0 {
        p.publish(
            "test/lab_pir",
            format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(start.elapsed() < Duration::from_secs(15), "nothing read");
    }
    p.flush(Duration::from_secs(5)).await;
    eventually("warm-up applied", Duration::from_secs(10), || async {
        engine_caught_up(js, stream_messages(js, "SENSORS").await).await
    })
    .await;
    let base_count = stream_messages(js, "SENSORS").await;

    proxy.mute_upstream();
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":false,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "stored, its PUBACK lost",
        Duration::from_secs(10),
        || async { stream_messages(js, "SENSORS").await == base_count + 1 },
    )
    .await;
    d.kill9();
    proxy.cut();
    proxy.restore();
    d.restart();
    d.wait_healthy(http, Duration::from_secs(20));
    d.wait_for_log(
        "MQTT redelivery of a message already stored; acknowledged",
        Duration::from_secs(15),
    );
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "the next reading stored",
        Duration::from_secs(10),
        || async { stream_messages(js, "SENSORS").await >= base_count + 2 },
    )
    .await;
    eventually("engine caught up", Duration::from_secs(10), || async {
        engine_caught_up(js, base_count + 2).await
    })
    .await;
    assert_eq!(stream_messages(js, "SENSORS").await, base_count + 2);
    let log = d.log();
    assert!(
        !log.contains("cannot look up stored MQTT deliveries"),
        "{log}"
    );
    assert!(!log.contains("Permissions Violation"), "{log}");
}
