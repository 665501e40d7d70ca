//! The archiver inside the daemon: takes snapshots on schedule, uploads
//! what the outbox says is not uploaded yet, retries failures with
//! exponential backoff and jitter (no attempt limit), and prunes.
//!
//! Everything it must remember is in JetStream (snapshots, outbox), so a
//! restart resumes: entries not yet uploaded are retried at once, and the
//! next snapshot is due `every` after the newest existing one.

use super::config::ArchiveConfig;
use super::metrics::{
    ArchiveMetrics, PRUNED_LOCAL, PRUNED_REMOTE, SNAPSHOT_FAILED, SNAPSHOT_TAKEN, UPLOADED,
    UPLOAD_FAILED,
};
use super::outbox::{Entry, Outbox};
use super::s3::Remote;
use super::snapshot::{self, LocalSnapshot, Plan};
use super::verify::{verify_remote, Digested};
use super::{meta, retention, ArchiveError, SnapshotMeta};
use crate::base::backoff::Backoff;
use crate::metrics::Metrics;
use crate::naming::Site;
use async_nats::jetstream::{self, kv, object_store::ObjectStore};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;

pub struct Archiver {
    js: jetstream::Context,
    site: Site,
    cfg: ArchiveConfig,
    plan: Plan,
    store: ObjectStore,
    outbox: Outbox,
    remote: Option<Remote>,
    metrics: Arc<ArchiveMetrics>,
    /// The archiver's NKEY, which signs every snapshot; `None` when the
    /// leaf has no authorization (snapshots are then unsigned).
    signer: Option<super::sign::Signer>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The plan of snapshots `cfg` asks for.
pub fn plan(site: &Site, cfg: &ArchiveConfig) -> Plan {
    Plan {
        site: site.clone(),
        buckets: cfg.buckets.clone(),
        events: cfg.events,
    }
}

impl Archiver {
    /// Opens the object store and the outbox and reads the S3 credentials:
    /// anything missing fails the start, loudly, rather than every upload.
    pub async fn start(
        js: jetstream::Context,
        site: Site,
        cfg: ArchiveConfig,
        metrics: &Metrics,
        seed_file: Option<&std::path::Path>,
    ) -> Result<Archiver, ArchiveError> {
        let signer = seed_file
            .map(super::sign::Signer::from_seed_file)
            .transpose()?;
        if signer.is_none() {
            tracing::warn!("archive: no nats.nkey_seed_file, snapshots will be unsigned and restore refuses them without --allow-unsigned");
        }
        let store = snapshot::snapshots_store(&js).await?;
        let outbox = Outbox::open(&js).await?;
        let remote = cfg.s3.as_ref().map(Remote::from_config).transpose()?;
        // Assumed reachable until an upload says otherwise.
        let own = Arc::new(ArchiveMetrics::default());
        own.s3_ok.store(remote.is_some(), Ordering::Relaxed);
        // Registered once the start succeeded: the archiver's families
        // and its `/healthz` section appear only when it runs.
        metrics.add_collector(own.clone());
        let metrics = own;
        Ok(Archiver {
            plan: plan(&site, &cfg),
            js,
            site,
            cfg,
            store,
            outbox,
            remote,
            metrics,
            signer,
        })
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut due: BTreeMap<String, Instant> = BTreeMap::new();
        let mut next_snapshot = Instant::now();
        match snapshot::list_local(&self.store).await {
            Ok(local) => {
                if let Some(newest) = local.iter().rev().find(|s| s.meta.is_some()) {
                    let age = SystemTime::now()
                        .duration_since(newest.created)
                        .unwrap_or_default();
                    next_snapshot += self.cfg.every.saturating_sub(age);
                    Metrics::set(
                        &self.metrics.last_snapshot_seconds,
                        unix_secs(newest.created),
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "archive: cannot list snapshots at start"),
        }
        if self.remote.is_some() {
            match self.outbox.all().await {
                Ok((entries, bad)) => {
                    for e in bad {
                        tracing::error!(error = %e, "archive: outbox entry skipped");
                    }
                    let open: Vec<_> = entries.iter().filter(|(e, _)| !e.is_done()).collect();
                    if !open.is_empty() {
                        tracing::info!(
                            count = open.len(),
                            "archive: resuming uploads left by the last run"
                        );
                    }
                    for (e, _) in open {
                        due.insert(e.snapshot.clone(), Instant::now());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "archive: cannot read the outbox at start"),
            }
        }
        self.set_pending(&due);
        let mut outbox_watch: Option<kv::Watch> = None;
        let mut next_watch_try = Instant::now();
        tracing::info!(
            every = %humantime::format_duration(self.cfg.every),
            buckets = %self.plan.names().join(","),
            s3 = %self.remote.as_ref().map_or("-".to_owned(), |r| r.location.clone()),
            "archive: started"
        );
        loop {
            if outbox_watch.is_none() && self.remote.is_some() && Instant::now() >= next_watch_try {
                match self.outbox.watch().await {
                    Ok(w) => outbox_watch = Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "archive: cannot watch the outbox; retrying");
                        next_watch_try = Instant::now() + Duration::from_secs(5);
                    }
                }
            }
            let next_retry = due.values().min().copied();
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = tokio::time::sleep_until(next_snapshot) => {
                    next_snapshot = match self.snapshot_cycle(&mut due).await {
                        Ok(()) => Instant::now() + self.cfg.every,
                        Err(()) => Instant::now() + self.cfg.every.min(self.cfg.retry_max),
                    };
                }
                _ = tokio::time::sleep_until(next_retry.unwrap_or(next_snapshot)), if next_retry.is_some() => {
                    let now = Instant::now();
                    let ready: Vec<String> = due
                        .iter()
                        .filter(|(_, t)| **t <= now)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for id in ready {
                        self.attempt(&id, &mut due).await;
                    }
                }
                change = next_change(&mut outbox_watch) => match change {
                    Some(Ok(e)) => {
                        if e.operation == kv::Operation::Put {
                            match Outbox::decode_entry(&e.key, &e.value) {
                                Ok(entry) if !entry.is_done() && !due.contains_key(&e.key) => {
                                    due.insert(e.key.clone(), Instant::now());
                                }
                                Ok(_) => {}
                                Err(err) => tracing::error!(error = %err, "archive: outbox entry skipped"),
                            }
                        }
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "archive: outbox watch failed; restarting it");
                        outbox_watch = None;
                    }
                    None => outbox_watch = None,
                },
            }
            self.set_pending(&due);
        }
        tracing::info!("archive: stopped");
    }

