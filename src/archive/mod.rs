//! The archiver: snapshots of the state buckets into object store
//! `snapshots`, uploaded to S3 (Wasabi) through the durable outbox in KV
//! `archive`, verified, pruned, and restored on demand.
//!
//! - [`config`]: the `[archive]` section and its checks.
//! - [`metrics`]: the archiver's metrics and `/healthz` section.
//! - [`format`]: the versioned, compressed snapshot format (pure).
//! - [`snapshot`]: streams buckets into the object store.
//! - [`outbox`]: the upload state of each snapshot (pure transitions + KV).
//! - [`s3`]: the S3 client built from config and credential files.
//! - [`verify`]: sha256 and size of local and remote copies.
//! - [`sign`]: NKEY signatures over a snapshot's sha256 and metadata.
//! - [`refusal`]: permission refusals named with the grant that allows them.
//! - [`retention`]: which snapshots to prune (pure) and pruning.
//! - [`restore`]: rebuilds buckets from a snapshot.
//! - [`worker`]: the archiver inside the daemon (schedule, uploads).
//! - [`commands`]: what `presenced snapshot`, `snapshots` and `restore`
//!   do; they return values, the binary's `cli/` prints them.
//!
//! See docs/ARCHIVE.md for the operator's view.

pub mod commands;
pub mod config;
pub mod format;
pub mod metrics;
pub mod outbox;
pub mod refusal;
pub mod restore;
pub mod retention;
pub mod s3;
pub mod sign;
pub mod snapshot;
pub mod verify;
pub mod worker;

use std::collections::{BTreeMap, HashMap};

/// Why an archive operation failed. Every variant says which snapshot,
/// bucket or remote object it is about.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} is missing on the leaf ({source}): run `presenced provision` first")]
    Missing {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("NATS: {context}: {source}")]
    Nats {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("S3: {context}: {source}")]
    S3 {
        context: String,
        source: object_store::Error,
    },
    #[error("snapshot {id}: {source}")]
    Format {
        id: String,
        source: format::FormatError,
    },
    #[error("snapshot {id}: {what}")]
    Verify { id: String, what: String },
    #[error("{0}")]
    Refused(String),
    /// The snapshot's signature is missing, foreign or does not match:
    /// nothing it holds may be trusted.
    #[error("snapshot {id} refused: {why}")]
    Signature { id: String, why: String },
    /// The server refused this identity an operation (see
    /// `cli::named_refusal`).
    #[error("{0}")]
    PermissionRefused(String),
    #[error("archive.s3: {0}")]
    Credentials(String),
    #[error("outbox entry {key}: {what}")]
    Outbox { key: String, what: String },
}

impl ArchiveError {
    pub fn nats(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ArchiveError::Nats {
            context: context.into(),
            source: source.into(),
        }
    }

    pub fn s3(context: impl Into<String>, source: object_store::Error) -> Self {
        ArchiveError::S3 {
            context: context.into(),
            source,
        }
    }
}

/// Metadata keys on the snapshot object (JetStream object metadata and S3
/// user metadata `x-amz-meta-<key>`).
pub mod meta {
    pub const SITE: &str = "site";
    pub const BUCKETS: &str = "buckets";
    /// `presence=12,debounce=7,...`: last stream sequence per bucket.
    pub const LAST_SEQUENCE: &str = "last-sequence";
    /// Hex SHA-256 of the object's bytes (the compressed file). Absent on
    /// an object whose snapshot did not complete.
    pub const SHA256: &str = "sha256";
    pub const FORMAT_VERSION: &str = "format-version";
    pub const PRESENCED_VERSION: &str = "presenced-version";
    pub const CREATED: &str = "created";
    pub const RECORDS: &str = "records";
    /// Base64url (no padding) Ed25519 signature of
    /// [`super::sign::signed_bytes`] by the archiver's NKEY.
    pub const SIGNATURE: &str = "signature";
    /// The NKEY public key (`U...`) that made `signature`.
    pub const SIGNER: &str = "signer";
}

/// What is known about a complete snapshot, from its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub id: String,
    pub site: String,
    pub buckets: Vec<String>,
    pub last_sequence: BTreeMap<String, u64>,
    pub sha256: String,
    pub size: u64,
    pub format_version: u32,
    pub presenced_version: String,
    /// RFC 3339.
    pub created: String,
    pub records: u64,
    /// See [`meta::SIGNATURE`]; `None` on an unsigned snapshot.
    pub signature: Option<String>,
    pub signer: Option<String>,
}

