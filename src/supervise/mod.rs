//! Supervision of the daemon's long-running components.
//!
//! Every task the daemon starts (sources, ingest, engine, lease, hub
//! watch, archiver, Home Assistant output, HTTP, the gauge task) runs in
//! one [`JoinSet`] under one root [`CancellationToken`], so none can end
//! unnoticed: an unexpected end is logged at ERROR with the component's
//! name and cause, recorded in the [`Registry`] that `/healthz` and
//! `/metrics` read, and decides whether the daemon goes on.
//!
//! Shutdown is staged ([`Stage`]): each stage has a child token of the
//! root, cancelled in order and awaited before the next, so the lease is
//! released before input stops and ingest drains before the engine stops.
//!
//! A component says "retrying cannot help" by wrapping its error in
//! [`Fatal`] (see [`fatal`]): a configuration error, a missing secret
//! file, a permission refused. The daemon then exits non-zero at once so
//! systemd restarts it and the journal shows why.

pub mod config;

pub mod metrics;

use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Marks an error that retrying (or a restart with the same files) cannot
/// fix. Found anywhere in an `anyhow` chain by [`is_fatal`].
#[derive(Debug)]
pub struct Fatal(pub anyhow::Error);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Fatal {}

/// Wraps `e` as [`Fatal`].
pub fn fatal(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Fatal(e.into()))
}

/// Whether `e` (or anything it wraps) was marked [`Fatal`].
pub fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Fatal>())
}

/// A component's error that can say whether a retry could help. Source,
/// engine and output errors implement it, each beside its error type (the
/// supervisor knows no component); [`classify`] turns one into an
/// `anyhow::Error`, wrapped in [`Fatal`] when it is.
pub trait Failure: std::error::Error + Send + Sync + 'static {
    /// True when retrying, or restarting with the same files, cannot fix
    /// it: configuration, a missing secret file, missing provisioning.
    fn is_fatal(&self) -> bool;
}

/// `e` as an `anyhow::Error`, marked [`Fatal`] when [`Failure::is_fatal`].
pub fn classify<E: Failure>(e: E) -> anyhow::Error {
    if e.is_fatal() {
        fatal(e)
    } else {
        anyhow::Error::new(e)
    }
}

/// Shutdown order: each stage is stopped and awaited before the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The lease goes first: clients see this service's keys as stale
    /// from the moment it starts to stop.
    Lease,
    /// Input stops; what the sources handed over stays in the buffer.
    Sources,
    /// Ingest stores what it holds; it ends when every source has.
    Ingest,
    /// Engine, archiver, Home Assistant, hub watch, gauges.
    Work,
    /// HTTP last, so health answers while the rest drains.
    Http,
}

impl Stage {
    const ORDER: [Stage; 5] = [
        Stage::Lease,
        Stage::Sources,
        Stage::Ingest,
        Stage::Work,
        Stage::Http,
    ];
}

/// What a component is doing, as `/healthz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Running,
    /// Ended on request (shutdown).
    Stopped,
    /// Ended unexpectedly or could not start.
    Failed,
}

/// One component's entry in the [`Registry`].
#[derive(Clone, Debug, Serialize)]
pub struct Component {
    pub state: State,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// Whether the daemon cannot do its job without it (anything the
    /// instance `runs`, the lease, HTTP): its failure means "down", an
    /// optional one's means "degraded".
    pub essential: bool,
    /// Unexpected ends since start.
    pub failures: u64,
    /// Unix seconds of the last state change.
    pub since: u64,
}

/// The state of every supervised component, by name.
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<BTreeMap<String, Component>>,
    /// The daemon's READY (`presenced_ready`, `/healthz`): set by its main
    /// loop once every component it waits on has started.
    ready: std::sync::atomic::AtomicBool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Registry {
    pub fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Component)) {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let c = map.entry(name.to_owned()).or_insert(Component {
            state: State::Starting,
            cause: None,
            essential: false,
            failures: 0,
            since: unix_now(),
        });
        f(c);
    }

    /// Adds `name` as starting.
    pub fn register(&self, name: &str, essential: bool) {
        self.update(name, |c| {
            c.essential = essential;
            c.state = State::Starting;
            c.since = unix_now();
        });
    }

    /// Marks `name` running (started, first connection done, ...).
    pub fn running(&self, name: &str) {
        self.update(name, |c| {
            if c.state == State::Starting {
                c.state = State::Running;
                c.since = unix_now();
            }
        });
    }

    fn set(&self, name: &str, state: State, cause: Option<String>) {
        self.update(name, |c| {
            c.state = state;
            c.cause = cause;
            c.since = unix_now();
        });
    }

    /// Marks `name` failed: counts the failure and logs it (one
    /// [`metrics::COMPONENT_FAILED`] event), then records the state.
    fn failed(&self, name: &str, cause: String, fatal: bool) {
        crate::emit!(
            metrics::COMPONENT_FAILED,
            |n| self.update(name, |c| c.failures += n);
            component = %name,
            error = %cause,
            fatal
        );
        self.set(name, State::Failed, Some(cause));
    }

    /// A copy of every entry, by name.
    pub fn snapshot(&self) -> BTreeMap<String, Component> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How a supervised task ended.
#[derive(Debug)]
pub struct Exit {
    pub name: String,
    pub essential: bool,
    /// `Ok` only for an end on request; an early `Ok` is turned into an
    /// error by [`Supervisor::next_exit`].
    pub result: anyhow::Result<()>,
}

/// The join set and the tokens of one daemon.
pub struct Supervisor {
    root: CancellationToken,
    stages: BTreeMap<Stage, CancellationToken>,
    set: JoinSet<(String, anyhow::Result<()>)>,
    /// Tasks not yet ended: name to (stage, essential).
    running: BTreeMap<String, (Stage, bool)>,
    /// Task ids to names, to name a task that panicked.
    ids: std::collections::HashMap<tokio::task::Id, String>,
    registry: std::sync::Arc<Registry>,
}

