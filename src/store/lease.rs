//! Liveness leases in KV `owners`: every running service keeps the key
//! `owners.<service>` alive, and clients mark the keys of a keyspace stale
//! when no live lease runs the component that owns it.
//!
//! The lease is a KV put with a per-message TTL (`Nats-TTL`, nats-server
//! 2.11+). The bucket has subject delete markers (`limit_markers`), so when
//! a lease lapses the server writes a delete marker that watchers see: a
//! SIGKILLed service turns stale for everybody within the TTL, with no
//! survivor having to notice. A graceful stop deletes the key at once.
//!
//! The decisions (when to renew, whether the holder still holds it, which
//! lease owns a bucket, whether a lease has run out) are pure functions
//! below; [`keep`] is the I/O shell the daemon runs.

use crate::base::ownership::{Component, Keyspace};
use crate::naming;
use crate::time::Timestamp;
use async_nats::jetstream::{self, message::PublishMessage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;

pub use crate::base::ownership::MIN_TTL;

/// How long the server keeps the delete marker of a lapsed lease. Long
/// enough for a watcher to see it after a short outage; a watcher that
/// missed it still sees the lease as expired from its `expires` field.
pub const MARKER_TTL: Duration = Duration::from_secs(300);

/// Difference between the clocks of a lease holder and a client that is
/// tolerated before the client calls an unremoved lease expired by its
/// `expires` field (the server's TTL is the primary signal; this covers a
/// hub mirror cut off from its leaf, where nothing removes the lease).
pub const CLOCK_SKEW: Duration = Duration::from_secs(2);

/// Schema version of [`Lease`].
pub const SCHEMA: u32 = 1;

/// The value of `owners.<service>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub v: u32,
    pub service: String,
    /// Components the service runs (`ingest`, `engine`, `archiver`): the
    /// keyspaces it writes follow from them.
    pub components: Vec<String>,
    /// The keyspaces those components write (DESIGN.md's naming table),
    /// for readers that do not know the component map.
    #[serde(default)]
    pub writes: Vec<String>,
    pub host: String,
    pub pid: u32,
    /// The holder's PID namespace (`pid:[inode]`), so that an instance on
    /// the same host can tell that `pid` is gone for certain (the engine's
    /// leader lease, [`super::leader`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<String>,
    pub started: Timestamp,
    pub renewed: Timestamp,
    /// `renewed` plus the TTL: when the server drops the lease unless it is
    /// renewed again.
    pub expires: Timestamp,
}

impl Lease {
    pub fn new(service: &str, components: &[Component], started: Timestamp) -> Lease {
        Lease {
            v: SCHEMA,
            service: service.to_owned(),
            components: components.iter().map(|c| c.name().to_owned()).collect(),
            writes: components
                .iter()
                .flat_map(|c| c.owns())
                .map(|k| k.name().to_owned())
                .collect(),
            host: hostname(),
            pid: std::process::id(),
            pid_ns: std::fs::read_link("/proc/self/ns/pid")
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
            started,
            renewed: started,
            expires: started,
        }
    }

    /// This lease renewed at `now` for `ttl`.
    pub fn renewed_at(&self, now: Timestamp, ttl: Duration) -> Lease {
        Lease {
            renewed: now,
            expires: now.plus(ttl),
            ..self.clone()
        }
    }

    pub fn runs(&self, component: Component) -> bool {
        self.components.iter().any(|c| c == component.name())
    }

    /// True once `now` is past `expires` by more than [`CLOCK_SKEW`].
    pub fn run_out(&self, now: Timestamp) -> bool {
        now.millis() > self.expires.plus(CLOCK_SKEW).millis()
    }
}

/// How often the holder renews: three chances per TTL.
pub fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// The holder's own view of its lease: held while the last acknowledged
/// renewal is younger than the TTL.
#[derive(Debug, Clone)]
pub struct Holder {
    ttl: Duration,
    last_ack: Option<tokio::time::Instant>,
}

impl Holder {
    pub fn new(ttl: Duration) -> Holder {
        Holder {
            ttl,
            last_ack: None,
        }
    }

