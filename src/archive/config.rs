//! The `[archive]` section (snapshots, retention, the S3 target) and its
//! checks.

use crate::base::problems::Problems;
use crate::naming;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The archiver (`[archive]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Time between scheduled snapshots, counted from the newest one (a
    /// restart does not take an extra snapshot).
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    /// KV buckets a snapshot holds (`presence`, `debounce`, `owners`).
    #[serde(default = "default_archive_buckets")]
    pub buckets: Vec<String>,
    /// Also hold the transitions of stream EVENTS of this last window.
    #[serde(default, with = "humantime_serde")]
    pub events: Option<Duration>,
    /// Snapshots kept in the object store: a count (`24`) or an age
    /// (`"7d"`). A snapshot not yet uploaded is never pruned locally.
    #[serde(default = "default_keep_local")]
    pub keep_local: Keep,
    /// Snapshots kept in S3, pruned only when `delete_remote` is true.
    #[serde(default = "default_keep_remote")]
    pub keep_remote: Keep,
    /// Delete remote snapshots beyond `keep_remote`. Off by default:
    /// Wasabi bills a minimum storage duration anyway, and a bucket with
    /// object lock refuses the deletes.
    #[serde(default)]
    pub delete_remote: bool,
    /// First delay before an upload is retried; doubled per attempt, with
    /// jitter, up to `retry_max`. Attempts never stop.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest delay between two upload attempts (the backoff's cap).
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Where snapshots are uploaded; without it they stay local.
    pub s3: Option<S3Config>,
}

/// How many snapshots to keep: the newest N, or those younger than an age.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "KeepRepr", into = "KeepRepr")]
pub enum Keep {
    Count(u64),
    Age(Duration),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum KeepRepr {
    Count(u64),
    Age(String),
}

impl TryFrom<KeepRepr> for Keep {
    type Error = String;
    fn try_from(r: KeepRepr) -> Result<Keep, String> {
        match r {
            KeepRepr::Count(n) => Ok(Keep::Count(n)),
            KeepRepr::Age(s) => humantime::parse_duration(&s)
                .map(Keep::Age)
                .map_err(|e| format!("{s:?} is neither a count (24) nor a duration (\"7d\"): {e}")),
        }
    }
}

impl From<Keep> for KeepRepr {
    fn from(k: Keep) -> KeepRepr {
        match k {
            Keep::Count(n) => KeepRepr::Count(n),
            Keep::Age(d) => KeepRepr::Age(humantime::format_duration(d).to_string()),
        }
    }
}

fn default_archive_buckets() -> Vec<String> {
    vec!["presence".into(), "debounce".into(), "owners".into()]
}
fn default_keep_local() -> Keep {
    Keep::Count(24)
}
fn default_keep_remote() -> Keep {
    Keep::Age(Duration::from_secs(90 * 86_400))
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(300)
}

/// An S3-compatible target (`[archive.s3]`), Wasabi or any other.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `https://s3.<region>.wasabisys.com` for Wasabi.
    pub endpoint: String,
    /// The bucket's region (`us-east-1`, ...); signed into each request.
    pub region: String,
    /// The bucket snapshots go to.
    pub bucket: String,
    /// Key prefix before the snapshot id, e.g. `presenced/`.
    #[serde(default)]
    pub prefix: String,
    /// Path-style requests (`<endpoint>/<bucket>/<key>`) instead of
    /// virtual-hosted style (`<bucket>.<endpoint host>/<key>`).
    #[serde(default)]
    pub path_style: bool,
    /// Files with the access key id and secret (systemd credentials in
    /// production); never the keys themselves in the config.
    pub access_key_file: PathBuf,
    /// See `access_key_file`.
    pub secret_key_file: PathBuf,
    /// Snapshots larger than this go up in multipart uploads of parts this
    /// size (S3 needs at least 5 MiB).
    #[serde(default = "default_part_size")]
    pub part_size: u64,
    /// How long one S3 request may take.
    #[serde(default = "default_s3_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_part_size() -> u64 {
    8 << 20
}
fn default_s3_timeout() -> Duration {
    Duration::from_secs(60)
}

/// Buckets a snapshot may hold.
pub const ARCHIVE_BUCKETS: [&str; 3] = [
    naming::PRESENCE_BUCKET,
    naming::DEBOUNCE_BUCKET,
    naming::OWNERS_BUCKET,
];

/// S3 refuses multipart parts under 5 MiB (except the last).
const MIN_PART_SIZE: u64 = 5 << 20;

/// Checks `[archive]`, pushing every problem found.
pub fn check(a: &ArchiveConfig, p: &mut Problems) {
    if a.every < Duration::from_secs(1) {
        p.push("archive.every", "must be at least 1s");
    }
    if a.buckets.is_empty() {
        p.push(
            "archive.buckets",
            "is empty: list what a snapshot holds, e.g. [\"presence\", \"debounce\", \"owners\"]",
        );
    }
    for (i, b) in a.buckets.iter().enumerate() {
        if !ARCHIVE_BUCKETS.contains(&b.as_str()) {
            p.push(
                format!("archive.buckets[{i}]"),
                format!(
                    "{b:?} is not a state bucket (known: {})",
                    ARCHIVE_BUCKETS.join(", ")
                ),
            );
        } else if a.buckets[..i].contains(b) {
            p.push(
                format!("archive.buckets[{i}]"),
                format!("{b:?} is listed twice"),
            );
        }
    }
    if let Some(w) = a.events {
        p.positive("archive.events", w);
    }
    for (field, keep) in [
        ("archive.keep_local", a.keep_local),
        ("archive.keep_remote", a.keep_remote),
    ] {
        match keep {
            Keep::Count(0) => p.push(field, "must keep at least 1 snapshot"),
            Keep::Age(d) if d.is_zero() => p.push(field, "must be longer than 0s"),
            _ => {}
        }
    }
    p.positive("archive.retry_initial", a.retry_initial);
    if a.retry_max < a.retry_initial {
        p.push(
            "archive.retry_max",
            format!(
                "{} is shorter than retry_initial ({})",
                humantime::format_duration(a.retry_max),
                humantime::format_duration(a.retry_initial)
            ),
        );
    }
    if let Some(s3) = &a.s3 {
        match s3.endpoint.split_once("://") {
            Some(("http" | "https", host)) if !host.is_empty() => {}
            _ => p.push(
                "archive.s3.endpoint",
                format!(
                    "{:?} is not an http(s) URL, e.g. \"https://s3.eu-central-2.wasabisys.com\"",
                    s3.endpoint
                ),
            ),
        }
        if s3.region.trim().is_empty() {
            p.push("archive.s3.region", "is empty: e.g. \"eu-central-2\"");
        }
        if s3.bucket.trim().is_empty() {
            p.push("archive.s3.bucket", "is empty");
        }
        if s3.prefix.starts_with('/') {
            p.push("archive.s3.prefix", "must not start with `/`");
        }
        if s3.part_size < MIN_PART_SIZE {
            p.push(
                "archive.s3.part_size",
                format!(
                    "{} bytes is under S3's minimum part of {MIN_PART_SIZE}",
                    s3.part_size
                ),
            );
        }
        p.positive("archive.s3.timeout", s3.timeout);
        for (field, path) in [
            ("archive.s3.access_key_file", &s3.access_key_file),
            ("archive.s3.secret_key_file", &s3.secret_key_file),
        ] {
            if path.as_os_str().is_empty() {
                p.push(field, "is empty: name the file holding the key");
            }
        }
    }
}
