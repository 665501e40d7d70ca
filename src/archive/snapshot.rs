//! Taking a snapshot: each bucket is read through an ordered pull consumer
//! (current value per key, in revision order), encoded and compressed a
//! piece at a time and streamed into object store `snapshots`, so memory
//! does not grow with the number of keys.
//!
//! The object is written with partial metadata first; the sha256, sizes
//! and last sequences are only known at the end and are added with a
//! metadata update. An object without `sha256` metadata is an incomplete
//! snapshot (the archiver died half-way): never uploaded, pruned later.

use super::format::{
    self, Encoder, Header, Op, Record, Section, SectionKind, SectionSummary, Trailer,
};
use super::{meta, name_stamp, ArchiveError, SnapshotMeta};
use crate::naming::{self, Site};
use async_nats::jetstream::{self, consumer, object_store};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;

/// Compressed bytes gathered before they are handed to the object store.
const FLUSH_AT: usize = 128 << 10;
/// Chunk size of snapshot objects in the object store.
pub const CHUNK_SIZE: usize = 128 << 10;
/// Longest wait for the next key of a bucket being read: a consumer
/// that delivers nothing for this long has stalled.
const IDLE: Duration = Duration::from_secs(10);

/// What to snapshot.
#[derive(Clone, Debug)]
pub struct Plan {
    pub site: Site,
    /// KV buckets, in the order they are written.
    pub buckets: Vec<String>,
    /// Window of EVENTS to include.
    pub events: Option<Duration>,
}

impl Plan {
    /// Names the snapshot holds (buckets, plus `events`).
    pub fn names(&self) -> Vec<String> {
        let mut n = self.buckets.clone();
        if self.events.is_some() {
            n.push("events".to_owned());
        }
        n
    }
}

pub async fn snapshots_store(
    js: &jetstream::Context,
) -> Result<object_store::ObjectStore, ArchiveError> {
    js.get_object_store(naming::SNAPSHOTS_OBJECT)
        .await
        .map_err(|e| ArchiveError::Missing {
            what: format!("object store {}", naming::SNAPSHOTS_OBJECT),
            source: e.into(),
        })
}

