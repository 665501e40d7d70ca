//! `presenced snapshot`, `presenced snapshots` and `presenced restore`.

use super::outbox::{Entry, Outbox, State};
use super::restore::{self, Source};
use super::s3::Remote;
use super::snapshot;
use super::verify::{compare, digest_local, verify_remote, Digested};
use super::{ArchiveError, SnapshotMeta};
use crate::config::{ArchiveConfig, Config};
use crate::naming::Site;
use anyhow::Context as _;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

fn archive_section(config: &Config) -> anyhow::Result<&ArchiveConfig> {
    config
        .archive
        .as_ref()
        .context("the config has no [archive] section (see docs/CONFIG.md)")
}

async fn connect(config: &Config) -> anyhow::Result<async_nats::jetstream::Context> {
    let who = crate::store::connect::As {
        service: Some(config.service.clone()),
        violations: None,
    };
    let client = crate::store::connect_as(
        &config.nats,
        "presenced-cli",
        None,
        Some(Duration::from_secs(10)),
        &who,
    )
    .await?;
    Ok(crate::daemon::jetstream_context(client, config))
}

/// Takes a snapshot now and queues it for upload (the running archiver
/// uploads it).
pub async fn snapshot(config: Config) -> anyhow::Result<()> {
    let archive = archive_section(&config)?;
    let site = Site::new(&config.site)?;
    let js = connect(&config).await?;
    let plan = super::worker::plan(&site, archive);
    let meta = snapshot::take(&js, &plan).await?;
    println!(
        "{}: {} bytes, {} records, sha256 {}",
        meta.id, meta.size, meta.records, meta.sha256
    );
    if archive.s3.is_some() {
        let outbox = Outbox::open(&js).await?;
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        outbox
            .add(&Entry::new(&meta.id, meta.size, &meta.sha256, &now))
            .await?;
        println!("{}: queued for upload", meta.id);
    }
    Ok(())
}

/// One row of `presenced snapshots`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Row {
    pub id: String,
    /// Size in the object store, if there.
    pub local_size: Option<u64>,
    /// `complete`, `incomplete`, or absent.
    pub local: Option<String>,
    /// Outbox state.
    pub state: Option<String>,
    pub attempts: Option<u32>,
    pub uploads: Option<u32>,
    pub last_error: Option<String>,
    pub remote_size: Option<u64>,
    pub sha256: Option<String>,
    pub age_seconds: Option<u64>,
    /// `yes` (checked now or at upload), `no`, `corrupt: ...`, or absent.
    pub local_verified: Option<String>,
    pub remote_verified: Option<String>,
}

