//! Commands against the real daemon and nats-server: a manual override
//! applies, holds against the sensors and expires at its wall-clock
//! instant (also across SIGKILL and restart); every kind of invalid
//! command gets its own error reply and changes nothing.

use crate::common;
use crate::support;

use common::*;
use presenced::engine::command::{ErrorKind, Reply};
use presenced::engine::{Cause, Presence, Transition};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::daemon::run_presenced;
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

const ZONES: &str = r#"
[zones.hall]
prior = 0.1
occupied_above = 0.6
vacant_below = 0.3
arrive_after = "0s"
leave_after = "1s"
[[zones.hall.evidence]]
sensor = "hall_pir"
p_true = 0.95
p_false = 0.05
"#;

struct Site {
    nats: NatsServer,
    mqtt: Mosquitto,
    http: SocketAddr,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn site() -> Site {
    let nats = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        ..Default::default()
    });
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    let config = daemon_config(
        "test",
        &nats.url(),
        mqtt.port,
        http_port,
        &motion_mapping(false),
        ZONES,
    );
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("presenced.toml");
    std::fs::write(&config_path, config).unwrap();
    provision(&config_path);
    Site {
        nats,
        mqtt,
        http: SocketAddr::from(([127, 0, 0, 1], http_port)),
        config_path,
        _dir: dir,
    }
}

fn start(site: &Site) -> Daemon {
    let daemon = Daemon::start_at(&site.config_path, &[]);
    daemon.wait_healthy(site.http, Duration::from_secs(20));
    daemon
}

/// `presenced cmd ... --json` through the CLI: exit success and the reply.
fn cli(config: &Path, args: &[&str]) -> (bool, Reply, String) {
    let mut all: Vec<&str> = vec!["cmd"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config.to_str().unwrap(), "--json"]);
    let out = run_presenced(&all, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let reply: Reply = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("presenced {all:?}: no reply JSON ({e}); stdout {stdout:?}, stderr {stderr:?}")
    });
    (out.status.success(), reply, stderr)
}

async fn presence_revision(js: &async_nats::jetstream::Context) -> u64 {
    let kv = js.get_key_value("presence").await.unwrap();
    kv.entry("hall").await.unwrap().map_or(0, |e| e.revision)
}

fn hall(ev: &[Transition]) -> Vec<(Presence, Presence, i64)> {
    ev.iter()
        .filter(|t| t.zone == "hall")
        .map(|t| (t.from, t.to, t.at.0))
        .collect()
}

