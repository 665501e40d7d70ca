//! The upload outbox: KV `archive`, one key per snapshot id, holding its
//! upload state. Pure transitions below; the I/O at the end.
//!
//! ```text
//! pending ──begin──► uploading ──uploaded──► uploaded{etag, remote_sha256}
//!    ▲                   │  ▲                    │
//!    │                   ▼  │ begin              │ remote found corrupt
//!    └───────────── failed{last_error, attempts} ◄┘
//! ```
//!
//! `uploading` found after a restart means the daemon died during the
//! attempt; it counts as failed and is retried. Writes are compare-and-set
//! on the KV revision, so two writers cannot both move one entry.

use super::ArchiveError;
use crate::naming;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Pending,
    Uploading,
    Uploaded {
        etag: Option<String>,
        /// SHA-256 of the remote object, as verified after the upload.
        remote_sha256: String,
        /// RFC 3339.
        verified_at: String,
    },
    Failed {
        last_error: String,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Uploading => "uploading",
            State::Uploaded { .. } => "uploaded",
            State::Failed { .. } => "failed",
        }
    }
}

/// One snapshot's upload state, as stored (JSON, `"v"` schema field).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub v: u32,
    pub snapshot: String,
    #[serde(flatten)]
    pub state: State,
    /// Size and SHA-256 of the local object: what the remote must match.
    pub size: u64,
    pub sha256: String,
    /// Upload attempts begun.
    pub attempts: u32,
    /// PUTs S3 acknowledged: 1 after a clean upload, more if the remote
    /// copy had to be replaced.
    pub uploads: u32,
    /// RFC 3339 of the last change.
    pub updated: String,
}

/// A transition that does not apply to the entry's state.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("snapshot {snapshot}: cannot {action} while {state}")]
pub struct Invalid {
    pub snapshot: String,
    pub action: &'static str,
    pub state: &'static str,
}

impl Entry {
    pub fn new(snapshot: &str, size: u64, sha256: &str, now: &str) -> Entry {
        Entry {
            v: SCHEMA,
            snapshot: snapshot.to_owned(),
            state: State::Pending,
            size,
            sha256: sha256.to_owned(),
            attempts: 0,
            uploads: 0,
            updated: now.to_owned(),
        }
    }

    fn invalid(&self, action: &'static str) -> Invalid {
        Invalid {
            snapshot: self.snapshot.clone(),
            action,
            state: self.state.name(),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Uploaded { .. })
    }

    /// An attempt starts (also from `uploading`: the last one died).
    pub fn begin(&self, now: &str) -> Result<Entry, Invalid> {
        match self.state {
            State::Pending | State::Failed { .. } | State::Uploading => Ok(Entry {
                state: State::Uploading,
                attempts: self.attempts + 1,
                updated: now.to_owned(),
                ..self.clone()
            }),
            State::Uploaded { .. } => Err(self.invalid("begin an upload")),
        }
    }

    /// The remote copy is verified; `put` says whether this attempt PUT it
    /// (false when an earlier attempt's copy was found intact).
    pub fn uploaded(
        &self,
        etag: Option<String>,
        remote_sha256: &str,
        put: bool,
        now: &str,
    ) -> Result<Entry, Invalid> {
        match self.state {
            State::Uploading => Ok(Entry {
                state: State::Uploaded {
                    etag,
                    remote_sha256: remote_sha256.to_owned(),
                    verified_at: now.to_owned(),
                },
                uploads: self.uploads + u32::from(put),
                updated: now.to_owned(),
                ..self.clone()
            }),
            _ => Err(self.invalid("mark uploaded")),
        }
    }

    pub fn failed(&self, error: &str, put: bool, now: &str) -> Result<Entry, Invalid> {
        match self.state {
            State::Uploading => Ok(Entry {
                state: State::Failed {
                    last_error: error.to_owned(),
                },
                uploads: self.uploads + u32::from(put),
                updated: now.to_owned(),
                ..self.clone()
            }),
            _ => Err(self.invalid("mark failed")),
        }
    }

    /// A later verification found the remote copy wrong: upload again.
    pub fn corrupt(&self, error: &str, now: &str) -> Result<Entry, Invalid> {
        match self.state {
            State::Uploaded { .. } => Ok(Entry {
                state: State::Failed {
                    last_error: error.to_owned(),
                },
                updated: now.to_owned(),
                ..self.clone()
            }),
            _ => Err(self.invalid("mark corrupt")),
        }
    }
}

/// Delay before attempt `attempts + 1`: `initial · 2^(attempts-1)` capped at
/// `max`, then scaled into `[d/2, d]` by `jitter` in `[0, 1)` so that
/// many sites do not retry in step after a shared outage (the crate's one
/// policy, [`crate::base::backoff`], with the attempt count the outbox keeps).
pub fn retry_delay(attempts: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let nominal = crate::base::backoff::Backoff::new(initial, max).nominal(attempts);
    crate::base::backoff::jittered(nominal, jitter)
}

/// KV `archive`.
#[derive(Clone)]
pub struct Outbox {
    kv: kv::Store,
}

impl Outbox {
    pub async fn open(js: &jetstream::Context) -> Result<Outbox, ArchiveError> {
        let kv = js
            .get_key_value(naming::ARCHIVE_BUCKET)
            .await
            .map_err(|e| ArchiveError::Missing {
                what: format!("KV bucket {}", naming::ARCHIVE_BUCKET),
                source: e.into(),
            })?;
        Ok(Outbox { kv })
    }