    pub fn acked(&mut self, at: tokio::time::Instant) {
        self.last_ack = Some(at);
    }

    pub fn released(&mut self) {
        self.last_ack = None;
    }

    /// Whether the server still holds the lease (it may have dropped it a
    /// little earlier than this says: the put was sent before the ack).
    pub fn held(&self, now: tokio::time::Instant) -> bool {
        self.last_ack.is_some_and(|t| now < t + self.ttl)
    }

    /// Wait before the next attempt: a third of the TTL after a success,
    /// one second (never more than that third) after a failure.
    pub fn next_attempt(&self, failed: bool) -> Duration {
        let every = renew_every(self.ttl);
        if failed {
            every.min(Duration::from_secs(1))
        } else {
            every
        }
    }
}

/// The component that owns a bucket's keys (presence → engine), from the
/// ownership model the ACL generator uses.
pub fn owning_component(bucket: &str) -> Option<Component> {
    let keyspace = match bucket {
        naming::PRESENCE_BUCKET => Keyspace::Presence,
        naming::DEBOUNCE_BUCKET => Keyspace::Debounce,
        _ => return None,
    };
    Component::ALL
        .into_iter()
        .find(|c| c.owns().contains(&keyspace))
}

/// The leases a client knows of, by owners key.
///
/// Which components a lease stands for comes from the ownership table
/// stored at provisioning when there is one: the key is the service (the
/// ACL lets each identity write `owners.<its service>` only), and the
/// table says what that service runs. The lease body's `components` is
/// the holder's own claim and counts only without a table (a site
/// provisioned without `--access`, where no ACL stops anyone anyway).
#[derive(Debug, Clone, Default)]
pub struct Leases {
    by_key: BTreeMap<String, Lease>,
    table: Option<crate::store::published::Published>,
}

impl Leases {
    /// No leases yet; components from `table` when given.
    pub fn with_table(table: Option<crate::store::published::Published>) -> Leases {
        Leases {
            by_key: BTreeMap::new(),
            table,
        }
    }

    /// The same table, no leases (a new snapshot of the bucket follows).
    pub fn emptied(&self) -> Leases {
        Leases::with_table(self.table.clone())
    }

    /// Whether the lease under `key` stands for `component`.
    fn runs(&self, key: &str, lease: &Lease, component: Component) -> bool {
        match &self.table {
            Some(t) => t.runs(key, component),
            None => lease.runs(component),
        }
    }

    /// Records a put (`Some`) or a delete, purge or expiry (`None`).
    pub fn apply(&mut self, key: &str, lease: Option<Lease>) {
        match lease {
            Some(l) => {
                self.by_key.insert(key.to_owned(), l);
            }
            None => {
                self.by_key.remove(key);
            }
        }
    }

    pub fn clear(&mut self) {
        self.by_key.clear();
    }

    /// Whether a live lease runs `component` at `now`.
    pub fn alive(&self, component: Component, now: Timestamp) -> bool {
        self.by_key
            .iter()
            .any(|(k, l)| self.runs(k, l, component) && !l.run_out(now))
    }

    /// Whether keys of `bucket` are stale at `now`: no live lease runs the
    /// component owning them. Buckets without an owning component are
    /// never stale.
    pub fn stale(&self, bucket: &str, now: Timestamp) -> bool {
        owning_component(bucket).is_some_and(|c| !self.alive(c, now))
    }

    /// The earliest `expires + CLOCK_SKEW` still ahead of `now`: when the
    /// stale answer may change without any message arriving.
    pub fn next_run_out(&self, now: Timestamp) -> Option<Timestamp> {
        self.by_key
            .values()
            .map(|l| l.expires.plus(CLOCK_SKEW))
            .filter(|t| t.millis() >= now.millis())
            .min_by_key(|t| t.millis())
    }
}

/// Parses a lease value; `None` (with the reason) for one this version
/// cannot read, which then counts as no lease.
pub fn parse(value: &[u8]) -> Result<Lease, String> {
    serde_json::from_slice::<Lease>(value).map_err(|e| e.to_string())
}

