//! Rebuilding KV buckets from a snapshot, from the object store, from S3
//! or from a local file.
//!
//! A restore either completes or leaves the target as it found it. Order
//! of work:
//!
//! 1. **Trust.** The snapshot's signature is checked against the
//!    archiver's key in the ownership map ([`super::sign`]); unsigned or
//!    wrongly signed snapshots are refused unless `allow_unsigned`. A
//!    snapshot of another site is refused.
//! 2. **Read it all before changing anything.** The whole copy is read,
//!    hashed against the signed sha256 and decoded: every frame, every
//!    key, the record counts of the end frame.
//! 3. **Check every right before changing anything.** For each target
//!    bucket: it exists and is readable, a write is accepted (a put
//!    guarded by an expected sequence no key has, which the stream
//!    refuses and never stores), and a purge is accepted (one filtered to
//!    a key no zone can have, which removes nothing). A refusal here
//!    names the subject and the grant (`runs = ["restore"]`) and nothing
//!    has changed.
//! 4. **Keep the old data until the new is complete.** A target that
//!    holds data (`force`) is first copied to a local file in the
//!    snapshot format. Then the targets are purged and every record is
//!    put in its original order, 256 in flight; the copy is read a second
//!    time and hashed again.
//! 5. **Roll back on any failure after the first change** (a write the
//!    server refuses, a limit, the connection, a copy that changed): the
//!    targets are purged and the saved contents put back from the file.
//!    Should that fail too, the file is kept and the error says how to
//!    put it back by hand.
//!
//! The EVENTS window of a snapshot is archive only and not replayed:
//! transitions republished into a live leaf would be new transitions. KV
//! `owners` is not restored either: a lease says a service is alive now,
//! and a restored one would vouch for a process that is gone (leases carry
//! per-message TTLs the snapshot does not keep); services take their
//! leases again when they start.

use super::format::{Decoder, Item, Op, SectionKind};
use super::refusal::Refusals;
use super::s3::Remote;
use super::sign::{Checked, Trust};
use super::verify::{compare, Digested};
use super::{hex, ArchiveError, SnapshotMeta};
use crate::naming::{self, Site};
use async_nats::jetstream;
use bytes::Bytes;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// Puts awaiting their ack at once.
const IN_FLIGHT: usize = 256;

/// The buckets restore writes: the engine's state. `owners` is never
/// restored (see the module doc); the grants of `runs = ["restore"]` are
/// exactly these.
pub const RESTORABLE: [&str; 2] = [naming::PRESENCE_BUCKET, naming::DEBOUNCE_BUCKET];

/// The KV key the rights probe uses: `=` is allowed in KV keys and never
/// in zone ids, so no real key is touched.
pub const PROBE_KEY: &str = "restore=probe";

/// Where the snapshot is read from.
pub enum Source {
    Local,
    Remote(Remote),
    /// A file in the snapshot format (a copy restore kept); it carries no
    /// metadata, so no signature either.
    File(PathBuf),
}

/// How to restore.
pub struct Options {
    /// Replace buckets that hold data.
    pub force: bool,
    pub trust: Trust,
    /// The site, for the header of the saved copy.
    pub site: Site,
    /// Where the copy of replaced data is written.
    pub backup_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub id: String,
    pub sha256: String,
    /// Keys restored per bucket.
    pub buckets: BTreeMap<String, u64>,
    /// Buckets that held data and were replaced (`force`).
    pub purged: Vec<String>,
    pub signature: Checked,
    /// The copy of what was replaced.
    pub backup: Option<PathBuf>,
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
        Source::File(path) => {
            // Its own bytes are all there is to go by.
            let mut s = chunks(js, source, id).await?;
            let mut sha = Sha256::new();
            let mut size = 0;
            while let Some(c) = s.next().await {
                let c = c?;
                sha.update(&c);
                size += c.len() as u64;
            }
            return Ok(SnapshotMeta {
                id: path.display().to_string(),
                site: String::new(),
                buckets: Vec::new(),
                last_sequence: BTreeMap::new(),
                sha256: hex(&sha.finalize()),
                size,
                format_version: super::format::VERSION,
                presenced_version: String::new(),
                created: String::new(),
                records: 0,
                signature: None,
                signer: None,
            });
        }
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
        Source::File(path) => {
            let file = std::fs::File::open(path).map_err(|e| {
                ArchiveError::Refused(format!("cannot read {}: {e}", path.display()))
            })?;
            let shown = path.display().to_string();
            Ok(futures::stream::unfold(Some(file), move |file| {
                let shown = shown.clone();
                async move {
                    use std::io::Read as _;
                    let mut file = file?;
                    let mut buf = vec![0u8; 128 << 10];
                    match file.read(&mut buf) {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok(Bytes::from(buf)), Some(file)))
                        }
                        Err(e) => Some((
                            Err(ArchiveError::Refused(format!("cannot read {shown}: {e}"))),
                            None,
                        )),
                    }
                }
            })
            .boxed())
        }
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