/// Takes a snapshot now; returns its metadata once the object is complete.
/// With a signer (the archiver's NKEY) the metadata carries a signature
/// over everything restore trusts (see [`super::sign`]); without, the
/// snapshot is unsigned and restore refuses it unless told otherwise.
pub async fn take(
    js: &jetstream::Context,
    plan: &Plan,
    signer: Option<&super::sign::Signer>,
) -> Result<SnapshotMeta, ArchiveError> {
    let store = snapshots_store(js).await?;
    let now = SystemTime::now();
    let created = humantime::format_rfc3339_millis(now).to_string();
    let names = plan.names();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let id = naming::snapshot_name(&plan.site, &name_refs, &name_stamp(&created));
    let header = Header {
        site: plan.site.to_string(),
        created: created.clone(),
        presenced_version: env!("CARGO_PKG_VERSION").to_owned(),
        buckets: names.clone(),
        events_since: plan
            .events
            .map(|w| humantime::format_rfc3339_millis(now - w).to_string()),
    };
    let partial = HashMap::from([
        (meta::SITE.to_owned(), plan.site.to_string()),
        (meta::BUCKETS.to_owned(), names.join(",")),
        (meta::FORMAT_VERSION.to_owned(), format::VERSION.to_string()),
        (
            meta::PRESENCED_VERSION.to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
        (meta::CREATED.to_owned(), created.clone()),
    ]);
    let (writer, reader) = tokio::io::duplex(256 << 10);
    let produce = produce(js, plan, header, writer, now);
    let put_store = store.clone();
    let put_meta = object_store::ObjectMetadata {
        name: id.clone(),
        description: Some(format!("presenced snapshot of {}", names.join(", "))),
        chunk_size: Some(CHUNK_SIZE),
        metadata: partial,
        headers: None,
    };
    // The reader moves into the put, so a failed put closes the pipe and
    // the producer stops instead of waiting on a full buffer.
    let put = async move {
        let mut reader = reader;
        put_store.put(put_meta, &mut reader).await
    };
    let (produced, put) = tokio::join!(produce, put);
    let produced = match produced {
        Ok(p) => p,
        Err(e) => {
            let _ = store.delete(&id).await;
            return Err(e);
        }
    };
    let info = put.map_err(|e| ArchiveError::nats(format!("writing snapshot {id}"), e))?;
    if info.size as u64 != produced.size {
        let _ = store.delete(&id).await;
        return Err(ArchiveError::Verify {
            id,
            what: format!(
                "object store holds {} bytes, {} were written",
                info.size, produced.size
            ),
        });
    }
    let mut meta = SnapshotMeta {
        id: id.clone(),
        site: plan.site.to_string(),
        buckets: names,
        last_sequence: produced
            .trailer
            .sections
            .iter()
            .map(|s| (s.name.clone(), s.last_sequence))
            .collect::<BTreeMap<_, _>>(),
        sha256: produced.sha256,
        size: produced.size,
        format_version: format::VERSION,
        presenced_version: env!("CARGO_PKG_VERSION").to_owned(),
        created,
        records: produced.trailer.sections.iter().map(|s| s.records).sum(),
        signature: None,
        signer: None,
    };
    match signer {
        Some(s) => s.sign(&mut meta)?,
        None => tracing::warn!(
            snapshot = %id,
            "snapshot is unsigned: no nats.nkey_seed_file to sign it with; restore will refuse it without --allow-unsigned"
        ),
    }
    complete(js, &store, &id, meta.to_map()).await?;
    Ok(meta)
}

/// Writes the current contents of `plan`'s buckets to a new local file
/// in the snapshot format (mode 0600: it holds the site's state); returns
/// its size and sha256. Restore keeps the data it replaces this way.
pub async fn to_file(
    js: &jetstream::Context,
    plan: &Plan,
    path: &std::path::Path,
) -> Result<super::verify::Digested, ArchiveError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use tokio::io::AsyncReadExt as _;
    let io =
        |e: std::io::Error| ArchiveError::Refused(format!("cannot write {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let now = SystemTime::now();
    let header = Header {
        site: plan.site.to_string(),
        created: humantime::format_rfc3339_millis(now).to_string(),
        presenced_version: env!("CARGO_PKG_VERSION").to_owned(),
        buckets: plan.names(),
        events_since: None,
    };
    let (writer, mut reader) = tokio::io::duplex(256 << 10);
    let produce = produce(js, plan, header, writer, now);
    // Owns the reader: a failed write closes the pipe, so the producer
    // stops instead of waiting on a full buffer.
    let copy = async move {
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let n = reader.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).map_err(io)?;
        }
        file.sync_all().map_err(io)
    };
    let (produced, copied) = tokio::join!(produce, copy);
    let produced = produced?;
    copied?;
    Ok(super::verify::Digested {
        size: produced.size,
        sha256: produced.sha256,
    })
}