/// Lists local and remote snapshots with their state. With `verify`,
/// reads every copy and checks its sha256; a corrupt remote copy of an
/// uploaded snapshot is put back to `failed` so the archiver uploads it
/// again. Fails (after printing) when any copy is corrupt.
pub async fn list(config: Config, verify: bool, json: bool) -> anyhow::Result<()> {
    let archive = archive_section(&config)?;
    let js = connect(&config).await?;
    let store = snapshot::snapshots_store(&js).await?;
    let remote = archive.s3.as_ref().map(Remote::from_config).transpose()?;
    let now = SystemTime::now();
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut metas: BTreeMap<String, SnapshotMeta> = BTreeMap::new();
    for s in snapshot::list_local(&store).await? {
        let r = rows.entry(s.name.clone()).or_insert_with(|| Row {
            id: s.name.clone(),
            ..Default::default()
        });
        r.local_size = Some(s.size);
        r.age_seconds = now.duration_since(s.created).ok().map(|d| d.as_secs());
        match &s.meta {
            Some(m) => {
                r.local = Some("complete".into());
                r.sha256 = Some(m.sha256.clone());
                metas.insert(s.name.clone(), m.clone());
            }
            None => r.local = Some("incomplete".into()),
        }
    }
    let outbox = Outbox::open(&js).await?;
    let (entries, bad) = outbox.all().await?;
    for e in bad {
        eprintln!("presenced: {e}");
    }
    let mut revisions: BTreeMap<String, (Entry, u64)> = BTreeMap::new();
    for (e, rev) in entries {
        let r = rows.entry(e.snapshot.clone()).or_insert_with(|| Row {
            id: e.snapshot.clone(),
            ..Default::default()
        });
        r.state = Some(e.state.name().to_owned());
        r.attempts = Some(e.attempts);
        r.uploads = Some(e.uploads);
        r.sha256.get_or_insert_with(|| e.sha256.clone());
        if let State::Failed { last_error } = &e.state {
            r.last_error = Some(last_error.clone());
        }
        if e.is_done() {
            r.remote_verified = Some("yes".into());
        }
        revisions.insert(e.snapshot.clone(), (e, rev));
    }
    if let Some(remote) = &remote {
        for m in remote.list(&config.site).await? {
            let Some(id) = remote.id_of(&m.location) else {
                continue;
            };
            let r = rows.entry(id.clone()).or_insert_with(|| Row {
                id: id.clone(),
                ..Default::default()
            });
            r.remote_size = Some(m.size);
            if r.age_seconds.is_none() {
                let t: SystemTime = m.last_modified.into();
                r.age_seconds = now.duration_since(t).ok().map(|d| d.as_secs());
            }
            if r.remote_verified.is_none() {
                r.remote_verified = Some("no".into());
            }
        }
    }
    let mut corrupt = Vec::new();
    if verify {
        for r in rows.values_mut() {
            let expected = r
                .sha256
                .clone()
                .zip(
                    metas
                        .get(&r.id)
                        .map(|m| m.size)
                        .or_else(|| revisions.get(&r.id).map(|(e, _)| e.size)),
                )
                .map(|(sha256, size)| Digested { size, sha256 });
            // Known only in S3 (another leaf's, or pruned here): its own
            // metadata says what it should be.
            let expected = match (expected, &remote) {
                (Some(e), _) => Some(e),
                (None, Some(remote)) if r.remote_size.is_some() => {
                    remote.head(&r.id).await?.and_then(|(m, map)| {
                        let meta = SnapshotMeta::from_map(&r.id, m.size, &map)?;
                        r.sha256 = Some(meta.sha256.clone());
                        Some(Digested {
                            size: meta.size,
                            sha256: meta.sha256,
                        })
                    })
                }
                (None, _) => None,
            };
            let Some(expected) = expected else { continue };
            if r.local.as_deref() == Some("complete") {
                let got = digest_local(&store, &r.id).await?;
                r.local_verified = Some(match compare(&r.id, "local", &expected, &got) {
                    Ok(()) => "yes".into(),
                    Err(e) => {
                        corrupt.push(e.to_string());
                        format!("corrupt: {e}")
                    }
                });
            }
            if let (Some(remote), Some(_)) = (&remote, r.remote_size) {
                match verify_remote(remote, &r.id, &expected).await {
                    Ok(_) => r.remote_verified = Some("yes".into()),
                    Err(e @ ArchiveError::Verify { .. }) => {
                        corrupt.push(e.to_string());
                        r.remote_verified = Some(format!("corrupt: {e}"));
                        if let Some((entry, rev)) = revisions.get(&r.id) {
                            let now =
                                humantime::format_rfc3339_millis(SystemTime::now()).to_string();
                            if let Ok(failed) = entry.corrupt(&e.to_string(), &now) {
                                outbox.update(&failed, *rev).await?;
                                r.state = Some("failed".into());
                            }
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    if json {
        for r in rows.values() {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<58} {:>10} {:>10} {:>10} {:>8}  {:<12} {:<8} {:<8}",
            "SNAPSHOT", "LOCAL", "STATE", "REMOTE", "AGE", "SHA256", "L-OK", "R-OK"
        );
        for r in rows.values() {
            let size = |s: Option<u64>| s.map_or("-".to_owned(), |n| n.to_string());
            let short = |v: &Option<String>| {
                v.as_deref().map_or("-".to_owned(), |s| {
                    s.split(':').next().unwrap_or(s).to_owned()
                })
            };
            println!(
                "{:<58} {:>10} {:>10} {:>10} {:>8}  {:<12} {:<8} {:<8}",
                r.id,
                if r.local.as_deref() == Some("incomplete") {
                    "partial".to_owned()
                } else {
                    size(r.local_size)
                },
                r.state.as_deref().unwrap_or("-"),
                size(r.remote_size),
                r.age_seconds.map_or("-".to_owned(), |s| {
                    humantime::format_duration(Duration::from_secs(s))
                        .to_string()
                        .split(' ')
                        .next()
                        .unwrap_or("-")
                        .to_owned()
                }),
                r.sha256
                    .as_deref()
                    .map_or("-", |s| s.get(..12).unwrap_or(s)),
                short(&r.local_verified),
                short(&r.remote_verified),
            );
            if let Some(e) = &r.last_error {
                println!("    last error: {e}");
            }
        }
    }
    if !corrupt.is_empty() {
        anyhow::bail!(
            "{} corrupt cop(y/ies):\n  {}",
            corrupt.len(),
            corrupt.join("\n  ")
        );
    }
    Ok(())
}

/// Restores `id` into the leaf of `config`.
pub async fn restore(config: Config, id: String, from_s3: bool, force: bool) -> anyhow::Result<()> {
    let js = connect(&config).await?;
    let source = if from_s3 {
        let archive = archive_section(&config)?;
        let s3 = archive
            .s3
            .as_ref()
            .context("--from-s3 needs an [archive.s3] section")?;
        Source::Remote(Remote::from_config(s3)?)
    } else {
        Source::Local
    };
    let report = restore::restore(&js, &source, &id, force).await?;
    for b in &report.purged {
        println!("{b}: purged (--force)");
    }
    for (b, n) in &report.buckets {
        println!("{b}: {n} keys restored");
    }
    println!(
        "{}: restored (sha256 {} verified)",
        report.id, report.sha256
    );
    Ok(())
}