impl Supervisor {
    /// The registry of the supervised components: starts mark theirs
    /// running in it, `/healthz` and `/metrics` read it.
    pub fn registry(&self) -> std::sync::Arc<Registry> {
        self.registry.clone()
    }

    pub fn new(registry: std::sync::Arc<Registry>) -> Supervisor {
        let root = CancellationToken::new();
        let stages = Stage::ORDER
            .iter()
            .map(|s| (*s, root.child_token()))
            .collect();
        Supervisor {
            root,
            stages,
            set: JoinSet::new(),
            running: BTreeMap::new(),
            ids: std::collections::HashMap::new(),
            registry,
        }
    }

    /// The token cancelled when `stage` is to stop (or the root is).
    pub fn token(&self, stage: Stage) -> CancellationToken {
        self.stages
            .get(&stage)
            .cloned()
            .unwrap_or_else(|| self.root.child_token())
    }

    /// `token(stage)` as the `watch` flag the components take.
    pub fn stop_flag(&self, stage: Stage) -> watch::Receiver<bool> {
        let token = self.token(stage);
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => { let _ = tx.send(true); }
                _ = tx.closed() => {}
            }
        });
        rx
    }

    /// Runs `task` as component `name`, stopped with `stage`.
    pub fn spawn<F>(&mut self, name: &str, stage: Stage, essential: bool, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.registry.register(name, essential);
        self.running.insert(name.to_owned(), (stage, essential));
        let n = name.to_owned();
        let handle = self.set.spawn(async move { (n, task.await) });
        self.ids.insert(handle.id(), name.to_owned());
    }

    /// Whether `name` is still running.
    pub fn is_running(&self, name: &str) -> bool {
        self.running.contains_key(name)
    }

    /// Waits for the next task to end (pending forever when none runs)
    /// and records it: an end before its stage was cancelled is a failure.
    pub async fn next_exit(&mut self) -> Exit {
        loop {
            let Some(joined) = self.set.join_next().await else {
                std::future::pending::<()>().await;
                continue;
            };
            return self.record(joined);
        }
    }

    fn record(
        &mut self,
        joined: Result<(String, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> Exit {
        let (name, result) = match joined {
            Ok(r) => r,
            Err(e) => {
                let name = self
                    .ids
                    .get(&e.id())
                    .cloned()
                    .unwrap_or_else(|| "unknown".into());
                (name, Err(anyhow::anyhow!("task panicked: {e}")))
            }
        };
        self.ids.retain(|_, n| *n != name);
        let (stage, essential) = self.running.remove(&name).unwrap_or((Stage::Work, false));
        let asked = self.token(stage).is_cancelled();
        let result = match result {
            Ok(()) if asked => Ok(()),
            Ok(()) => Err(anyhow::anyhow!("stopped unexpectedly")),
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) => self.registry.set(&name, State::Stopped, None),
            Err(e) => {
                self.registry.failed(&name, format!("{e:#}"), is_fatal(e));
            }
        }
        Exit {
            name,
            essential,
            result,
        }
    }

    /// Stops every stage in order, each within what is left of
    /// `timeout`; returns false when time ran out (the rest is aborted).
    pub async fn drain(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for stage in Stage::ORDER {
            self.token(stage).cancel();
            if stage == Stage::Sources {
                // Ingest ends by itself once the sources have dropped
                // their senders, possibly before its own stage comes up:
                // that end is asked for too.
                self.token(Stage::Ingest).cancel();
            }
            while self.running.values().any(|(s, _)| *s == stage) {
                match tokio::time::timeout_at(deadline, self.set.join_next()).await {
                    Ok(Some(joined)) => {
                        self.record(joined);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        let left: Vec<_> = self.running.keys().cloned().collect();
                        tracing::warn!(?timeout, still_running = ?left, "drain did not finish in time; exiting anyway (unacknowledged input will be redelivered)");
                        self.root.cancel();
                        self.set.abort_all();
                        return false;
                    }
                }
            }
        }
        self.root.cancel();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fatal_is_found_through_context() {
        let e = fatal(anyhow::anyhow!("password file missing")).context("source mqtt.home");
        assert!(is_fatal(&e));
        assert!(!is_fatal(&anyhow::anyhow!("broker down")));
        assert!(format!("{e:#}").contains("password file missing"));
    }

    #[tokio::test]
    async fn an_early_end_is_a_failure_and_an_asked_one_is_not() {
        let reg = Arc::new(Registry::default());
        let mut sup = Supervisor::new(reg.clone());
        sup.spawn("early", Stage::Work, false, async { Ok(()) });
        let exit = sup.next_exit().await;
        assert_eq!(exit.name, "early");
        assert!(exit.result.is_err());
        assert_eq!(reg.snapshot()["early"].state, State::Failed);
        assert_eq!(reg.snapshot()["early"].failures, 1);

        let lease = sup.token(Stage::Lease);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let o = order.clone();
        sup.spawn("lease", Stage::Lease, true, async move {
            lease.cancelled().await;
            o.lock().unwrap().push("lease");
            Ok(())
        });
        let http = sup.token(Stage::Http);
        let o = order.clone();
        sup.spawn("http", Stage::Http, true, async move {
            http.cancelled().await;
            o.lock().unwrap().push("http");
            Ok(())
        });
        assert!(sup.drain(Duration::from_secs(5)).await);
        assert_eq!(*order.lock().unwrap(), ["lease", "http"]);
        assert_eq!(reg.snapshot()["lease"].state, State::Stopped);
        assert_eq!(reg.snapshot()["http"].state, State::Stopped);
    }
}
