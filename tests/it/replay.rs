//! `presenced replay` against what the real daemon did: a scenario runs
//! through Mosquitto, the daemon and nats-server under the generated ACL;
//! replaying it as a reader identity with the daemon's own config gives
//! exactly the transitions in EVENTS, byte-identical output on a second
//! run, and no write to any stream or bucket of the site.

use crate::common;
use crate::support;

use common::*;
use futures::StreamExt as _;
use presenced::engine::{Presence, Transition};
use std::collections::BTreeMap;
use std::net::SocketAddr;

use std::time::Duration;
use support::{AclSite, Daemon, Mosquitto};

/// Two zones: debounce and hold deadlines fire between readings, and the
/// hall gets an override that runs out.
const ZONES: &str = r#"
[zones.lab]
occupied_above = 0.6
vacant_below = 0.3
arrive_after = "1s"
leave_after = "1500ms"
[[zones.lab.evidence]]
sensor = "lab_pir"
p_true = 0.95
p_false = 0.05
hold = "2s"
[[zones.lab.evidence]]
sensor = "lab_door"
p_true = 0.6
p_false = 0.4

[zones.hall]
occupied_above = 0.6
arrive_after = "0s"
leave_after = "1s"
[[zones.hall.evidence]]
sensor = "hall_pir"
p_true = 0.95
p_false = 0.02
"#;

/// Last sequence and message count of every stream of the server: any
/// write (a KV put, a purge, a publish) changes one of them.
pub(crate) async fn sequences(js: &async_nats::jetstream::Context) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    let mut names = js.stream_names();
    while let Some(name) = names.next().await {
        let name = name.expect("stream name");
        let mut s = js.get_stream(&name).await.expect("stream");
        let info = s.info().await.expect("stream info");
        out.insert(name, (info.state.last_sequence, info.state.messages));
    }
    out
}

/// The site of [`site_with`]: an [`AclSite`] (seeds, files, server) with
/// the admin's JetStream context and the daemon's base config.
pub(crate) struct Site {
    acl: AclSite,
    pub(crate) admin_js: async_nats::jetstream::Context,
    pub(crate) base: String,
    pub(crate) http_port: u16,
    pub(crate) url: String,
}

impl std::ops::Deref for Site {
    type Target = AclSite;
    fn deref(&self) -> &AclSite {
        &self.acl
    }
}

/// A nats-server under the ACL `presenced acl` generates for a daemon
/// (ingest + engine), an analyst that reads SENSORS and EVENTS only, and
/// an operator granted commands; provisioned by the admin.
pub(crate) async fn site(mqtt: &Mosquitto) -> Site {
    site_with(mqtt, ZONES).await
}

