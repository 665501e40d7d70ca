//! What `presenced snapshot`, `presenced snapshots` and `presenced
//! restore` do, returning what they found: the binary's `cli/` prints it.

use super::config::ArchiveConfig;
use super::outbox::{Entry, Outbox, State};
use super::refusal::Refusals;
use super::restore::{self, Source};
use super::s3::Remote;
use super::sign::{Checked, Signer, Trust};
use super::snapshot;
use super::verify::{compare, digest_local, verify_remote, Digested};
use super::{ArchiveError, SnapshotMeta};
use crate::naming::Site;
use crate::store::config::NatsConfig;
use anyhow::Context as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The parts of the config an archive command reads: the site, who it
/// connects as and where, and the `[archive]` section.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub site: &'a str,
    pub service: &'a str,
    pub nats: &'a NatsConfig,
    pub archive: Option<&'a ArchiveConfig>,
}

fn archive_section<'a>(config: &Target<'a>) -> anyhow::Result<&'a ArchiveConfig> {
    config
        .archive
        .context("the config has no [archive] section (see docs/CONFIG.md)")
}

/// Connects as the config's service, catching the server's refusals so
/// that an error can name them.
async fn connect(
    config: &Target<'_>,
) -> anyhow::Result<(async_nats::jetstream::Context, Refusals)> {
    let (tx, rx) = crate::acl::violation::channel();
    let who = crate::store::connect::As {
        service: Some(config.service.to_owned()),
        violations: Some(tx),
    };
    let client = crate::store::connect_as(
        config.nats,
        "presenced-cli",
        Some(std::sync::Arc::new(crate::metrics::Metrics::default())),
        Some(Duration::from_secs(10)),
        &who,
    )
    .await?;
    Ok((
        crate::store::jetstream_context(client, config.nats),
        Refusals::new(config.service, Some(rx)),
    ))
}

