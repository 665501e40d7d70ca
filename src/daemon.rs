//! `presenced run`: starts the components the config enables (sources and
//! ingest, engine, archiver, lease, Home Assistant output, hub watch,
//! HTTP) under one [`Supervisor`], sends READY once they have started,
//! reloads zones on SIGHUP, and shuts them down in order.

use crate::component::Ctx;
use crate::config::Config;
use crate::engine::Model;
use crate::metrics::Metrics;
use crate::naming::Site;
use crate::supervise::{self, Stage, Supervisor};
use crate::{engine, http, ingest, store, systemd};
use async_nats::jetstream;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Resolves when SIGTERM or SIGINT arrives.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the daemon");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// JetStream context for the daemon (see [`store::jetstream_context`]).
pub fn jetstream_context(client: async_nats::Client, config: &Config) -> jetstream::Context {
    store::jetstream_context(client, &config.nats)
}

/// Runs the components the config enables under one [`Supervisor`] until
/// SIGTERM/SIGINT (then drains in order and returns `Ok`) or until a
/// component fails in a way the daemon cannot carry on from (then drains
/// and returns the error, so the process exits non-zero and systemd
/// restarts it). See docs/OPERATIONS.md "Failure modes".
pub async fn run(config: Config) -> anyhow::Result<()> {
    run_file(config, None).await
}