async fn wait_state(js: &async_nats::jetstream::Context, want: Presence, deadline: Duration) {
    eventually(&format!("hall {want:?}"), deadline, || async {
        zone(js, "hall").await.is_some_and(|z| z.state == want)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_applies_holds_against_sensors_and_expires_on_time_and_clear_ends_it() {
    let s = site();
    let _d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    wait_state(&js, Presence::Vacant, Duration::from_secs(10)).await;

    let (ok, reply, stderr) = cli(
        &s.config_path,
        &[
            "override", "hall", "occupied", "--for", "4s", "--by", "ann", "--reason", "cleaning",
        ],
    );
    assert!(ok, "override refused: {reply:?} {stderr}");
    assert!(reply.ok && reply.error.is_none(), "{reply:?}");
    assert_eq!(reply.state, Some(Presence::Occupied));
    let held = reply
        .manual
        .clone()
        .expect("the reply carries the override");
    assert_eq!(
        (held.by.as_str(), held.reason.as_deref()),
        ("ann", Some("cleaning"))
    );
    assert_eq!(held.until.0 - held.since.0, 4_000);
    assert_eq!(reply.since, Some(held.since));

    // The zone value records who, why and until; the revision in the reply
    // is the one holding it.
    let kv = js.get_key_value("presence").await.unwrap();
    let entry = kv.entry("hall").await.unwrap().unwrap();
    assert_eq!(Some(entry.revision), reply.revision);
    let value: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
    assert_eq!(value["state"], "occupied");
    assert_eq!(value["override"]["state"], "occupied");
    assert_eq!(value["override"]["by"], "ann");
    assert_eq!(value["override"]["reason"], "cleaning");
    assert_eq!(value["override"]["until"], held.until.to_string());

    // A sensor saying "nobody" is taken in but moves nothing.
    let last_seq = zone(&js, "hall").await.unwrap().last_seq;
    let mut p = Publisher::connect(s.mqtt.port, "test-pub").await;
    p.publish("test/hall_pir", r#"{"occupancy":false}"#).await;
    p.flush(Duration::from_secs(5)).await;
    eventually("reading applied", Duration::from_secs(10), || async {
        zone(&js, "hall")
            .await
            .is_some_and(|z| z.last_seq > last_seq)
    })
    .await;
    let during = zone(&js, "hall").await.unwrap();
    assert_eq!(during.state, Presence::Occupied, "held as commanded");
    assert!(during.confidence < 0.3, "{}", during.confidence);
    assert!(
        now_ms() < held.until.0,
        "the reading came after the override ended; the machine is too slow for this test"
    );

    // At `until` the evidence decides again, through the normal debounce.
    wait_state(&js, Presence::Vacant, Duration::from_secs(20)).await;
    let ev = events(&js).await;
    assert_eq!(
        hall(&ev),
        vec![
            (Presence::Vacant, Presence::Occupied, held.since.0),
            (Presence::Occupied, Presence::Leaving, held.until.0),
            (Presence::Leaving, Presence::Vacant, held.until.0 + 1_000),
        ],
        "{ev:?}"
    );
    assert_eq!(
        ev[0].cause,
        Some(Cause::Override {
            by: "ann".into(),
            reason: Some("cleaning".into()),
            until: held.until
        })
    );
    assert_eq!(ev[1].cause, Some(Cause::OverrideExpired));
    assert_eq!(ev[2].cause, None);
    assert!(zone(&js, "hall").await.unwrap().manual.is_none());

    // `clear` ends an override early; a second clear has nothing to do.
    let (ok, reply, _) = cli(
        &s.config_path,
        &["override", "hall", "occupied", "--for", "1h"],
    );
    assert!(ok && reply.state == Some(Presence::Occupied), "{reply:?}");
    let (ok, reply, stderr) = cli(&s.config_path, &["clear", "hall", "--by", "bob"]);
    assert!(ok, "clear refused: {reply:?} {stderr}");
    assert_eq!((reply.changed, reply.manual.clone()), (Some(true), None));
    assert_eq!(reply.state, Some(Presence::Leaving));
    wait_state(&js, Presence::Vacant, Duration::from_secs(10)).await;
    let ev = events(&js).await;
    let cleared = ev
        .iter()
        .find(|t| t.cause == Some(Cause::OverrideCleared { by: "bob".into() }))
        .expect("the clear is in EVENTS");
    assert_eq!(
        (cleared.from, cleared.to),
        (Presence::Occupied, Presence::Leaving)
    );
    let (ok, reply, _) = cli(&s.config_path, &["clear", "hall"]);
    assert!(ok && reply.changed == Some(false), "{reply:?}");
    assert_eq!(hall(&events(&js).await).len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_command_gets_its_own_error_and_changes_nothing() {
    let s = site();
    let _d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    wait_state(&js, Presence::Vacant, Duration::from_secs(10)).await;
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    let revision = presence_revision(&js).await;
    let events_before = stream_messages(&js, "EVENTS").await;

    let hall = "cmd.test.presence.hall";
    let cases: [(&str, &str, ErrorKind, &str); 12] = [
        (
            "cmd.test.presence.attic",
            r#"{"v":1,"op":"override","state":"occupied","for":"1m"}"#,
            ErrorKind::UnknownZone,
            "attic",
        ),
        (
            "cmd.test.presence.hall.x",
            r#"{"v":1,"op":"clear"}"#,
            ErrorKind::UnknownZone,
            "hall.x",
        ),
        (
            hall,
            r#"{"v":1,"op":"override","#,
            ErrorKind::Malformed,
            "not JSON",
        ),
        (
            hall,
            r#"{"v":1,"op":"override","state":"occupied","for":"1m","colour":"red"}"#,
            ErrorKind::Malformed,
            "colour",
        ),
        (hall, r#"{"v":7,"op":"clear"}"#, ErrorKind::Schema, "v"),
        (hall, r#"{"op":"clear"}"#, ErrorKind::Schema, "\"v\""),
        (
            hall,
            r#"{"v":1,"op":"reboot"}"#,
            ErrorKind::UnknownOp,
            "reboot",
        ),
        (
            hall,
            r#"{"v":1,"op":"override","state":"leaving","for":"1m"}"#,
            ErrorKind::BadState,
            "leaving",
        ),
        (
            hall,
            r#"{"v":1,"op":"override","state":"occupied","for":"a while"}"#,
            ErrorKind::BadDuration,
            "a while",
        ),
        (
            hall,
            r#"{"v":1,"op":"override","state":"occupied","for":"0s"}"#,
            ErrorKind::ZeroDuration,
            "zero",
        ),
        (
            hall,
            r#"{"v":1,"op":"override","state":"occupied","for":"400d"}"#,
            ErrorKind::DurationTooLong,
            "longest",
        ),
        (
            hall,
            r#"{"v":1,"op":"override","state":"occupied","for":"1m","by":"a\u0000b"}"#,
            ErrorKind::BadField,
            "\"by\"",
        ),
    ];
    for (subject, body, kind, says) in cases {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subject.to_owned(), body.to_owned().into()),
        )
        .await
        .unwrap_or_else(|_| panic!("no reply to {body} on {subject}"))
        .unwrap();
        let reply: Reply = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(reply.v, 1);
        assert!(!reply.ok, "{body} was accepted: {reply:?}");
        let error = reply.error.expect("an error reply says why");
        assert_eq!(error.kind, kind, "{body}: {}", error.message);
        assert!(
            error.message.contains(says),
            "{body}: message {:?} does not mention {says:?}",
            error.message
        );
        assert_eq!(reply.state, None, "no state in an error reply");
    }
    // The CLI refuses a bad state before sending, in the engine's words, and
    // shows the engine's refusal of an unknown zone.
    let out = run_presenced(
        &[
            "cmd",
            "override",
            "hall",
            "maybe",
            "--for",
            "1m",
            "--config",
            s.config_path.to_str().unwrap(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("bad_state"),
        "{stderr}"
    );
    let (ok, reply, stderr) = cli(
        &s.config_path,
        &["override", "attic", "vacant", "--for", "1m"],
    );
    assert!(!ok, "unknown zone accepted: {reply:?}");
    assert!(
        stderr.contains("unknown_zone") && stderr.contains("attic"),
        "{stderr}"
    );

    // Nothing changed: no new revision of the zone, no transition.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(presence_revision(&js).await, revision);
    assert_eq!(stream_messages(&js, "EVENTS").await, events_before);
    let state = zone(&js, "hall").await.unwrap();
    assert_eq!((state.state, state.manual), (Presence::Vacant, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_survives_sigkill_and_restart_and_still_expires_on_time() {
    let s = site();
    let mut d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    wait_state(&js, Presence::Vacant, Duration::from_secs(10)).await;

    let (ok, reply, stderr) = cli(
        &s.config_path,
        &["override", "hall", "occupied", "--for", "6s"],
    );
    assert!(ok, "{reply:?} {stderr}");
    let held = reply.manual.expect("override in the reply");
    // Killed right after the reply: the override is durable already.
    d.kill9();
    assert!(zone(&js, "hall").await.unwrap().manual.is_some());
    // Back before the expiry, then killed again and kept down across it.
    d.restart();
    d.wait_healthy(s.http, Duration::from_secs(20));
    assert_eq!(zone(&js, "hall").await.unwrap().state, Presence::Occupied);
    d.kill9();
    while now_ms() < held.until.0 + 1_500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        zone(&js, "hall").await.unwrap().state,
        Presence::Occupied,
        "nothing fires while the daemon is down"
    );
    d.restart();
    d.wait_healthy(s.http, Duration::from_secs(20));
    wait_state(&js, Presence::Vacant, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ev = events(&js).await;
    assert_eq!(
        hall(&ev),
        vec![
            (Presence::Vacant, Presence::Occupied, held.since.0),
            (Presence::Occupied, Presence::Leaving, held.until.0),
            (Presence::Leaving, Presence::Vacant, held.until.0 + 1_000),
        ],
        "the same trajectory as without the kills, dated at the override's end: {ev:?}"
    );
    assert_eq!(ev[1].cause, Some(Cause::OverrideExpired));
    assert!(zone(&js, "hall").await.unwrap().manual.is_none());
}

/// Commands share the engine's loop with SENSORS batches but come first:
/// one sent in the middle of a burst is answered without waiting for the
/// backlog, and the burst that follows cannot move the held zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_answered_during_a_burst_and_the_burst_does_not_move_the_held_zone() {
    use presenced::observation::{Observation, Reading};
    const BURST: u64 = 20_000;
    let s = site();
    let _d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    wait_state(&js, Presence::Vacant, Duration::from_secs(10)).await;
    let before = stream_messages(&js, "SENSORS").await;
    let at = presenced::time::Timestamp(now_ms());
    let mut acks = Vec::new();
    for i in 0..BURST {
        let obs = Observation {
            v: 1,
            sensor: "hall_pir".into(),
            // Ends on true: the sensors say occupied.
            value: Reading::Bool(i % 2 == 1),
            observed_at: at,
            id: format!("burst-{i}"),
            source: "main".into(),
            delivery: None,
        };
        let ack = js
            .publish(
                "sensors.test.hall_pir",
                serde_json::to_vec(&obs).unwrap().into(),
            )
            .await
            .unwrap();
        acks.push(ack);
        if acks.len() >= 500 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    let sent = std::time::Instant::now();
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(
            "cmd.test.presence.hall",
            r#"{"v":1,"op":"override","state":"vacant","for":"1h","by":"ann"}"#.into(),
        ),
    )
    .await
    .expect("a reply within 5 s during the burst")
    .unwrap();
    let latency = sent.elapsed();
    let applied_then = zone(&js, "hall").await.unwrap().last_seq;
    let reply: Reply = serde_json::from_slice(&msg.payload).unwrap();
    assert!(reply.ok, "{reply:?}");
    eprintln!(
        "command answered in {latency:?} during a burst of {BURST}; {} of the burst applied by then",
        applied_then.saturating_sub(before)
    );
    eventually("burst applied", Duration::from_secs(60), || {
        engine_caught_up(&js, before + BURST)
    })
    .await;
    let after = zone(&js, "hall").await.unwrap();
    assert_eq!(after.last_seq, before + BURST, "every reading applied");
    assert!(after.confidence > 0.6, "the sensors say occupied");
    assert_eq!(after.state, Presence::Vacant, "held as commanded");
    assert_eq!(after.manual.map(|m| m.by), Some("ann".to_owned()));
}

/// A command with an id, retried (its reply lost, say): the retry gets the
/// original reply, byte for byte, and changes nothing again; a new id is a
/// new command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_command_with_the_same_id_gets_the_original_reply_and_is_applied_once() {
    let s = site();
    let d = start(&s);
    let js = jetstream(&s.nats.url()).await;
    wait_state(&js, Presence::Vacant, Duration::from_secs(10)).await;
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    let hall = "cmd.test.presence.hall";
    let send = |body: &'static str| {
        let client = client.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                client.request(hall.to_owned(), body.into()),
            )
            .await
            .expect("a reply")
            .unwrap()
            .payload
        }
    };
    let body = r#"{"v":1,"op":"override","state":"occupied","for":"1m","by":"ann","id":"req-1"}"#;
    let first = send(body).await;
    let reply: Reply = serde_json::from_slice(&first).unwrap();
    assert!(reply.ok, "{reply:?}");
    let revision = presence_revision(&js).await;
    let events = stream_messages(&js, "EVENTS").await;
    let manual = zone(&js, "hall").await.unwrap().manual.unwrap();

    let again = send(body).await;
    assert_eq!(again, first, "the retry gets the original reply");
    assert_eq!(
        presence_revision(&js).await,
        revision,
        "nothing written again"
    );
    assert_eq!(stream_messages(&js, "EVENTS").await, events);
    assert_eq!(zone(&js, "hall").await.unwrap().manual.unwrap(), manual);
    d.wait_for_log("answered with the original reply", Duration::from_secs(2));

    // Another id is another command: applied (a new override, new since).
    let other =
        send(r#"{"v":1,"op":"override","state":"occupied","for":"1m","by":"ann","id":"req-2"}"#)
            .await;
    let other: Reply = serde_json::from_slice(&other).unwrap();
    assert!(other.ok, "{other:?}");
    assert!(presence_revision(&js).await > revision, "applied");

    // An id that is no usable text is refused like any bad field.
    let bad = send(r#"{"v":1,"op":"clear","id":""}"#).await;
    let bad: Reply = serde_json::from_slice(&bad).unwrap();
    assert_eq!(bad.error.expect("refused").kind, ErrorKind::BadField);
}
