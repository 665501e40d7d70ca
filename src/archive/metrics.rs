//! The archiver's metrics, declared here and registered by
//! [`super::start`] once the archiver has started (an instance without
//! `[archive]` exports none of them), with its detail in `/healthz`.

use crate::metrics::{counter_name, Collector, Count, Event, Flag, Level};
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;

/// Counters and gauges of the archiver.
#[derive(Debug, Default)]
pub struct ArchiveMetrics {
    pub snapshots: Count,
    pub snapshot_failures: Count,
    pub uploads: Count,
    pub uploaded_bytes: Count,
    pub upload_failures: Count,
    pub verify_failures: Count,
    /// Snapshots whose upload is not yet verified.
    pub pending: Level,
    /// False after an upload failed for a reason other than
    /// verification, true again after one succeeds.
    pub s3_ok: Flag,
    pub pruned_local: Count,
    pub pruned_remote: Count,
    /// Unix seconds of the newest snapshot.
    pub last_snapshot_seconds: Level,
    /// Unix seconds of the last verified upload.
    pub last_upload_seconds: Level,
}

/// A snapshot was written to the object store `snapshots`.
pub const SNAPSHOT_TAKEN: Event = Event {
    name: "archive_snapshot_taken",
    level: tracing::Level::INFO,
    message: "archive: snapshot taken",
    counter: "presenced_archive_snapshots_total",
};

/// A scheduled snapshot failed.
pub const SNAPSHOT_FAILED: Event = Event {
    name: "archive_snapshot_failed",
    level: tracing::Level::ERROR,
    message: "archive: snapshot failed",
    counter: "presenced_archive_snapshot_failures_total",
};

/// A snapshot is in S3 and verified; counted in uploads and bytes only
/// when this attempt PUT it (not when an intact copy was found there).
pub const UPLOADED: Event = Event {
    name: "archive_uploaded",
    level: tracing::Level::INFO,
    message: "archive: uploaded and verified",
    counter: "presenced_archive_uploads_total, presenced_archive_uploaded_bytes_total",
};

/// An upload attempt failed and is retried with backoff; a failed
/// verification is counted in verify failures too.
pub const UPLOAD_FAILED: Event = Event {
    name: "archive_upload_failed",
    level: tracing::Level::WARN,
    message: "archive: upload failed; will retry",
    counter: "presenced_archive_upload_failures_total, presenced_archive_verify_failures_total",
};

/// A snapshot pruned from the local object store by retention.
pub const PRUNED_LOCAL: Event = Event {
    name: "archive_pruned_local",
    level: tracing::Level::INFO,
    message: "archive: pruned from the object store",
    counter: "presenced_archive_pruned_local_total",
};

/// A snapshot pruned from S3 by retention.
pub const PRUNED_REMOTE: Event = Event {
    name: "archive_pruned_remote",
    level: tracing::Level::INFO,
    message: "archive: pruned from S3",
    counter: "presenced_archive_pruned_remote_total",
};

impl Collector for ArchiveMetrics {
    fn collect(&self, r: &mut Registry) {
        let counters = [
            (
                "presenced_archive_snapshots_total",
                "Snapshots written to object store snapshots.",
                &self.snapshots,
            ),
            (
                "presenced_archive_snapshot_failures_total",
                "Scheduled snapshots that failed.",
                &self.snapshot_failures,
            ),
            (
                "presenced_archive_uploads_total",
                "Snapshots PUT to S3 and verified.",
                &self.uploads,
            ),
            (
                "presenced_archive_uploaded_bytes_total",
                "Bytes of snapshots PUT to S3 and verified.",
                &self.uploaded_bytes,
            ),
            (
                "presenced_archive_upload_failures_total",
                "Upload attempts that failed (retried with backoff).",
                &self.upload_failures,
            ),
            (
                "presenced_archive_verify_failures_total",
                "Remote copies whose size or sha256 did not match.",
                &self.verify_failures,
            ),
        ];
        for (name, help, c) in counters {
            r.register(counter_name(name), help, c.clone());
        }
        r.register(
            "presenced_archive_pending",
            "Snapshots waiting for a verified upload.",
            self.pending.clone(),
        );
        r.register(
            "presenced_archive_s3_ok",
            "0 while uploads fail for reasons other than verification.",
            self.s3_ok.clone(),
        );
        for (name, help, c) in [
            (
                "presenced_archive_pruned_local_total",
                "Snapshots pruned from the object store.",
                &self.pruned_local,
            ),
            (
                "presenced_archive_pruned_remote_total",
                "Snapshots pruned from S3.",
                &self.pruned_remote,
            ),
        ] {
            r.register(counter_name(name), help, c.clone());
        }
        r.register(
            "presenced_archive_last_snapshot_timestamp_seconds",
            "Unix time of the newest snapshot.",
            self.last_snapshot_seconds.clone(),
        );
        r.register(
            "presenced_archive_last_upload_timestamp_seconds",
            "Unix time of the last verified upload.",
            self.last_upload_seconds.clone(),
        );
    }

    /// Detail only: a slow S3 does not make the daemon unhealthy.
    fn health(&self) -> Option<(&'static str, serde_json::Value)> {
        let get = |v: &Level| v.load(Ordering::Relaxed);
        let secs = |v: u64| (v > 0).then_some(v);
        Some((
            "archive",
            serde_json::json!({
                "pending": get(&self.pending),
                "s3_ok": self.s3_ok.load(Ordering::Relaxed),
                "last_snapshot_unix": secs(get(&self.last_snapshot_seconds)),
                "last_upload_unix": secs(get(&self.last_upload_seconds)),
                "snapshot_failures": self.snapshot_failures.load(Ordering::Relaxed),
                "upload_failures": self.upload_failures.load(Ordering::Relaxed),
            }),
        ))
    }
}