/// The host name for the lease value, from gethostname(2): the NixOS
/// unit's `ProcSubset=pid` hides `/proc/sys/kernel/hostname`, and the
/// kernel's uname data is what that file shows anyway.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes and we read only up to the first NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("KV owners: cannot write lease {key}: {reason}")]
    Write { key: String, reason: String },
}

/// Publishes one lease put (with its TTL) or delete, waiting for the ack.
/// Only the subject `$KV.owners.<service>` is used: the ACL grants each
/// service exactly that.
async fn write(
    js: &jetstream::Context,
    service: &str,
    lease: Option<&Lease>,
    ttl: Duration,
) -> Result<u64, LeaseError> {
    let key = naming::kv_subject(naming::OWNERS_BUCKET, service);
    let err = |reason: String| LeaseError::Write {
        key: key.clone(),
        reason,
    };
    let msg = match lease {
        Some(l) => {
            let body = serde_json::to_vec(l).map_err(|e| err(e.to_string()))?;
            PublishMessage::build()
                .header("Nats-TTL", format!("{}s", ttl.as_secs()).as_str())
                .payload(body.into())
        }
        None => PublishMessage::build().header("KV-Operation", "DEL"),
    };
    let ack = js
        .send_publish(key.clone(), msg)
        .await
        .map_err(|e| err(e.to_string()))?
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(ack.sequence)
}