    fn decode(key: &str, value: &[u8]) -> Result<Entry, ArchiveError> {
        serde_json::from_slice(value).map_err(|e| ArchiveError::Outbox {
            key: key.to_owned(),
            what: format!("unreadable value: {e}"),
        })
    }

    /// Adds a new snapshot; refuses to overwrite an existing entry.
    pub async fn add(&self, entry: &Entry) -> Result<u64, ArchiveError> {
        let value = serde_json::to_vec(entry).map_err(|e| ArchiveError::Outbox {
            key: entry.snapshot.clone(),
            what: e.to_string(),
        })?;
        self.kv
            .create(&entry.snapshot, value.into())
            .await
            .map_err(|e| ArchiveError::nats(format!("adding outbox entry {}", entry.snapshot), e))
    }

    /// Compare-and-set on `revision`; returns the new revision.
    pub async fn update(&self, entry: &Entry, revision: u64) -> Result<u64, ArchiveError> {
        let value = serde_json::to_vec(entry).map_err(|e| ArchiveError::Outbox {
            key: entry.snapshot.clone(),
            what: e.to_string(),
        })?;
        self.kv
            .update(&entry.snapshot, value.into(), revision)
            .await
            .map_err(|e| ArchiveError::nats(format!("updating outbox entry {}", entry.snapshot), e))
    }

    pub async fn get(&self, key: &str) -> Result<Option<(Entry, u64)>, ArchiveError> {
        match self
            .kv
            .entry(key)
            .await
            .map_err(|e| ArchiveError::nats(format!("reading outbox entry {key}"), e))?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((Self::decode(key, &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    pub async fn remove(&self, key: &str) -> Result<(), ArchiveError> {
        self.kv
            .purge(key)
            .await
            .map_err(|e| ArchiveError::nats(format!("removing outbox entry {key}"), e))
    }

    /// Every entry with its revision. Unreadable values are skipped and
    /// returned as errors alongside, so one bad entry cannot stop uploads.
    pub async fn all(&self) -> Result<(Vec<(Entry, u64)>, Vec<ArchiveError>), ArchiveError> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| ArchiveError::nats("listing the outbox", e))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(|e| ArchiveError::nats("listing the outbox", e))?);
        }
        names.sort();
        for k in names {
            match self.kv.entry(&k).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => {
                    match Self::decode(&k, &e.value) {
                        Ok(entry) => out.push((entry, e.revision)),
                        Err(err) => bad.push(err),
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(ArchiveError::nats(format!("reading outbox entry {k}"), e)),
            }
        }
        Ok((out, bad))
    }

    /// New and changed entries from now on (the daemon learns of
    /// `presenced snapshot` runs this way).
    pub async fn watch(&self) -> Result<kv::Watch, ArchiveError> {
        self.kv
            .watch_all()
            .await
            .map_err(|e| ArchiveError::nats("watching the outbox", e))
    }

    pub fn decode_entry(key: &str, value: &[u8]) -> Result<Entry, ArchiveError> {
        Self::decode(key, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "2026-11-30T02:00:00Z";

    #[test]
    fn happy_path() {
        let e = Entry::new("home/presence/x", 10, "aa", T);
        let e = e.begin(T).unwrap();
        assert_eq!((e.state.name(), e.attempts), ("uploading", 1));
        let e = e.uploaded(Some("\"etag\"".into()), "aa", true, T).unwrap();
        assert!(e.is_done());
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&j).unwrap(), e, "{j}");
        assert_eq!(e.uploads, 1);
        assert!(
            e.begin(T).is_err(),
            "an uploaded snapshot is not uploaded again"
        );
    }

    #[test]
    fn failure_retry_and_crash() {
        let e = Entry::new("s", 1, "aa", T).begin(T).unwrap();
        let e = e.failed("connection refused", false, T).unwrap();
        assert_eq!(
            e.state,
            State::Failed {
                last_error: "connection refused".into()
            }
        );
        // Died during the second attempt: `uploading` is retried.
        let e = e.begin(T).unwrap();
        let e = e.begin(T).unwrap();
        assert_eq!(e.attempts, 3);
        let e = e.uploaded(None, "aa", false, T).unwrap();
        assert_eq!(
            e.uploads, 0,
            "found intact from an earlier PUT, not PUT again"
        );
        let e = e.corrupt("sha256 differs", T).unwrap();
        assert_eq!(e.state.name(), "failed");
        assert!(Entry::new("s", 1, "aa", T)
            .uploaded(None, "aa", true, T)
            .is_err());
    }

    #[test]
    fn json_shape() {
        let e = Entry::new("home/presence/x", 10, "aa", T)
            .begin(T)
            .unwrap()
            .failed("boom", true, T)
            .unwrap();
        let j: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(j["v"], 1);
        assert_eq!(j["state"], "failed");
        assert_eq!(j["last_error"], "boom");
        assert_eq!(j["uploads"], 1);
        let back: Entry = serde_json::from_value(j).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let i = Duration::from_secs(1);
        let m = Duration::from_secs(60);
        assert_eq!(retry_delay(1, i, m, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(3, i, m, 1.0), Duration::from_secs(4));
        assert_eq!(retry_delay(3, i, m, 0.0), Duration::from_secs(2));
        assert_eq!(retry_delay(40, i, m, 1.0), m);
        assert_eq!(retry_delay(u32::MAX, i, m, 0.5), m.mul_f64(0.75));
    }
}
