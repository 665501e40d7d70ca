//! `presenced watch` against a real nats-server: snapshot then deltas for
//! a pattern, JSON lines and the table, stale flags following a lease, and
//! a SIGKILLed leaf nats-server under a running daemon and watch (no gap,
//! no duplicate compared with the KV history).

use crate::common;
use crate::support;

use async_nats::jetstream;
use common::watch::Watch;
use common::*;
use presenced::engine::{Presence, ZoneState};
use presenced::time::Timestamp;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

fn zone_state(zone: &str, state: Presence) -> bytes::Bytes {
    serde_json::to_vec(&ZoneState {
        v: 1,
        zone: zone.into(),
        state,
        since: Timestamp(1_800_000_000_000),
        confidence: 0.75,
        clock: Timestamp(1_800_000_000_000),
        last_seq: 1,
        transitions: 1,
        pending: None,
        evidence: vec![],
        manual: None,
    })
    .unwrap()
    .into()
}

/// A provisioned leaf and a config file pointing at it (no daemon).
fn leaf() -> (NatsServer, PathBuf, tempfile::TempDir) {
    let nats = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, crate::common::client_config("test", &nats.url())).unwrap();
    provision(&path);
    (nats, path, dir)
}

/// Writes a lease for `service` running the engine, as the daemon does.
async fn put_lease(js: &jetstream::Context, service: &str, ttl_s: u64) {
    let now = Timestamp::now();
    let lease = serde_json::json!({
        "v": 1, "service": service, "components": ["engine"], "host": "test",
        "pid": 1, "started": now, "renewed": now, "expires": now.plus(Duration::from_secs(ttl_s)),
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-TTL", format!("{ttl_s}s").as_str());
    js.publish_with_headers(
        format!("$KV.owners.{service}"),
        headers,
        lease.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_deltas_for_a_pattern_in_json_with_stale_flags() {
    let (nats, path, _dir) = leaf();
    let js = jetstream(&nats.url()).await;
    let kv = js.get_key_value("presence").await.unwrap();
    let hall = kv
        .put("floor1.hall", zone_state("hall", Presence::Occupied))
        .await
        .unwrap();
    let kitchen = kv
        .put("floor1.kitchen", zone_state("kitchen", Presence::Vacant))
        .await
        .unwrap();
    kv.put("floor2.bath", zone_state("bath", Presence::Vacant))
        .await
        .unwrap();
    // An older revision of hall that the snapshot must not show.
    let hall = kv
        .put("floor1.hall", zone_state("hall", Presence::Leaving))
        .await
        .unwrap_or(hall);

    let watch = Watch::start(&path, &["--json", "floor1.*"]);
    let (_, end) = watch
        .wait_json("the end of the snapshot", Duration::from_secs(10), |v| {
            v["event"] == "snapshot_end"
        })
        .await;
    let lines = watch.json();
    let snapshot: Vec<_> = lines
        .iter()
        .map(|(_, v)| v)
        .take_while(|v| v["event"] != "snapshot_end")
        .collect();
    assert_eq!(snapshot.len(), 2, "two keys match floor1.*: {snapshot:?}");
    assert_eq!(snapshot[0]["key"], "floor1.kitchen");
    assert_eq!(snapshot[0]["revision"], kitchen);
    assert_eq!(snapshot[1]["key"], "floor1.hall");
    assert_eq!(snapshot[1]["revision"], hall, "the latest revision only");
    assert_eq!(snapshot[1]["value"]["state"], "leaving");
    for v in &snapshot {
        assert_eq!(v["event"], "snapshot");
        assert_eq!(v["stale"], true, "no lease runs the engine: {v}");
        assert_eq!(v["present"], true);
    }
    assert_eq!(end["keys"], 2);
    assert_eq!(end["revision"], hall);

    // Deltas: a matching put, a non-matching put, a matching delete.
    let n = lines.len();
    let vacant = kv
        .put("floor1.hall", zone_state("hall", Presence::Vacant))
        .await
        .unwrap();
    kv.put("floor2.bath", zone_state("bath", Presence::Occupied))
        .await
        .unwrap();
    kv.delete("floor1.kitchen").await.unwrap();
    let (_, deleted) = watch
        .wait_json_from(n, "the delete of kitchen", Duration::from_secs(10), |v| {
            v["key"] == "floor1.kitchen" && v["present"] == false
        })
        .await;
    let deltas: Vec<_> = watch.json().into_iter().skip(n).map(|(_, v)| v).collect();
    assert_eq!(deltas.len(), 2, "bath does not match floor1.*: {deltas:?}");
    assert_eq!(deltas[0]["event"], "change");
    assert_eq!(deltas[0]["key"], "floor1.hall");
    assert_eq!(deltas[0]["revision"], vacant);
    assert_eq!(deltas[0]["value"]["state"], "vacant");
    assert_eq!(deleted["op"], "delete");
    assert!(deleted["value"].is_null());
    assert!(deleted["revision"].as_u64().unwrap() > vacant);

    // A lease running the engine appears: every present key turns fresh;
    // it lapses (TTL, SIGKILL-like): stale again, without any KV change.
    let n = watch.json().len();
    put_lease(&js, "core", 3).await;
    let (_, fresh) = watch
        .wait_json_from(n, "hall fresh", Duration::from_secs(5), |v| {
            v["event"] == "owner" && v["stale"] == false
        })
        .await;
    assert_eq!(fresh["key"], "floor1.hall");
    assert_eq!(fresh["revision"], vacant, "same revision, new stale flag");
    let owner_lines = |from: usize| {
        watch
            .json()
            .into_iter()
            .skip(from)
            .filter(|(_, v)| v["event"] == "owner")
            .count()
    };
    assert_eq!(
        owner_lines(n),
        1,
        "one line per present key (kitchen is deleted)"
    );
    let n = watch.json().len();
    watch
        .wait_json_from(
            n,
            "hall stale after the lease lapsed",
            Duration::from_secs(8),
            |v| v["event"] == "owner" && v["stale"] == true && v["key"] == "floor1.hall",
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_has_a_header_snapshot_rows_and_an_end_marker() {
    let (nats, path, _dir) = leaf();
    let js = jetstream(&nats.url()).await;
    let kv = js.get_key_value("presence").await.unwrap();
    kv.put("hall", zone_state("hall", Presence::Occupied))
        .await
        .unwrap();
    put_lease(&js, "core", 30).await;
    let watch = Watch::start(&path, &[]);
    support::wait_until("three table lines", Duration::from_secs(10), || {
        watch.text().len() >= 3
    });
    let text = watch.text();
    let cols: Vec<&str> = text[0].split_whitespace().collect();
    assert_eq!(
        cols,
        ["ZONE", "STATE", "CONF", "SINCE", "REV", "STALE", "EVENT", "WHY"]
    );
    let row: Vec<&str> = text[1].split_whitespace().collect();
    assert_eq!(row[0], "hall");
    assert_eq!(row[1], "occupied");
    assert_eq!(row[2], "75.0%");
    assert_eq!(row[4], "1", "revision");
    assert_eq!(row[5], "no", "a lease runs the engine");
    assert_eq!(row[6], "snapshot");
    assert!(
        text[2].starts_with("-- end of snapshot: 1 key(s)"),
        "{:?}",
        text[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pattern_is_refused_with_the_token() {
    let (_nats, path, _dir) = leaf();
    let out =
        support::daemon::run_presenced(&["watch", "--config", path.to_str().unwrap(), "a..b"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"a..b\"") && err.contains("token 2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_leaf_under_a_daemon_and_a_watch_no_gap_no_duplicate() {
    let mut nats = NatsServer::start(NatsOptions {
        domain: Some("leaf-test".into()),
        ..Default::default()
    });
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let mut zones = String::from("[lease]\nttl = \"3s\"\n");
    for z in ["a", "b", "c"] {
        zones.push_str(&format!(
            "[zones.{z}]\narrive_after = \"0s\"\nleave_after = \"0s\"\n[[zones.{z}.evidence]]\nsensor = \"{z}_pir\"\np_true = 0.95\np_false = 0.05\n"
        ));
    }
    let cfg = daemon_config(
        "test",
        &nats.url(),
        mqtt.port,
        http_port,
        &motion_mapping(false),
        &zones,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, &cfg).unwrap();
    provision(&path);
    let d = Daemon::start_at(&path, &[]);
    d.wait_healthy(http, Duration::from_secs(20));

    // Readings keep coming the whole time: zones flip every few readings.
    let mut p = Publisher::connect(mqtt.port, "leaf-restart-pub").await;
    let toggle = |i: usize| {
        let zone = ["a", "b", "c"][i % 3];
        let on = (i / 3) % 2 == 0;
        (
            format!("test/{zone}_pir"),
            format!("{{\"occupancy\":{on}}}"),
        )
    };
    let mut i = 0;
    for _ in 0..6 {
        let (t, m) = toggle(i);
        p.publish(&t, m).await;
        i += 1;
    }
    p.flush(Duration::from_secs(5)).await;
    let js = jetstream(&nats.url()).await;
    eventually(
        "all three zones written",
        Duration::from_secs(10),
        || async {
            let mut all = true;
            for z in ["a", "b", "c"] {
                all &= zone(&js, z).await.is_some();
            }
            all
        },
    )
    .await;

    let watch = Watch::start(&path, &["--json"]);
    watch
        .wait_json("the end of the snapshot", Duration::from_secs(10), |v| {
            v["event"] == "snapshot_end"
        })
        .await;
    for _ in 0..12 {
        let (t, m) = toggle(i);
        p.publish(&t, m).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.flush(Duration::from_secs(5)).await;

    // SIGKILL the leaf while readings keep arriving over MQTT.
    eventually(
        "engine caught up before the kill",
        Duration::from_secs(20),
        || async { engine_caught_up(&js, stream_messages(&js, "SENSORS").await).await },
    )
    .await;
    let before_kill = js
        .get_stream("KV_presence")
        .await
        .unwrap()
        .cached_info()
        .state
        .last_sequence;
    nats.kill();
    for _ in 0..12 {
        let (t, m) = toggle(i);
        p.publish(&t, m).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.flush(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.start_again();
    let back = std::time::Instant::now();
    let js = jetstream(&nats.url()).await;
    for _ in 0..12 {
        let (t, m) = toggle(i);
        p.publish(&t, m).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.flush(Duration::from_secs(5)).await;

    // The daemon recovers: it is healthy and applies everything.
    d.wait_healthy(http, Duration::from_secs(30));
    // Readings held while the leaf was down are stored after it is back, so
    // wait for the count to reach what was published, then check that it
    // stays there (no reading stored twice).
    eventually(
        "every reading stored after the restart",
        Duration::from_secs(30),
        || async { stream_messages(&js, "SENSORS").await as usize >= i },
    )
    .await;
    eventually(
        "engine caught up after the restart",
        Duration::from_secs(30),
        || async { engine_caught_up(&js, stream_messages(&js, "SENSORS").await).await },
    )
    .await;
    let total = stream_messages(&js, "SENSORS").await;
    assert_eq!(total as usize, i, "every reading stored once");

    // The watch recovers: it reaches the bucket's last revision.
    let mut info = js.get_stream("KV_presence").await.unwrap();
    let last = info.info().await.unwrap().state.last_sequence;
    assert!(
        last > before_kill,
        "the engine wrote after the leaf came back ({before_kill} -> {last})"
    );
    watch
        .wait_json("the last revision", Duration::from_secs(30), |v| {
            v["revision"].as_u64() == Some(last) && v["event"] == "change"
        })
        .await;

    let (first_after, _) = watch
        .wait_json(
            "a revision written after the restart",
            Duration::from_secs(1),
            |v| v["event"] == "change" && v["revision"].as_u64().unwrap() > before_kill,
        )
        .await;
    eprintln!(
        "leaf back; the watch printed its first new revision {:?} later",
        first_after - back
    );

    // Compared with the KV history: every stored revision after the
    // snapshot appears once, in order, with its key and value.
    let lines = watch.json();
    let (snapshot, rest): (Vec<_>, Vec<_>) = {
        let end = lines
            .iter()
            .position(|(_, v)| v["event"] == "snapshot_end")
            .unwrap();
        (lines[..end].to_vec(), lines[end + 1..].to_vec())
    };
    let snap_last = snapshot
        .iter()
        .map(|(_, v)| v["revision"].as_u64().unwrap())
        .max()
        .unwrap();
    let changes: Vec<(u64, String, serde_json::Value)> = rest
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["event"] == "change")
        .map(|v| {
            (
                v["revision"].as_u64().unwrap(),
                v["key"].as_str().unwrap().to_owned(),
                v["value"].clone(),
            )
        })
        .collect();
    let revisions: Vec<u64> = changes.iter().map(|c| c.0).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "no duplicate, in order: {revisions:?}"
    );
    let history: BTreeMap<u64, (String, serde_json::Value)> = read_stream(&js, "KV_presence")
        .await
        .into_iter()
        .map(|m| {
            let info = m.info().unwrap().stream_sequence;
            let key = m
                .subject
                .as_str()
                .trim_start_matches("$KV.presence.")
                .to_owned();
            (info, (key, serde_json::from_slice(&m.payload).unwrap()))
        })
        .filter(|(seq, _)| *seq > snap_last)
        .collect();
    let seen: BTreeMap<u64, (String, serde_json::Value)> =
        changes.into_iter().map(|(r, k, v)| (r, (k, v))).collect();
    let missing: Vec<_> = history.keys().filter(|r| !seen.contains_key(r)).collect();
    assert!(
        missing.is_empty(),
        "revisions stored but not printed (a gap): {missing:?}\nstderr:\n{}",
        watch.stderr()
    );
    for (rev, kv) in &history {
        assert_eq!(&seen[rev], kv, "revision {rev} printed as stored");
    }
    assert!(
        seen.keys().any(|r| *r > snap_last) && history.len() >= 3,
        "the test wrote across the restart: {} revisions after the snapshot",
        history.len()
    );
    eprintln!(
        "revisions after the snapshot: {} (last before the kill {before_kill}, last {last})",
        history.len()
    );
    assert!(
        watch.stderr().contains("re-creating the consumer"),
        "the watch noticed the restart:\n{}",
        watch.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_bucket_gives_a_reset_and_a_new_snapshot() {
    let (mut nats, path, _dir) = leaf();
    let js = jetstream(&nats.url()).await;
    let kv = js.get_key_value("presence").await.unwrap();
    for z in ["a", "b", "c"] {
        kv.put(z, zone_state(z, Presence::Occupied)).await.unwrap();
    }
    let watch = Watch::start(&path, &["--json"]);
    watch
        .wait_json("the end of the snapshot", Duration::from_secs(10), |v| {
            v["event"] == "snapshot_end"
        })
        .await;
    let n = watch.json().len();

    // The leaf's store is lost and provisioned again: revisions restart.
    nats.kill();
    std::fs::remove_dir_all(&nats.store_dir).unwrap();
    nats.start_again();
    provision(&path);
    let js = jetstream(&nats.url()).await;
    let kv = js.get_key_value("presence").await.unwrap();
    let rev = kv
        .put("z", zone_state("z", Presence::Vacant))
        .await
        .unwrap();
    assert_eq!(rev, 1);
    watch
        .wait_json_from(
            n,
            "the second snapshot's end",
            Duration::from_secs(20),
            |v| v["event"] == "snapshot_end",
        )
        .await;
    let after: Vec<_> = watch.json().into_iter().skip(n).map(|(_, v)| v).collect();
    assert_eq!(after[0]["event"], "reset", "{after:?}");
    assert_eq!(after[1]["event"], "snapshot");
    assert_eq!(after[1]["key"], "z");
    assert_eq!(after[1]["revision"], 1);
    assert_eq!(after[2]["event"], "snapshot_end");
    assert_eq!(after[2]["keys"], 1);
    assert_eq!(after.len(), 3, "{after:?}");
}
