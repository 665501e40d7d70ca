//! Which snapshots to prune (pure), and pruning them.
//!
//! Rules: `Keep::Count(n)` keeps the newest n, `Keep::Age(d)` keeps those
//! younger than d; the newest snapshot is always kept, so a long pause in
//! snapshots never empties the archive. A protected snapshot (locally: one
//! whose outbox entry is not yet `uploaded`) is never pruned and does not
//! count towards n. Remote snapshots are ordered by the time in their
//! name. Incomplete local objects (the archiver died while
//! writing them) are removed once they are older than
//! [`INCOMPLETE_GRACE`].

use super::config::Keep;
use super::outbox::Outbox;
use super::s3::Remote;
use super::snapshot::LocalSnapshot;
use super::ArchiveError;
use async_nats::jetstream::object_store::ObjectStore;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

/// A snapshot being written has no sha256 yet; leave it this long.
pub const INCOMPLETE_GRACE: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub created: SystemTime,
    pub protected: bool,
}

/// The ids to prune, oldest first.
pub fn expired(candidates: &[Candidate], keep: Keep, now: SystemTime) -> Vec<String> {
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    // Newest first.
    sorted.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
    let mut out = Vec::new();
    let mut kept = 0u64;
    for (i, c) in sorted.iter().enumerate() {
        if c.protected {
            continue;
        }
        let keep_it = i == 0
            || match keep {
                Keep::Count(n) => kept < n,
                Keep::Age(d) => now.duration_since(c.created).unwrap_or_default() < d,
            };
        if keep_it {
            kept += 1;
        } else {
            out.push(c.id.clone());
        }
    }
    out.reverse();
    out
}

/// Prunes the object store; returns the ids removed. `unsent` holds the
/// ids whose outbox entry is not yet `uploaded`.
pub async fn prune_local(
    store: &ObjectStore,
    local: &[LocalSnapshot],
    unsent: &BTreeSet<String>,
    keep: Keep,
    now: SystemTime,
) -> Result<Vec<String>, ArchiveError> {
    let mut doomed = Vec::new();
    let mut complete = Vec::new();
    for s in local {
        match &s.meta {
            None => {
                if now.duration_since(s.created).unwrap_or_default() > INCOMPLETE_GRACE {
                    doomed.push(s.name.clone());
                }
            }
            Some(_) => complete.push(Candidate {
                id: s.name.clone(),
                created: s.created,
                protected: unsent.contains(&s.name),
            }),
        }
    }
    doomed.extend(expired(&complete, keep, now));
    for id in &doomed {
        store
            .delete(id)
            .await
            .map_err(|e| ArchiveError::nats(format!("deleting snapshot {id}"), e))?;
    }
    Ok(doomed)
}

/// Prunes S3 (only called when `delete_remote` is on) and the outbox
/// entries of what it removed.
pub async fn prune_remote(
    remote: &Remote,
    outbox: &Outbox,
    site: &str,
    keep: Keep,
    now: SystemTime,
) -> Result<Vec<String>, ArchiveError> {
    let listed = remote.list(site).await?;
    let candidates: Vec<Candidate> = listed
        .iter()
        .filter_map(|m| {
            let id = remote.id_of(&m.location)?;
            let created = stamp_time(&id).unwrap_or_else(|| m.last_modified.into());
            Some(Candidate {
                id,
                created,
                protected: false,
            })
        })
        .collect();
    let doomed = expired(&candidates, keep, now);
    for id in &doomed {
        remote.delete(id).await?;
        outbox.remove(id).await?;
    }
    Ok(doomed)
}

/// The time in a snapshot name (`.../20261130T015800.123Z`).
pub fn stamp_time(id: &str) -> Option<SystemTime> {
    let stamp = id.rsplit('/').next()?;
    let b = stamp.as_bytes();
    if b.len() < 16 || b[8] != b'T' {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}",
        stamp.get(0..4)?,
        stamp.get(4..6)?,
        stamp.get(6..8)?,
        stamp.get(9..11)?,
        stamp.get(11..13)?,
        stamp.get(13..)?
    );
    humantime::parse_rfc3339(&rfc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn c(id: &str, secs: u64, protected: bool) -> Candidate {
        Candidate {
            id: id.into(),
            created: at(secs),
            protected,
        }
    }

    #[test]
    fn stamps_parse() {
        assert_eq!(
            stamp_time("home/presence/20261130T015800.123Z"),
            humantime::parse_rfc3339("2026-11-30T01:58:00.123Z").ok()
        );
        assert_eq!(stamp_time("home/presence/garbage"), None);
    }

    #[test]
    fn count_keeps_the_newest() {
        let all = [
            c("a", 1, false),
            c("b", 2, false),
            c("c", 3, false),
            c("d", 4, false),
        ];
        assert_eq!(expired(&all, Keep::Count(2), at(10)), vec!["a", "b"]);
        assert!(expired(&all, Keep::Count(9), at(10)).is_empty());
    }

    #[test]
    fn age_keeps_the_young_and_always_the_newest() {
        let all = [c("a", 1, false), c("b", 50, false), c("c", 95, false)];
        assert_eq!(
            expired(&all, Keep::Age(Duration::from_secs(20)), at(100)),
            vec!["a", "b"]
        );
        assert_eq!(
            expired(&all, Keep::Age(Duration::from_secs(1)), at(1000)),
            vec!["a", "b"],
            "the newest survives however old"
        );
    }

    #[test]
    fn protected_are_never_pruned_nor_counted() {
        let all = [
            c("a", 1, true),
            c("b", 2, false),
            c("c", 3, false),
            c("d", 4, true),
        ];
        assert_eq!(expired(&all, Keep::Count(1), at(10)), vec!["b"]);
    }
}
