//! Warm standby: an engine instance that does not hold the leader lease
//! keeps a copy of KV `presence` and `debounce`, so a takeover starts
//! from the state it already has instead of reading both buckets from
//! scratch.
//!
//! The copy is brought up to date once every [`FOLLOW_EVERY`],
//! and only when a bucket has changed (its last sequence moved), each
//! time with a short-lived consumer that reads the cheaper of the two
//! ways: the writes since the copy's last sequence, or the last value of
//! every key (a snapshot, when more writes than keys happened since).
//! A standby's cost to the site is therefore bounded by the number of
//! keys per period, not by the active engine's write rate, as it was
//! when the standby followed every write as it happened (each write of
//! the active engine delivered a second time; docs/PERFORMANCE.md,
//! "Engine failover").
//!
//! At takeover the copy is brought up to the buckets' last sequences as
//! the server reports them then, which reads at most as many messages as
//! there are keys: a write of the old holder that the copy missed would
//! otherwise make the new holder's first compare-and-set expect a stale
//! revision. If that does not finish within [`CATCH_UP`] (a broken
//! follow, a lagging link) the copy is dropped and the buckets are read
//! in full, as a cold start does.
//!
//! The holder runs no follower: its own writes would only come back to it.

use crate::naming;
use crate::store::kv::Current;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often a standby brings its copy up to date (when it changed).
/// Each catch-up costs nats-server a consumer and at most one message per
/// key, and a takeover's last catch-up reads at most one message per key
/// whatever the period: a longer period costs a takeover little, a
/// shorter one costs the active engine's server (at 1 s the server spent
/// about 6% more CPU per reading the engine applied; docs/PERFORMANCE.md).
pub const FOLLOW_EVERY: Duration = Duration::from_secs(5);

/// How long a takeover waits for the copy to reach the buckets' last
/// sequences before it reads them in full instead.
pub const CATCH_UP: Duration = Duration::from_secs(1);

/// How long one periodic catch-up may take before it is given up (and
/// the copy dropped, to be read afresh next time).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);

/// Messages asked for in one pull of a catch-up.
const PULL: u64 = 1000;

/// The server removes a catch-up's consumer this long after its last
/// pull: it is not deleted by the standby (its identity may create
/// ephemeral consumers on the buckets it reads, not delete them).
/// Until then every write to the bucket still signals it.
const CONSUMER_IDLE: Duration = Duration::from_secs(2);

/// A standby's copy of one bucket.
#[derive(Debug, Default, Clone)]
pub struct Followed {
    /// Each key's last value (`None`: deleted or purged) and revision.
    pub keys: BTreeMap<String, Current>,
    /// Every write up to this stream sequence is reflected in `keys`.
    pub seen: u64,
}

/// KV presence and debounce as the standby last caught up with them.
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

    /// The copy brought up to what the server holds now; `None` if that
    /// does not finish within `wait` or the buckets cannot be read.
    pub async fn take(
        self,
        presence: &kv::Store,
        debounce: &kv::Store,
        wait: Duration,
    ) -> Option<Rehydrated> {
        // Stop the periodic catch-ups first: from here on only this one
        // changes the copy.
        for t in &self.tasks {
            t.abort();
        }
        let p = lock(&self.shared.presence).clone();
        let d = lock(&self.shared.debounce).clone();
        let (p_seen, d_seen) = (p.seen, d.seen);
        let both = async { futures::try_join!(catch_up(presence, p), catch_up(debounce, d)) };
        match tokio::time::timeout(wait, both).await {
            Ok(Ok(((p, p_read), (d, d_read)))) => {
                tracing::debug!(
                    presence_read = p_read,
                    debounce_read = d_read,
                    presence_seen = p.seen,
                    debounce_seen = d.seen,
                    "warm standby: copy caught up at takeover"
                );
                Some(Rehydrated {
                    presence: p.keys,
                    debounce: d.keys,
                })
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    error = %e,
                    "warm standby: cannot bring the copy up to date; reading the buckets in full"
                );
                None
            }
            Err(_) => {
                tracing::warn!(
                    presence_seen = p_seen,
                    debounce_seen = d_seen,
                    wait_ms = wait.as_millis() as u64,
                    "warm standby: the copy did not catch up with the buckets in time; reading them in full"
                );
                None
            }
        }
    }
}