/// [`run`], with the file the config came from: SIGHUP re-reads it.
pub async fn run_file(mut config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    use crate::acl::access::Component;
    let running = Running::of(&config);
    // Listened for from the start: SIGHUP's default action would end the
    // process without a drain.
    let mut hup = hangups();
    let site = Site::new(&config.site)?;
    let runs = config.components();
    if runs.is_empty() {
        return Err(supervise::fatal(anyhow::anyhow!(
            "nothing to run: the config has no source, zone or [archive], and no `runs`"
        )));
    }
    let ingest_on = runs.contains(&Component::Ingest);
    let engine_on = runs.contains(&Component::Engine);
    let archiver_on = runs.contains(&Component::Archiver);
    let metrics = Arc::new(Metrics::default());
    *metrics.runs.write().unwrap_or_else(|p| p.into_inner()) =
        runs.iter().map(|c| c.name().to_owned()).collect();
    // Readiness, the components, the link and the lease are exported from
    // the start: while the leaf is unreachable they read 0.
    let components = Arc::new(supervise::Registry::default());
    metrics.register(components.clone());
    let (_, lease_metrics) = store::metrics::declare(&metrics, engine_on);
    let path = config_path.clone();
    let model = Arc::new(Model::from_config(&config));
    // The compiled model is all the engine needs; with thousands of zones
    // the parsed copy would only hold memory. Home Assistant discovery
    // describes the zones from it, so it keeps them when enabled.
    let zones = config.take_presence_entries();
    let ha_zones = config.homeassistant.as_ref().map(|_| zones);
    let mut sup = Supervisor::new(components.clone());
    let page = crate::page::Page::new(
        site.clone(),
        config.service.clone(),
        metrics.clone(),
        model.clone(),
        config.http.page_commands,
        sup.stop_flag(Stage::Http),
    );

    let routes = crate::page::router(page.clone());
    http::start(&mut sup, &metrics, &config.http, routes).await?;

    let term = termination();
    tokio::pin!(term);

    let client_name = format!("presenced-{site}");
    let (violations_tx, violations_rx) = crate::acl::violation::channel();
    let who = store::connect::As {
        service: Some(config.service.clone()),
        violations: Some(violations_tx),
    };
    let client = tokio::select! {
        c = store::connect_as(&config.nats, &client_name, Some(metrics.clone()), None, &who) => c?,
        _ = &mut term => {
            tracing::info!("stopped before connecting to nats-server");
            sup.drain(config.engine.drain_timeout).await;
            return Ok(());
        }
    };
    let js = jetstream_context(client.clone(), &config);
    if config.http.enabled {
        let follow = page.follow(client.clone(), js.clone(), sup.stop_flag(Stage::Http));
        tokio::spawn(follow);
    }
    // Every violation is audited; any one stops the daemon, which would
    // otherwise wait forever on an ack the server will never send.
    let (refused_tx, mut refused_rx) = mpsc::unbounded_channel();
    let audit = crate::acl::violation::spawn_audit(
        client.clone(),
        site.clone(),
        config.service.clone(),
        violations_rx,
        Some(refused_tx),
    );
    let service = config.service.clone();
    let refused = move |v: crate::acl::violation::Violation| {
        supervise::fatal(anyhow::anyhow!(
            "nats-server refused to let service {} {} {:?}: the ACL does not grant what this service needs; regenerate it with `presenced acl` (see docs/SECURITY.md)",
            service,
            v.operation.as_str(),
            v.subject
        ))
    };

    // Each component's start: its task under the supervisor, its
    // metrics, and what the components after it need.
    let mut ctx = Ctx {
        site: &site,
        service: &config.service,
        client: &client,
        js: &js,
        metrics: &metrics,
        sup: &mut sup,
    };
    let sections = ingest::start::Sections {
        ingest: &config.ingest,
        mqtt: &config.mqtt,
        serial: &config.serial,
        health: &config.health,
    };
    // With the engine or ingest, the lease is the leader lease
    // (store::leader): the engine and the sources run only while this
    // instance holds it, and stand by otherwise (one writer per service).
    let led = engine_on || ingest_on;
    let fence = store::leader::Fence::new(config.lease.ttl);
    let (role_tx, role_rx) = watch::channel(store::leader::Role::default());
    let inputs = ingest::start::start(
        &mut ctx,
        sections,
        ingest_on,
        role_rx.clone(),
        fence.clone(),
    );
    let (model_tx, model_rx) = watch::channel(model.clone());
    let engine_ready_rx = engine_on.then(|| {
        let (model, fence, role) = (model.clone(), fence.clone(), role_rx.clone());
        let skew = config.ingest.max_clock_skew;
        engine::start::start(&mut ctx, &config.engine, skew, model, model_rx, fence, role)
    });
    let leader = led.then_some((fence, role_tx));
    let held_rx = store::keeper::start(&mut ctx, &config.lease, &runs, leader, role_rx.clone());
    if let Some((ha, zones)) = config.homeassistant.clone().zip(ha_zones) {
        crate::homeassistant::start(&mut ctx, ha, zones, held_rx);
    }
    if let Some(cfg) = config.archive.clone().filter(|_| archiver_on) {
        crate::archive::start(&mut ctx, cfg, config.nats.nkey_seed_file.clone());
    }
    if let Some(cfg) = config.hub.clone() {
        crate::hub::start(&mut ctx, cfg);
    }

    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut ready = false;
    let mut reloader = Reloader {
        path,
        running,
        model: model_tx,
    };
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = &mut term => {
                tracing::info!("stopping: signal received");
                break Ok(());
            }
            Some(()) = recv_hup(&mut hup) => reloader.reload(engine_on),
            Some(v) = refused_rx.recv() => break Err(refused(v)),
            exit = sup.next_exit() => {
                let Err(e) = exit.result else { continue };
                if supervise::is_fatal(&e) {
                    break Err(e.context(format!("component {} cannot run", exit.name)));
                }
                if exit.essential {
                    // One failure often ends others (a source that cannot
                    // start closes ingest's input): name the root cause,
                    // the fatal one, when it follows within moments.
                    let mut cause = e.context(format!("component {} failed", exit.name));
                    while let Ok(other) =
                        tokio::time::timeout(Duration::from_millis(200), sup.next_exit()).await
                    {
                        if let Err(e) = other.result {
                            if supervise::is_fatal(&e) {
                                cause = e.context(format!("component {} cannot run", other.name));
                                break;
                            }
                        }
                    }
                    break Err(cause);
                }
                tracing::warn!(component = %exit.name, "carrying on without it: health reports the daemon degraded until a restart");
            }
            _ = tick.tick() => {
                if !engine_on {
                    // Without the engine nothing else pings the watchdog.
                    systemd::watchdog();
                }
                if ready {
                    continue;
                }
                // READY once every component that must be up is: the
                // lease written, the engine rehydrated and bound, the
                // archiver started, and each source connected once or
                // running without failure for health.source_start_wait (a
                // broker down at boot is reported by health, it does not
                // hold the unit).
                let waited = started.elapsed() >= config.health.source_start_wait;
                let sources_started = inputs.started(&sup, waited);
                let engine_line = engine_ready_rx.as_ref().and_then(|r| r.borrow().clone());
                let archiver_started = !archiver_on
                    || components.snapshot().get("archiver").is_some_and(|c| c.state == supervise::State::Running);
                // The lease too: until it is written, clients would see
                // this service's keys as stale.
                // A standby holds no lease and runs no engine or source by design.
                let standby = led && !role_rx.borrow().active && role_rx.borrow().since.is_some();
                let lease_held = lease_metrics.held.load(Ordering::Relaxed) || standby;
                let what = if engine_on { "the engine" } else { "ingest" };
                let engine_line = engine_line.or_else(|| standby.then(|| {
                    format!("standby: {what} runs on {}", role_rx.borrow().holder.clone().unwrap_or_else(|| "another instance".into()))
                }));
                if (sources_started || standby)
                    && archiver_started
                    && lease_held
                    && (!engine_on || engine_line.is_some())
                {
                    ready = true;
                    if engine_on {
                        components.running("engine");
                    }
                    let line = engine_line.unwrap_or_else(|| {
                        format!(
                            "running {}; {} source(s)",
                            runs.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "),
                            inputs.sources()
                        )
                    });
                    inputs.refresh();
                    components.set_ready(true);
                    tracing::info!(status = %line, "ready");
                    systemd::ready(&line);
                }
            }
        }
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %format!("{e:#}"), "stopping: the daemon cannot carry on; exiting non-zero so its supervisor restarts it");
    }
    systemd::stopping();
    components.set_ready(false);

    // Drain in stage order (lease, sources, ingest, engine and the rest,
    // HTTP), all within engine.drain_timeout.
    let clean = sup.drain(config.engine.drain_timeout).await;
    // Folded refusals of a flood are written before the exit.
    audit.finish(Duration::from_secs(2)).await;
    let _ = client.flush().await;
    if clean {
        tracing::info!("stopped cleanly");
    }
    outcome
}