    fn set_pending(&self, due: &BTreeMap<String, Instant>) {
        Metrics::set(&self.metrics.pending, due.len() as u64);
    }

    async fn snapshot_cycle(&self, due: &mut BTreeMap<String, Instant>) -> Result<(), ()> {
        let start = Instant::now();
        let taken = match snapshot::take(&self.js, &self.plan, self.signer.as_ref()).await {
            Ok(m) => m,
            Err(e) => {
                crate::emit!(SNAPSHOT_FAILED, &self.metrics.snapshot_failures; error = %e);
                return Err(());
            }
        };
        Metrics::set(
            &self.metrics.last_snapshot_seconds,
            unix_secs(SystemTime::now()),
        );
        crate::emit!(
            SNAPSHOT_TAKEN,
            &self.metrics.snapshots;
            snapshot = %taken.id,
            bytes = taken.size,
            records = taken.records,
            sha256 = %taken.sha256,
            took_ms = start.elapsed().as_millis() as u64
        );
        if self.remote.is_some() {
            let entry = Entry::new(&taken.id, taken.size, &taken.sha256, &now_rfc3339());
            if let Err(e) = self.outbox.add(&entry).await {
                tracing::error!(snapshot = %taken.id, error = %e, "archive: cannot queue the upload");
            }
            due.insert(taken.id.clone(), Instant::now());
        }
        self.prune().await;
        Ok(())
    }

