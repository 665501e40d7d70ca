//! Warm standby: an engine instance that does not hold the leader lease
//! follows KV `presence` and `debounce` (an ordered consumer on each, the
//! snapshot then every write of the holder), so a takeover starts from the
//! state it already has instead of reading both buckets from scratch.
//!
//! At takeover the cache is only trusted once it has caught up with the
//! buckets' last sequences as the server reports them then (one stream
//! info per bucket): a write of the old holder that the follower has not
//! seen yet would otherwise make the new holder's first compare-and-set
//! expect a stale revision. A cache that does not catch up within
//! [`CATCH_UP`] (a broken follow, a lagging link) is dropped and the
//! buckets are read in full, as a cold start does.
//!
//! The holder runs no follower: its own writes would only come back to it.

use crate::naming;
use crate::store::kv::Current;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How long a takeover waits for the cache to reach the buckets' last
/// sequences before it reads them in full instead.
pub const CATCH_UP: Duration = Duration::from_secs(1);

/// Wait before following a bucket again after its consumer failed.
const RETRY: Duration = Duration::from_secs(1);

/// What the follower of one bucket has seen.
#[derive(Debug, Default)]
struct Followed {
    keys: BTreeMap<String, Current>,
    /// The highest stream sequence applied to `keys`.
    seen: u64,
}

/// KV presence and debounce as the follower last saw them.
#[derive(Debug, Clone, Default)]
struct Shared {
    presence: Arc<Mutex<Followed>>,
    debounce: Arc<Mutex<Followed>>,
}

/// The followers of a standby, stopped when dropped.
pub struct Warm {
    shared: Shared,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Warm {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The buckets' contents handed to the runner at takeover.
pub struct Rehydrated {
    pub presence: BTreeMap<String, Current>,
    pub debounce: BTreeMap<String, Current>,
}

impl Warm {
    /// Starts following both buckets (in tasks of their own).
    pub fn start(js: jetstream::Context) -> Warm {
        let shared = Shared::default();
        let tasks = vec![
            tokio::spawn(follow(
                js.clone(),
                naming::PRESENCE_BUCKET,
                shared.presence.clone(),
            )),
            tokio::spawn(follow(js, naming::DEBOUNCE_BUCKET, shared.debounce.clone())),
        ];
        Warm { shared, tasks }
    }

    /// The cached buckets once they have caught up with what the server
    /// holds now; `None` (and the followers stopped) if they do not
    /// within `wait`, or the buckets cannot be asked.
    pub async fn take(
        self,
        presence: &kv::Store,
        debounce: &kv::Store,
        wait: Duration,
    ) -> Option<Rehydrated> {
        let last = |store: &kv::Store| {
            let store = store.clone();
            async move {
                store
                    .status()
                    .await
                    .ok()
                    .map(|s| s.info.state.last_sequence)
            }
        };
        let (p_last, d_last) = futures::join!(last(presence), last(debounce));
        let (p_last, d_last) = (p_last?, d_last?);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let p_seen = lock(&self.shared.presence).seen;
            let d_seen = lock(&self.shared.debounce).seen;
            if p_seen >= p_last && d_seen >= d_last {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    presence_seen = p_seen,
                    presence_last = p_last,
                    debounce_seen = d_seen,
                    debounce_last = d_last,
                    "warm standby: the followed state did not catch up with the buckets; reading them in full"
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Stop following before taking the maps: nothing changes them
        // after this point.
        for t in &self.tasks {
            t.abort();
        }
        let presence = std::mem::take(&mut lock(&self.shared.presence).keys);
        let debounce = std::mem::take(&mut lock(&self.shared.debounce).keys);
        Some(Rehydrated { presence, debounce })
    }
}

fn lock(m: &Mutex<Followed>) -> std::sync::MutexGuard<'_, Followed> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows one bucket until aborted: snapshot (last value per key), then
/// every write; on any error starts over with a fresh snapshot.
async fn follow(js: jetstream::Context, bucket: &'static str, into: Arc<Mutex<Followed>>) {
    let mut logged = false;
    loop {
        let result = async {
            let store = js.get_key_value(bucket).await.map_err(|e| e.to_string())?;
            let mut watch = store
                .watch_with_history(">")
                .await
                .map_err(|e| e.to_string())?;
            *lock(&into) = Followed::default();
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| e.to_string())?;
                let value = match entry.operation {
                    kv::Operation::Put => Some(entry.value),
                    kv::Operation::Delete | kv::Operation::Purge => None,
                };
                let mut f = lock(&into);
                f.seen = f.seen.max(entry.revision);
                f.keys.insert(
                    entry.key,
                    Current {
                        value,
                        revision: entry.revision,
                    },
                );
            }
            Err::<(), String>("the watch ended".into())
        }
        .await;
        if let Err(e) = result {
            if !logged {
                tracing::warn!(bucket, error = %e, "warm standby: cannot follow the bucket; retrying (a takeover reads it in full meanwhile)");
                logged = true;
            }
        }
        *lock(&into) = Followed::default();
        tokio::time::sleep(RETRY).await;
    }
}
