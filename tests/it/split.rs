//! Components from config: one site split into an ingest-only, an
//! engine-only and an archiver-only daemon, each with its own identity
//! under the ACL `presenced acl` generates, as modules/presenced.nix and
//! docs/DEPLOY.md describe the strict deployment.

use crate::common;
use crate::support;

use common::*;
use presenced::naming;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
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

/// The common head of every instance's file (its service and seed are
/// added by [`AclSite::as_identity`]).
fn head(nats: &str, http: u16) -> String {
    format!(
        "site = \"test\"\n\n[nats]\nurl = \"{nats}\"\nrequest_timeout = \"2s\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n[engine]\ndrain_timeout = \"5s\"\n\n[lease]\nttl = \"3s\"\n"
    )
}

fn mqtt(port: u16) -> String {
    format!(
        "[mqtt.main]\nhost = \"127.0.0.1\"\nport = {port}\nkeep_alive = \"5s\"\nreconnect_max = \"1s\"\n{}",
        motion_mapping(true)
    )
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn check_config(path: &Path, runs: &str) {
    let out = support::daemon::run_presenced(&["check-config", path.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "check-config refused {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("runs {runs},")), "{said}");
}

async fn lease_components(js: &async_nats::jetstream::Context, service: &str) -> serde_json::Value {
    let kv = js.get_key_value(naming::OWNERS_BUCKET).await.unwrap();
    let v = kv.get(service).await.unwrap().unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&v).unwrap_or_default()["components"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_engine_and_archiver_run_as_separate_instances_under_the_generated_acl() {
    let broker = Mosquitto::start();
    let site = AclSite::start(&[
        ("ingest", r#"runs = ["ingest"]"#),
        ("engine", r#"runs = ["engine"]"#),
        ("archiver", r#"runs = ["archiver"]"#),
    ]);
    let url = site.url();
    let ports = [
        support::free_port(),
        support::free_port(),
        support::free_port(),
    ];
    site.provision(&format!("{}{ZONES}", head(&url, support::free_port())));

    // Each instance's file has only its own part: no zones in the ingest,
    // no source in the engine, only [archive] in the archiver.
    let ingest_cfg = site.config_file(
        // An instance without zones says it runs ingest only:
        // check-config refuses sources without zones otherwise.
        &format!(
            "runs = [\"ingest\"]\n{}{}",
            head(&url, ports[0]),
            mqtt(broker.port)
        ),
        "ingest",
    );
    let engine_cfg = site.config_file(&format!("{}{ZONES}", head(&url, ports[1])), "engine");
    let archiver_cfg = site.config_file(
        &format!("{}[archive]\nevery = \"1s\"\n", head(&url, ports[2])),
        "archiver",
    );
    for (c, runs) in [
        (&ingest_cfg, "ingest"),
        (&engine_cfg, "engine"),
        (&archiver_cfg, "archiver"),
    ] {
        check_config(c, runs);
    }

    let http = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let di = Daemon::start_at(&ingest_cfg, &[]);
    let de = Daemon::start_at(&engine_cfg, &[]);
    let da = Daemon::start_at(&archiver_cfg, &[]);
    di.wait_healthy(http(ports[0]), Duration::from_secs(20));
    de.wait_healthy(http(ports[1]), Duration::from_secs(20));
    da.wait_healthy(http(ports[2]), Duration::from_secs(20));

    let js = site.js("admin").await;

    // A reading read by the ingest instance is decided by the engine one.
    let mut p = Publisher::connect(broker.port, "split-pub").await;
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    eventually(
        "lab occupied through two instances",
        Duration::from_secs(15),
        || async {
            zone(&js, "lab")
                .await
                .is_some_and(|z| z.state == presenced::engine::Presence::Occupied)
        },
    )
    .await;

    // The ingest instance's health shows the reading on its source.
    eventually(
        "the ingest instance counts the reading",
        Duration::from_secs(10),
        || async {
            support::http_get(http(ports[0]), "/healthz").is_some_and(|(_, b)| {
                let h: serde_json::Value = serde_json::from_str(&b).unwrap_or_default();
                h["sources"][0]["readings"] == 1
            })
        },
    )
    .await;

    // Each lease announces exactly what its instance runs.
    for (service, want) in [
        ("ingest", "ingest"),
        ("engine", "engine"),
        ("archiver", "archiver"),
    ] {
        assert_eq!(
            lease_components(&js, service).await,
            serde_json::json!([want]),
            "lease of {service}"
        );
    }

    // The archiver alone snapshots.
    let store = js.get_object_store(naming::SNAPSHOTS_OBJECT).await.unwrap();
    eventually(
        "the archiver-only instance snapshots",
        Duration::from_secs(15),
        || async {
            presenced::archive::snapshot::list_local(&store)
                .await
                .is_ok_and(|l| l.iter().any(|s| s.meta.is_some()))
        },
    )
    .await;

    // Each /healthz names what its instance runs, and none was refused.
    for (p, runs) in [
        (ports[0], "ingest"),
        (ports[1], "engine"),
        (ports[2], "archiver"),
    ] {
        let (code, body) = support::http_get(http(p), "/healthz").unwrap();
        let h: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(code, 200, "{h:#}");
        assert_eq!(h["runs"], serde_json::json!([runs]), "{h:#}");
    }
    for d in [&di, &de, &da] {
        assert!(
            !d.log().contains("permission violation"),
            "{}",
            d.log_tail()
        );
    }

    // `presenced status` as the operator holds it: the admin identity, a
    // file naming the whole site (sources and zones) and the engine
    // daemon's listen address without binding it.
    let operator = site.file(
        "operator.toml",
        &site.as_identity(
            &format!(
                "{}{}{ZONES}",
                head(&url, ports[1]).replace("[http]\n", "[http]\nenabled = false\n"),
                mqtt(broker.port)
            ),
            "admin",
        ),
    );
    let status = |cfg: &Path| {
        let out = support::daemon::run_presenced(
            &["status", "--json", "--config", cfg.to_str().unwrap()],
            &[],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), v)
    };
    let (code, v) = status(&operator);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["zones"]["configured"], 1, "{v:#}");
    assert_eq!(v["zones"]["stored"], 1, "{v:#}");
    assert_eq!(v["zones"]["stale"], 0, "{v:#}");
    assert_eq!(v["backlog"]["sensors_pending"], 0, "{v:#}");
    assert_eq!(v["daemon"]["status"], "healthy", "{v:#}");
    // An identity that may not read the zones is told so, as a refusal.
    let (code, v) = status(&ingest_cfg);
    assert_eq!(code, Some(2), "{v:#}");
    let causes = v["causes"].to_string();
    assert!(causes.contains("refused"), "{v:#}");
    assert!(
        causes.contains("not a missing stream or bucket") && causes.contains("[services.ingest]"),
        "the refusal names itself and the grant: {v:#}"
    );
    assert!(
        !causes.contains("is missing") && !causes.contains("is not there"),
        "{v:#}"
    );
}

#[test]
fn an_instance_with_nothing_to_run_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "empty.toml",
        &format!(
            "site = \"test\"\n[nats]\nurl = \"nats://127.0.0.1:{}\"\n",
            support::free_port()
        ),
    );
    let out = support::daemon::run_presenced(&["run", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to run"), "{err}");
}

#[test]
fn runs_that_disagree_with_the_file_are_refused_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "bad.toml",
        &format!(
            "site = \"test\"\nruns = [\"engine\", \"archiver\", \"scheduler\"]\n{}\n",
            mqtt(1883)
        ),
    );
    let out = support::daemon::run_presenced(&["check-config", cfg.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("runs[2]") && err.contains("unknown component"),
        "{err}"
    );
    assert!(err.contains("does not list ingest"), "{err}");
    assert!(err.contains("`[archive]` is missing"), "{err}");
}