/// What the first read found: the copy's digest and its KV sections.
struct Inspected {
    digest: Digested,
    /// KV sections in file order.
    kv: Vec<String>,
    /// Why the content is unusable (decoding, keys, counts), reported
    /// after the digest comparison: a wrong sha256 is the clearer report.
    problem: Option<ArchiveError>,
}

/// Reads the whole copy, hashing it and decoding every frame, so a
/// corrupt, truncated or invalid snapshot is refused before anything
/// changes.
async fn inspect(
    js: &jetstream::Context,
    source: &Source,
    id: &str,
) -> Result<Inspected, ArchiveError> {
    let fmt = |source| ArchiveError::Format {
        id: id.to_owned(),
        source,
    };
    let mut input = chunks(js, source, id).await?;
    let mut decoder = Decoder::new();
    let mut sha = Sha256::new();
    let mut size = 0u64;
    let mut kv = Vec::new();
    let mut current: Option<String> = None;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut ended = None;
    let mut decode_error = None;
    loop {
        let chunk = match input.next().await {
            Some(c) => Some(c?),
            None => None,
        };
        match &chunk {
            Some(c) => {
                sha.update(c);
                size += c.len() as u64;
                if decode_error.is_none() {
                    if let Err(e) = decoder.push(c) {
                        decode_error = Some(fmt(e));
                    }
                }
            }
            None if decode_error.is_none() => {
                if let Err(e) = decoder.close() {
                    decode_error = Some(fmt(e));
                }
            }
            None => {}
        }
        // Keep hashing after a decode error: a wrong sha256 is the
        // clearer report.
        while decode_error.is_none() {
            match decoder.next_item() {
                Ok(Some(Item::Section(s))) => {
                    current = (s.kind == SectionKind::Kv).then(|| s.name.clone());
                    if s.kind == SectionKind::Kv {
                        kv.push(s.name.clone());
                    }
                    counts.entry(s.name).or_default();
                }
                Ok(Some(Item::Record(r))) => {
                    if let Some(b) = &current {
                        if RESTORABLE.contains(&b.as_str()) && !is_kv_key(&r.key) {
                            decode_error = Some(ArchiveError::Refused(format!(
                                "snapshot {id}: key {:?} of bucket {b} is not a valid KV key",
                                r.key
                            )));
                        }
                        *counts.entry(b.clone()).or_default() += 1;
                    }
                }
                Ok(Some(Item::End(t))) => ended = Some(t),
                Ok(Some(Item::Header(_))) => {}
                Ok(None) => break,
                Err(e) => decode_error = Some(fmt(e)),
            }
        }
        if chunk.is_none() {
            break;
        }
    }
    let digest = Digested {
        size,
        sha256: hex(&sha.finalize()),
    };
    if decode_error.is_none() {
        if let Err(e) = decoder.finish() {
            decode_error = Some(fmt(e));
        }
    }
    if let (None, Some(t)) = (&decode_error, ended) {
        for s in &t.sections {
            match counts.get(&s.name) {
                Some(n) if kv.contains(&s.name) && *n != s.records => {
                    decode_error = Some(ArchiveError::Verify {
                        id: id.to_owned(),
                        what: format!(
                            "bucket {} has {n} records, its end frame says {}",
                            s.name, s.records
                        ),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(Inspected {
        digest,
        kv,
        problem: decode_error,
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

/// Runs `op` unless the server refuses something first; a refusal
/// becomes an error naming the subject and the grant.
async fn unless_refused<T>(
    refusals: &mut Refusals,
    op: impl std::future::Future<Output = Result<T, ArchiveError>>,
) -> Result<T, ArchiveError> {
    tokio::select! {
        r = op => r,
        v = refusals.next() => Err(ArchiveError::PermissionRefused(refusals.named(&v))),
    }
}

/// Checks every right restore needs on `bucket` with requests that change
/// nothing.
async fn probe(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    bucket: &str,
) -> Result<(), ArchiveError> {
    use async_nats::jetstream::context::PublishErrorKind;
    let subject = naming::kv_subject(bucket, PROBE_KEY);
    let mut h = async_nats::HeaderMap::new();
    // No key has this last sequence: the stream refuses the put.
    h.insert("Nats-Expected-Last-Subject-Sequence", u64::MAX.to_string());
    let ack = js
        .publish_with_headers(subject.clone(), h, Bytes::new())
        .await
        .map_err(|e| ArchiveError::nats(format!("probing the right to write {subject}"), e))?
        .await;
    match ack {
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
        Ok(_) => {} // stored after all: the purge probe below removes it
        Err(e) => {
            return Err(ArchiveError::nats(
                format!("probing the right to write {subject} (nothing changed)"),
                e,
            ))
        }
    }
    stream.purge().filter(subject.clone()).await.map_err(|e| {
        ArchiveError::nats(
            format!("probing the right to purge KV bucket {bucket} (nothing changed)"),
            e,
        )
    })?;
    Ok(())
}

pub async fn restore(
    js: &jetstream::Context,
    source: &Source,
    id: &str,
    opts: &Options,
    refusals: &mut Refusals,
) -> Result<Report, ArchiveError> {
    // 1. Trust.
    let meta = unless_refused(refusals, expected(js, source, id)).await?;
    let signature = opts.trust.check(&meta)?;
    // The site is part of what is signed: a snapshot of another site
    // (another leaf's, copied under this one's prefix) is not this one's.
    if !meta.site.is_empty() && meta.site != opts.site.as_str() {
        return Err(ArchiveError::Refused(format!(
            "snapshot {id} is of site {}, this leaf is site {} (the config's site); nothing restored",
            meta.site, opts.site
        )));
    }
    let want = Digested {
        size: meta.size,
        sha256: meta.sha256.clone(),
    };
    // 2. The whole copy, read and decoded.
    let inspected = unless_refused(refusals, inspect(js, source, id)).await?;
    compare(id, "this", &want, &inspected.digest)
        .map_err(|e| ArchiveError::Refused(format!("{e}; restore refused, nothing changed")))?;
    if let Some(e) = inspected.problem {
        return Err(ArchiveError::Refused(format!(
            "{e}; restore refused, nothing changed"
        )));
    }
    let targets: Vec<String> = inspected
        .kv
        .iter()
        .filter(|b| RESTORABLE.contains(&b.as_str()))
        .cloned()
        .collect();

    // 3. Every target and every right, before anything changes.
    let mut busy = Vec::new();
    let mut streams = Vec::new();
    for b in &targets {
        let stream = unless_refused(refusals, async {
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
            Ok((stream, messages))
        })
        .await?;
        if stream.1 > 0 {
            busy.push(format!("{b} ({} messages)", stream.1));
        }
        streams.push((b.clone(), stream.0, stream.1));
    }
    if !busy.is_empty() && !opts.force {
        return Err(ArchiveError::Refused(format!(
            "the target is not empty: {}; restore replaces these buckets only with --force",
            busy.join(", ")
        )));
    }
    for (b, stream, _) in &streams {
        unless_refused(refusals, probe(js, stream, b)).await?;
    }

    // 4. Keep what is there, then replace it.
    let backup = if busy.is_empty() {
        None
    } else {
        let stamp = super::name_stamp(
            &humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        );
        let path = opts
            .backup_dir
            .join(format!("presenced-restore-{}-{stamp}.snap", opts.site));
        let plan = super::snapshot::Plan {
            site: opts.site.clone(),
            buckets: targets.clone(),
            events: None,
        };
        let saved = unless_refused(refusals, super::snapshot::to_file(js, &plan, &path)).await?;
        tracing::info!(file = %path.display(), bytes = saved.size, "restore: the contents it replaces are saved");
        Some(path)
    };
    let mut purged = Vec::new();
    let applied = unless_refused(refusals, async {
        for (b, stream, n) in &streams {
            stream
                .purge()
                .await
                .map_err(|e| ArchiveError::nats(format!("purging KV bucket {b}"), e))?;
            if *n > 0 {
                purged.push(b.clone());
            }
        }
        write_records(js, source, id, &targets, &want).await
    })
    .await;
    match applied {
        Ok(buckets) => Ok(Report {
            id: id.to_owned(),
            sha256: meta.sha256.clone(),
            buckets,
            purged,
            signature,
            backup,
        }),
        // 5. Put back what was there.
        Err(e) => {
            let back = rollback(js, &streams, backup.as_deref()).await;
            Err(ArchiveError::Refused(match (back, &backup) {
                (Ok(()), Some(file)) => format!(
                    "restore of {id} failed after it began replacing {}: {e}\nrolled back: the previous contents were put back from {} (kept)",
                    targets.join(", "),
                    file.display()
                ),
                (Ok(()), None) => format!(
                    "restore of {id} failed after it began writing {}: {e}\nrolled back: the buckets are empty again, as they were",
                    targets.join(", ")
                ),
                (Err(e2), Some(file)) => format!(
                    "restore of {id} failed after it began replacing {}: {e}\nrolling back failed too: {e2}\nthe previous contents are in {f}; put them back with `presenced restore --from-file {f} --force --allow-unsigned`",
                    targets.join(", "),
                    f = file.display()
                ),
                (Err(e2), None) => format!(
                    "restore of {id} failed after it began writing {}: {e}\nemptying them again failed too: {e2}",
                    targets.join(", ")
                ),
            }))
        }
    }
}

/// Purges the targets and puts `backup` back. Not cut short by refusals:
/// those of the failed writes may still be arriving, and a refused
/// rollback shows anyway, as acks that time out (the caller names the
/// refusals it saw).
async fn rollback(
    js: &jetstream::Context,
    streams: &[(String, jetstream::stream::Stream, u64)],
    backup: Option<&Path>,
) -> Result<(), ArchiveError> {
    let targets: Vec<String> = streams.iter().map(|(b, _, _)| b.clone()).collect();
    async {
        for (b, stream, _) in streams {
            stream
                .purge()
                .await
                .map_err(|e| ArchiveError::nats(format!("purging KV bucket {b}"), e))?;
        }
        if let Some(path) = backup {
            let source = Source::File(path.to_owned());
            let id = path.display().to_string();
            let want = expected(js, &source, &id).await?;
            let want = Digested {
                size: want.size,
                sha256: want.sha256,
            };
            write_records(js, &source, &id, &targets, &want).await?;
        }
        Ok(())
    }
    .await
}

/// Puts every record of `targets` in order; checks the bytes against
/// `want` again and the counts against the end frame.
async fn write_records(
    js: &jetstream::Context,
    source: &Source,
    id: &str,
    targets: &[String],
    want: &Digested,
) -> Result<BTreeMap<String, u64>, ArchiveError> {
    let mut buckets: BTreeMap<String, u64> = targets.iter().map(|b| (b.clone(), 0)).collect();
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
                    let key = r.key.clone();
                    let ack = sent
                        .map_err(|e| ArchiveError::nats(format!("restoring {bucket}/{key}"), e))?;
                    let what = format!("restoring {bucket}/{key}");
                    acks.push(async move {
                        std::future::IntoFuture::into_future(ack)
                            .await
                            .map_err(|e| ArchiveError::nats(what, e))
                    });
                    *buckets.entry(bucket.clone()).or_default() += 1;
                    while acks.len() >= IN_FLIGHT {
                        if let Some(a) = acks.next().await {
                            a?;
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
        a?;
    }
    decoder.finish().map_err(fmt)?;
    let second = Digested {
        size,
        sha256: hex(&sha.finalize()),
    };
    compare(id, "this", want, &second).map_err(|e| {
        ArchiveError::Refused(format!(
            "{e} on the second read (the copy changed while it was restored)"
        ))
    })?;
    if let Some(t) = ended {
        for s in &t.sections {
            if let Some(n) = buckets.get(&s.name) {
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
    Ok(buckets)
}