/// SIGHUP, when it can be listened for.
type Hangups = Option<tokio::signal::unix::Signal>;

fn hangups() -> Hangups {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by restarting");
            None
        }
    }
}

async fn recv_hup(h: &mut Hangups) -> Option<()> {
    match h {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies SIGHUP: re-reads and re-validates the config file; a change of
/// zones or evidence only is swapped into the engine; anything else is
/// named as needing a restart and the old config kept.
struct Reloader {
    path: Option<PathBuf>,
    running: Running,
    model: watch::Sender<Arc<Model>>,
}

/// What a reload compares a new file against. Not a copy of the running
/// config: with thousands of zones that copy is megabytes, held for a
/// SIGHUP that may never come.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Running {
    /// Each top-level field but `zones` and `persons`: a hash of its JSON.
    fields: BTreeMap<String, u64>,
    /// The zone and person keys, in order.
    keys: Vec<String>,
}

impl Running {
    fn of(config: &Config) -> Running {
        let fields = match serde_json::to_value(config) {
            Ok(serde_json::Value::Object(map)) => map
                .into_iter()
                .filter(|(k, _)| k != "zones" && k != "persons")
                .map(|(k, v)| {
                    let mut h = std::hash::DefaultHasher::new();
                    v.to_string().hash(&mut h);
                    (k, h.finish())
                })
                .collect(),
            // Config always serializes to a table; if it ever does not,
            // no field is known and a reload is refused.
            _ => BTreeMap::new(),
        };
        Running {
            fields,
            keys: config.presence_entries().map(|(k, _)| k).collect(),
        }
    }
}

impl Reloader {
    fn reload(&mut self, engine_on: bool) {
        let Some(path) = &self.path else {
            tracing::warn!("SIGHUP ignored: the daemon was not started from a config file");
            return;
        };
        tracing::info!(config = %path.display(), "SIGHUP: reloading the zone and evidence configuration");
        let new = match Config::load_valid(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "SIGHUP: the new config is refused; running on with the old one");
                return;
            }
        };
        let next = Running::of(&new);
        let restart = fields_needing_restart(&self.running, &next);
        if !restart.is_empty() {
            tracing::warn!(fields = ?restart, "SIGHUP: these fields changed and need a restart (`systemctl restart`); running on with the old config");
            return;
        }
        if self.running.keys != next.keys {
            let (added, removed) = key_changes(&self.running.keys, &next.keys);
            tracing::warn!(
                ?added,
                ?removed,
                "SIGHUP: zones or persons were added or removed, which needs a restart; running on with the old config"
            );
            return;
        }
        if !engine_on {
            tracing::info!("SIGHUP: this instance runs no engine; nothing to swap");
            self.running = next;
            return;
        }
        let model = Arc::new(Model::from_config(&new));
        self.model.send_replace(model);
        self.running = next;
    }
}

