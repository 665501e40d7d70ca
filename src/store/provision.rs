//! Creates or updates the leaf's streams and buckets, idempotently.
//!
//! Services never create what they use (least privilege): this runs as the
//! admin identity, before the daemons, and running it twice changes nothing.

use crate::naming::{self, Site};
use async_nats::jetstream::{self, kv, object_store, stream};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("nats-server {found} is too old: presenced needs {MIN_SERVER_VERSION} or newer")]
    ServerTooOld { found: String },
    #[error("cannot create or update stream {name}: {source}")]
    Stream {
        name: String,
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("cannot create or update KV bucket {name}: {source}")]
    Bucket {
        name: String,
        source: async_nats::jetstream::context::CreateKeyValueError,
    },
    #[error("{reason}")]
    Table { reason: String },
    #[error("cannot create object store {name}: {source}")]
    ObjectStore {
        name: String,
        source: async_nats::jetstream::context::CreateObjectStoreError,
    },
}

/// Oldest nats-server presenced is tested with (JetStream domains over
/// leaf nodes, KV per-message TTLs, strict JS API).
pub const MIN_SERVER_VERSION: &str = "2.11.0";

/// Parses `2.15.1` (also `v2.15.1`, `2.12.0-beta.1`) into a comparable triple.
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let v = v.trim().trim_start_matches('v');
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// Refuses servers older than [`MIN_SERVER_VERSION`].
pub fn check_server_version(found: &str) -> Result<(), ProvisionError> {
    let min = parse_version(MIN_SERVER_VERSION);
    match parse_version(found) {
        Some(v) if Some(v) >= min => Ok(()),
        _ => Err(ProvisionError::ServerTooOld {
            found: found.to_owned(),
        }),
    }
}

/// What provisioning did to one thing. Every provisioning command
/// (`provision`, `provision-hub`) reports in these words, so a rerun that
/// changes nothing reads `unchanged` everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Created,
    /// Updated in place; the settings that changed.
    Updated(Vec<String>),
    Unchanged,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Created => f.write_str("created"),
            Action::Unchanged => f.write_str("unchanged"),
            Action::Updated(what) => write!(f, "updated ({})", what.join(", ")),
        }
    }
}

/// What provisioning did to one stream or bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub kind: &'static str,
    pub name: String,
    pub action: Action,
}

impl std::fmt::Display for Provisioned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.name, self.action)
    }
}

/// The action that turned the server's config `before` (None: there was
/// none) into `after`: the top-level settings that differ. `metadata` is
/// left out: presenced sets none besides the ownership table (reported on
/// its own line), and the server keeps its own `_nats.*` entries there.
pub fn action_between<T: serde::Serialize>(before: Option<&T>, after: &T) -> Action {
    let Some(before) = before else {
        return Action::Created;
    };
    let (Ok(serde_json::Value::Object(b)), Ok(serde_json::Value::Object(a))) =
        (serde_json::to_value(before), serde_json::to_value(after))
    else {
        return Action::Unchanged;
    };
    let mut changed: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| k.as_str() != "metadata" && a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    changed.sort();
    changed.dedup();
    if changed.is_empty() {
        Action::Unchanged
    } else {
        Action::Updated(changed)
    }
}

/// The config of stream `name` as the server has it; None when there is
/// no such stream (or it cannot be read: then the create that follows
/// reports the real error).
async fn server_config(js: &jetstream::Context, name: &str) -> Option<stream::Config> {
    let stream = js.get_stream(name).await.ok()?;
    Some(stream.cached_info().config.clone())
}

/// The stream configs of a site's leaf, from the naming convention.
pub fn stream_configs(site: &Site) -> Vec<stream::Config> {
    let base = |name: &str, subjects: String, max_age: Duration, dup: Duration| stream::Config {
        name: name.to_owned(),
        subjects: vec![subjects],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age,
        duplicate_window: dup,
        num_replicas: 1,
        allow_direct: true,
        ..Default::default()
    };
    let day = Duration::from_secs(86_400);
    vec![
        // Replay source and audit trail of readings; two minutes of
        // duplicate window cover a daemon restart's MQTT redelivery.
        base(
            naming::SENSORS_STREAM,
            site.sensors_filter(),
            7 * day,
            Duration::from_secs(120),
        ),
        // Transitions are few; a long window makes a republished
        // transition after a slow restart still a duplicate.
        base(
            naming::EVENTS_STREAM,
            site.events_filter(),
            90 * day,
            Duration::from_secs(3600),
        ),
        base(
            naming::REJECTED_STREAM,
            site.rejected_filter(),
            30 * day,
            Duration::from_secs(120),
        ),
        base(
            naming::AUDIT_STREAM,
            site.audit_filter(),
            365 * day,
            Duration::from_secs(120),
        ),
    ]
}

/// The KV bucket configs of a site's leaf.
pub fn bucket_configs() -> Vec<kv::Config> {
    let base = |bucket: &str, history: i64, description: &str| kv::Config {
        bucket: bucket.to_owned(),
        description: description.to_owned(),
        history,
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    };
    vec![
        base(
            naming::PRESENCE_BUCKET,
            5,
            "presence of each zone; written by the engine",
        ),
        base(
            naming::DEBOUNCE_BUCKET,
            1,
            "pending debounce deadline of each zone; written by the engine",
        ),
        base(
            naming::ARCHIVE_BUCKET,
            5,
            "upload outbox of each snapshot; written by the archiver",
        ),
        // Leases carry their own TTL (`Nats-TTL` on each put); the subject
        // delete marker makes a lapsed lease visible to watchers.
        kv::Config {
            limit_markers: Some(super::lease::MARKER_TTL),
            ..base(
                naming::OWNERS_BUCKET,
                1,
                "liveness lease of each service (per-message TTL); each service writes its own key",
            )
        },
    ]
}

