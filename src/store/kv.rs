//! Compare-and-set KV writes, pipelined, and rehydration of a bucket.
//!
//! A KV bucket is a stream with subjects `$KV.<bucket>.<key>`; a write with
//! `Nats-Expected-Last-Subject-Sequence` is a compare-and-set on the key's
//! revision. Publishing those directly (instead of `Store::update`, one round
//! trip each) lets a batch of writes share one round trip.

use crate::naming;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::Operation;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("KV {bucket}: cannot write key {key}: {source}")]
    Write {
        bucket: String,
        key: String,
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("KV {bucket}: cannot read: {reason}")]
    Read { bucket: String, reason: String },
}

impl KvError {
    /// True when the key's revision was not the expected one: someone else
    /// wrote it (or our own earlier write landed unseen). Not retryable as is.
    pub fn is_conflict(&self) -> bool {
        matches!(self, KvError::Write { source, .. } if source.kind() == PublishErrorKind::WrongLastSequence)
    }
}

/// One compare-and-set write: `value` None deletes the key.
#[derive(Debug, Clone)]
pub struct CasWrite {
    pub key: String,
    pub value: Option<Bytes>,
    /// Revision the key must have now; 0 means "must not exist".
    pub expected: u64,
}

/// Outcome of one write of a batch.
#[derive(Debug)]
pub struct CasResult {
    pub key: String,
    pub result: Result<u64, KvError>,
}

/// Sends the batch pipelined (see [`super::publish`]) and returns the new
/// revision of each key, in input order.
pub async fn write_batch(
    js: &jetstream::Context,
    bucket: &str,
    writes: Vec<CasWrite>,
) -> Vec<CasResult> {
    let keys: Vec<String> = writes.iter().map(|w| w.key.clone()).collect();
    let messages: Vec<_> = writes
        .into_iter()
        .map(|w| {
            let msg = PublishMessage::build().expected_last_subject_sequence(w.expected);
            let msg = match w.value {
                Some(v) => msg.payload(v),
                None => msg.header("KV-Operation", "DEL"),
            };
            (naming::kv_subject(bucket, &w.key), msg)
        })
        .collect();
    let results = super::publish::publish_all(js, messages).await;
    keys.into_iter()
        .zip(results)
        .map(|(key, r)| CasResult {
            result: r.map(|ack| ack.sequence).map_err(|source| KvError::Write {
                bucket: bucket.to_owned(),
                key: key.clone(),
                source,
            }),
            key,
        })
        .collect()
}

/// A key's current value and revision. A deleted key keeps its revision
/// (the delete marker's): the next compare-and-set write must expect it.
#[derive(Debug, Clone)]
pub struct Current {
    pub value: Option<Bytes>,
    pub revision: u64,
}

/// Reads every live key of a bucket with one ordered consumer (not one get
/// per key: 10,000 zones rehydrate in a fraction of a second).
pub async fn load_all(
    store: &kv::Store,
    bucket: &str,
) -> Result<BTreeMap<String, Current>, KvError> {
    let read_err = |reason: String| KvError::Read {
        bucket: bucket.to_owned(),
        reason,
    };
    let mut out = BTreeMap::new();
    // Asked afresh: `kv::Store::status` answers what the stream held
    // when the store was bound, and a store bound earlier would read as
    // empty or end the snapshot early.
    let info = store
        .stream
        .get_info()
        .await
        .map_err(|e| read_err(e.to_string()))?;
    if info.state.messages == 0 {
        return Ok(out);
    }
    // The stream's last sequence tells exactly when the snapshot is
    // complete, without waiting for a message that never comes.
    let last_seq = info.state.last_sequence;
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| read_err(e.to_string()))?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| read_err(e.to_string()))?;
        let revision = entry.revision;
        let value = match entry.operation {
            Operation::Put => Some(entry.value),
            Operation::Delete | Operation::Purge => None,
        };
        out.insert(entry.key, Current { value, revision });
        if revision >= last_seq || entry.delta == 0 {
            break;
        }
    }
    Ok(out)
}
