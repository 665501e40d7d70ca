//! Rebuilding KV buckets from a snapshot, from the object store or
//! straight from S3.
//!
//! Order of work: the copy's sha256 is checked against the snapshot's
//! metadata first (a whole read), then the target buckets are checked to
//! be empty (or purged with `force`), then the snapshot is read again and
//! every key is put in the original revision order, so a `watch` of the
//! restored leaf lists the same keys, values and order as the source (the
//! revision numbers themselves start afresh). The second read is hashed
//! too, so a copy that changed in between is reported.
//!
//! The EVENTS window of a snapshot is archive only and not replayed:
//! transitions republished into a live leaf would be new transitions. KV
//! `owners` is not restored either: a lease says a service is alive now,
//! and a restored one would vouch for a process that is gone (leases carry
//! per-message TTLs the snapshot does not keep); services take their
//! leases again when they start.

use super::format::{Decoder, Item, Op, SectionKind};
use super::s3::Remote;
use super::verify::{compare, Digested};
use super::{hex, ArchiveError, SnapshotMeta};
use crate::naming;
use async_nats::jetstream;
use bytes::Bytes;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tokio::io::AsyncReadExt;

/// Puts awaiting their ack at once.
const IN_FLIGHT: usize = 256;

/// Where the snapshot is read from.
pub enum Source {
    Local,
    Remote(Remote),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub id: String,
    pub sha256: String,
    /// Keys restored per bucket.
    pub buckets: BTreeMap<String, u64>,
    /// Buckets that held data and were purged (`force`).
    pub purged: Vec<String>,
}

async fn expected(
    js: &jetstream::Context,
    source: &Source,
    id: &str,
) -> Result<SnapshotMeta, ArchiveError> {
    let (size, map, whence) = match source {
        Source::Local => {
            let store = super::snapshot::snapshots_store(js).await?;
            let info = store.info(id).await.map_err(|e| {
                ArchiveError::Refused(format!("snapshot {id} is not in the object store: {e}"))
            })?;
            (info.size as u64, info.metadata, "object store")
        }
        Source::Remote(r) => match r.head(id).await? {
            Some((m, map)) => (m.size, map, "S3"),
            None => {
                return Err(ArchiveError::Refused(format!(
                    "snapshot {id} is not in S3 at {}{id}",
                    r.location
                )))
            }
        },
    };
    SnapshotMeta::from_map(id, size, &map).ok_or_else(|| {
        ArchiveError::Refused(format!(
            "snapshot {id} in the {whence} has no sha256 in its metadata (incomplete or not a presenced snapshot); nothing restored"
        ))
    })
}

/// The snapshot's bytes as they arrive.
pub async fn chunks(
    js: &jetstream::Context,
    source: &Source,
    id: &str,
) -> Result<BoxStream<'static, Result<Bytes, ArchiveError>>, ArchiveError> {
    match source {
        Source::Remote(r) => r.read(id).await,
        Source::Local => {
            let store = super::snapshot::snapshots_store(js).await?;
            let object = store
                .get(id)
                .await
                .map_err(|e| ArchiveError::nats(format!("reading snapshot {id}"), e))?;
            let id = id.to_owned();
            Ok(futures::stream::unfold(Some(object), move |object| {
                let id = id.clone();
                async move {
                    let mut object = object?;
                    let mut buf = vec![0u8; 128 << 10];
                    match object.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok(Bytes::from(buf)), Some(object)))
                        }
                        Err(e) => Some((
                            Err(ArchiveError::nats(format!("reading snapshot {id}"), e)),
                            None,
                        )),
                    }
                }
            })
            .boxed())
        }
    }
}

async fn digest(
    js: &jetstream::Context,
    source: &Source,
    id: &str,
) -> Result<Digested, ArchiveError> {
    let mut s = chunks(js, source, id).await?;
    let mut sha = Sha256::new();
    let mut size = 0;
    while let Some(c) = s.next().await {
        let c = c?;
        sha.update(&c);
        size += c.len() as u64;
    }
    Ok(Digested {
        size,
        sha256: hex(&sha.finalize()),
    })
}

/// What the server accepts as a KV key: `[-/_=.a-zA-Z0-9]`, no leading
/// or trailing dot.
fn is_kv_key(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with('.')
        && !k.ends_with('.')
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
}

