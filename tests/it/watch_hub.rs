//! `presenced watch --hub`: the hub's mirrors of a site's buckets, read
//! through the leaf (JetStream domain `hub`), across a hub restart. The
//! mirrors are made here by hand (provisioning them is not this test's
//! subject).

use crate::common;
use crate::support;

use async_nats::jetstream::{self, kv, stream};
use common::watch::Watch;
use common::*;
use presenced::naming::{self, Site};
use std::time::Duration;
use support::{NatsOptions, NatsServer};

async fn mirror(hub: &jetstream::Context, site: &Site, bucket: &str) {
    hub.create_key_value(kv::Config {
        bucket: site.hub_mirror(bucket),
        history: 5,
        mirror: Some(stream::Source {
            name: bucket.to_owned(),
            external: Some(stream::External {
                api_prefix: format!("$JS.{}.API", site.leaf_domain()),
                delivery_prefix: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("hub mirror of {bucket}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_watch_reads_the_mirror_with_stale_flags_and_survives_a_hub_restart() {
    let site = Site::new("test").unwrap();
    let mut hub = NatsServer::start(NatsOptions {
        domain: Some(naming::HUB_DOMAIN.into()),
        leafnode_listen: true,
        server_name: Some("hub-1".into()),
        ..Default::default()
    });
    let leaf = NatsServer::start(NatsOptions {
        domain: Some(site.leaf_domain()),
        leaf_remotes: vec![hub.leafnode_url().unwrap()],
        server_name: Some("leaf-test".into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, crate::common::client_config("test", &leaf.url())).unwrap();
    provision(&path);
    let leaf_js = jetstream(&leaf.url()).await;
    let hub_js = jetstream(&hub.url()).await;
    let presence = leaf_js.get_key_value("presence").await.unwrap();
    let first = presence.put("hall", "\"one\"".into()).await.unwrap();

    // Without an owners mirror, stale is unknown and said once.
    mirror(&hub_js, &site, naming::PRESENCE_BUCKET).await;
    let hub_kv = hub_js.get_key_value("presence-test").await.unwrap();
    eventually("the mirror has hall", Duration::from_secs(20), || async {
        hub_kv.get("hall").await.ok().flatten().is_some()
    })
    .await;
    let watch = Watch::start(&path, &["--json", "--hub", "--site", "test"]);
    let (_, line) = watch
        .wait_json("hall from the hub", Duration::from_secs(10), |v| {
            v["event"] == "snapshot" && v["key"] == "hall"
        })
        .await;
    assert_eq!(line["revision"], first);
    assert_eq!(line["value"], "one");
    assert!(line["stale"].is_null(), "no owners mirror: unknown: {line}");
    assert!(
        watch.stderr().contains("owners-test")
            && watch.stderr().contains("stale flags are unknown"),
        "{}",
        watch.stderr()
    );
    drop(watch);

    // With an owners mirror, a lease on the leaf makes the hub copy fresh.
    mirror(&hub_js, &site, naming::OWNERS_BUCKET).await;
    let now = presenced::time::Timestamp::now();
    let lease = serde_json::json!({
        "v": 1, "service": "core", "components": ["engine"], "host": "t", "pid": 1,
        "started": now, "renewed": now, "expires": now.plus(Duration::from_secs(600)),
    });
    // As the daemon writes it: with a per-message TTL.
    let put_lease = |ttl: &'static str| {
        let leaf_js = leaf_js.clone();
        let lease = lease.to_string();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-TTL", ttl);
            leaf_js
                .publish_with_headers("$KV.owners.core", headers, lease.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    put_lease("600s").await;
    let hub_owners = hub_js.get_key_value("owners-test").await.unwrap();
    eventually(
        "the mirror has the lease",
        Duration::from_secs(20),
        || async { hub_owners.get("core").await.ok().flatten().is_some() },
    )
    .await;
    let watch = Watch::start(&path, &["--json", "--hub", "--site", "test"]);
    let (_, line) = watch
        .wait_json("hall fresh from the hub", Duration::from_secs(10), |v| {
            v["event"] == "snapshot" && v["key"] == "hall"
        })
        .await;
    assert_eq!(line["stale"], false, "{line}");
    watch
        .wait_json("end of snapshot", Duration::from_secs(10), |v| {
            v["event"] == "snapshot_end"
        })
        .await;

    // The lease's fate on the leaf reaches the hub copy: deleted (a
    // graceful stop), renewed, and lapsed (its TTL's delete marker is
    // mirrored too).
    let owners = leaf_js.get_key_value("owners").await.unwrap();
    let n = watch.json().len();
    owners.delete("core").await.unwrap();
    watch
        .wait_json_from(
            n,
            "stale on the hub after a release",
            Duration::from_secs(10),
            |v| v["event"] == "owner" && v["stale"] == true,
        )
        .await;
    let n = watch.json().len();
    put_lease("3s").await;
    watch
        .wait_json_from(n, "fresh on the hub", Duration::from_secs(10), |v| {
            v["event"] == "owner" && v["stale"] == false
        })
        .await;
    let n = watch.json().len();
    let put = std::time::Instant::now();
    let (at, _) = watch
        .wait_json_from(
            n,
            "stale on the hub after the TTL",
            Duration::from_secs(15),
            |v| v["event"] == "owner" && v["stale"] == true,
        )
        .await;
    eprintln!(
        "lease with TTL 3s seen lapsed through the hub mirror {:?} after the put",
        at - put
    );
    assert!(at - put <= Duration::from_secs(4), "{:?}", at - put);
    put_lease("600s").await;

    // The hub goes away (the link is cut) while the leaf takes writes; it
    // comes back and the watch resumes without a gap or a duplicate.
    hub.kill();
    let mut written = vec![first];
    for i in 0..3 {
        written.push(
            presence
                .put("hall", format!("\"cut-{i}\"").into())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    hub.start_again();
    let back = std::time::Instant::now();
    let last = *written.last().unwrap();
    let hub_js = jetstream(&hub.url()).await;
    let hub_kv = hub_js.get_key_value("presence-test").await.unwrap();
    eventually(
        "the mirror has the last write",
        Duration::from_secs(60),
        || async {
            hub_kv
                .entry("hall")
                .await
                .ok()
                .flatten()
                .is_some_and(|e| e.revision == last)
        },
    )
    .await;
    let mirrored = back.elapsed();
    let (seen_at, _) = watch
        .wait_json(
            "the last write through the mirror",
            Duration::from_secs(60),
            |v| v["revision"].as_u64() == Some(last),
        )
        .await;
    eprintln!(
        "hub back; the mirror had the last write {mirrored:?} later, the watch printed it {:?} later",
        seen_at - back
    );
    let revisions: Vec<u64> = watch
        .json()
        .into_iter()
        .filter(|(_, v)| v["event"] == "snapshot" || v["event"] == "change")
        .map(|(_, v)| v["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, written, "every revision once, in order");
}