/// Rewrites the object's metadata entry with the full metadata.
/// async-nats's `update_metadata` keeps only name and description, so the
/// entry is published here the way the object store does it: the object
/// info as JSON on `$O.<bucket>.M.<base64url(name)>`, rolling up the old
/// entry.
async fn complete(
    js: &jetstream::Context,
    store: &object_store::ObjectStore,
    id: &str,
    metadata: HashMap<String, String>,
) -> Result<(), ArchiveError> {
    use base64::Engine as _;
    let err = |e: String| ArchiveError::nats(format!("completing snapshot {id}"), e);
    let mut info = store.info(id).await.map_err(|e| err(e.to_string()))?;
    info.metadata = metadata;
    let body = serde_json::to_vec(&info).map_err(|e| err(e.to_string()))?;
    let subject = format!(
        "$O.{}.M.{}",
        naming::SNAPSHOTS_OBJECT,
        base64::engine::general_purpose::URL_SAFE.encode(id)
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    js.publish_with_headers(subject, headers, body.into())
        .await
        .map_err(|e| err(e.to_string()))?
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

struct Produced {
    sha256: String,
    size: u64,
    trailer: Trailer,
}

/// Hashes and hands over what the encoder compressed so far.
struct Pipe {
    writer: tokio::io::DuplexStream,
    sha: Sha256,
    size: u64,
}

impl Pipe {
    async fn drain(
        &mut self,
        enc: &mut Encoder<Vec<u8>>,
        at_least: usize,
    ) -> Result<(), ArchiveError> {
        if enc.sink().len() < at_least || enc.sink().is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(enc.sink(), Vec::with_capacity(FLUSH_AT * 2));
        self.send(&chunk).await
    }

    async fn send(&mut self, chunk: &[u8]) -> Result<(), ArchiveError> {
        self.sha.update(chunk);
        self.size += chunk.len() as u64;
        self.writer
            .write_all(chunk)
            .await
            .map_err(|e| ArchiveError::nats("streaming the snapshot into the object store", e))
    }
}

async fn produce(
    js: &jetstream::Context,
    plan: &Plan,
    header: Header,
    writer: tokio::io::DuplexStream,
    now: SystemTime,
) -> Result<Produced, ArchiveError> {
    let id = header.created.clone();
    let fmt_err = |source| ArchiveError::Format {
        id: id.clone(),
        source,
    };
    let mut enc = Encoder::new(Vec::with_capacity(FLUSH_AT * 2), &header).map_err(fmt_err)?;
    let mut pipe = Pipe {
        writer,
        sha: Sha256::new(),
        size: 0,
    };
    let mut trailer = Trailer::default();
    for bucket in &plan.buckets {
        let summary = write_bucket(js, bucket, &mut enc, &mut pipe).await?;
        trailer.sections.push(summary);
    }
    if let Some(window) = plan.events {
        let since = now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
        let summary = write_events(js, &plan.site, since, &mut enc, &mut pipe).await?;
        trailer.sections.push(summary);
    }
    let rest = enc.finish(&trailer).map_err(fmt_err)?;
    pipe.send(&rest).await?;
    pipe.writer
        .shutdown()
        .await
        .map_err(|e| ArchiveError::nats("closing the snapshot stream", e))?;
    Ok(Produced {
        sha256: super::hex(&pipe.sha.finalize()),
        size: pipe.size,
        trailer,
    })
}

/// Streams every message an ordered pull consumer on `stream` delivers
/// (from `deliver`, filtered by `filter`) into the encoder. A pull
/// consumer fetches in bounded batches, so the client never holds more
/// than one batch however large the bucket: a push watch would let the
/// server run ahead into the connection's buffers.
struct Reading<'a> {
    /// For messages: `KV bucket presence`, `stream EVENTS`.
    what: &'a str,
    stream_name: &'a str,
    filter: String,
    deliver: consumer::DeliverPolicy,
    /// `$KV.<bucket>.` for a KV bucket (keys and operations are taken
    /// from the subject and headers), `None` for a plain stream.
    kv_prefix: Option<String>,
}

async fn write_stream(
    js: &jetstream::Context,
    r: Reading<'_>,
    enc: &mut Encoder<Vec<u8>>,
    pipe: &mut Pipe,
) -> Result<SectionSummary, ArchiveError> {
    let Reading {
        what,
        stream_name,
        filter,
        deliver,
        kv_prefix,
    } = r;
    let fmt_err = |source| ArchiveError::Format {
        id: what.to_owned(),
        source,
    };
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| ArchiveError::Missing {
            what: what.to_owned(),
            source: e.into(),
        })?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: deliver,
            ..Default::default()
        })
        .await
        .map_err(|e| ArchiveError::nats(format!("reading {what}"), e))?;
    let name = kv_prefix
        .as_deref()
        .map(|p| {
            p.trim_start_matches("$KV.")
                .trim_end_matches('.')
                .to_owned()
        })
        .unwrap_or_else(|| "events".to_owned());
    let mut summary = SectionSummary {
        name,
        records: 0,
        last_sequence: 0,
    };
    // From the create response: a CONSUMER.INFO request would need a grant
    // the generated ACL does not give (readers create, pull, never inspect).
    let pending = c.cached_info().num_pending;
    if pending == 0 {
        return Ok(summary);
    }
    let mut messages = c
        .messages()
        .await
        .map_err(|e| ArchiveError::nats(format!("reading {what}"), e))?;
    loop {
        let m = match tokio::time::timeout(IDLE, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(ArchiveError::nats(format!("reading {what}"), e)),
            Ok(None) | Err(_) => {
                return Err(ArchiveError::nats(
                    format!("reading {what}"),
                    format!(
                        "the consumer stopped delivering after sequence {}",
                        summary.last_sequence
                    ),
                ))
            }
        };
        let info = m
            .info()
            .map_err(|e| ArchiveError::nats(format!("reading {what}"), e))?;
        let (seq, pending, published) = (
            info.stream_sequence,
            info.pending,
            info.published.unix_timestamp_nanos() as i64,
        );
        let (key, op) = match &kv_prefix {
            Some(prefix) => {
                let key = m
                    .subject
                    .strip_prefix(prefix.as_str())
                    .unwrap_or(m.subject.as_str())
                    .to_owned();
                let op = match m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .map(|v| v.as_str())
                {
                    Some("DEL") => Op::Delete,
                    Some("PURGE") => Op::Purge,
                    _ => Op::Put,
                };
                (key, op)
            }
            None => (m.subject.to_string(), Op::Put),
        };
        enc.record(&Record {
            key,
            op,
            revision: seq,
            created_ns: published,
            value: m.payload.to_vec(),
        })
        .map_err(fmt_err)?;
        summary.records += 1;
        summary.last_sequence = seq;
        pipe.drain(enc, FLUSH_AT).await?;
        if pending == 0 {
            break;
        }
    }
    Ok(summary)
}