/// Top-level fields (never `zones` or `persons`) whose change a reload
/// cannot apply. A config that could not be serialized has no fields: it
/// cannot be compared, which needs a restart too.
fn fields_needing_restart(old: &Running, new: &Running) -> Vec<String> {
    if old.fields.is_empty() || new.fields.is_empty() {
        return vec!["(config cannot be compared)".into()];
    }
    let mut keys: Vec<&String> = old.fields.keys().chain(new.fields.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| old.fields.get(*k) != new.fields.get(*k))
        .cloned()
        .collect()
}

/// Keys only in `new` (added) and only in `old` (removed), at most
/// [`KEYS_NAMED`] of each: a log line, not a dump of every zone.
fn key_changes(old: &[String], new: &[String]) -> (Vec<String>, Vec<String>) {
    let (a, b): (BTreeSet<&String>, BTreeSet<&String>) =
        (old.iter().collect(), new.iter().collect());
    let only = |x: &BTreeSet<&String>, y: &BTreeSet<&String>| {
        x.difference(y)
            .take(KEYS_NAMED)
            .map(|k| (*k).clone())
            .collect()
    };
    (only(&b, &a), only(&a, &b))
}

/// How many added or removed zones a refused reload names.
const KEYS_NAMED: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "site = \"lab\"\n{extra}\n[zones.kitchen]\n[[zones.kitchen.evidence]]\nsensor = \"k\"\np_true = 0.9\np_false = 0.1\n"
        );
        Config::from_toml(&text, std::path::Path::new("test.toml")).expect("config")
    }

    #[test]
    fn a_changed_section_is_named_and_zones_are_not_a_field() {
        let old = Running::of(&config(""));
        assert!(fields_needing_restart(&old, &Running::of(&config(""))).is_empty());
        let new = Running::of(&config("[ingest]\nreject_log_every = \"2s\"\n"));
        assert_eq!(fields_needing_restart(&old, &new), ["ingest"]);
        assert!(!old.fields.contains_key("zones") && !old.fields.contains_key("persons"));
        assert_eq!(old.keys, ["kitchen"]);
        let unknown = Running {
            fields: BTreeMap::new(),
            keys: old.keys.clone(),
        };
        assert_eq!(
            fields_needing_restart(&unknown, &old),
            ["(config cannot be compared)"]
        );
    }

    #[test]
    fn added_and_removed_zones_are_named_a_few_at_most() {
        let old: Vec<String> = (0..100).map(|i| format!("z{i:03}")).collect();
        let new: Vec<String> = (50..200).map(|i| format!("z{i:03}")).collect();
        let (added, removed) = key_changes(&old, &new);
        assert_eq!(added.len(), KEYS_NAMED);
        assert_eq!(added[0], "z100");
        assert_eq!(removed.len(), KEYS_NAMED);
        assert_eq!(removed[0], "z000");
        assert_eq!(key_changes(&old, &old), (vec![], vec![]));
    }
}
