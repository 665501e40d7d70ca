//! The hub mirrors of a site (`SENSORS-<site>`, `EVENTS-<site>`,
//! `presence-<site>`, `owners-<site>`), created or updated idempotently by
//! an admin of the hub (`presenced provision-hub`).
//!
//! Each mirror names its source on the leaf through the external API prefix
//! `$JS.leaf-<site>.API` (current servers refuse the `domain` field). Its
//! limits follow the source's, read over the leafnode link when the site
//! is linked, else the leaf config `presenced provision` creates.

use crate::naming::{self, Site};
use crate::store::provision;
use async_nats::jetstream::{self, stream};
use std::fmt;

/// What a mirror copies: a stream, or the stream behind a KV bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Stream,
    Kv,
}

/// One mirror of a site: what it copies and what it is called on the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub kind: SourceKind,
    /// Stream or bucket name on the leaf (`SENSORS`, `presence`).
    pub source: &'static str,
    /// Mirror name on the hub (`SENSORS-<site>`, `presence-<site>`).
    pub name: String,
}

impl Mirror {
    /// Name of the leaf's stream the mirror copies.
    pub fn source_stream(&self) -> String {
        match self.kind {
            SourceKind::Stream => self.source.to_owned(),
            SourceKind::Kv => naming::kv_stream(self.source),
        }
    }

    /// Name of the hub's stream that holds the mirror.
    pub fn stream(&self) -> String {
        match self.kind {
            SourceKind::Stream => self.name.clone(),
            SourceKind::Kv => naming::kv_stream(&self.name),
        }
    }
}

/// Every mirror of `site`, in provisioning order.
pub fn mirrors(site: &Site) -> Vec<Mirror> {
    let m = |kind, source: &'static str| Mirror {
        kind,
        source,
        name: site.hub_mirror(source),
    };
    vec![
        m(SourceKind::Stream, naming::SENSORS_STREAM),
        m(SourceKind::Stream, naming::EVENTS_STREAM),
        m(SourceKind::Kv, naming::PRESENCE_BUCKET),
        m(SourceKind::Kv, naming::OWNERS_BUCKET),
    ]
}

/// The leaf's own config of a mirrored stream, as `presenced provision`
/// creates it; `None` for a source it does not create.
pub fn local_source_config(site: &Site, mirror: &Mirror) -> Option<stream::Config> {
    match mirror.kind {
        SourceKind::Stream => provision::stream_configs(site)
            .into_iter()
            .find(|c| c.name == mirror.source),
        SourceKind::Kv => provision::bucket_configs()
            .into_iter()
            .find(|c| c.bucket == mirror.source)
            .map(|b| stream::Config {
                name: naming::kv_stream(&b.bucket),
                max_messages_per_subject: b.history,
                max_age: b.max_age,
                storage: b.storage,
                allow_message_ttl: b.limit_markers.is_some(),
                subject_delete_marker_ttl: b.limit_markers,
                ..Default::default()
            }),
    }
}

/// The hub stream config of `mirror`, its limits taken from the source's.
pub fn mirror_config(
    site: &Site,
    mirror: &Mirror,
    source: &stream::Config,
    replicas: usize,
) -> stream::Config {
    let kv = mirror.kind == SourceKind::Kv;
    stream::Config {
        name: mirror.stream(),
        description: Some(format!(
            "read-only mirror of {} on {}",
            mirror.source_stream(),
            site.leaf_domain()
        )),
        mirror: Some(stream::Source {
            name: mirror.source_stream(),
            external: Some(stream::External {
                api_prefix: naming::domain_api_prefix(&site.leaf_domain()),
                // Per site, so that the hub lets each leaf deliver to its
                // own mirrors only.
                delivery_prefix: Some(naming::leaf::mirror_delivery_prefix(site)),
            }),
            ..Default::default()
        }),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        num_replicas: replicas,
        max_age: source.max_age,
        max_messages_per_subject: source.max_messages_per_subject,
        max_messages: source.max_messages,
        max_bytes: source.max_bytes,
        // Lease keys expire by per-message TTL on the leaf; the mirror
        // honours the same TTLs. Servers forbid delete markers on mirrors:
        // the leaf's own markers arrive as mirrored messages instead.
        allow_message_ttl: source.allow_message_ttl,
        subject_delete_marker_ttl: None,
        // KV reads of the mirror (`get`, watch with history) go through
        // direct gets, as on the leaf.
        allow_direct: true,
        mirror_direct: kv,
        allow_rollup: kv,
        deny_delete: kv,
        // The owners mirror carries the site's ownership table, so that
        // `watch --hub` judges leases as a client of the leaf does.
        metadata: source
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() == crate::store::published::METADATA_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        discard: if kv {
            stream::DiscardPolicy::New
        } else {
            stream::DiscardPolicy::Old
        },
        ..Default::default()
    }
}