async fn write_bucket(
    js: &jetstream::Context,
    bucket: &str,
    enc: &mut Encoder<Vec<u8>>,
    pipe: &mut Pipe,
) -> Result<SectionSummary, ArchiveError> {
    enc.section(&Section {
        name: bucket.to_owned(),
        kind: SectionKind::Kv,
    })
    .map_err(|source| ArchiveError::Format {
        id: bucket.to_owned(),
        source,
    })?;
    let what = format!("KV bucket {bucket}");
    let stream_name = naming::kv_stream(bucket);
    let r = Reading {
        what: &what,
        stream_name: &stream_name,
        filter: naming::kv_filter(bucket),
        deliver: consumer::DeliverPolicy::LastPerSubject,
        kv_prefix: Some(format!("$KV.{bucket}.")),
    };
    write_stream(js, r, enc, pipe).await
}

async fn write_events(
    js: &jetstream::Context,
    site: &Site,
    since: SystemTime,
    enc: &mut Encoder<Vec<u8>>,
    pipe: &mut Pipe,
) -> Result<SectionSummary, ArchiveError> {
    enc.section(&Section {
        name: "events".to_owned(),
        kind: SectionKind::Stream,
    })
    .map_err(|source| ArchiveError::Format {
        id: "events".to_owned(),
        source,
    })?;
    let nanos = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let what = format!("stream {}", naming::EVENTS_STREAM);
    let r = Reading {
        what: &what,
        stream_name: naming::EVENTS_STREAM,
        filter: site.events_filter(),
        deliver: consumer::DeliverPolicy::ByStartTime { start_time },
        kv_prefix: None,
    };
    write_stream(js, r, enc, pipe).await
}

/// Complete snapshots in the object store, oldest first (names sort by
/// time within a bucket set; the creation time decides across sets).
pub async fn list_local(
    store: &object_store::ObjectStore,
) -> Result<Vec<LocalSnapshot>, ArchiveError> {
    let mut list = store
        .list()
        .await
        .map_err(|e| ArchiveError::nats("listing object store snapshots", e))?;
    let mut out = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| ArchiveError::nats("listing object store snapshots", e))?;
        let meta = SnapshotMeta::from_map(&info.name, info.size as u64, &info.metadata);
        let created = info
            .metadata
            .get(meta::CREATED)
            .and_then(|c| humantime::parse_rfc3339(c).ok())
            .or_else(|| {
                info.modified.map(|m| {
                    SystemTime::UNIX_EPOCH
                        + Duration::from_nanos(m.unix_timestamp_nanos().max(0) as u64)
                })
            })
            .unwrap_or(SystemTime::UNIX_EPOCH);
        out.push(LocalSnapshot {
            name: info.name,
            size: info.size as u64,
            created,
            meta,
        });
    }
    out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// One object of `snapshots`.
#[derive(Clone, Debug)]
pub struct LocalSnapshot {
    pub name: String,
    pub size: u64,
    pub created: SystemTime,
    /// `None` for an incomplete snapshot.
    pub meta: Option<SnapshotMeta>,
}