fn lock(m: &Mutex<Followed>) -> std::sync::MutexGuard<'_, Followed> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps `into` within [`FOLLOW_EVERY`] of the bucket until aborted; on
/// any error drops the copy (the next catch-up reads a snapshot).
async fn follow(js: jetstream::Context, bucket: &'static str, into: Arc<Mutex<Followed>>) {
    let mut logged = false;
    let mut store = None;
    loop {
        let result = async {
            if store.is_none() {
                store = Some(js.get_key_value(bucket).await.map_err(|e| e.to_string())?);
            }
            let Some(s) = store.as_ref() else {
                return Err("the bucket is not bound".to_owned());
            };
            let current = lock(&into).clone();
            let (next, _) = tokio::time::timeout(CATCH_UP_LIMIT, catch_up(s, current))
                .await
                .map_err(|_| format!("a catch-up took over {CATCH_UP_LIMIT:?}"))??;
            *lock(&into) = next;
            Ok::<(), String>(())
        }
        .await;
        match result {
            Ok(()) => logged = false,
            Err(e) => {
                *lock(&into) = Followed::default();
                store = None;
                if !logged {
                    tracing::warn!(bucket, error = %e, "warm standby: cannot follow the bucket; retrying (a takeover reads it in full meanwhile)");
                    logged = true;
                }
            }
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// `from` brought up to the bucket's last sequence as the server reports
/// it now, and how many messages that read. Reads the writes since
/// `from.seen`, or the last value of every key when that is fewer
/// messages (or `from` is empty).
pub async fn catch_up(store: &kv::Store, from: Followed) -> Result<(Followed, u64), String> {
    // Asked afresh: `kv::Store::status` answers what the stream held
    // when the store was bound.
    let info = store.stream.get_info().await.map_err(|e| e.to_string())?;
    let state = &info.state;
    let target = state.last_sequence;
    if from.seen >= target {
        return Ok((from, 0));
    }
    if state.messages == 0 {
        // Everything up to `target` was removed (a purge of the stream).
        return Ok((
            Followed {
                keys: BTreeMap::new(),
                seen: target,
            },
            0,
        ));
    }
    let since = target - from.seen;
    let (mut next, deliver_policy) = if from.seen == 0 || since > state.subjects_count {
        (Followed::default(), DeliverPolicy::LastPerSubject)
    } else {
        let start_sequence = from.seen + 1;
        (from, DeliverPolicy::ByStartSequence { start_sequence })
    };
    let consumer = store
        .stream
        .create_consumer(pull::Config {
            deliver_policy,
            ack_policy: AckPolicy::None,
            filter_subject: format!("{}>", store.prefix),
            inactive_threshold: CONSUMER_IDLE,
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    // Everything pending when the consumer was made (its create answer
    // says; asking again is not granted): at least every write up to
    // `target`, or every key's last value.
    let owed = consumer.cached_info().num_pending;
    let mut read = 0u64;
    let mut last = 0u64;
    while read < owed || last < target {
        let want = (owed.saturating_sub(read)).clamp(1, PULL);
        let mut batch = consumer
            .batch()
            .max_messages(want as usize)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut got = 0u64;
        let mut drained = false;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| e.to_string())?;
            let info = m.info().map_err(|e| e.to_string())?;
            let (revision, pending) = (info.stream_sequence, info.pending);
            let Some(key) = m.subject.as_str().strip_prefix(store.prefix.as_str()) else {
                continue;
            };
            let value = match m
                .headers
                .as_ref()
                .and_then(|h| h.get(KV_OPERATION))
                .map(|v| v.as_str())
            {
                Some("DEL" | "PURGE") => None,
                _ => Some(m.payload.clone()),
            };
            next.keys
                .insert(key.to_owned(), Current { value, revision });
            last = last.max(revision);
            got += 1;
            drained = pending == 0;
        }
        read += got;
        if got == 0 {
            return Err(format!(
                "a catch-up stalled after {read} of {owed} messages (at sequence {last}, target {target})"
            ));
        }
        if drained && last >= target {
            break;
        }
    }
    next.seen = next.seen.max(last).max(target);
    Ok((next, read))
}

/// The header a KV delete or purge marker carries.
const KV_OPERATION: &str = "KV-Operation";