/// What provisioning did to one mirror: the words `provision` uses too.
pub use crate::store::provision::Action;

/// The outcome for one mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub mirror: String,
    pub action: Action,
    /// Where the limits came from: the linked leaf or the local defaults.
    pub limits_from: &'static str,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mirror {}: {} (limits from {})",
            self.mirror, self.action, self.limits_from
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(
        "nats-server {found} on the hub is too old: presenced needs {} or newer",
        provision::MIN_SERVER_VERSION
    )]
    ServerTooOld { found: String },
    #[error("mirror {mirror}: the leaf's {source_stream} is unknown here (not provisioned by `presenced provision`) and cannot be read over the link ({reason}); link the site and provision its leaf first")]
    SourceUnknown {
        mirror: String,
        source_stream: String,
        reason: String,
    },
    #[error("mirror {mirror}: {what} cannot be changed in place by NATS (hub has {have}, wanted {want}); delete stream {stream} on the hub (`nats stream rm {stream}`) and provision again: the mirror then copies the leaf again from its start")]
    Immutable {
        mirror: String,
        stream: String,
        what: &'static str,
        have: String,
        want: String,
    },
    #[error("mirror {mirror}: cannot read stream {stream} on the hub: {reason}")]
    Info {
        mirror: String,
        stream: String,
        reason: String,
    },
    #[error("mirror {mirror}: cannot create stream {stream} on the hub: {source}")]
    Create {
        mirror: String,
        stream: String,
        source: jetstream::context::CreateStreamError,
    },
    #[error("mirror {mirror}: cannot update stream {stream} on the hub: {source}")]
    Update {
        mirror: String,
        stream: String,
        source: jetstream::context::UpdateStreamError,
    },
}

/// The settings of `want` that differ in `have`, by name; errors for the
/// ones NATS cannot change in place.
pub fn differences(
    mirror: &Mirror,
    have: &stream::Config,
    want: &stream::Config,
) -> Result<Vec<String>, MirrorError> {
    let immutable = |what: &'static str, had: String, wanted: String| MirrorError::Immutable {
        mirror: mirror.name.clone(),
        stream: want.name.clone(),
        what,
        have: had,
        want: wanted,
    };
    let source_of = |c: &stream::Config| {
        c.mirror.as_ref().map(|m| {
            format!(
                "{} via {}{}",
                m.name,
                m.external
                    .as_ref()
                    .map_or("local", |e| e.api_prefix.as_str()),
                m.external
                    .as_ref()
                    .and_then(|e| e.delivery_prefix.as_deref())
                    .map(|d| format!(", delivered to {d}"))
                    .unwrap_or_default()
            )
        })
    };
    if source_of(have) != source_of(want) {
        return Err(immutable(
            "the mirror source",
            source_of(have).unwrap_or_else(|| "no mirror".into()),
            source_of(want).unwrap_or_default(),
        ));
    }
    if have.storage != want.storage {
        return Err(immutable(
            "the storage type",
            format!("{:?}", have.storage),
            format!("{:?}", want.storage),
        ));
    }
    let mut changed = Vec::new();
    // Every setting provisioning owns that the server can change in place.
    macro_rules! compare {
        ($($name:literal => $field:ident),* $(,)?) => {$(
            if have.$field != want.$field {
                changed.push(format!("{} {:?} -> {:?}", $name, have.$field, want.$field));
            }
        )*};
    }
    compare!(
        "replicas" => num_replicas,
        "max_age" => max_age,
        "max_msgs_per_subject" => max_messages_per_subject,
        "max_msgs" => max_messages,
        "max_bytes" => max_bytes,
        "allow_msg_ttl" => allow_message_ttl,
        "subject_delete_marker_ttl" => subject_delete_marker_ttl,
        "allow_direct" => allow_direct,
        "mirror_direct" => mirror_direct,
        "description" => description,
    );
    let table = |c: &stream::Config| {
        c.metadata
            .get(crate::store::published::METADATA_KEY)
            .cloned()
    };
    if table(have) != table(want) {
        changed.push("ownership table".to_owned());
    }
    Ok(changed)
}