/// The object store configs of a site's leaf.
pub fn object_store_configs() -> Vec<object_store::Config> {
    vec![object_store::Config {
        bucket: naming::SNAPSHOTS_OBJECT.to_owned(),
        description: Some("state snapshots; written by the archiver".to_owned()),
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    }]
}

/// Creates or updates every stream and bucket of the site, keeping the
/// ownership table already stored (see [`provision_with`]).
pub async fn provision(
    client: &async_nats::Client,
    site: &Site,
) -> Result<Vec<Provisioned>, ProvisionError> {
    provision_with(client, site, None).await
}

/// [`provision`], storing `table` (the access file's services, what
/// they run and who may send commands) on KV `owners`' stream, where
/// clients and the engine read it (`crate::store::published`). Without a
/// table, a stored one is kept: updating the bucket would otherwise drop
/// it with the rest of the stream's metadata.
pub async fn provision_with(
    client: &async_nats::Client,
    site: &Site,
    table: Option<&crate::store::published::Published>,
) -> Result<Vec<Provisioned>, ProvisionError> {
    use crate::store::published;
    check_server_version(&client.server_info().version)?;
    let js = jetstream::new(client.clone());
    let owners_stream = naming::kv_stream(naming::OWNERS_BUCKET);
    // Read before the buckets are updated: updating KV `owners` drops the
    // table with the rest of its stream's metadata.
    // Missing bucket (first run): nothing stored.
    let stored = published::read(&js, &owners_stream).await.ok().flatten();
    let kept = match table {
        Some(t) => Some(t.clone()),
        None => stored.clone(),
    };
    let mut done = Vec::new();
    // What the server has before and after each step says whether the
    // step created, updated or left the thing as it was.
    let settled = |name: String| {
        let js = js.clone();
        async move { server_config(&js, &name).await }
    };
    for cfg in stream_configs(site) {
        let name = cfg.name.clone();
        let before = settled(name.clone()).await;
        let info =
            js.create_or_update_stream(cfg)
                .await
                .map_err(|source| ProvisionError::Stream {
                    name: name.clone(),
                    source,
                })?;
        done.push(Provisioned {
            kind: "stream",
            action: action_between(before.as_ref(), &info.config),
            name,
        });
    }
    for cfg in bucket_configs() {
        let name = cfg.bucket.clone();
        let before = settled(naming::kv_stream(&name)).await;
        js.create_or_update_key_value(cfg)
            .await
            .map_err(|source| ProvisionError::Bucket {
                name: name.clone(),
                source,
            })?;
        let after = settled(naming::kv_stream(&name)).await;
        done.push(Provisioned {
            kind: "kv",
            action: after.map_or(Action::Created, |a| action_between(before.as_ref(), &a)),
            name,
        });
    }
    if let Some(t) = &kept {
        published::store(&js, &owners_stream, t)
            .await
            .map_err(|reason| ProvisionError::Table { reason })?;
        done.push(Provisioned {
            kind: "ownership table on",
            name: owners_stream.clone(),
            action: match stored {
                None => Action::Created,
                Some(s) if &s == t => Action::Unchanged,
                Some(_) => Action::Updated(vec!["services".to_owned()]),
            },
        });
    }
    for cfg in object_store_configs() {
        let name = cfg.bucket.clone();
        let stream = naming::obj_stream(&name);
        let before = settled(stream.clone()).await;
        // Creating with an unchanged config is a no-op on the server.
        js.create_object_store(cfg)
            .await
            .map_err(|source| ProvisionError::ObjectStore {
                name: name.clone(),
                source,
            })?;
        let after = settled(stream).await;
        done.push(Provisioned {
            kind: "object store",
            action: after.map_or(Action::Created, |a| action_between(before.as_ref(), &a)),
            name,
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_the_settings_that_changed() {
        let site = Site::new("home").unwrap();
        let have = stream_configs(&site).remove(0);
        assert_eq!(action_between(None, &have), Action::Created);
        assert_eq!(action_between(Some(&have), &have), Action::Unchanged);
        let mut want = have.clone();
        want.max_age = Duration::from_secs(60);
        want.metadata.insert("_nats.ver".into(), "2.12.0".into());
        assert_eq!(
            action_between(Some(&have), &want),
            Action::Updated(vec!["max_age".into()]),
            "the server's own metadata is no change of presenced's"
        );
        let line = Provisioned {
            kind: "stream",
            name: "SENSORS".into(),
            action: Action::Updated(vec!["max_age".into()]),
        };
        assert_eq!(line.to_string(), "stream SENSORS: updated (max_age)");
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("v2.11.0-beta.2"), Some((2, 11, 0)));
        assert!(check_server_version("2.10.22").is_err());
        assert!(check_server_version("2.11.0").is_ok());
        assert!(check_server_version("garbage").is_err());
    }

    #[test]
    fn stream_subjects_follow_naming() {
        let site = Site::new("home").unwrap();
        let s = stream_configs(&site);
        let subjects: Vec<_> = s
            .iter()
            .map(|c| (c.name.as_str(), c.subjects[0].as_str()))
            .collect();
        assert_eq!(
            subjects,
            vec![
                ("SENSORS", "sensors.home.>"),
                ("EVENTS", "events.home.>"),
                ("REJECTED", "rejected.home.>"),
                ("AUDIT", "audit.events.home.>"),
            ]
        );
    }
}