/// An error of an archive command, with the server's refusals named
/// when there were any (the error itself is then often a timeout or a
/// "missing" bucket).
fn named(e: impl Into<anyhow::Error>, refusals: &mut Refusals) -> anyhow::Error {
    let e = e.into();
    if e.to_string().contains("permission refused:") {
        return e;
    }
    match refusals.describe() {
        Some(r) => anyhow::anyhow!(
            "{r}
(then: {e:#})"
        ),
        None => e,
    }
}

/// Whom to trust: the archiver of the ownership map in `access`.
pub fn trust(access: Option<&Path>, allow_unsigned: bool) -> anyhow::Result<Trust> {
    if allow_unsigned {
        tracing::warn!("--allow-unsigned: snapshots whose signature cannot be checked are accepted; anyone who can write where they are stored could have made them");
    }
    match access {
        Some(path) => {
            let access = crate::acl::access::Access::load(path)?;
            Trust::from_access(&access, allow_unsigned)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        None => Ok(Trust {
            archiver: None,
            allow_unsigned,
        }),
    }
}

fn signature_text(c: &Result<Checked, ArchiveError>) -> String {
    match c {
        Ok(Checked::Signed { signer }) => format!("signed by {signer}"),
        Ok(Checked::Unchecked(why)) => format!("unchecked (--allow-unsigned): {why}"),
        Err(e) => format!("refused: {e}"),
    }
}

/// A snapshot taken by `presenced snapshot`.
#[derive(Debug)]
pub struct Taken {
    pub meta: SnapshotMeta,
    /// Queued in the outbox for upload (an `[archive.s3]` is configured).
    pub queued: bool,
}

/// Takes a snapshot now and queues it for upload (the running archiver
/// uploads it).
pub async fn snapshot(config: Target<'_>) -> anyhow::Result<Taken> {
    let archive = archive_section(&config)?;
    let site = Site::new(config.site)?;
    let (js, mut refusals) = connect(&config).await?;
    let signer = config
        .nats
        .nkey_seed_file
        .as_deref()
        .map(Signer::from_seed_file)
        .transpose()?;
    let plan = super::worker::plan(&site, archive);
    let meta = tokio::select! {
        r = snapshot::take(&js, &plan, signer.as_ref()) => r.map_err(|e| named(e, &mut refusals))?,
        v = refusals.next() => anyhow::bail!(refusals.named(&v)),
    };
    let queued = archive.s3.is_some();
    if queued {
        let outbox = Outbox::open(&js).await?;
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        outbox
            .add(&Entry::new(&meta.id, meta.size, &meta.sha256, &now))
            .await?;
    }
    Ok(Taken { meta, queued })
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
    /// With `--verify`: `signed by U...`, `unchecked (--allow-unsigned):
    /// ...` or `refused: ...` for each copy.
    pub local_signature: Option<String>,
    pub remote_signature: Option<String>,
}

/// What `presenced snapshots` found: a row per snapshot, the outbox
/// entries that could not be read, and every corrupt or refused copy.
#[derive(Debug, Default)]
pub struct Listing {
    pub rows: Vec<Row>,
    /// Outbox entries that could not be read (printed as warnings).
    pub unreadable: Vec<String>,
    /// Copies found corrupt or wrongly signed (with `verify`).
    pub corrupt: Vec<String>,
}

/// Lists local and remote snapshots with their state. With `verify`,
/// checks every copy's signature against `trust` and reads it to check
/// its sha256; a corrupt or wrongly signed remote copy of an uploaded
/// snapshot is put back to `failed` so the archiver uploads it again.
/// Corrupt or refused copies are in [`Listing::corrupt`]: the caller
/// prints the rows and then fails.
pub async fn list(config: Target<'_>, verify: Option<Trust>) -> anyhow::Result<Listing> {
    let (js, mut refusals) = connect(&config).await?;
    // A refusal ends the listing at once, named (the request it stopped
    // would only time out).
    let result = tokio::select! {
        r = list_on(&config, &js, verify) => r,
        v = refusals.next() => Err(anyhow::anyhow!(refusals.named(&v))),
    };
    result.map_err(|e| named(e, &mut refusals))
}

async fn list_on(
    config: &Target<'_>,
    js: &async_nats::jetstream::Context,
    verify: Option<Trust>,
) -> anyhow::Result<Listing> {
    let archive = archive_section(config)?;
    let js = js.clone();
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
    let unreadable = bad.iter().map(ToString::to_string).collect();
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
        for m in remote.list(config.site).await? {
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
    if let Some(trust) = &verify {
        for r in rows.values_mut() {
            // The signatures first: a copy whose signature fails is not
            // the archiver's, whatever its sha256 says.
            if let Some(m) = metas.get(&r.id) {
                let c = trust.check(m);
                if let Err(e) = &c {
                    corrupt.push(format!("local copy: {e}"));
                }
                r.local_signature = Some(signature_text(&c));
            }
            let mut remote_refused = None;
            if let (Some(remote), Some(_)) = (&remote, r.remote_size) {
                let c = match remote.head(&r.id).await? {
                    Some((m, map)) => match SnapshotMeta::from_map(&r.id, m.size, &map) {
                        Some(meta) => trust.check(&meta),
                        None => Err(ArchiveError::Signature {
                            id: r.id.clone(),
                            why:
                                "its S3 metadata has no sha256 (not a complete presenced snapshot)"
                                    .to_owned(),
                        }),
                    },
                    None => Ok(Checked::Unchecked("gone from S3".to_owned())),
                };
                if let Err(e) = &c {
                    corrupt.push(format!("remote copy: {e}"));
                    remote_refused = Some(e.to_string());
                }
                r.remote_signature = Some(signature_text(&c));
            }
            if let (Some(why), Some((entry, rev))) = (&remote_refused, revisions.get(&r.id)) {
                let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
                if let Ok(failed) = entry.corrupt(why, &now) {
                    outbox.update(&failed, *rev).await?;
                    r.state = Some("failed".into());
                }
            }
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
    Ok(Listing {
        rows: rows.into_values().collect(),
        unreadable,
        corrupt,
    })
}

/// What `presenced restore` was asked.
pub struct RestoreArgs {
    pub id: Option<String>,
    pub from_s3: bool,
    /// `--from-file`: a copy restore kept (unsigned).
    pub from_file: Option<PathBuf>,
    pub force: bool,
    pub trust: Trust,
    /// Where the replaced contents are saved (default: the temp dir).
    pub backup_dir: Option<PathBuf>,
}

/// Restores a snapshot into the leaf of `config`.
pub async fn restore(config: Target<'_>, args: RestoreArgs) -> anyhow::Result<restore::Report> {
    let site = Site::new(config.site)?;
    let (source, id) = match (&args.from_file, &args.id, args.from_s3) {
        (Some(f), None, false) => (Source::File(f.clone()), f.display().to_string()),
        (None, Some(id), true) => {
            let archive = archive_section(&config)?;
            let s3 = archive
                .s3
                .as_ref()
                .context("--from-s3 needs an [archive.s3] section")?;
            (Source::Remote(Remote::from_config(s3)?), id.clone())
        }
        (None, Some(id), false) => (Source::Local, id.clone()),
        _ => anyhow::bail!(
            "give a SNAPSHOT (with --from-s3 to read it from S3), or --from-file FILE"
        ),
    };
    let (js, mut refusals) = connect(&config).await?;
    let opts = restore::Options {
        force: args.force,
        trust: args.trust,
        site,
        backup_dir: args.backup_dir.unwrap_or_else(std::env::temp_dir),
    };
    restore::restore(&js, &source, &id, &opts, &mut refusals)
        .await
        .map_err(|e| named(e, &mut refusals))
}
