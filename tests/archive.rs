//! The archiver against a real nats-server leaf and a real S3 server
//! (SeaweedFS): snapshot, upload and verification, S3 outages across a
//! daemon crash, corruption, restore, retention and 100,000 keys.

mod support;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as S3Path;
use object_store::{ObjectStore, PutPayload};
use presenced::archive::format::{self, Item, Op};
use presenced::archive::outbox::{Entry, Outbox, State};
use presenced::naming;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::daemon::run_presenced;
use support::{wait_until_async, Daemon, NatsOptions, NatsServer, Seaweed};

const SITE: &str = "home";
const LONG: Duration = Duration::from_secs(90);

/// A leaf nats-server with the site's streams and buckets, and a config
/// for it.
struct Leaf {
    nats: NatsServer,
    http: SocketAddr,
    config_path: PathBuf,
    dir: tempfile::TempDir,
}

fn new_leaf(archive: &str) -> Leaf {
    let nats = NatsServer::start(NatsOptions {
        domain: Some(format!("leaf-{SITE}")),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let http_port = support::free_port();
    let config = format!(
        "site = \"{SITE}\"\n\n[nats]\nurl = \"{}\"\nrequest_timeout = \"5s\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n[engine]\ndrain_timeout = \"5s\"\n\n{archive}",
        nats.url()
    );
    let config_path = dir.path().join("presenced.toml");
    std::fs::write(&config_path, config).unwrap();
    let out = run_presenced(
        &["provision", "--config", config_path.to_str().unwrap()],
        &[],
    );
    assert!(
        out.status.success(),
        "provision failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Leaf {
        nats,
        http: SocketAddr::from(([127, 0, 0, 1], http_port)),
        config_path,
        dir,
    }
}

fn archive_section(every: &str, extra: &str, s3: &str) -> String {
    format!(
        "[archive]\nevery = \"{every}\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n{extra}\n{s3}"
    )
}

impl Leaf {
    async fn js(&self) -> jetstream::Context {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        jetstream::new(client)
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec![args[0], "--config", self.config_path.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        run_presenced(&all, &[])
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "presenced {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The owners bucket (leases), when provisioning does not create it.
async fn ensure_owners(js: &jetstream::Context) {
    if js.get_key_value(naming::OWNERS_BUCKET).await.is_err() {
        js.create_key_value(kv::Config {
            bucket: naming::OWNERS_BUCKET.to_owned(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// Keys in every state bucket, with updates and deletes so revision
/// order and delete markers matter.
async fn seed(js: &jetstream::Context, zones: usize) {
    ensure_owners(js).await;
    let presence = js.get_key_value(naming::PRESENCE_BUCKET).await.unwrap();
    let debounce = js.get_key_value(naming::DEBOUNCE_BUCKET).await.unwrap();
    let owners = js.get_key_value(naming::OWNERS_BUCKET).await.unwrap();
    for i in 0..zones {
        presence
            .put(format!("zone-{i}"), format!("{{\"v\":1,\"i\":{i}}}").into())
            .await
            .unwrap();
    }
    for i in (0..zones).step_by(3) {
        presence
            .put(
                format!("zone-{i}"),
                format!("{{\"v\":1,\"i\":{i},\"again\":true}}").into(),
            )
            .await
            .unwrap();
        debounce
            .put(
                format!("zone-{i}"),
                format!("{{\"v\":1,\"due\":{i}}}").into(),
            )
            .await
            .unwrap();
    }
    presence.delete("zone-1").await.unwrap();
    debounce.purge("zone-0").await.unwrap();
    owners.put("engine", "{\"v\":1}".into()).await.unwrap();
}

/// What `watch` shows of a bucket: every key's current entry (including
/// delete markers) in revision order.
async fn dump(js: &jetstream::Context, bucket: &str) -> Vec<(String, kv::Operation, Bytes)> {
    let mut stream = js.get_stream(naming::kv_stream(bucket)).await.unwrap();
    if stream.info().await.unwrap().state.messages == 0 {
        return Vec::new();
    }
    let store = js.get_key_value(bucket).await.unwrap();
    let mut w = store.watch_with_history(">").await.unwrap();
    let mut out = Vec::new();
    while let Some(e) = w.next().await {
        let e = e.unwrap();
        out.push((e.key.clone(), e.operation, e.value.clone()));
        if e.delta == 0 {
            break;
        }
    }
    out
}

async fn outbox(js: &jetstream::Context) -> Vec<Entry> {
    let (entries, bad) = Outbox::open(js).await.unwrap().all().await.unwrap();
    assert!(bad.is_empty(), "unreadable outbox entries: {bad:?}");
    entries.into_iter().map(|(e, _)| e).collect()
}

async fn wait_all_uploaded(
    js: &jetstream::Context,
    at_least: usize,
    daemon: &Daemon,
) -> Vec<Entry> {
    let start = std::time::Instant::now();
    loop {
        let entries = outbox(js).await;
        if entries.len() >= at_least && entries.iter().all(Entry::is_done) {
            return entries;
        }
        if start.elapsed() > LONG {
            panic!(
                "outbox not all uploaded after {LONG:?}: {entries:#?}\ndaemon log:\n{}",
                daemon.log_tail()
            );
        }
        // Each look creates a short-lived consumer: do not flood the server.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn s3_client(sw: &Seaweed) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(sw.endpoint())
        .with_region("us-east-1")
        .with_bucket_name(&sw.bucket)
        .with_access_key_id(&sw.access_key)
        .with_secret_access_key(&sw.secret_key)
        .with_allow_http(true)
        .build()
        .unwrap()
}

/// Waits until S3 answers signed requests, creating the bucket (the
/// first signed PUT does).
async fn s3_ready(sw: &Seaweed) -> AmazonS3 {
    let s3 = s3_client(sw);
    let probe = S3Path::from("probe");
    let start = std::time::Instant::now();
    loop {
        match s3.put(&probe, PutPayload::from_static(b"x")).await {
            Ok(_) => break,
            Err(e) if start.elapsed() > LONG => {
                panic!("SeaweedFS S3 not ready: {e}\n{}", sw.log())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    s3.delete(&probe).await.unwrap();
    s3
}

async fn remote_keys(s3: &AmazonS3, prefix: &str) -> Vec<String> {
    let p = S3Path::from(prefix);
    let mut keys: Vec<String> = s3
        .list(Some(&p))
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    keys.sort();
    keys
}

fn sha256_hex(b: &[u8]) -> String {
    presenced::archive::hex(&Sha256::digest(b))
}

async fn local_ids(js: &jetstream::Context) -> Vec<String> {
    let store = js.get_object_store(naming::SNAPSHOTS_OBJECT).await.unwrap();
    let mut ids: Vec<String> = presenced::archive::snapshot::list_local(&store)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.meta.is_some())
        .map(|s| s.name)
        .collect();
    ids.sort();
    ids
}

fn metric(http: SocketAddr, name: &str) -> Option<u64> {
    let (_, body) = support::http_get(http, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_uploaded_verified_and_carries_its_metadata() {
    let sw = Seaweed::start();
    let s3 = s3_ready(&sw).await;
    let dir = tempfile::tempdir().unwrap();
    let leaf = new_leaf(&archive_section(
        "1h",
        "events = \"1h\"",
        &sw.config_section(dir.path(), "edge"),
    ));
    let js = leaf.js().await;
    seed(&js, 50).await;
    js.publish(
        format!("events.{SITE}.presence.zone-2"),
        "{\"v\":1,\"to\":\"occupied\"}".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let daemon = Daemon::start_at(&leaf.config_path, &[]);
    let entries = wait_all_uploaded(&js, 1, &daemon).await;
    assert_eq!(entries.len(), 1, "one snapshot at start, the next in 1h");
    let e = &entries[0];
    assert_eq!(e.uploads, 1);
    assert!(
        e.snapshot
            .starts_with("home/debounce_events_owners_presence/"),
        "{}",
        e.snapshot
    );
    let State::Uploaded {
        remote_sha256: sha256,
        etag,
        ..
    } = &e.state
    else {
        panic!("{e:?}")
    };
    assert_eq!(sha256, &e.sha256);
    assert!(etag.is_some(), "the ETag is recorded");

    // The remote object: key, bytes, sha256 and metadata.
    let key = S3Path::from(format!("edge/{}", e.snapshot));
    assert_eq!(remote_keys(&s3, "edge").await, vec![key.to_string()]);
    let got = s3.get(&key).await.unwrap();
    let attrs = got.attributes.clone();
    let bytes = got.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, e.size);
    assert_eq!(sha256_hex(&bytes), e.sha256);
    let meta = |k: &str| {
        attrs
            .get(&object_store::Attribute::Metadata(k.to_owned().into()))
            .map(|v| v.as_ref().to_owned())
            .unwrap_or_else(|| panic!("no x-amz-meta-{k} on the remote object: {attrs:?}"))
    };
    assert_eq!(meta("sha256"), e.sha256);
    assert_eq!(meta("site"), SITE);
    assert_eq!(meta("buckets"), "presence,debounce,owners,events");
    assert_eq!(meta("format-version"), "1");
    assert_eq!(meta("presenced-version"), env!("CARGO_PKG_VERSION"));
    let seq = meta("last-sequence");
    let presence_last = js
        .get_stream(naming::kv_stream(naming::PRESENCE_BUCKET))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert!(
        seq.contains(&format!("presence={presence_last}")) && seq.contains("events=1"),
        "{seq}"
    );

    // The same object in the local store, and its content.
    let store = js.get_object_store(naming::SNAPSHOTS_OBJECT).await.unwrap();
    let info = store.info(&e.snapshot).await.unwrap();
    assert_eq!(info.metadata.get("sha256"), Some(&e.sha256));
    let items = format::decode_all(&bytes).unwrap();
    let presence: Vec<_> = items
        .iter()
        .skip_while(|i| !matches!(i, Item::Section(s) if s.name == "presence"))
        .skip(1)
        .take_while(|i| matches!(i, Item::Record(_)))
        .collect();
    let want = dump(&js, naming::PRESENCE_BUCKET).await;
    assert_eq!(presence.len(), want.len());
    for (item, (k, op, v)) in presence.iter().zip(&want) {
        let Item::Record(r) = item else {
            unreachable!()
        };
        assert_eq!(&r.key, k);
        assert_eq!(r.op == Op::Put, *op == kv::Operation::Put);
        assert_eq!(r.value, v.to_vec());
    }
    assert!(items.iter().any(
        |i| matches!(i, Item::Record(r) if r.key == "events.home.presence.zone-2" && r.revision == 1)
    ));

    assert_eq!(
        metric(leaf.http, "presenced_archive_uploads_total"),
        Some(1)
    );
    let listing = leaf.cli_ok(&["snapshots", "--json", "--verify"]);
    let row: serde_json::Value = serde_json::from_str(listing.lines().next().unwrap()).unwrap();
    assert_eq!(row["id"], e.snapshot.as_str());
    assert_eq!(row["state"], "uploaded");
    assert_eq!(row["remote_size"], e.size);
    assert_eq!(row["local_verified"], "yes");
    assert_eq!(row["remote_verified"], "yes");
    assert_eq!(row["sha256"], e.sha256.as_str());
    drop(daemon);
    let _ = leaf.dir.path();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_across_a_daemon_crash_uploads_exactly_once() {
    let mut sw = Seaweed::start();
    let s3 = s3_ready(&sw).await;
    sw.stop();
    let dir = tempfile::tempdir().unwrap();
    let leaf = new_leaf(&archive_section(
        "1h",
        "",
        &sw.config_section(dir.path(), ""),
    ));
    let js = leaf.js().await;
    seed(&js, 20).await;
    let mut daemon = Daemon::start_at(&leaf.config_path, &[]);
    let failed_after = |n: u32| {
        let js = js.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let e = outbox(&js).await;
            e.len() == 1 && matches!(e[0].state, State::Failed { .. }) && e[0].attempts >= n
        }
    };
    wait_until_async("the upload failed twice", LONG, || failed_after(2)).await;
    assert!(
        daemon.is_running(),
        "the daemon keeps running while S3 is down"
    );
    let entry = outbox(&js).await.remove(0);
    let State::Failed { last_error } = &entry.state else {
        unreachable!()
    };
    assert!(last_error.contains("S3"), "{last_error}");
    let (code, health) = support::http_get(leaf.http, "/healthz").unwrap();
    assert_eq!(
        code, 200,
        "S3 being down does not make the daemon unhealthy"
    );
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["archive"]["s3_ok"], false, "{health}");
    assert_eq!(health["archive"]["pending"], 1, "{health}");
    assert!(metric(leaf.http, "presenced_archive_upload_failures_total").unwrap() >= 2);
    daemon.wait_for_log("upload failed; will retry", LONG);

    // Crash, restart while S3 is still down: the attempt count goes on.
    daemon.kill9();
    let before = outbox(&js).await[0].attempts;
    let daemon = Daemon::start_at(&leaf.config_path, &[]);
    wait_until_async("attempts resumed after the restart", LONG, || {
        failed_after(before + 2)
    })
    .await;
    daemon.wait_for_log("resuming uploads left by the last run", LONG);

    sw.restart();
    let entries = wait_all_uploaded(&js, 1, &daemon).await;
    assert_eq!(
        entries.len(),
        1,
        "no second snapshot: the restart kept the schedule"
    );
    assert_eq!(entries[0].snapshot, entry.snapshot);
    assert_eq!(
        entries[0].uploads, 1,
        "uploaded exactly once: {:?}",
        entries[0]
    );
    assert_eq!(
        remote_keys(&s3, SITE).await,
        vec![entry.snapshot.clone()],
        "exactly one object in S3"
    );
    let bytes = s3
        .get(&S3Path::from(entry.snapshot.as_str()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&bytes), entry.sha256);
    let health: serde_json::Value =
        serde_json::from_str(&support::http_get(leaf.http, "/healthz").unwrap().1).unwrap();
    assert_eq!(health["archive"]["s3_ok"], true, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_remote_copy_is_reported_and_restore_from_it_refused() {
    let sw = Seaweed::start();
    let s3 = s3_ready(&sw).await;
    let dir = tempfile::tempdir().unwrap();
    let s3_section = sw.config_section(dir.path(), "");
    let leaf = new_leaf(&archive_section("1h", "", &s3_section));
    let js = leaf.js().await;
    seed(&js, 30).await;
    let mut daemon = Daemon::start_at(&leaf.config_path, &[]);
    let entry = wait_all_uploaded(&js, 1, &daemon).await.remove(0);
    daemon.terminate();

    // One byte flipped in place (bit rot): same size and metadata, other
    // content.
    let key = S3Path::from(entry.snapshot.as_str());
    let got = s3.get(&key).await.unwrap();
    let attributes = got.attributes.clone();
    let mut bytes = got.bytes().await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    let opts = object_store::PutOptions {
        attributes,
        ..Default::default()
    };
    s3.put_opts(&key, PutPayload::from(bytes), opts)
        .await
        .unwrap();

    let out = leaf.cli(&["snapshots", "--json", "--verify"]);
    assert!(!out.status.success(), "a corrupt copy fails the listing");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let row: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let rv = row["remote_verified"].as_str().unwrap();
    assert!(rv.starts_with("corrupt") && rv.contains("sha256"), "{rv}");
    assert_eq!(row["local_verified"], "yes");
    assert!(stderr.contains(&entry.snapshot), "{stderr}");
    let e = outbox(&js).await.remove(0);
    assert!(
        matches!(&e.state, State::Failed { last_error } if last_error.contains("sha256")),
        "the outbox records the corruption, so the archiver uploads again: {e:?}"
    );

    // A fresh, empty leaf refuses to restore from the corrupt copy.
    let target = new_leaf(&archive_section("1h", "", &s3_section));
    let out = target.cli(&["restore", &entry.snapshot, "--from-s3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sha256") && err.contains("refused"), "{err}");
    let tjs = target.js().await;
    assert!(dump(&tjs, naming::PRESENCE_BUCKET).await.is_empty());

    // The archiver repairs it: the local copy goes up again.
    let daemon = Daemon::start_at(&leaf.config_path, &[]);
    let e = wait_all_uploaded(&js, 1, &daemon).await.remove(0);
    assert_eq!(e.uploads, 2);
    let bytes = s3.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_hex(&bytes), entry.sha256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reproduces_keys_values_and_order_and_refuses_a_non_empty_leaf() {
    let sw = Seaweed::start();
    s3_ready(&sw).await;
    let dir = tempfile::tempdir().unwrap();
    let s3_section = sw.config_section(dir.path(), "site-archive");
    let source = new_leaf(&archive_section("1h", "", &s3_section));
    let js = source.js().await;
    seed(&js, 200).await;
    let mut daemon = Daemon::start_at(&source.config_path, &[]);
    let id = wait_all_uploaded(&js, 1, &daemon).await.remove(0).snapshot;
    daemon.terminate();
    let buckets = [naming::PRESENCE_BUCKET, naming::DEBOUNCE_BUCKET];
    let mut want = Vec::new();
    for b in buckets {
        want.push(dump(&js, b).await);
    }
    assert!(want[0].len() > 150 && want[0].iter().any(|(_, op, _)| *op != kv::Operation::Put));

    // Straight from S3 into an empty leaf.
    let target = new_leaf(&archive_section("1h", "", &s3_section));
    let tjs = target.js().await;
    ensure_owners(&tjs).await;
    let out = target.cli_ok(&["restore", &id, "--from-s3"]);
    assert!(out.contains("restored (sha256"), "{out}");
    // The new leaf lists and verifies the snapshot it only knows from S3.
    let listing = target.cli_ok(&["snapshots", "--json", "--verify"]);
    let row: serde_json::Value = serde_json::from_str(listing.lines().next().unwrap()).unwrap();
    assert_eq!(row["id"], id.as_str());
    assert!(row["local"].is_null() && row["state"].is_null(), "{row}");
    assert_eq!(row["remote_verified"], "yes", "{row}");
    for (b, w) in buckets.iter().zip(&want) {
        assert_eq!(&dump(&tjs, b).await, w, "bucket {b} differs after restore");
    }
    assert!(
        dump(&tjs, naming::OWNERS_BUCKET).await.is_empty(),
        "leases are not restored"
    );
    // `presenced watch` shows the same as on the source.
    // `presenced watch --json` prints the snapshot, then waits for changes.
    let watch = |leaf: &Leaf| -> Vec<String> {
        use std::io::Read;
        let mut child = std::process::Command::new(support::presenced_bin())
            .args([
                "watch",
                "--config",
                leaf.config_path.to_str().unwrap(),
                "--json",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        support::process::kill(&mut child);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        out.lines().map(str::to_owned).collect()
    };
    // The snapshot part of `watch`: keys, values, delete markers, order.
    // Revisions start afresh on the new leaf, and staleness follows the
    // leases, which are not restored: both are left out.
    let strip = |lines: Vec<String>| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "snapshot" || v["event"] == "snapshot_end")
            .map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("revision");
                    o.remove("stale");
                }
                v
            })
            .collect()
    };
    let (a, b) = (strip(watch(&source)), strip(watch(&target)));
    assert!(!a.is_empty());
    assert_eq!(a, b, "watch on the restored leaf differs");

    // The target is no longer empty: refused without --force.
    let out = target.cli(&["restore", &id, "--from-s3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    // Locally on the source, with --force: purged and rebuilt, same state.
    let presence = js.get_key_value(naming::PRESENCE_BUCKET).await.unwrap();
    presence.put("intruder", "{}".into()).await.unwrap();
    let out = source.cli_ok(&["restore", &id, "--force"]);
    assert!(out.contains("purged"), "{out}");
    for (b, w) in buckets.iter().zip(&want) {
        assert_eq!(&dump(&js, b).await, w, "bucket {b} differs after --force");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_exactly_what_the_settings_say() {
    let sw = Seaweed::start();
    let s3 = s3_ready(&sw).await;
    let dir = tempfile::tempdir().unwrap();
    let leaf = new_leaf(&archive_section(
        "1h",
        "keep_local = 3\nkeep_remote = 2\ndelete_remote = true",
        &sw.config_section(dir.path(), ""),
    ));
    let js = leaf.js().await;
    seed(&js, 10).await;
    let daemon = Daemon::start_at(&leaf.config_path, &[]);
    wait_all_uploaded(&js, 1, &daemon).await;
    let mut all = local_ids(&js).await;
    for _ in 0..5 {
        // Names have millisecond stamps; keep them apart.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let out = leaf.cli_ok(&["snapshot"]);
        all.push(out.split(':').next().unwrap().to_owned());
    }
    all.sort();
    assert_eq!(all.len(), 6);
    let remote_want: Vec<String> = all[4..].to_vec();
    let local_want: Vec<String> = all[3..].to_vec();
    let start = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let entries = outbox(&js).await;
        let remote = remote_keys(&s3, SITE).await;
        let local = local_ids(&js).await;
        if entries.iter().all(Entry::is_done) && remote == remote_want && local == local_want {
            break;
        }
        assert!(
            start.elapsed() < LONG,
            "retention not applied: remote {remote:?} (want {remote_want:?}), local {local:?} (want {local_want:?}), outbox {entries:#?}\n{}",
            daemon.log_tail()
        );
    }
    let entries: Vec<String> = outbox(&js).await.into_iter().map(|e| e.snapshot).collect();
    assert_eq!(
        entries, remote_want,
        "outbox entries of snapshots pruned from S3 are removed"
    );
    drop(daemon);

    // delete_remote = false (the default) never deletes from S3.
    let leaf2 = new_leaf(&archive_section(
        "1h",
        "keep_local = 1\nkeep_remote = 1",
        &sw.config_section(dir.path(), "keep-all"),
    ));
    let js2 = leaf2.js().await;
    seed(&js2, 5).await;
    let daemon = Daemon::start_at(&leaf2.config_path, &[]);
    wait_all_uploaded(&js2, 1, &daemon).await;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        leaf2.cli_ok(&["snapshot"]);
    }
    wait_all_uploaded(&js2, 3, &daemon).await;
    wait_until_async("one snapshot left locally", LONG, || {
        let js2 = js2.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            local_ids(&js2).await.len() == 1
        }
    })
    .await;
    assert_eq!(remote_keys(&s3, "keep-all").await.len(), 3);
}

/// Runs presenced to completion and returns its peak RSS (KiB): VmHWM of
/// /proc/<pid>/status, polled until it exits. (wait4's ru_maxrss would
/// include the test process's own size, which a spawned child inherits
/// as its high-water mark across exec.)
fn run_measured(args: &[&str]) -> (std::process::ExitStatus, u64, String) {
    let mut child = std::process::Command::new(support::presenced_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let mut e = String::new();
        let _ = stderr.read_to_string(&mut e);
        s + &e
    });
    let mut peak = 0;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, peak, reader.join().unwrap())
}

/// Puts `n` keys into presence, pipelined.
async fn fill(js: &jetstream::Context, from: usize, to: usize) {
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in from..to {
        let payload = format!(
            "{{\"v\":1,\"state\":\"occupied\",\"confidence\":0.93,\"since\":\"2026-11-30T02:00:00Z\",\"zone\":{i}}}"
        );
        let ack = js
            .publish(
                naming::kv_subject(naming::PRESENCE_BUCKET, &format!("zone-{i}")),
                payload.into(),
            )
            .await
            .unwrap();
        acks.push(std::future::IntoFuture::into_future(ack));
        if acks.len() >= 512 {
            acks.next().await.unwrap().unwrap();
        }
    }
    while let Some(a) = acks.next().await {
        a.unwrap();
    }
}

/// Peak RSS bound of `snapshot` and `restore` at 100,000 keys, measured
/// (see docs/PERFORMANCE.md): flat in the key count.
const PEAK_RSS_KIB: u64 = 48 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_keys_snapshot_and_restore_with_flat_memory() {
    let leaf = new_leaf(&archive_section("1h", "buckets = [\"presence\"]", ""));
    let js = leaf.js().await;
    let cfg = leaf.config_path.to_str().unwrap().to_owned();
    fill(&js, 0, 10_000).await;
    let (st, small, out) = run_measured(&["snapshot", "--config", &cfg]);
    assert!(st.success(), "{out}");
    fill(&js, 10_000, 100_000).await;
    let want = dump(&js, naming::PRESENCE_BUCKET).await;
    assert_eq!(want.len(), 100_000);
    let t = std::time::Instant::now();
    let (st, big, out) = run_measured(&["snapshot", "--config", &cfg]);
    assert!(st.success(), "{out}");
    let snap_time = t.elapsed();
    let id = out.split(':').next().unwrap().to_owned();
    let t = std::time::Instant::now();
    let (st, restore_peak, out) = run_measured(&["restore", "--config", &cfg, &id, "--force"]);
    assert!(st.success(), "{out}");
    let restore_time = t.elapsed();
    assert!(out.contains("presence: 100000 keys restored"), "{out}");
    let got = dump(&js, naming::PRESENCE_BUCKET).await;
    assert_eq!(got, want, "100,000 keys restored in order");
    println!(
        "peak RSS: snapshot 10k keys {small} KiB, 100k keys {big} KiB ({snap_time:?}); restore 100k keys {restore_peak} KiB ({restore_time:?})"
    );
    assert!(
        big <= PEAK_RSS_KIB && restore_peak <= PEAK_RSS_KIB,
        "peak RSS over {PEAK_RSS_KIB} KiB: snapshot {big}, restore {restore_peak}"
    );
    assert!(
        big < small + 8 * 1024,
        "snapshot memory grows with the keys: {small} KiB at 10k, {big} KiB at 100k"
    );
    let _ = Path::new(&cfg);
}