pub async fn restore(
    js: &jetstream::Context,
    source: &Source,
    id: &str,
    force: bool,
) -> Result<Report, ArchiveError> {
    let meta = expected(js, source, id).await?;
    let want = Digested {
        size: meta.size,
        sha256: meta.sha256.clone(),
    };
    let got = digest(js, source, id).await?;
    compare(id, "this", &want, &got)
        .map_err(|e| ArchiveError::Refused(format!("{e}; restore refused, nothing changed")))?;

    let targets: Vec<String> = meta
        .buckets
        .iter()
        .filter(|b| b.as_str() != "events" && b.as_str() != naming::OWNERS_BUCKET)
        .cloned()
        .collect();
    let mut busy = Vec::new();
    let mut streams = Vec::new();
    for b in &targets {
        js.get_key_value(b)
            .await
            .map_err(|e| ArchiveError::Missing {
                what: format!("KV bucket {b}"),
                source: e.into(),
            })?;
        let mut stream = js
            .get_stream(naming::kv_stream(b))
            .await
            .map_err(|e| ArchiveError::nats(format!("stream of KV bucket {b}"), e))?;
        let messages = stream
            .info()
            .await
            .map_err(|e| ArchiveError::nats(format!("stream of KV bucket {b}"), e))?
            .state
            .messages;
        if messages > 0 {
            busy.push(format!("{b} ({messages} messages)"));
        }
        streams.push((b.clone(), stream, messages));
    }
    let mut purged = Vec::new();
    if !busy.is_empty() {
        if !force {
            return Err(ArchiveError::Refused(format!(
                "the target is not empty: {}; restore replaces these buckets only with --force",
                busy.join(", ")
            )));
        }
        for (b, stream, n) in &streams {
            if *n > 0 {
                stream.purge().await.map_err(|e| {
                    ArchiveError::nats(format!("purging KV bucket {b} for --force"), e)
                })?;
                purged.push(b.clone());
            }
        }
    }

    let mut report = Report {
        id: id.to_owned(),
        sha256: meta.sha256.clone(),
        buckets: targets.iter().map(|b| (b.clone(), 0)).collect(),
        purged,
    };
    let fmt = |source| ArchiveError::Format {
        id: id.to_owned(),
        source,
    };
    let mut input = chunks(js, source, id).await?;
    let mut decoder = Decoder::new();
    let mut sha = Sha256::new();
    let mut size = 0u64;
    let mut current: Option<String> = None;
    let mut acks = FuturesUnordered::new();
    let mut ended = None;
    loop {
        let chunk = match input.next().await {
            Some(c) => Some(c?),
            None => None,
        };
        match &chunk {
            Some(c) => {
                sha.update(c);
                size += c.len() as u64;
                decoder.push(c).map_err(fmt)?;
            }
            None => decoder.close().map_err(fmt)?,
        }
        while let Some(item) = decoder.next_item().map_err(fmt)? {
            match item {
                Item::Header(_) => {}
                Item::Section(s) => {
                    current =
                        (s.kind == SectionKind::Kv && targets.contains(&s.name)).then_some(s.name);
                }
                Item::Record(r) => {
                    let Some(bucket) = &current else { continue };
                    if !is_kv_key(&r.key) {
                        return Err(ArchiveError::Refused(format!(
                            "snapshot {id}: key {:?} of bucket {bucket} is not a valid KV key",
                            r.key
                        )));
                    }
                    let subject = naming::kv_subject(bucket, &r.key);
                    let sent = match r.op {
                        Op::Put => js.publish(subject, r.value.into()).await,
                        Op::Delete | Op::Purge => {
                            let mut h = async_nats::HeaderMap::new();
                            if r.op == Op::Delete {
                                h.insert("KV-Operation", "DEL");
                            } else {
                                h.insert("KV-Operation", "PURGE");
                                h.insert("Nats-Rollup", "sub");
                            }
                            js.publish_with_headers(subject, h, r.value.into()).await
                        }
                    };
                    let ack = sent.map_err(|e| {
                        ArchiveError::nats(format!("restoring {bucket}/{}", r.key), e)
                    })?;
                    acks.push(std::future::IntoFuture::into_future(ack));
                    *report.buckets.entry(bucket.clone()).or_default() += 1;
                    while acks.len() >= IN_FLIGHT {
                        if let Some(a) = acks.next().await {
                            a.map_err(|e| ArchiveError::nats(format!("restoring {bucket}"), e))?;
                        }
                    }
                }
                Item::End(t) => ended = Some(t),
            }
        }
        if chunk.is_none() {
            break;
        }
    }
    while let Some(a) = acks.next().await {
        a.map_err(|e| ArchiveError::nats("restoring", e))?;
    }
    decoder.finish().map_err(fmt)?;
    let second = Digested {
        size,
        sha256: hex(&sha.finalize()),
    };
    compare(id, "this", &want, &second).map_err(|e| {
        ArchiveError::Refused(format!(
            "{e} on the second read; the restored buckets may be incomplete, restore again"
        ))
    })?;
    if let Some(t) = ended {
        for s in &t.sections {
            if let Some(n) = report.buckets.get(&s.name) {
                if *n != s.records {
                    return Err(ArchiveError::Verify {
                        id: id.to_owned(),
                        what: format!(
                            "bucket {} restored {n} keys, the snapshot says {}",
                            s.name, s.records
                        ),
                    });
                }
            }
        }
    }
    Ok(report)
}
