//! A standby's copy of a KV bucket (`engine::standby::catch_up`), as a
//! part on one server: it reads the cheaper of the writes since its last
//! sequence and one value per key, and ends equal to the bucket. The
//! failover tests run it in the daemon under the generated ACL.

use crate::support;
use presenced::engine::standby::{catch_up, Followed};
use presenced::naming;
use std::collections::BTreeMap;
use support::{NatsOptions, NatsServer};

/// The bucket as a plain read sees it: each key's value (`None` once
/// deleted) and revision.
async fn truth(
    store: &async_nats::jetstream::kv::Store,
) -> BTreeMap<String, (Option<Vec<u8>>, u64)> {
    presenced::store::kv::load_all(store, naming::PRESENCE_BUCKET)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, c)| (k, (c.value.map(|v| v.to_vec()), c.revision)))
        .collect()
}

fn copy_of(f: &Followed) -> BTreeMap<String, (Option<Vec<u8>>, u64)> {
    f.keys
        .iter()
        .map(|(k, c)| (k.clone(), (c.value.clone().map(|v| v.to_vec()), c.revision)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_copy_reads_what_changed_or_one_value_per_key_whichever_is_fewer() {
    let server = NatsServer::start(NatsOptions::default());
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let config = presenced::store::provision::bucket_configs()
        .into_iter()
        .find(|c| c.bucket == naming::PRESENCE_BUCKET)
        .unwrap();
    let store = js.create_key_value(config).await.unwrap();

    // 100 keys written three times each: a first copy is one value per key.
    for round in 0..3 {
        for k in 0..100 {
            store
                .put(format!("z{k}"), format!("{round}").into())
                .await
                .unwrap();
        }
    }
    let (copy, read) = catch_up(&store, Followed::default()).await.unwrap();
    assert_eq!(read, 100, "a first copy reads one value per key");
    assert_eq!(copy.seen, 300);
    assert_eq!(copy_of(&copy), truth(&store).await);

    // Nothing changed: nothing read.
    let (copy, read) = catch_up(&store, copy).await.unwrap();
    assert_eq!(read, 0);

    // Two writes and a delete since: exactly those three are read.
    store.put("z7", "x".into()).await.unwrap();
    store.put("z8", "y".into()).await.unwrap();
    store.delete("z9").await.unwrap();
    let (copy, read) = catch_up(&store, copy).await.unwrap();
    assert_eq!(read, 3, "only the writes since the copy's last sequence");
    assert_eq!(copy.seen, 303);
    assert_eq!(
        copy.keys["z9"].value, None,
        "a delete is a key without a value"
    );
    assert_eq!(copy_of(&copy), truth(&store).await);

    // More writes than keys since: one value per key again, not every write.
    for round in 0..4 {
        for k in 0..100 {
            store
                .put(format!("z{k}"), format!("r{round}").into())
                .await
                .unwrap();
        }
    }
    let (copy, read) = catch_up(&store, copy).await.unwrap();
    assert_eq!(read, 100, "400 writes on 100 keys read as 100 values");
    assert_eq!(copy.seen, 703);
    assert_eq!(copy_of(&copy), truth(&store).await);
}