/// The source's config read over the link (`$JS.leaf-<site>.API`), else the
/// local default; with where it came from.
async fn source_config(
    hub: &async_nats::Client,
    site: &Site,
    mirror: &Mirror,
) -> Result<(stream::Config, &'static str), MirrorError> {
    let reason = match leaf_stream_info(hub, site, &mirror.source_stream()).await {
        Ok(info) => return Ok((info.config, "the linked leaf")),
        Err(e) => e,
    };
    match local_source_config(site, mirror) {
        Some(c) => Ok((c, "the leaf's provisioned defaults")),
        None => Err(MirrorError::SourceUnknown {
            mirror: mirror.name.clone(),
            source_stream: mirror.source_stream(),
            reason,
        }),
    }
}

/// Stream info of `stream` on `site`'s leaf, asked by the hub's admin
/// over the link (`$JS.leaf-<site>.API`), answered on an inbox of that
/// site (`naming::leaf::admin_reply_prefix`): the hub lets each leaf
/// answer there only.
pub async fn leaf_stream_info(
    hub: &async_nats::Client,
    site: &Site,
    stream: &str,
) -> Result<stream::Info, String> {
    use async_nats::jetstream::response::Response;
    let subject = format!(
        "{}.STREAM.INFO.{stream}",
        naming::domain_api_prefix(&site.leaf_domain())
    );
    let inbox = format!(
        "{}.{}",
        naming::leaf::admin_reply_prefix(site),
        crate::store::consumer_name(hub.clone(), "r")
    );
    let msg = hub
        .send_request(
            subject.clone(),
            async_nats::Request::new().payload("".into()).inbox(inbox),
        )
        .await
        .map_err(|e| format!("{subject}: {e}"))?;
    match serde_json::from_slice::<Response<stream::Info>>(&msg.payload) {
        Ok(Response::Ok(info)) => Ok(info),
        Ok(Response::Err { error }) => Err(format!("{subject}: {error}")),
        Err(e) => Err(format!("{subject}: unreadable answer: {e}")),
    }
}

/// Creates or updates one mirror on the hub.
pub async fn provision_mirror(
    hub: &async_nats::Client,
    site: &Site,
    mirror: &Mirror,
    replicas: usize,
) -> Result<Outcome, MirrorError> {
    let (source, limits_from) = source_config(hub, site, mirror).await?;
    let want = mirror_config(site, mirror, &source, replicas);
    let js = jetstream::new(hub.clone());
    let stream = want.name.clone();
    let existing = match js.get_stream(&stream).await {
        Ok(mut s) => {
            Some(
                s.info()
                    .await
                    .map(|i| i.config.clone())
                    .map_err(|e| MirrorError::Info {
                        mirror: mirror.name.clone(),
                        stream: stream.clone(),
                        reason: e.to_string(),
                    })?,
            )
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            None
        }
        Err(e) => {
            return Err(MirrorError::Info {
                mirror: mirror.name.clone(),
                stream,
                reason: e.to_string(),
            })
        }
    };
    let action = match existing {
        None => {
            js.create_stream(want)
                .await
                .map_err(|source| MirrorError::Create {
                    mirror: mirror.name.clone(),
                    stream: stream.clone(),
                    source,
                })?;
            Action::Created
        }
        Some(have) => {
            let changed = differences(mirror, &have, &want)?;
            if changed.is_empty() {
                Action::Unchanged
            } else {
                js.update_stream(want)
                    .await
                    .map_err(|source| MirrorError::Update {
                        mirror: mirror.name.clone(),
                        stream: stream.clone(),
                        source,
                    })?;
                Action::Updated(changed)
            }
        }
    };
    Ok(Outcome {
        mirror: mirror.name.clone(),
        action,
        limits_from,
    })
}

