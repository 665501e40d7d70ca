//! The command line: config checking, provisioning, get and watch.

use crate::common;
use crate::support;

use std::process::Command;
use std::time::Duration;

fn presenced(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(args)
        .output()
        .expect("run presenced")
}

#[test]
fn check_config_reports_every_problem_with_its_field_path_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"site = "Bad Site"
[mqtt.main]
[[mqtt.main.topics]]
filter = "a/#/b"
sensor = "x"
[zones.kitchen]
occupied_above = 0.2
vacant_below = 0.5
[[zones.kitchen.evidence]]
sensor = "x"
p_true = 0.9
p_false = 0.1
[[zones.kitchen.evidence]]
sensor = "x"
p_true = 0.5
p_false = 0.1
[[zones.kitchen.evidence]]
sensor = "x"
p_true = 1.3
p_false = 0.1
"#,
    )
    .unwrap();
    let out = presenced(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "site:",
        "mqtt.main.topics[0].filter:",
        "zones.kitchen.vacant_below:",
        "zones.kitchen.evidence[2].p_true: must be strictly between 0 and 1, got 1.3",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

/// `check-config` takes its file the way every other command does
/// (`--config`/`-c`, `$PRESENCED_CONFIG`) and, as before, positionally.
#[test]
fn check_config_reads_the_config_like_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "site = \"home\"\n[zones.hall]\n[[zones.hall.evidence]]\nsensor = \"pir\"\np_true = 0.9\np_false = 0.1\n").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "site = \"Bad Site\"\n").unwrap();
    let good = good.to_str().unwrap();
    let bad = bad.to_str().unwrap();
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_presenced"));
        cmd.args(args).env_remove("PRESENCED_CONFIG");
        if let Some(v) = env {
            cmd.env("PRESENCED_CONFIG", v);
        }
        cmd.output().expect("run presenced")
    };
    for (args, env) in [
        (vec!["check-config", good], None),
        (vec!["check-config", "--config", good], None),
        (vec!["check-config", "-c", good], None),
        (vec!["check-config"], Some(good)),
        // The positional file wins over the environment.
        (vec!["check-config", good], Some(bad)),
    ] {
        let out = run(&args, env);
        assert!(
            out.status.success(),
            "{args:?} {env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with(&format!("{good}: ok")),
            "{args:?}: {stdout}"
        );
    }
    for (args, env) in [
        (vec!["check-config", "-c", bad], None),
        (vec!["check-config"], Some(bad)),
    ] {
        let out = run(&args, env);
        assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}");
    }
    // Nothing named: the documented default path, said in the error.
    let out = run(&["check-config"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/etc/presenced/presenced.toml"), "{err}");
    // A usage error is exit code 2.
    assert_eq!(
        run(&["check-config", "--no-such-flag"], None).status.code(),
        Some(2)
    );
}

/// Completions and man pages come from the same clap definitions as the
/// command line, every subcommand in them.
#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = presenced(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for sub in ["check-config", "provision-hub", "watch", "completions"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = presenced(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "presenced.1",
        "presenced-check-config.1",
        "presenced-cmd-override.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page}: {text}");
    }
    let main = std::fs::read_to_string(dir.path().join("presenced-watch.1")).unwrap();
    assert!(main.contains("PRESENCED_CONFIG"), "{main}");
    // A reader that stops early (`| head`) is no failure, and no panic:
    // the read end is closed before the program has started up, so its
    // write meets a closed pipe.
    for args in [&["completions", "zsh"][..], &["man"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_presenced"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_config_names_an_unknown_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "site = \"home\"\n[nats]\nurll = \"nats://127.0.0.1:4222\"\n",
    )
    .unwrap();
    let out = presenced(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("urll"), "{err}");
}

/// Every syntax, type and unknown-field problem at once, in file order,
/// each with its line, column and exact field path, in the operator's
/// words; the second `[[zones.x.evidence]]` table is `evidence[1]`.
#[test]
fn check_config_reports_every_parse_problem_at_once_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typos.toml");
    std::fs::write(
        &path,
        r#"site = "home"
[nats]
urll = "nats://127.0.0.1:4222"
connect_timeout = "5 parsecs"
[mqtt.main]
[[mqtt.main.topics]]
filter = "t/+"
sensor = "{1}"
[zones.kitchen]
prior = "high"
[[zones.kitchen.evidence]]
sensor = "a"
p_true = 0.9
p_false = 0.1
[[zones.kitchen.evidence]]
sensor = "b"
p_true = "0.8"
p_false = 0.1
"#,
    )
    .unwrap();
    let out = presenced(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let wanted = [
        "line 3, column 1: `nats.urll`: unknown field `urll`",
        "line 4, column 19: `nats.connect_timeout`: expected a duration like \"30s\", \"5m\"",
        "line 10, column 9: `zones.kitchen.prior`: expected a number like 0.8, got string \"high\"",
        "line 17, column 10: `zones.kitchen.evidence[1].p_true`: expected a number like 0.8",
    ];
    let mut last = 0;
    for w in wanted {
        let at = err
            .find(w)
            .unwrap_or_else(|| panic!("missing {w:?} in:\n{err}"));
        assert!(at >= last, "{w:?} out of file order in:\n{err}");
        last = at;
    }
    assert!(!err.contains("expected f64"), "serde's words leak:\n{err}");
}