    /// One upload attempt of snapshot `id`.
    async fn attempt(&self, id: &str, due: &mut BTreeMap<String, Instant>) {
        let Some(remote) = &self.remote else {
            due.remove(id);
            return;
        };
        let (entry, rev) = match self.outbox.get(id).await {
            Ok(Some(x)) => x,
            Ok(None) => {
                due.remove(id);
                return;
            }
            Err(e) => {
                tracing::warn!(snapshot = %id, error = %e, "archive: cannot read the outbox entry");
                due.insert(id.to_owned(), Instant::now() + self.cfg.retry_initial);
                return;
            }
        };
        if entry.is_done() {
            due.remove(id);
            return;
        }
        let Ok(uploading) = entry.begin(&now_rfc3339()) else {
            due.remove(id);
            return;
        };
        let rev = match self.outbox.update(&uploading, rev).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(snapshot = %id, error = %e, "archive: outbox entry changed under us; will re-read");
                due.insert(id.to_owned(), Instant::now() + self.cfg.retry_initial);
                return;
            }
        };
        let expected = Digested {
            size: entry.size,
            sha256: entry.sha256.clone(),
        };
        let start = Instant::now();
        let (result, put) = self.upload(remote, id, &expected).await;
        let now = now_rfc3339();
        match result {
            Ok(etag) => {
                let done = uploading.uploaded(etag.clone(), &expected.sha256, put, &now);
                let Ok(done) = done else { return };
                if let Err(e) = self.outbox.update(&done, rev).await {
                    tracing::warn!(snapshot = %id, error = %e, "archive: cannot record the upload; it is checked again");
                    due.insert(id.to_owned(), Instant::now() + self.cfg.retry_initial);
                    return;
                }
                due.remove(id);
                self.metrics.s3_ok.store(true, Ordering::Relaxed);
                Metrics::set(
                    &self.metrics.last_upload_seconds,
                    unix_secs(SystemTime::now()),
                );
                let counted = |n| {
                    if put {
                        Metrics::add(&self.metrics.uploads, n);
                        Metrics::add(&self.metrics.uploaded_bytes, n * expected.size);
                    }
                };
                crate::emit!(
                    UPLOADED,
                    counted;
                    snapshot = %id,
                    bytes = expected.size,
                    sha256 = %expected.sha256,
                    etag = etag.as_deref().unwrap_or("-"),
                    attempt = done.attempts,
                    reused = !put,
                    took_ms = start.elapsed().as_millis() as u64
                );
                self.prune().await;
            }
            Err(e) => {
                let verify = matches!(e, ArchiveError::Verify { .. });
                if !verify {
                    self.metrics.s3_ok.store(false, Ordering::Relaxed);
                }
                let delay = Backoff::new(self.cfg.retry_initial, self.cfg.retry_max)
                    .delay_after(uploading.attempts);
                let msg = e.to_string();
                if let Ok(failed) = uploading.failed(&msg, put, &now) {
                    if let Err(e2) = self.outbox.update(&failed, rev).await {
                        tracing::warn!(snapshot = %id, error = %e2, "archive: cannot record the failed upload");
                    }
                }
                let counted = |n| {
                    Metrics::add(&self.metrics.upload_failures, n);
                    if verify {
                        Metrics::add(&self.metrics.verify_failures, n);
                    }
                };
                crate::emit!(
                    UPLOAD_FAILED,
                    counted;
                    snapshot = %id,
                    attempt = uploading.attempts,
                    retry_in_ms = delay.as_millis() as u64,
                    verify,
                    error = %msg
                );
                due.insert(id.to_owned(), Instant::now() + delay);
            }
        }
    }

    /// Uploads unless an intact copy is already there (a PUT whose
    /// success was not recorded before a crash). Returns the ETag and
    /// whether a PUT happened.
    async fn upload(
        &self,
        remote: &Remote,
        id: &str,
        expected: &Digested,
    ) -> (Result<Option<String>, ArchiveError>, bool) {
        let info = match self.store.info(id).await {
            Ok(i) => i,
            Err(e) => {
                return (
                    Err(ArchiveError::nats(
                        format!("snapshot {id} is not in the object store"),
                        e,
                    )),
                    false,
                )
            }
        };
        let Some(meta) = SnapshotMeta::from_map(id, info.size as u64, &info.metadata) else {
            return (
                Err(ArchiveError::Verify {
                    id: id.to_owned(),
                    what: "the local object has no sha256 metadata".to_owned(),
                }),
                false,
            );
        };
        // A copy already there counts only with the same content and the
        // same signature metadata (a copy stripped of its signature is
        // replaced, or restore would refuse it).
        match remote.head(id).await {
            Ok(Some((m, map)))
                if m.size == expected.size
                    && map.get(meta::SHA256) == Some(&expected.sha256)
                    && map.get(meta::SIGNATURE) == meta.signature.as_ref()
                    && map.get(meta::SIGNER) == meta.signer.as_ref() =>
            {
                if verify_remote(remote, id, expected).await.is_ok() {
                    return (Ok(m.e_tag), false);
                }
            }
            Ok(_) => {}
            Err(e) => return (Err(e), false),
        }
        let etag = match remote.upload(&self.store, &meta).await {
            Ok(t) => t,
            Err(e) => return (Err(e), false),
        };
        match verify_remote(remote, id, expected).await {
            Ok(_) => (Ok(etag), true),
            Err(e) => (Err(e), true),
        }
    }

    async fn prune(&self) {
        let now = SystemTime::now();
        let local: Vec<LocalSnapshot> = match snapshot::list_local(&self.store).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "archive: cannot list snapshots for pruning");
                return;
            }
        };
        let unsent: BTreeSet<String> = if self.remote.is_some() {
            match self.outbox.all().await {
                Ok((entries, _)) => entries
                    .into_iter()
                    .filter(|(e, _)| !e.is_done())
                    .map(|(e, _)| e.snapshot)
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "archive: cannot read the outbox for pruning");
                    return;
                }
            }
        } else {
            BTreeSet::new()
        };
        match retention::prune_local(&self.store, &local, &unsent, self.cfg.keep_local, now).await {
            Ok(gone) => {
                for id in &gone {
                    crate::emit!(PRUNED_LOCAL, &self.metrics.pruned_local; snapshot = %id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "archive: local pruning failed"),
        }
        if let (Some(remote), true) = (&self.remote, self.cfg.delete_remote) {
            match retention::prune_remote(
                remote,
                &self.outbox,
                self.site.as_str(),
                self.cfg.keep_remote,
                now,
            )
            .await
            {
                Ok(gone) => {
                    for id in &gone {
                        crate::emit!(PRUNED_REMOTE, &self.metrics.pruned_remote; snapshot = %id);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "archive: remote pruning failed"),
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn next_change(
    w: &mut Option<kv::Watch>,
) -> Option<Result<kv::Entry, async_nats::jetstream::kv::WatcherError>> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
