//! The ownership map as the running system sees it (written from the
//! access file by `acl`, see `Published::from_access` there): `presenced provision
//! --access FILE` stores each service's components and whether it may send
//! commands in the metadata of the stream behind KV `owners`.
//!
//! Why there: only the admin may change a stream's configuration
//! (`$JS.API.STREAM.UPDATE`), while every service and every reader of
//! `owners` already may read it (`$JS.API.STREAM.INFO.KV_owners`), so the
//! table needs no grant of its own and no service can forge it. A lease
//! body is written by the service it names and says whatever that service
//! wants; the table is what decides:
//!
//! - clients count a lease as running a component only when the table
//!   says its service runs it (the lease's key is the service: each
//!   identity may write `owners.<its service>` only);
//! - the engine answers a command only on the inbox prefix of a service
//!   the table grants `commands`.

use crate::base::ownership::Component;
use crate::naming;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Metadata key of the stream behind KV `owners` holding the table (JSON).
pub const METADATA_KEY: &str = "presenced.access";

/// Schema version of [`Published`].
pub const SCHEMA: u32 = 1;

/// One service of the stored table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedService {
    /// Components it runs (`ingest`, `engine`, `archiver`).
    pub runs: Vec<String>,
    /// Holds the `commands` read grant: may send commands, and gets the
    /// engine's replies on its inbox prefix.
    #[serde(default)]
    pub commands: bool,
    /// The keyspaces it is granted to read beyond its own (`presence`,
    /// `events`, ...), as in the access file: a component that reads on
    /// an identity's behalf (the status page) asks here first, since a
    /// read the ACL refuses is a permission violation, and those stop the
    /// daemon. Absent in tables stored before it was added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<String>,
}

/// The stored table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub v: u32,
    pub services: BTreeMap<String, PublishedService>,
}

impl Published {
    pub fn to_json(&self) -> String {
        // A map of strings and bools always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The table in a stream's metadata: `None` when none is stored,
    /// `Err` when one is stored but unreadable (a newer schema).
    pub fn from_metadata(metadata: &HashMap<String, String>) -> Result<Option<Published>, String> {
        let Some(text) = metadata.get(METADATA_KEY) else {
            return Ok(None);
        };
        let p: Published = serde_json::from_str(text)
            .map_err(|e| format!("stream metadata {METADATA_KEY}: {e}"))?;
        if p.v != SCHEMA {
            return Err(format!(
                "stream metadata {METADATA_KEY}: schema version {} is not {SCHEMA}",
                p.v
            ));
        }
        Ok(Some(p))
    }

    /// Whether the service owning lease key `service` runs `component`.
    pub fn runs(&self, service: &str, component: Component) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| s.runs.iter().any(|c| c == component.name()))
    }

    /// Services that may send commands (and receive the replies).
    pub fn commanders(&self) -> impl Iterator<Item = &str> {
        self.services
            .iter()
            .filter(|(_, s)| s.commands)
            .map(|(n, _)| n.as_str())
    }
}

/// Whether the engine may answer a command on `reply`.
///
/// With a stored table: only under the inbox prefix of a service granted
/// `commands` (`_INBOX.<service>.<token>...`), which is all the generated
/// ACL lets the engine publish to besides its own keyspaces. Without one
/// (a site provisioned without `--access`, typically without ACLs): any
/// inbox (`_INBOX.` and more), never a keyspace or API subject. Wildcards
/// are never a reply subject.
pub fn reply_allowed(reply: &str, table: Option<&Published>) -> bool {
    if reply.contains(['*', '>', ' ', '\t', '\r', '\n']) || reply.split('.').any(str::is_empty) {
        return false;
    }
    let under = |prefix: &str| {
        reply
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| !rest.is_empty())
    };
    match table {
        Some(t) => t.commanders().any(|s| under(&naming::inbox_prefix(s))),
        None => under("_INBOX"),
    }
}

/// Reads the table stored on `stream` (KV `owners`' stream, or a hub
/// mirror of it): `Ok(None)` when none is stored.
pub async fn read(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Result<Option<Published>, String> {
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    let info = s
        .info()
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    Published::from_metadata(&info.config.metadata)
}

/// Stores `table` (or, with `None`, keeps what is stored) in the metadata
/// of `stream`; the admin's job, at provisioning. Returns whether the
/// stream's config changed.
pub async fn store(
    js: &async_nats::jetstream::Context,
    stream: &str,
    table: &Published,
) -> Result<bool, String> {
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    let info = s
        .info()
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    let mut config = info.config.clone();
    let text = table.to_json();
    if config.metadata.get(METADATA_KEY) == Some(&text) {
        return Ok(false);
    }
    config.metadata.insert(METADATA_KEY.to_owned(), text);
    js.update_stream(config)
        .await
        .map_err(|e| format!("cannot store the ownership table on stream {stream}: {e}"))?;
    Ok(true)
}