/// Keeps `owners.<service>` alive until `stop` turns true, then deletes
/// it. `held` follows the holder's view (for Home Assistant availability).
/// Renewal failures are logged once per outage and retried every second.
pub async fn keep(
    js: jetstream::Context,
    lease: Lease,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
    held: watch::Sender<bool>,
) {
    let mut holder = Holder::new(ttl);
    let mut failing = false;
    loop {
        if *stop.borrow() {
            break;
        }
        let current = lease.renewed_at(Timestamp::now(), ttl);
        let result = tokio::select! {
            r = write(&js, &lease.service, Some(&current), ttl) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        match result {
            Ok(revision) => {
                holder.acked(tokio::time::Instant::now());
                if failing {
                    tracing::info!(service = %lease.service, revision, "lease renewed again");
                } else {
                    tracing::debug!(service = %lease.service, revision, "lease renewed");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(service = %lease.service, error = %e, ttl = ?ttl, "cannot renew the lease; clients will see this service's keys as stale once it runs out; retrying");
                }
                failing = true;
            }
        }
        held.send_replace(holder.held(tokio::time::Instant::now()));
        let wait = holder.next_attempt(failing);
        // Wake early when the holder's view would flip to "not held".
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    holder.released();
    held.send_replace(false);
    match tokio::time::timeout(ttl, write(&js, &lease.service, None, ttl)).await {
        Ok(Ok(revision)) => {
            tracing::info!(service = %lease.service, revision, "lease released")
        }
        Ok(Err(e)) => {
            tracing::warn!(service = %lease.service, error = %e, "cannot release the lease; it runs out on its own within its TTL")
        }
        Err(_) => {
            tracing::warn!(service = %lease.service, "releasing the lease timed out; it runs out on its own within its TTL")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_is_the_kernels_not_unknown() {
        let h = hostname();
        assert_ne!(h, "unknown");
        let uname = std::process::Command::new("uname")
            .arg("-n")
            .output()
            .unwrap();
        assert_eq!(h, String::from_utf8_lossy(&uname.stdout).trim());
    }

    fn lease(service: &str, components: &[Component], renewed_ms: i64, ttl_s: u64) -> Lease {
        Lease::new(service, components, Timestamp(0))
            .renewed_at(Timestamp(renewed_ms), Duration::from_secs(ttl_s))
    }

    #[test]
    fn presence_is_owned_by_the_engine() {
        assert_eq!(
            owning_component(naming::PRESENCE_BUCKET),
            Some(Component::Engine)
        );
        assert_eq!(owning_component(naming::OWNERS_BUCKET), None);
    }

    #[test]
    fn stale_follows_the_engine_lease() {
        let now = Timestamp(10_000);
        let mut leases = Leases::default();
        assert!(
            leases.stale(naming::PRESENCE_BUCKET, now),
            "no lease at all"
        );
        leases.apply(
            "ingester",
            Some(lease("ingester", &[Component::Ingest], 9_000, 10)),
        );
        assert!(
            leases.stale(naming::PRESENCE_BUCKET, now),
            "a lease without the engine does not own presence"
        );
        leases.apply("core", Some(lease("core", &[Component::Engine], 9_000, 10)));
        assert!(!leases.stale(naming::PRESENCE_BUCKET, now));
        leases.apply("core", None);
        assert!(leases.stale(naming::PRESENCE_BUCKET, now));
        assert!(!leases.stale(naming::OWNERS_BUCKET, now));
    }

    #[test]
    fn with_a_table_a_lease_counts_for_what_its_service_runs_not_what_it_claims() {
        use crate::store::published::{Published, PublishedService};
        let table = Published {
            v: crate::store::published::SCHEMA,
            services: [
                (
                    "core".to_owned(),
                    PublishedService {
                        runs: vec!["engine".into()],
                        commands: false,
                        reads: vec![],
                    },
                ),
                (
                    "dashboard".to_owned(),
                    PublishedService {
                        runs: vec![],
                        commands: true,
                        reads: vec![],
                    },
                ),
            ]
            .into(),
        };
        let now = Timestamp(1_000);
        let mut leases = Leases::with_table(Some(table));
        // A forged lease: the dashboard claims the engine.
        let forged = lease("dashboard", &[Component::Ingest, Component::Engine], 0, 60);
        leases.apply("dashboard", Some(forged.clone()));
        assert!(leases.stale(naming::PRESENCE_BUCKET, now));
        // The same body under the engine's service key counts.
        leases.apply("core", Some(lease("core", &[], 0, 60)));
        assert!(!leases.stale(naming::PRESENCE_BUCKET, now));
        let emptied = leases.emptied();
        let mut again = emptied.clone();
        again.apply("dashboard", Some(forged.clone()));
        assert!(again.stale(naming::PRESENCE_BUCKET, now));
        // Without a table the claim is all there is.
        let mut open = Leases::default();
        open.apply("dashboard", Some(forged));
        assert!(!open.stale(naming::PRESENCE_BUCKET, now));
    }

    #[test]
    fn a_lease_nobody_removed_runs_out_after_expiry_and_skew() {
        let mut leases = Leases::default();
        leases.apply("core", Some(lease("core", &[Component::Engine], 0, 5)));
        assert!(!leases.stale(naming::PRESENCE_BUCKET, Timestamp(7_000)));
        assert_eq!(
            leases.next_run_out(Timestamp(1_000)),
            Some(Timestamp(7_000))
        );
        assert!(leases.stale(naming::PRESENCE_BUCKET, Timestamp(7_001)));
        assert_eq!(leases.next_run_out(Timestamp(7_001)), None);
    }

    #[test]
    fn holder_holds_for_one_ttl_after_the_last_ack() {
        let t0 = tokio::time::Instant::now();
        let mut h = Holder::new(Duration::from_secs(6));
        assert!(!h.held(t0));
        h.acked(t0);
        assert!(h.held(t0 + Duration::from_millis(5_999)));
        assert!(!h.held(t0 + Duration::from_secs(6)));
        assert_eq!(h.next_attempt(false), Duration::from_secs(2));
        assert_eq!(h.next_attempt(true), Duration::from_secs(1));
        h.released();
        assert!(!h.held(t0));
    }

    #[test]
    fn lease_value_round_trips_with_schema_version() {
        let l = lease(
            "presenced",
            &[Component::Ingest, Component::Engine],
            1_000,
            10,
        );
        let text = serde_json::to_string(&l).unwrap();
        assert!(text.contains("\"v\":1"), "{text}");
        assert!(
            text.contains("\"components\":[\"ingest\",\"engine\"]"),
            "{text}"
        );
        assert!(
            text.contains(
                "\"writes\":[\"sensors\",\"rejected\",\"live\",\"presence\",\"debounce\",\"events\",\"commands\"]"
            ),
            "{text}"
        );
        assert_eq!(parse(text.as_bytes()).unwrap(), l);
        assert!(parse(b"{}").is_err());
    }
}