/// What only the MQTT source's own compilation refuses (the same filter
/// and sensor template twice) is refused by `check-config` too: it runs
/// the daemon's compile path.
#[test]
fn check_config_runs_the_sources_compile_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("twice.toml");
    std::fs::write(
        &path,
        r#"site = "home"
[mqtt.main]
[[mqtt.main.topics]]
filter = "home/+/motion"
sensor = "{1}"
value = "/occupancy"
[[mqtt.main.topics]]
filter = "home/+/motion"
sensor = "{1}"
value = "/illuminance"
[zones.hall]
evidence = [{ sensor = "hall", p_true = 0.9, p_false = 0.1 }]
"#,
    )
    .unwrap();
    let out = presenced(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mqtt.main: mapping topics[1]: ")
            && err.contains("already mapped to sensor \"{1}\" by topics[0]"),
        "{err}"
    );
}

/// A missing MQTT password file fails `check-config` and the daemon's
/// start (before it connects or reports READY), naming the field and the
/// path.
#[test]
fn a_missing_mqtt_password_file_fails_check_config_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("mqtt-password");
    let path = dir.path().join("pw.toml");
    std::fs::write(
        &path,
        format!(
            r#"site = "home"
[nats]
url = "nats://127.0.0.1:1"
[mqtt.main]
username = "presenced"
password_file = {:?}
[[mqtt.main.topics]]
filter = "home/hall/motion"
sensor = "hall"
[zones.hall]
evidence = [{{ sensor = "hall", p_true = 0.9, p_false = 0.1 }}]
"#,
            secret.display().to_string()
        ),
    )
    .unwrap();
    let want = format!("mqtt.main.password_file: cannot read {}", secret.display());
    let out = presenced(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&want), "{err}");
    let out = presenced(&["run", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&want), "{err}");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let out = presenced(&["check-config", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_examples_pass_check_config() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = presenced(&["check-config", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 2, "examples exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_is_idempotent_and_get_and_watch_show_state() {
    let nats = support::NatsServer::start(support::NatsOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        common::daemon_config("cli", &nats.url(), 1, 0, &common::motion_mapping(false), "[zones.hall]\n[[zones.hall.evidence]]\nsensor = \"pir\"\np_true = 0.9\np_false = 0.1\n"),
    )
    .unwrap();
    let first = common::provision(&path);
    let js = common::jetstream(&nats.url()).await;
    let before = common::sensors_config(&js).await;
    let second = common::provision(&path);
    let after = common::sensors_config(&js).await;
    assert_eq!(before, after, "second provision changes nothing");
    // The same report as provision-hub: created, then unchanged, for the
    // four streams, four buckets, the object store and the consumer.
    for (report, word) in [(&first, "created"), (&second, "unchanged")] {
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.len(), 10, "{report}");
        for line in &lines {
            assert!(
                line.ends_with(&format!(": {word}")),
                "{line:?} in:\n{report}"
            );
        }
        for thing in [
            "stream SENSORS:",
            "kv owners:",
            "object store snapshots:",
            "consumer engine on SENSORS:",
        ] {
            assert!(report.contains(thing), "{thing:?} missing in:\n{report}");
        }
    }
    // With the ownership map: the table is created once, then unchanged,
    // though updating KV owners drops it from the stream's metadata.
    let access = dir.path().join("access.toml");
    let key = || nkeys::KeyPair::new_user().public_key();
    std::fs::write(
        &access,
        format!(
            "admin = {{ nkey = \"{}\" }}\n[services.presenced]\nnkey = \"{}\"\nruns = [\"ingest\", \"engine\"]\n",
            key(),
            key()
        ),
    )
    .unwrap();
    let with_access = || {
        let out = Command::new(env!("CARGO_BIN_EXE_presenced"))
            .args([
                "provision",
                "-c",
                path.to_str().unwrap(),
                "--access",
                access.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for word in ["created", "unchanged"] {
        let report = with_access();
        assert!(
            report.contains(&format!("ownership table on KV_owners: {word}\n")),
            "{report}"
        );
        let others = report.lines().filter(|l| !l.starts_with("ownership table"));
        for line in others {
            assert!(line.ends_with(": unchanged"), "{line:?} in:\n{report}");
        }
    }
    assert_eq!(after.subjects, vec!["sensors.cli.>".to_string()]);

    let missing = presenced(&["get", "--config", path.to_str().unwrap(), "hall"]);
    assert!(!missing.status.success(), "no state yet is an error");

    let kv = js.get_key_value("presence").await.unwrap();
    let state = presenced::engine::ZoneState {
        v: 1,
        zone: "hall".into(),
        state: presenced::engine::Presence::Occupied,
        since: presenced::time::Timestamp(1_800_000_000_000),
        confidence: 0.9,
        clock: presenced::time::Timestamp(1_800_000_000_000),
        last_seq: 1,
        transitions: 2,
        pending: None,
        manual: None,
        evidence: vec![],
    };
    kv.put("hall", serde_json::to_vec(&state).unwrap().into())
        .await
        .unwrap();
    let got = presenced(&["get", "--config", path.to_str().unwrap(), "hall", "--json"]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(v["key"], "hall");
    assert_eq!(v["value"]["state"], "occupied");

    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(["watch", "--config", path.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(watch.stdout.take().unwrap()));
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["value"]["state"], "occupied", "snapshot first");
    let rev = first["revision"].as_u64().unwrap();
    let mut vacant = state.clone();
    vacant.state = presenced::engine::Presence::Vacant;
    kv.put("hall", serde_json::to_vec(&vacant).unwrap().into())
        .await
        .unwrap();
    let mut read = Vec::new();
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        read.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    assert_eq!(
        read[0]["event"], "snapshot_end",
        "the snapshot is marked complete"
    );
    let next = read[1].clone();
    assert_eq!(next["value"]["state"], "vacant", "then the delta");
    assert!(next["revision"].as_u64().unwrap() > rev);
}