/// Creates or updates every mirror of each site; one failing mirror does
/// not stop the others. Running it twice changes nothing.
pub async fn provision(
    hub: &async_nats::Client,
    sites: &[Site],
    replicas: usize,
) -> Result<Vec<Result<Outcome, MirrorError>>, MirrorError> {
    let found = &hub.server_info().version;
    if provision::check_server_version(found).is_err() {
        return Err(MirrorError::ServerTooOld {
            found: found.clone(),
        });
    }
    let mut out = Vec::new();
    for site in sites {
        for mirror in mirrors(site) {
            out.push(provision_mirror(hub, site, &mirror, replicas).await);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_naming_table() {
        let site = Site::new("home").unwrap();
        let m = mirrors(&site);
        let names: Vec<_> = m.iter().map(|m| (m.name.as_str(), m.stream())).collect();
        assert_eq!(
            names,
            [
                ("SENSORS-home", "SENSORS-home".to_string()),
                ("EVENTS-home", "EVENTS-home".to_string()),
                ("presence-home", "KV_presence-home".to_string()),
                ("owners-home", "KV_owners-home".to_string()),
            ]
        );
        assert_eq!(m[2].source_stream(), "KV_presence");
    }

    #[test]
    fn mirror_sources_through_the_leaf_api_prefix() {
        let site = Site::new("home").unwrap();
        let m = &mirrors(&site)[2];
        let src = local_source_config(&site, m).unwrap();
        let c = mirror_config(&site, m, &src, 3);
        let source = c.mirror.as_ref().unwrap();
        assert_eq!(source.name, "KV_presence");
        assert_eq!(source.domain, None);
        assert_eq!(
            source.external.as_ref().unwrap().api_prefix,
            "$JS.leaf-home.API"
        );
        assert_eq!(c.num_replicas, 3);
        assert_eq!(c.max_messages_per_subject, 5);
        assert!(c.mirror_direct && c.subjects.is_empty());
    }

    #[test]
    fn the_owners_mirror_keeps_ttls_but_no_delete_markers() {
        let site = Site::new("home").unwrap();
        let m = &mirrors(&site)[3];
        let src = local_source_config(&site, m).unwrap();
        assert!(
            src.subject_delete_marker_ttl.is_some(),
            "the leaf's owners bucket marks lapses"
        );
        let c = mirror_config(&site, m, &src, 3);
        assert!(c.allow_message_ttl);
        assert_eq!(
            c.subject_delete_marker_ttl, None,
            "servers forbid markers on mirrors"
        );
    }

    #[test]
    fn a_changed_source_is_refused_and_limits_are_listed() {
        let site = Site::new("home").unwrap();
        let m = &mirrors(&site)[0];
        let src = local_source_config(&site, m).unwrap();
        let want = mirror_config(&site, m, &src, 3);
        let mut have = want.clone();
        assert_eq!(differences(m, &have, &want).unwrap(), Vec::<String>::new());
        have.num_replicas = 1;
        assert_eq!(
            differences(m, &have, &want).unwrap(),
            vec!["replicas 1 -> 3".to_string()]
        );
        have.mirror.as_mut().unwrap().external = None;
        let err = differences(m, &have, &want).unwrap_err().to_string();
        assert!(err.contains("cannot be changed in place"), "{err}");
        assert!(err.contains("SENSORS-home"), "{err}");
    }
}