/// [`site`] with other zones.
pub(crate) async fn site_with(mqtt: &Mosquitto, zones: &str) -> Site {
    let acl = AclSite::start(&[
        ("presenced", r#"runs = ["ingest", "engine"]"#),
        ("analyst", r#"reads = ["sensors", "events"]"#),
        ("operator", r#"reads = ["commands"]"#),
    ]);
    let http_port = support::free_port();
    let base = daemon_config(
        "test",
        &acl.url(),
        mqtt.port,
        http_port,
        &motion_mapping(true),
        zones,
    );
    acl.provision(&base);
    Site {
        url: acl.url(),
        admin_js: acl.js("admin").await,
        acl,
        base,
        http_port,
    }
}

async fn settled(js: &async_nats::jetstream::Context, zones: &[&str]) -> bool {
    for z in zones {
        match zone(js, z).await {
            Some(s) if s.state == Presence::Vacant && s.pending.is_none() && s.manual.is_none() => {
            }
            _ => return false,
        }
    }
    true
}

pub(crate) fn run(args: &[&str]) -> std::process::Output {
    support::daemon::run_presenced(args, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_with_the_daemons_config_gives_exactly_the_transitions_in_events() {
    let mqtt = Mosquitto::start();
    let s = site(&mqtt).await;
    let daemon_cfg = s.as_identity(&s.base, "presenced");
    let mut d = Daemon::start(&daemon_cfg, &[]);
    d.wait_healthy(
        SocketAddr::from(([127, 0, 0, 1], s.http_port)),
        Duration::from_secs(20),
    );
    let js = &s.admin_js;
    let from = presenced::time::Timestamp::now();
    let mut p = Publisher::connect(mqtt.port, "replay-pub").await;
    let reading = |sensor: &str, on: bool| {
        (
            format!("test/{sensor}"),
            format!(r#"{{"occupancy":{on},"ts":{}}}"#, now_ms()),
        )
    };

    // The lab: motion, repeated as PIRs do (QoS 0), a door, then quiet:
    // arriving, occupied after the debounce, leaving when the hold runs
    // out, vacant after the leave debounce. Every move after the first is
    // a deadline, none a reading.
    for (sensor, on) in [("lab_pir", true), ("lab_door", true), ("lab_pir", true)] {
        let (t, m) = reading(sensor, on);
        p.publish_qos0(&t, m).await;
    }
    let (t, m) = reading("lab_pir", true);
    p.publish(&t, m).await;
    p.flush(Duration::from_secs(5)).await;
    eventually("lab occupied", Duration::from_secs(15), || async {
        zone(js, "lab")
            .await
            .is_some_and(|z| z.state == Presence::Occupied)
    })
    .await;
    // The hall: a short visit, then an override that runs out.
    let (t, m) = reading("hall_pir", true);
    p.publish(&t, m).await;
    p.flush(Duration::from_secs(5)).await;
    eventually("hall occupied", Duration::from_secs(10), || async {
        zone(js, "hall")
            .await
            .is_some_and(|z| z.state == Presence::Occupied)
    })
    .await;
    let (t, m) = reading("hall_pir", false);
    p.publish(&t, m).await;
    let (t, m) = reading("lab_door", false);
    p.publish(&t, m).await;
    p.flush(Duration::from_secs(5)).await;
    eventually("hall vacant", Duration::from_secs(10), || async {
        zone(js, "hall")
            .await
            .is_some_and(|z| z.state == Presence::Vacant)
    })
    .await;
    let op_cfg = s.file("operator.toml", &s.as_identity(&s.base, "operator"));
    let out = run(&[
        "cmd",
        "override",
        "hall",
        "occupied",
        "--for",
        "2s",
        "--timeout",
        "5s",
        "--config",
        op_cfg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        "every zone settled vacant",
        Duration::from_secs(20),
        || async { settled(js, &["lab", "hall"]).await },
    )
    .await;
    eventually("engine caught up", Duration::from_secs(10), || async {
        engine_caught_up(js, stream_messages(js, "SENSORS").await).await
    })
    .await;
    // A graceful stop: the lease key is released now, not during the
    // replay, so any later change to a stream is the replay's.
    assert!(d.terminate().success(), "{}", d.log_tail());
    let recorded = events(js).await;
    let kinds: Vec<(&str, &str, &str)> = recorded
        .iter()
        .map(|t| (t.zone.as_str(), t.from.as_str(), t.to.as_str()))
        .collect();
    // The scenario did what it is meant to exercise.
    assert!(
        kinds.contains(&("lab", "arriving", "occupied")),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("lab", "leaving", "vacant")), "{kinds:?}");
    assert!(
        recorded.iter().any(|t| t.cause.is_some()),
        "no override recorded: {kinds:?}"
    );
    assert!(
        recorded.iter().filter(|t| t.seq.is_none()).count() >= 3,
        "few timer moves: {kinds:?}"
    );
    let before = sequences(js).await;

    // The analyst replays with the daemon's config, as its own identity.
    let analyst = s.file("analyst.toml", &s.as_identity(&s.base, "analyst"));
    let to = presenced::time::Timestamp::now();
    let (from_s, to_s) = (from.to_string(), to.to_string());
    let args = [
        "replay",
        "--config",
        analyst.to_str().unwrap(),
        "--from",
        &from_s,
        "--to",
        &to_s,
        "--json",
        "--diff",
    ];
    let first = run(&args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = run(&args);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        first.stdout, second.stdout,
        "two replays of the same range differ"
    );
    let doc: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let mut replayed: Vec<Transition> = Vec::new();
    for z in ["hall", "lab"] {
        let list: Vec<Transition> =
            serde_json::from_value(doc["zones"][z]["transitions"].clone()).unwrap();
        replayed.extend(list);
    }
    let key = |t: &Transition| (t.zone.clone(), t.number);
    let mut expected = recorded.clone();
    expected.sort_by_key(key);
    replayed.sort_by_key(key);
    assert_eq!(replayed, expected, "replay differs from EVENTS");
    assert_eq!(doc["diff"], serde_json::json!([]), "{doc}");
    assert_eq!(doc["readings"], stream_messages(js, "SENSORS").await);
    assert!(
        doc["zones"]["lab"]["occupied_ms"].as_i64().unwrap() > 0,
        "{doc}"
    );
    assert_eq!(doc["zones"]["lab"]["detection"]["count"], 1, "{doc}");
    // The text form says the same, and the diff is empty.
    let text = run(&[
        "replay",
        "--config",
        analyst.to_str().unwrap(),
        "--from",
        &from_s,
        "--to",
        &to_s,
        "--diff",
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("diff against EVENTS: identical"), "{text}");
    assert!(
        text.contains("zone lab: ") && text.contains("(timer)"),
        "{text}"
    );

    // A candidate that debounces longer differs, and --diff says where.
    let candidate = s.file(
        "candidate.toml",
        // A copy of a daemon's config names secret files the analyst
        // cannot read, and need not: only the zones are used.
        &s.base
            .replace("arrive_after = \"1s\"", "arrive_after = \"1h\"")
            .replace(
                "[mqtt.main]\n",
                "[mqtt.main]\nusername = \"presenced\"\npassword_file = \"/nonexistent/mqtt.pass\"\n",
            ),
    );
    let out = run(&[
        "replay",
        "--config",
        analyst.to_str().unwrap(),
        "--candidate",
        candidate.to_str().unwrap(),
        "--from",
        &from_s,
        "--to",
        &to_s,
        "--diff",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("- ") && text.contains("lab arriving -> occupied  (only in events)"),
        "{text}"
    );

    // Nothing was written anywhere: every stream and bucket as before.
    assert_eq!(sequences(js).await, before, "the replay wrote to the site");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_candidates_and_empty_ranges_are_refused_with_a_reason() {
    let mqtt = Mosquitto::start();
    let s = site(&mqtt).await;
    let analyst = s.file("analyst.toml", &s.as_identity(&s.base, "analyst"));
    let before = sequences(&s.admin_js).await;
    // A candidate failing check-config: refused, naming the problem,
    // before any connection (the server's URL is not even reachable).
    let bad = s.file("bad.toml", &s.base.replace("p_true = 0.95", "p_true = 1.7"));
    let unreachable = s.file(
        "unreachable.toml",
        &s.as_identity(&s.base, "analyst").replace(
            &s.url,
            &format!("nats://127.0.0.1:{}", support::free_port()),
        ),
    );
    let started = std::time::Instant::now();
    let out = run(&[
        "replay",
        "--config",
        unreachable.to_str().unwrap(),
        "--candidate",
        bad.to_str().unwrap(),
        "--since",
        "1h",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fails check-config; nothing was read")
            && err.contains("zones.lab.evidence[0].p_true"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it tried to connect first"
    );
    // An empty range says so.
    let out = run(&[
        "replay",
        "--config",
        analyst.to_str().unwrap(),
        "--since",
        "1h",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no readings in SENSORS of site test between"),
        "{err}"
    );
    assert_eq!(sequences(&s.admin_js).await, before);
}
