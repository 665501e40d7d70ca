//! Archive benchmark against a real nats-server and a real S3 server
//! (SeaweedFS): snapshot and restore of 100,000 keys, and the upload of
//! the snapshot, each next to the raw rate of the same store measured in
//! the same run. Run with `cargo bench --bench archive` (see
//! docs/PERFORMANCE.md).

#[path = "../tests/support/mod.rs"]
mod support;

use async_nats::jetstream::{self, object_store as jos};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use object_store::ObjectStore as _;
use presenced::archive::restore::{self, Source};
use presenced::archive::s3::Remote;
use presenced::archive::snapshot::{self, Plan};
use presenced::config::S3Config;
use presenced::naming::{self, Site};
use std::time::{Duration, Instant};
use support::{NatsOptions, NatsServer, Seaweed};

const KEYS: usize = 100_000;

fn mb(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

async fn fill(js: &jetstream::Context) -> u64 {
    let mut acks = FuturesUnordered::new();
    let mut bytes = 0u64;
    for i in 0..KEYS {
        let v = format!(
            "{{\"v\":1,\"state\":\"occupied\",\"confidence\":0.{:04},\"since\":\"2026-11-30T02:00:00Z\",\"applied_seq\":{i},\"evidence\":[{{\"sensor\":\"s{i}\",\"lr\":3.5}}]}}",
            i % 10_000
        );
        bytes += v.len() as u64;
        let ack = js
            .publish(
                naming::kv_subject(naming::PRESENCE_BUCKET, &format!("z{i:06}")),
                v.into(),
            )
            .await
            .expect("publish");
        acks.push(std::future::IntoFuture::into_future(ack));
        if acks.len() >= 512 {
            acks.next().await.expect("ack").expect("ack ok");
        }
    }
    while let Some(a) = acks.next().await {
        a.expect("ack ok");
    }
    bytes
}

/// Raw object-store put of `data`, best of three: the limit a snapshot
/// write runs against.
async fn raw_object_put(js: &jetstream::Context, data: &[u8]) -> f64 {
    let store = js
        .create_object_store(jos::Config {
            bucket: "rawbench".into(),
            ..Default::default()
        })
        .await
        .expect("scratch object store");
    let mut best = 0f64;
    for i in 0..3 {
        let t = Instant::now();
        let mut r = data;
        store
            .put(
                jos::ObjectMetadata {
                    name: format!("raw-{i}"),
                    chunk_size: Some(snapshot::CHUNK_SIZE),
                    ..Default::default()
                },
                &mut r,
            )
            .await
            .expect("raw put");
        best = best.max(mb(data.len() as u64, t.elapsed()));
    }
    best
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let nats = NatsServer::start(NatsOptions {
        domain: Some("leaf-bench".into()),
        ..Default::default()
    });
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let site = Site::new("bench").unwrap();
    presenced::store::provision::provision(&client, &site)
        .await
        .expect("provision");
    let js = jetstream::new(client.clone());
    let t = Instant::now();
    let value_bytes = fill(&js).await;
    let fill_time = t.elapsed();
    println!(
        "fill: {KEYS} keys, {:.1} MB of values in {:.2}s ({:.0} puts/s pipelined, the raw KV write limit)",
        value_bytes as f64 / 1e6,
        fill_time.as_secs_f64(),
        KEYS as f64 / fill_time.as_secs_f64()
    );

    // Raw read: the bucket through an ordered pull consumer, nothing else.
    let raw_read = {
        use async_nats::jetstream::consumer;
        let t = Instant::now();
        let stream = js
            .get_stream(naming::kv_stream(naming::PRESENCE_BUCKET))
            .await
            .expect("stream");
        let c = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: naming::kv_filter(naming::PRESENCE_BUCKET),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut m = c.messages().await.expect("messages");
        let mut n = 0;
        while let Some(msg) = m.next().await {
            n += 1;
            if msg.expect("msg").info().expect("info").pending == 0 {
                break;
            }
        }
        assert_eq!(n, KEYS);
        KEYS as f64 / t.elapsed().as_secs_f64()
    };

    let plan = Plan {
        site: site.clone(),
        buckets: vec![naming::PRESENCE_BUCKET.into()],
        events: None,
    };
    // Signed as the archiver signs, checked as restore checks.
    let key = nkeys::KeyPair::new_user();
    let signer =
        presenced::archive::sign::Signer::from_seed(&key.seed().expect("seed")).expect("signer");
    let mut snaps = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let meta = snapshot::take(&js, &plan, Some(&signer))
            .await
            .expect("snapshot");
        snaps.push((t.elapsed(), meta));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (snap_time, meta) = snaps
        .iter()
        .min_by_key(|(d, _)| *d)
        .cloned()
        .expect("snapshots");
    let store = js
        .get_object_store(naming::SNAPSHOTS_OBJECT)
        .await
        .expect("snapshots store");
    let data = {
        use tokio::io::AsyncReadExt;
        let mut o = store.get(&meta.id).await.expect("get");
        let mut b = Vec::new();
        o.read_to_end(&mut b).await.expect("read");
        b
    };
    let raw_put = raw_object_put(&js, &data).await;
    println!(
        "snapshot: {KEYS} keys in {:.2}s = {:.0} keys/s, {:.1} MB/s of values, {:.1} MB/s written ({:.2} MB gzip, ratio {:.1}) | raw ordered read of the bucket: {:.0} keys/s, raw object-store put of the same bytes: {:.1} MB/s",
        snap_time.as_secs_f64(),
        KEYS as f64 / snap_time.as_secs_f64(),
        mb(value_bytes, snap_time),
        mb(meta.size, snap_time),
        meta.size as f64 / 1e6,
        value_bytes as f64 / meta.size as f64,
        raw_read,
        raw_put
    );

    let t = Instant::now();
    let opts = restore::Options {
        force: true,
        trust: presenced::archive::sign::Trust {
            archiver: Some((key.public_key(), "services.archiver.nkey".into())),
            allow_unsigned: false,
        },
        site: site.clone(),
        backup_dir: std::env::temp_dir(),
    };
    let mut refusals = presenced::archive::refusal::Refusals::none("bench");
    let report = restore::restore(&js, &Source::Local, &meta.id, &opts, &mut refusals)
        .await
        .expect("restore");
    let restore_time = t.elapsed();
    if let Some(b) = &report.backup {
        let _ = std::fs::remove_file(b);
    }
    assert_eq!(report.buckets[naming::PRESENCE_BUCKET], KEYS as u64);
    println!(
        "restore (verify + purge + put): {KEYS} keys in {:.2}s = {:.0} keys/s, {:.1} MB/s of values | raw KV put (fill above): {:.0} keys/s, raw object-store put: {:.1} MB/s",
        restore_time.as_secs_f64(),
        KEYS as f64 / restore_time.as_secs_f64(),
        mb(value_bytes, restore_time),
        KEYS as f64 / fill_time.as_secs_f64(),
        raw_put
    );

    // Upload to a local SeaweedFS, next to a raw PUT of the same bytes.
    let sw = Seaweed::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (access, secret) = sw.write_key_files(dir.path());
    let cfg = |part_size: u64| S3Config {
        endpoint: sw.endpoint(),
        region: "us-east-1".into(),
        bucket: sw.bucket.clone(),
        prefix: "bench".into(),
        path_style: true,
        access_key_file: access.clone(),
        secret_key_file: secret.clone(),
        part_size,
        timeout: Duration::from_secs(60),
    };
    let remote = Remote::from_config(&cfg(8 << 20)).expect("remote");
    let s3 = remote.store();
    let start = Instant::now();
    loop {
        let probe = object_store::path::Path::from("probe");
        match s3
            .put(&probe, object_store::PutPayload::from_static(b"x"))
            .await
        {
            Ok(_) => break,
            Err(e) if start.elapsed() > Duration::from_secs(60) => panic!("S3 not ready: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let mut best_raw = 0f64;
    let mut best_up = 0f64;
    for i in 0..3 {
        let t = Instant::now();
        s3.put(
            &object_store::path::Path::from(format!("raw/{i}")),
            object_store::PutPayload::from(data.clone()),
        )
        .await
        .expect("raw S3 put");
        best_raw = best_raw.max(mb(data.len() as u64, t.elapsed()));
        let t = Instant::now();
        remote.upload(&store, &meta).await.expect("upload");
        best_up = best_up.max(mb(meta.size, t.elapsed()));
    }
    println!(
        "upload (object store -> S3, single PUT): {:.2} MB at {best_up:.1} MB/s | raw S3 PUT of the same bytes from memory: {best_raw:.1} MB/s",
        meta.size as f64 / 1e6
    );

    // Multipart: a 40 MB object in 5 MiB parts, read from the object store.
    let big: Vec<u8> = (0..40_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut r = big.as_slice();
    let big_meta = presenced::archive::SnapshotMeta {
        id: "bench/multipart/20261130T000000.000Z".into(),
        size: big.len() as u64,
        ..meta.clone()
    };
    store
        .put(
            jos::ObjectMetadata {
                name: big_meta.id.clone(),
                chunk_size: Some(snapshot::CHUNK_SIZE),
                ..Default::default()
            },
            &mut r,
        )
        .await
        .expect("big object");
    let multipart = Remote::from_config(&cfg(5 << 20)).expect("remote");
    let t = Instant::now();
    multipart
        .upload(&store, &big_meta)
        .await
        .expect("multipart upload");
    let up = mb(big.len() as u64, t.elapsed());
    let t = Instant::now();
    s3.put(
        &object_store::path::Path::from("raw/big"),
        object_store::PutPayload::from(big.clone()),
    )
    .await
    .expect("raw big put");
    let raw = mb(big.len() as u64, t.elapsed());
    println!(
        "upload (multipart, 5 MiB parts): 40 MB at {up:.1} MB/s | raw single S3 PUT of the same bytes from memory: {raw:.1} MB/s"
    );
    drop(sw);
    drop(nats);
}