impl SnapshotMeta {
    pub fn to_map(&self) -> HashMap<String, String> {
        let seq = self
            .last_sequence
            .iter()
            .map(|(b, s)| format!("{b}={s}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut map = HashMap::from([
            (meta::SITE.to_owned(), self.site.clone()),
            (meta::BUCKETS.to_owned(), self.buckets.join(",")),
            (meta::LAST_SEQUENCE.to_owned(), seq),
            (meta::SHA256.to_owned(), self.sha256.clone()),
            (
                meta::FORMAT_VERSION.to_owned(),
                self.format_version.to_string(),
            ),
            (
                meta::PRESENCED_VERSION.to_owned(),
                self.presenced_version.clone(),
            ),
            (meta::CREATED.to_owned(), self.created.clone()),
            (meta::RECORDS.to_owned(), self.records.to_string()),
        ]);
        for (k, v) in [
            (meta::SIGNATURE, &self.signature),
            (meta::SIGNER, &self.signer),
        ] {
            if let Some(v) = v {
                map.insert(k.to_owned(), v.clone());
            }
        }
        map
    }

    /// Reads metadata back; `None` when the snapshot is incomplete (no
    /// sha256) or the metadata is not ours.
    pub fn from_map(id: &str, size: u64, m: &HashMap<String, String>) -> Option<SnapshotMeta> {
        let sha256 = m.get(meta::SHA256)?.clone();
        let last_sequence = m
            .get(meta::LAST_SEQUENCE)
            .map(|s| {
                s.split(',')
                    .filter_map(|p| p.split_once('='))
                    .filter_map(|(b, n)| Some((b.to_owned(), n.parse().ok()?)))
                    .collect()
            })
            .unwrap_or_default();
        Some(SnapshotMeta {
            id: id.to_owned(),
            site: m.get(meta::SITE).cloned().unwrap_or_default(),
            buckets: m
                .get(meta::BUCKETS)
                .map(|b| {
                    b.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            last_sequence,
            sha256,
            size,
            format_version: m.get(meta::FORMAT_VERSION)?.parse().ok()?,
            presenced_version: m.get(meta::PRESENCED_VERSION).cloned().unwrap_or_default(),
            created: m.get(meta::CREATED).cloned().unwrap_or_default(),
            records: m
                .get(meta::RECORDS)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0),
            signature: m.get(meta::SIGNATURE).cloned(),
            signer: m.get(meta::SIGNER).cloned(),
        })
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `2026-11-30T01:58:00.123Z` → `20261130T015800.123Z`, the stamp in
/// snapshot names.
pub fn name_stamp(rfc3339: &str) -> String {
    rfc3339.chars().filter(|c| *c != '-' && *c != ':').collect()
}

/// Starts the archiver (component `archiver`, essential): snapshots and
/// uploads. A missing bucket or credential file fails its start, which a
/// retry cannot fix; it counts as running once started.
pub fn start(
    ctx: &mut crate::component::Ctx<'_>,
    cfg: config::ArchiveConfig,
    seed_file: Option<std::path::PathBuf>,
) {
    use crate::supervise::{self, Stage};
    let (js, site, metrics) = (ctx.js.clone(), ctx.site.clone(), ctx.metrics.clone());
    let components = ctx.sup.registry();
    let stop = ctx.sup.stop_flag(Stage::Work);
    ctx.sup.spawn("archiver", Stage::Work, true, async move {
        let archiver = worker::Archiver::start(js, site, cfg, &metrics, seed_file.as_deref())
            .await
            .map_err(|e| supervise::fatal(anyhow::Error::new(e).context("archive")))?;
        components.running("archiver");
        archiver.run(stop).await;
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips() {
        let m = SnapshotMeta {
            id: "home/presence/x".into(),
            site: "home".into(),
            buckets: vec!["presence".into(), "debounce".into()],
            last_sequence: BTreeMap::from([("presence".into(), 12), ("debounce".into(), 0)]),
            sha256: "ab".repeat(32),
            size: 99,
            format_version: 1,
            presenced_version: "0.1.0".into(),
            created: "2026-11-30T01:58:00.123Z".into(),
            records: 5,
            signature: Some("c2ln".into()),
            signer: Some("UKEY".into()),
        };
        assert_eq!(SnapshotMeta::from_map(&m.id, 99, &m.to_map()), Some(m));
        assert_eq!(SnapshotMeta::from_map("x", 1, &HashMap::new()), None);
    }

    #[test]
    fn stamps() {
        assert_eq!(
            name_stamp("2026-11-30T01:58:00.123Z"),
            "20261130T015800.123Z"
        );
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
