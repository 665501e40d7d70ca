//! The archiver against a real nats-server leaf and a real S3 server
//! (SeaweedFS): snapshot, upload and verification, S3 outages across a
//! daemon crash, corruption, restore, retention and 100,000 keys.

use crate::support;

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
pub(crate) async fn s3_ready(sw: &Seaweed) -> AmazonS3 {
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
    let listing = leaf.cli_ok(&["snapshots", "--json", "--verify", "--allow-unsigned"]);
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

    let out = leaf.cli(&["snapshots", "--json", "--verify", "--allow-unsigned"]);
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
    let out = target.cli(&["restore", &entry.snapshot, "--from-s3", "--allow-unsigned"]);
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
    let out = target.cli_ok(&["restore", &id, "--from-s3", "--allow-unsigned"]);
    assert!(out.contains("restored (sha256"), "{out}");
    // The new leaf lists and verifies the snapshot it only knows from S3.
    let listing = target.cli_ok(&["snapshots", "--json", "--verify", "--allow-unsigned"]);
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
    let out = target.cli(&["restore", &id, "--from-s3", "--allow-unsigned"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    // Locally on the source, with --force: purged and rebuilt, same state.
    let presence = js.get_key_value(naming::PRESENCE_BUCKET).await.unwrap();
    presence.put("intruder", "{}".into()).await.unwrap();
    let backups = source.dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    let out = source.cli_ok(&[
        "restore",
        &id,
        "--force",
        "--allow-unsigned",
        "--backup-dir",
        backups.to_str().unwrap(),
    ]);
    assert!(out.contains("purged"), "{out}");
    // What it replaced was kept, in the snapshot format.
    let saved: Vec<PathBuf> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(out.contains(saved[0].to_str().unwrap()), "{out}");
    let kept = format::decode_all(&std::fs::read(&saved[0]).unwrap()).unwrap();
    assert!(
        kept.iter()
            .any(|i| matches!(i, Item::Record(r) if r.key == "intruder")),
        "the saved copy holds the replaced data"
    );
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
    let backups = leaf.dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    let (st, restore_peak, out) = run_measured(&[
        "restore",
        "--config",
        &cfg,
        &id,
        "--force",
        "--allow-unsigned",
        "--backup-dir",
        backups.to_str().unwrap(),
    ]);
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

// ---------------------------------------------------------------------
// Under the ACL `presenced acl` generates: signed snapshots and the
// restore identity.

/// The identities of the ownership map the ACL tests use: the admin
/// (provisions), `presenced` (ingest, engine and archiver: it signs the
/// snapshots) and `restore` (`runs = ["restore"]`).
struct Keys {
    dir: tempfile::TempDir,
    access: PathBuf,
    archiver_key: String,
}

const IDENTITIES: [&str; 3] = ["admin", "presenced", "restore"];

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let mut public = std::collections::BTreeMap::new();
    for name in IDENTITIES {
        let g = presenced::acl::identity::keygen(name, &dir.path().join(format!("{name}.seed")))
            .unwrap();
        public.insert(name, g.public_key);
    }
    let access = dir.path().join("access.toml");
    std::fs::write(
        &access,
        format!(
            "admin = {{ nkey = \"{}\" }}\n\n[services.presenced]\nnkey = \"{}\"\nruns = [\"ingest\", \"engine\", \"archiver\"]\n\n[services.restore]\nnkey = \"{}\"\nruns = [\"restore\"]\n",
            public["admin"], public["presenced"], public["restore"]
        ),
    )
    .unwrap();
    Keys {
        archiver_key: public["presenced"].clone(),
        dir,
        access,
    }
}

impl Keys {
    fn seed(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.seed"))
    }

    /// A JetStream context as `name`, with its inbox prefix.
    async fn js(&self, nats: &NatsServer, name: &str) -> jetstream::Context {
        let seed = presenced::acl::identity::read_seed(&self.seed(name)).unwrap();
        let client = async_nats::ConnectOptions::new()
            .nkey(seed)
            .custom_inbox_prefix(naming::inbox_prefix(name))
            .connect(nats.url())
            .await
            .unwrap();
        jetstream::new(client)
    }
}

/// A leaf whose nats-server runs the generated ACL, provisioned by the
/// admin, with a config per identity.
struct AclLeaf {
    nats: NatsServer,
    dir: tempfile::TempDir,
}

fn acl_leaf(keys: &Keys, archive: &str) -> AclLeaf {
    let out = run_presenced(
        &[
            "acl",
            "--access",
            keys.access.to_str().unwrap(),
            "--site",
            SITE,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    leaf_with_acl(keys, archive, String::from_utf8(out.stdout).unwrap())
}

/// [`acl_leaf`] with a given authorization block.
fn leaf_with_acl(keys: &Keys, archive: &str, authorization: String) -> AclLeaf {
    let nats = NatsServer::start(NatsOptions {
        domain: Some(format!("leaf-{SITE}")),
        extra: authorization,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let http_port = support::free_port();
    for name in IDENTITIES {
        let config = format!(
            "site = \"{SITE}\"\nservice = \"{name}\"\n\n[nats]\nurl = \"{}\"\nnkey_seed_file = \"{}\"\nrequest_timeout = \"5s\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n[engine]\ndrain_timeout = \"5s\"\n\n{archive}",
            nats.url(),
            keys.seed(name).display()
        );
        std::fs::write(dir.path().join(format!("{name}.toml")), config).unwrap();
    }
    let leaf = AclLeaf { nats, dir };
    leaf.cli_ok("admin", &["provision"]);
    leaf
}

impl AclLeaf {
    fn config(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.toml"))
    }

    fn cli(&self, name: &str, args: &[&str]) -> std::process::Output {
        let config = self.config(name);
        let mut all = vec![args[0], "--config", config.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        run_presenced(&all, &[])
    }

    fn cli_ok(&self, name: &str, args: &[&str]) -> String {
        let out = self.cli(name, args);
        assert!(
            out.status.success(),
            "presenced {args:?} as {name} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects a failure; returns stderr.
    fn cli_fails(&self, name: &str, args: &[&str]) -> String {
        let out = self.cli(name, args);
        assert!(
            !out.status.success(),
            "presenced {args:?} as {name} succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }
}

/// Presence and debounce keys, written as the engine's identity (their
/// owner); `tag` makes each generation of values different.
async fn seed_as_engine(js: &jetstream::Context, zones: usize, tag: &str) {
    let presence = js.get_key_value(naming::PRESENCE_BUCKET).await.unwrap();
    let debounce = js.get_key_value(naming::DEBOUNCE_BUCKET).await.unwrap();
    for i in 0..zones {
        presence
            .put(
                format!("zone-{i}"),
                format!("{{\"v\":1,\"i\":{i},\"tag\":\"{tag}\"}}").into(),
            )
            .await
            .unwrap();
        if i % 2 == 0 {
            debounce
                .put(
                    format!("zone-{i}"),
                    format!("{{\"v\":1,\"due\":\"{tag}\"}}").into(),
                )
                .await
                .unwrap();
        }
    }
    presence.delete("zone-1").await.unwrap();
}

async fn dump_state(js: &jetstream::Context) -> Vec<Vec<(String, kv::Operation, Bytes)>> {
    let mut out = Vec::new();
    for b in [naming::PRESENCE_BUCKET, naming::DEBOUNCE_BUCKET] {
        out.push(dump(js, b).await);
    }
    out
}

/// The attacker's move: the snapshot in S3 replaced by another whose
/// `sha256` metadata matches its bytes, every other metadata kept
/// (signature included).
async fn replace_in_s3(s3: &AmazonS3, key: &S3Path, bytes: Vec<u8>, strip_signature: bool) {
    let got = s3.get(key).await.unwrap();
    let mut attributes = object_store::Attributes::new();
    for (k, v) in got.attributes.iter() {
        let skip = matches!(k, object_store::Attribute::Metadata(m)
            if strip_signature && (m == "signature" || m == "signer"));
        if !skip {
            attributes.insert(k.clone(), v.clone());
        }
    }
    attributes.insert(
        object_store::Attribute::Metadata("sha256".into()),
        sha256_hex(&bytes).into(),
    );
    let opts = object_store::PutOptions {
        attributes,
        ..Default::default()
    };
    s3.put_opts(key, PutPayload::from(bytes), opts)
        .await
        .unwrap();
}

/// A snapshot with one presence value changed, re-encoded: a valid
/// snapshot, just not the archiver's.
fn tampered(original: &[u8]) -> Vec<u8> {
    let items = format::decode_all(original).unwrap();
    let Some(Item::Header(h)) = items.first() else {
        panic!("no header")
    };
    let mut e = format::Encoder::new(Vec::new(), h).unwrap();
    let mut changed = false;
    for item in &items[1..] {
        match item {
            Item::Section(s) => e.section(s).unwrap(),
            Item::Record(r) if !changed && r.op == Op::Put && r.key.starts_with("zone-") => {
                let mut r = r.clone();
                r.value = b"{\"v\":1,\"state\":\"vacant\",\"forged\":true}".to_vec();
                changed = true;
                e.record(&r).unwrap();
            }
            Item::Record(r) => e.record(r).unwrap(),
            Item::End(t) => return e.finish(t).unwrap(),
            Item::Header(_) => unreachable!(),
        }
    }
    panic!("no end frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_and_checksum_replaced_in_s3_are_refused_by_restore_and_verify() {
    let sw = Seaweed::start();
    let s3 = s3_ready(&sw).await;
    let keys = keys();
    let s3_dir = tempfile::tempdir().unwrap();
    let s3_section = sw.config_section(s3_dir.path(), "");
    let archive = archive_section("1h", "buckets = [\"presence\", \"debounce\"]", &s3_section);
    let source = acl_leaf(&keys, &archive);
    let engine = keys.js(&source.nats, "presenced").await;
    seed_as_engine(&engine, 40, "source").await;
    let daemon = Daemon::start_at(&source.config("presenced"), &[]);
    let admin = keys.js(&source.nats, "admin").await;
    let entry = wait_all_uploaded(&admin, 1, &daemon).await.remove(0);
    assert!(
        !daemon.log().contains("permission violation"),
        "{}",
        daemon.log_tail()
    );
    let want = dump_state(&admin).await;
    let access = keys.access.to_str().unwrap();
    let key = S3Path::from(entry.snapshot.as_str());
    let original = s3.get(&key).await.unwrap();
    let attrs = original.attributes.clone();
    let original = original.bytes().await.unwrap().to_vec();
    let signer = attrs
        .get(&object_store::Attribute::Metadata("signer".into()))
        .map(|v| v.as_ref().to_owned());
    assert_eq!(signer.as_deref(), Some(keys.archiver_key.as_str()));

    // Signed by the archiver: verified on the source, restored into an
    // empty leaf by the restore identity.
    let listing = source.cli_ok(
        "presenced",
        &["snapshots", "--json", "--verify", "--access", access],
    );
    let row: serde_json::Value = serde_json::from_str(listing.lines().next().unwrap()).unwrap();
    let signed = format!("signed by {}", keys.archiver_key);
    assert_eq!(row["local_signature"], signed.as_str(), "{row}");
    assert_eq!(row["remote_signature"], signed.as_str(), "{row}");
    assert_eq!(row["remote_verified"], "yes", "{row}");
    let target = acl_leaf(&keys, &archive);
    let tadmin = keys.js(&target.nats, "admin").await;
    let out = target.cli_ok(
        "restore",
        &["restore", &entry.snapshot, "--from-s3", "--access", access],
    );
    assert!(
        out.contains(&format!("signature of {} verified", keys.archiver_key)),
        "{out}"
    );
    assert_eq!(dump_state(&tadmin).await, want, "restored data differs");

    // Without an ownership map there is nothing to check against.
    let err = target.cli_fails(
        "restore",
        &["restore", &entry.snapshot, "--from-s3", "--force"],
    );
    assert!(
        err.contains("--access") && err.contains("--allow-unsigned"),
        "{err}"
    );

    // The attacker holds the S3 keys: a changed snapshot with a matching
    // sha256 (the old check would pass it).
    let forged = tampered(&original);
    replace_in_s3(&s3, &key, forged.clone(), false).await;
    let err = target.cli_fails(
        "restore",
        &[
            "restore",
            &entry.snapshot,
            "--from-s3",
            "--force",
            "--access",
            access,
        ],
    );
    assert!(
        err.contains("refused") && err.contains("signature does not match"),
        "{err}"
    );
    assert_eq!(
        dump_state(&tadmin).await,
        want,
        "a refused restore changed the target"
    );
    // --allow-unsigned does not let a wrongly signed snapshot through.
    let err = target.cli_fails(
        "restore",
        &[
            "restore",
            &entry.snapshot,
            "--from-s3",
            "--force",
            "--access",
            access,
            "--allow-unsigned",
        ],
    );
    assert!(err.contains("signature does not match"), "{err}");
    assert_eq!(dump_state(&tadmin).await, want);

    // `snapshots --verify`: on the target (it knows the snapshot from S3
    // only, and its sha256 matches) and on the source.
    let out = target.cli(
        "presenced",
        &["snapshots", "--json", "--verify", "--access", access],
    );
    assert!(!out.status.success(), "--verify passed a forged snapshot");
    let row: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    let rs = row["remote_signature"].as_str().unwrap();
    assert!(
        rs.starts_with("refused") && rs.contains("does not match"),
        "{row}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&entry.snapshot) && stderr.contains("signature"),
        "{stderr}"
    );
    let out = source.cli(
        "presenced",
        &["snapshots", "--json", "--verify", "--access", access],
    );
    assert!(!out.status.success());
    // The forged copy goes back to the outbox and the running archiver
    // replaces it with its own, signed, copy.
    wait_until_async("the archiver uploaded its copy again", LONG, || {
        let admin = admin.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            outbox(&admin).await[0].uploads == 2
        }
    })
    .await;
    let e = wait_all_uploaded(&admin, 1, &daemon).await.remove(0);
    assert_eq!(e.uploads, 2, "{e:?}");
    let repaired = s3.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(repaired.as_ref(), original.as_slice());
    drop(daemon);

    // Unsigned (signature stripped): refused unless --allow-unsigned.
    let mut saved = std::collections::HashMap::new();
    for (k, v) in attrs.iter() {
        if let object_store::Attribute::Metadata(m) = k {
            saved.insert(m.to_string(), v.as_ref().to_owned());
        }
    }
    replace_in_s3(&s3, &key, original.clone(), true).await;
    let err = target.cli_fails(
        "restore",
        &[
            "restore",
            &entry.snapshot,
            "--from-s3",
            "--force",
            "--access",
            access,
        ],
    );
    assert!(
        err.contains("unsigned") && err.contains("--allow-unsigned"),
        "{err}"
    );
    let fresh = acl_leaf(&keys, &archive);
    let fadmin = keys.js(&fresh.nats, "admin").await;
    let out = fresh.cli_ok(
        "restore",
        &[
            "restore",
            &entry.snapshot,
            "--from-s3",
            "--access",
            access,
            "--allow-unsigned",
        ],
    );
    assert!(out.contains("SIGNATURE NOT CHECKED"), "{out}");
    assert_eq!(dump_state(&fadmin).await, want);
    assert!(saved.contains_key("signature"), "{saved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_checks_every_right_first_and_rolls_back_a_refused_write() {
    let keys = keys();
    let leaf = acl_leaf(
        &keys,
        &archive_section("1h", "buckets = [\"presence\", \"debounce\"]", ""),
    );
    let access = keys.access.to_str().unwrap();
    let engine = keys.js(&leaf.nats, "presenced").await;
    let admin = keys.js(&leaf.nats, "admin").await;
    seed_as_engine(&engine, 60, "snapshot").await;
    let snapshot_state = dump_state(&admin).await;
    let out = leaf.cli_ok("presenced", &["snapshot"]);
    let id = out.split(':').next().unwrap().to_owned();
    // The state moves on after the snapshot: this is what a refused
    // restore must leave in place.
    seed_as_engine(&engine, 80, "current").await;
    let current = dump_state(&admin).await;
    assert_ne!(current, snapshot_state);
    let backups = leaf.dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    let b = backups.to_str().unwrap();
    let args = [
        "restore",
        id.as_str(),
        "--force",
        "--access",
        access,
        "--backup-dir",
        b,
    ];

    // The engine's identity may write presence but not purge it: refused
    // at the check, named, nothing changed.
    let err = leaf.cli_fails("presenced", &args);
    assert!(
        err.contains("permission refused")
            && err.contains("\"presenced\"")
            && err.contains("$JS.API.STREAM.PURGE.KV_presence")
            && err.contains("runs = [\"restore\"]"),
        "{err}"
    );
    assert_eq!(
        dump_state(&admin).await,
        current,
        "the engine's restore changed the target"
    );
    // The admin may purge but write no keyspace: refused before the
    // purge (it used to purge, then fail every write).
    let err = leaf.cli_fails("admin", &args);
    assert!(
        err.contains("permission refused")
            && err.contains("$KV.presence.restore=probe")
            && err.contains("runs = [\"restore\"]"),
        "{err}"
    );
    assert_eq!(
        dump_state(&admin).await,
        current,
        "the admin's restore changed the target"
    );
    assert_eq!(
        std::fs::read_dir(&backups).unwrap().count(),
        0,
        "nothing saved: nothing began"
    );

    // Listing is the archiver's (the outbox is its own): refused at once
    // and named, not reported as a missing bucket after a timeout.
    let t = std::time::Instant::now();
    let err = leaf.cli_fails("restore", &["snapshots"]);
    assert!(
        err.contains("permission refused")
            && err.contains("\"restore\"")
            && err.contains("KV_archive")
            && err.contains("archiver"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );

    // Another site's leaf does not take this site's snapshot.
    let other = leaf.dir.path().join("other-site.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(leaf.config("restore"))
            .unwrap()
            .replacen(&format!("site = \"{SITE}\""), "site = \"other\"", 1),
    )
    .unwrap();
    let out = run_presenced(
        &[
            "restore",
            "--config",
            other.to_str().unwrap(),
            &id,
            "--force",
            "--access",
            access,
            "--backup-dir",
            b,
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is of site home, this leaf is site other"),
        "{err}"
    );
    assert_eq!(dump_state(&admin).await, current);

    // The restore identity: everything it needs, nothing refused.
    let out = leaf.cli_ok("restore", &args);
    assert!(out.contains("presence: 60 keys restored"), "{out}");
    assert_eq!(
        dump_state(&admin).await,
        snapshot_state,
        "restored data differs"
    );

    // Refused midway: a snapshot with a value the target's stream will
    // not take (a limit below the snapshot's largest value, set after it
    // was taken: the server refuses that write after others succeeded).
    let presence = engine.get_key_value(naming::PRESENCE_BUCKET).await.unwrap();
    presence
        .put(
            "zone-big",
            format!("{{\"v\":1,\"pad\":\"{}\"}}", "x".repeat(4000)).into(),
        )
        .await
        .unwrap();
    let out = leaf.cli_ok("presenced", &["snapshot"]);
    let big = out.split(':').next().unwrap().to_owned();
    presence.put("zone-big", "{\"v\":1}".into()).await.unwrap();
    seed_as_engine(&engine, 30, "before-the-failed-restore").await;
    let before = dump_state(&admin).await;
    let mut stream = admin
        .get_stream(naming::kv_stream(naming::PRESENCE_BUCKET))
        .await
        .unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 1024;
    admin.update_stream(config).await.unwrap();
    let args = [
        "restore",
        big.as_str(),
        "--force",
        "--access",
        access,
        "--backup-dir",
        b,
    ];
    let err = leaf.cli_fails("restore", &args);
    assert!(
        err.contains("zone-big") && err.contains("rolled back"),
        "{err}"
    );
    assert_eq!(
        dump_state(&admin).await,
        before,
        "the failed restore did not leave the old data in place"
    );

    // The copy it kept is a restorable file: unsigned, so only with
    // --allow-unsigned.
    let kept = err
        .split("put back from ")
        .nth(1)
        .and_then(|t| t.split(" (kept)").next())
        .unwrap()
        .to_owned();
    leaf.cli_ok("restore", &args_good(&id, access, b));
    assert_eq!(dump_state(&admin).await, snapshot_state);
    let from_file = [
        "restore",
        "--from-file",
        kept.as_str(),
        "--force",
        "--backup-dir",
        b,
    ];
    let err = leaf.cli_fails("restore", &from_file);
    assert!(
        err.contains("unsigned") && err.contains("--allow-unsigned"),
        "{err}"
    );
    assert_eq!(dump_state(&admin).await, snapshot_state);
    let mut with_flag = from_file.to_vec();
    with_flag.push("--allow-unsigned");
    let out = leaf.cli_ok("restore", &with_flag);
    assert!(out.contains("SIGNATURE NOT CHECKED"), "{out}");
    assert_eq!(
        dump_state(&admin).await,
        before,
        "the kept copy restores the old data"
    );

    // A file with a key the server would refuse, after valid ones: refused
    // on the first read, before anything changes (the key used to be
    // found half way through the writes, after the purge).
    let header = format::Header {
        site: SITE.into(),
        created: "2026-12-07T00:00:00.000Z".into(),
        presenced_version: "0".into(),
        buckets: vec!["presence".into()],
        events_since: None,
    };
    let mut e = format::Encoder::new(Vec::new(), &header).unwrap();
    e.section(&format::Section {
        name: "presence".into(),
        kind: format::SectionKind::Kv,
    })
    .unwrap();
    for (i, key) in ["zone-a", "zone-b", "not a key"].into_iter().enumerate() {
        e.record(&format::Record {
            key: key.into(),
            op: Op::Put,
            revision: i as u64 + 1,
            created_ns: 0,
            value: b"{\"v\":1}".to_vec(),
        })
        .unwrap();
    }
    let bytes = e
        .finish(&format::Trailer {
            sections: vec![format::SectionSummary {
                name: "presence".into(),
                records: 3,
                last_sequence: 3,
            }],
        })
        .unwrap();
    let bad = leaf.dir.path().join("bad-key.snap");
    std::fs::write(&bad, bytes).unwrap();
    let err = leaf.cli_fails(
        "restore",
        &[
            "restore",
            "--from-file",
            bad.to_str().unwrap(),
            "--force",
            "--allow-unsigned",
            "--backup-dir",
            b,
        ],
    );
    assert!(
        err.contains("\"not a key\"")
            && err.contains("not a valid KV key")
            && err.contains("nothing changed"),
        "{err}"
    );
    assert_eq!(dump_state(&admin).await, before);
}

fn args_good<'a>(id: &'a str, access: &'a str, backups: &'a str) -> [&'a str; 7] {
    [
        "restore",
        id,
        "--force",
        "--access",
        access,
        "--backup-dir",
        backups,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grant_of_the_restore_role_is_needed_and_without_one_nothing_changes() {
    use presenced::acl::{access::Access, render};
    let keys = keys();
    let site = presenced::naming::Site::new(SITE).unwrap();
    let access = Access::load(&keys.access).unwrap();
    let users = render::users(&access, &site);
    let at = users
        .iter()
        .position(|u| u.label == "service restore")
        .unwrap();
    let own: Vec<String> = users[at]
        .permissions
        .publish_allow
        .iter()
        .filter(|r| r.why.starts_with("restore:"))
        .map(|r| r.subject.clone())
        .collect();
    assert_eq!(own.len(), 4, "{own:?}");
    let archive = archive_section("1h", "buckets = [\"presence\", \"debounce\"]", "");
    let access_path = keys.access.to_str().unwrap();
    for rule in &own {
        let mut variant = users.clone();
        variant[at]
            .permissions
            .publish_allow
            .retain(|r| &r.subject != rule);
        let leaf = leaf_with_acl(&keys, &archive, render::render_users(&variant, &site, None));
        let engine = keys.js(&leaf.nats, "presenced").await;
        let admin = keys.js(&leaf.nats, "admin").await;
        seed_as_engine(&engine, 10, "snapshot").await;
        let out = leaf.cli_ok("presenced", &["snapshot"]);
        let id = out.split(':').next().unwrap().to_owned();
        seed_as_engine(&engine, 12, "current").await;
        let current = dump_state(&admin).await;
        let backups = leaf.dir.path().join("backups");
        std::fs::create_dir(&backups).unwrap();
        let err = leaf.cli_fails(
            "restore",
            &[
                "restore",
                &id,
                "--force",
                "--access",
                access_path,
                "--backup-dir",
                backups.to_str().unwrap(),
            ],
        );
        assert!(
            err.contains("permission refused") && err.contains(rule.trim_end_matches('>')),
            "without {rule}: {err}"
        );
        assert_eq!(
            dump_state(&admin).await,
            current,
            "without {rule}, restore changed the target"
        );
        assert_eq!(std::fs::read_dir(&backups).unwrap().count(), 0);
    }
}
