//! `presenced run`: starts the components the config enables (sources and
//! ingest, engine, archiver, lease, Home Assistant output, hub watch,
//! HTTP) under one [`Supervisor`], sends READY once they have started,
//! reloads zones on SIGHUP, and shuts them down in order.

use crate::config::Config;
use crate::engine::runner::Runner;
use crate::engine::Model;
use crate::metrics::Metrics;
use crate::naming::{self, Site};
use crate::sources::{self, Item};
use crate::supervise::{self, Stage, Supervisor};
use crate::{http, ingest, store, systemd};
use async_nats::jetstream;
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

/// Name of a source's component: `source.<kind>.<name>`.
fn source_component(kind: &str, name: &str) -> String {
    format!("source.{kind}.{name}")
}

/// One source as the supervisor and the gauge task see it.
struct SourceLink {
    name: String,
    kind: &'static str,
    component: String,
    connected: Probe,
}

/// Reads a source's status: (link up, connections so far, readings so far).
type Probe = Arc<dyn Fn() -> (bool, u64, u64) + Send + Sync>;

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
    let original = config.clone();
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
    Metrics::set(
        &metrics.clock_ahead_ok_ms,
        config.ingest.max_clock_skew.as_millis() as u64,
    );
    *metrics.runs.write().unwrap_or_else(|p| p.into_inner()) =
        runs.iter().map(|c| c.name().to_owned()).collect();
    metrics
        .mqtt_configured
        .store(ingest_on && !config.mqtt.is_empty(), Ordering::Relaxed);
    metrics
        .serial_configured
        .store(ingest_on && !config.serial.is_empty(), Ordering::Relaxed);
    let path = config_path.clone();
    let model = Arc::new(Model::from_config(&config));
    // The compiled model is all the engine needs; with thousands of zones
    // the parsed copy would only hold memory. Home Assistant discovery
    // describes the zones from it, so it keeps them when enabled.
    let zones = config.take_presence_entries();
    let ha_zones = config.homeassistant.as_ref().map(|_| zones);
    let mut sup = Supervisor::new(metrics.components.clone());
    let page = crate::page::Page::new(
        site.clone(),
        config.service.clone(),
        metrics.clone(),
        model.clone(),
        config.http.page_commands,
        sup.stop_flag(Stage::Http),
    );

    if config.http.enabled {
        let listener = http::bind(config.http.listen).await.map_err(|e| {
            supervise::fatal(anyhow::anyhow!(
                "cannot listen on http.listen = {}: {e}",
                config.http.listen
            ))
        })?;
        tracing::info!(listen = %config.http.listen, "serving /healthz, /metrics and the status page");
        let stop = sup.stop_flag(Stage::Http);
        let m = metrics.clone();
        let extra = crate::page::router(page.clone());
        sup.spawn("http", Stage::Http, true, async move {
            http::serve(listener, m, extra, stop).await;
            Ok(())
        });
        metrics.components.running("http");
    }

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

    // Sources → bounded buffer → ingest → SENSORS.
    let mut links: Vec<SourceLink> = Vec::new();
    let mut mqtt_statuses = Vec::new();
    let mut serial_statuses = Vec::new();
    if ingest_on {
        Metrics::set(&metrics.buffer_capacity, config.ingest.buffer as u64);
        let (tx, rx) = mpsc::channel::<Item>(config.ingest.buffer.max(1));
        {
            let (js, site, m) = (js.clone(), site.clone(), metrics.clone());
            let (max, every) = (config.ingest.max_in_flight, config.ingest.reject_log_every);
            // Ingest ends when every source has dropped its sender: it is
            // stopped by the sources stage, not by a token of its own.
            sup.spawn("ingest", Stage::Ingest, true, async move {
                ingest::run(js, site, max, every, rx, m).await;
                Ok(())
            });
            metrics.components.running("ingest");
        }
        for (name, src) in &config.mqtt {
            let status = Arc::new(sources::mqtt::MqttStatus::default());
            let client_id = src
                .client_id
                .clone()
                .unwrap_or_else(|| format!("presenced-{site}-{name}"));
            let component = source_component("mqtt", name);
            let fut = sources::mqtt::run(
                name.clone(),
                src.clone(),
                client_id,
                sources::mqtt::RunOptions {
                    rules: sources::mqtt::DecodeRules {
                        strict: config.ingest.strict_topics,
                        max_clock_skew: config.ingest.max_clock_skew,
                    },
                    stored: Some(ingest::StoredDeliveries::new(js.clone(), site.clone()).lookup()),
                },
                tx.clone(),
                status.clone(),
                sup.stop_flag(Stage::Sources),
            );
            sup.spawn(&component, Stage::Sources, true, async move {
                fut.await.map_err(supervise::classify)
            });
            let s = status.clone();
            links.push(SourceLink {
                name: name.clone(),
                kind: "mqtt",
                component,
                connected: Arc::new(move || {
                    (
                        s.connected.load(Ordering::Relaxed),
                        s.connects.load(Ordering::Relaxed),
                        s.received.load(Ordering::Relaxed),
                    )
                }),
            });
            mqtt_statuses.push(status);
        }
        let ports = Arc::new(sources::serial::Ports::default());
        if !config.serial.is_empty() {
            metrics.add_collector(ports.clone());
        }
        for (name, src) in &config.serial {
            let status = Arc::new(sources::serial::SerialStatus::default());
            let component = source_component("serial", name);
            let fut = sources::serial::run(
                name.clone(),
                src.clone(),
                config.ingest.max_clock_skew,
                tx.clone(),
                status.clone(),
                sup.stop_flag(Stage::Sources),
            );
            ports.add(sources::serial::PortMetrics::new(
                name,
                &src.device,
                &status,
            ));
            sup.spawn(&component, Stage::Sources, true, async move {
                fut.await.map_err(supervise::classify)
            });
            let s = status.clone();
            links.push(SourceLink {
                name: name.clone(),
                kind: "serial",
                component,
                connected: Arc::new(move || {
                    (
                        s.connected.load(Ordering::Relaxed),
                        s.connects.load(Ordering::Relaxed),
                        s.observations.load(Ordering::Relaxed),
                    )
                }),
            });
            serial_statuses.push(status);
        }
        drop(tx);
    }
    let gauges_now;
    {
        let stop = sup.token(Stage::Work);
        let gauges = Gauges {
            links: links
                .iter()
                .map(|l| (l.name.clone(), l.kind, l.connected.clone()))
                .collect(),
            mqtt: mqtt_statuses,
            serial: serial_statuses,
            metrics: metrics.clone(),
            grace: config.health.source_grace,
        };
        let gauges = Arc::new(gauges);
        let track = Arc::new(std::sync::Mutex::new(gauges.track()));
        gauges_now = Some((gauges.clone(), track.clone()));
        sup.spawn("gauges", Stage::Work, false, async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                gauges.refresh(&mut track.lock().unwrap_or_else(|p| p.into_inner()));
            }
        });
        metrics.components.running("gauges");
    }

    // Engine: rehydrate, bind the consumer, then say it is ready. With
    // the engine, the lease is the leader lease (store::leader): the
    // engine runs only while this instance holds it, and stands by
    // otherwise.
    let (engine_ready_tx, engine_ready_rx) = watch::channel::<Option<String>>(None);
    let (model_tx, model_rx) = watch::channel(model.clone());
    let fence = store::leader::Fence::new(config.lease.ttl);
    let (role_tx, role_rx) = watch::channel(store::leader::Role::default());
    if engine_on {
        let (js, site, metrics, batch) = (
            js.clone(),
            site.clone(),
            metrics.clone(),
            config.engine.batch,
        );
        let stop = sup.stop_flag(Stage::Work);
        let model = model.clone();
        let (fence, mut role) = (fence.clone(), role_rx.clone());
        sup.spawn("engine", Stage::Work, true, async move {
            let ready = Arc::new(engine_ready_tx);
            let mut started_once = false;
            loop {
                // Stand by until this instance holds the lease, following
                // the state meanwhile (engine::standby).
                let warm = crate::engine::standby::Warm::start(js.clone());
                let mut waiting = stop.clone();
                tokio::select! {
                    r = role.wait_for(|r| r.active) => if r.is_err() { return Ok(()) },
                    _ = waiting.wait_for(|s| *s) => return Ok(()),
                }
                let runner = match Runner::start_fenced(
                    js.clone(),
                    site.clone(),
                    model.clone(),
                    metrics.clone(),
                    batch,
                    Some(fence.clone()),
                    Some(warm),
                )
                .await
                {
                    Ok(r) => r,
                    Err(e) if !started_once => {
                        return Err(supervise::classify(e).context("engine start"))
                    }
                    Err(e) => {
                        // A takeover during a flaky leaf: give the lease
                        // back rather than hold it without running.
                        tracing::warn!(error = %e, "engine start after a takeover failed; stepping down and trying again");
                        fence.revoke();
                        let _ = role.wait_for(|r| !r.active).await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                started_once = true;
                release_startup_memory();
                let consumer = js
                    .get_stream(naming::SENSORS_STREAM)
                    .await
                    .map_err(|e| {
                        supervise::fatal(anyhow::anyhow!(
                            "stream SENSORS is missing on the leaf ({e}): run `presenced provision` first"
                        ))
                    })?
                    .get_consumer::<jetstream::consumer::pull::Config>(naming::ENGINE_CONSUMER)
                    .await
                    .map_err(|e| {
                        supervise::fatal(anyhow::anyhow!(
                            "consumer `engine` on SENSORS is missing ({e}): run `presenced provision` first"
                        ))
                    })?;
                let ready = ready.clone();
                runner
                    .run_reloadable(consumer, stop.clone(), model_rx.clone(), move |r: &Runner| {
                        ready.send_replace(Some(r.status_line()));
                    })
                    .await
                    .map_err(|e| supervise::classify(e).context("engine failed"))?;
                if *stop.borrow() {
                    return Ok(());
                }
                // Fenced: wait for the keeper to step down before looking
                // at the role again.
                let _ = role.wait_for(|r| !r.active).await;
                tracing::warn!("engine stopped writing: the leader lease is lost; this instance stands by");
            }
        });
    }

    // The lease says this service runs; clients mark its keyspaces stale
    // once it is gone. With the engine it is also the leader lease.
    let (held_tx, held_rx) = watch::channel(false);
    {
        let lease = store::lease::Lease::new(&config.service, &runs, crate::time::Timestamp::now());
        let (js, ttl, metrics) = (js.clone(), config.lease.ttl, metrics.clone());
        let stop = sup.stop_flag(Stage::Lease);
        let mut held = held_rx.clone();
        let mut role = role_rx.clone();
        let fence = fence.clone();
        let audit = site.audit_subject(&config.service);
        sup.spawn("lease", Stage::Lease, true, async move {
            let watcher = async {
                while held.changed().await.is_ok() {
                    let now = *held.borrow_and_update();
                    metrics.lease_held.store(now, Ordering::Relaxed);
                    if now {
                        metrics.components.running("lease");
                    }
                }
            };
            if engine_on {
                let metrics = metrics.clone();
                let roles = async move {
                    let mut seen = false;
                    while role.changed().await.is_ok() {
                        let r = role.borrow_and_update().clone();
                        if r.active {
                            Metrics::inc(&metrics.engine_takeovers);
                        }
                        metrics.engine_active.store(r.active, Ordering::Relaxed);
                        if !seen {
                            seen = true;
                            metrics.components.running("lease");
                        }
                        *metrics
                            .engine_role
                            .write()
                            .unwrap_or_else(|p| p.into_inner()) = Some(r);
                    }
                };
                tokio::join!(
                    store::leader::keep(
                        js,
                        lease,
                        ttl,
                        fence,
                        audit,
                        stop,
                        store::leader::Reports {
                            role: role_tx,
                            held: held_tx,
                        },
                    ),
                    roles,
                    watcher
                );
            } else {
                drop((role_tx, fence));
                tokio::join!(store::lease::keep(js, lease, ttl, stop, held_tx), watcher);
            }
            Ok(())
        });
    }

    // Home Assistant follows KV presence; started once the engine owns it.
    if let Some((ha, zones)) = config.homeassistant.clone().zip(ha_zones) {
        let fut = crate::homeassistant::run(
            ha,
            site.clone(),
            zones,
            js.clone(),
            held_rx.clone(),
            sup.stop_flag(Stage::Work),
        );
        sup.spawn("homeassistant", Stage::Work, false, async move {
            fut.await.map_err(supervise::classify)
        });
        metrics.components.running("homeassistant");
    }

    // The archiver: snapshots and uploads; a missing bucket or credential
    // file fails its start, which a retry cannot fix.
    if archiver_on {
        if let Some(cfg) = config.archive.clone() {
            let (js, site, metrics) = (js.clone(), site.clone(), metrics.clone());
            let seed = config.nats.nkey_seed_file.clone();
            let stop = sup.stop_flag(Stage::Work);
            sup.spawn("archiver", Stage::Work, true, async move {
                let archiver = crate::archive::worker::Archiver::start(
                    js,
                    site,
                    cfg,
                    metrics.clone(),
                    seed.as_deref(),
                )
                .await
                .map_err(|e| supervise::fatal(anyhow::Error::new(e).context("archive")))?;
                metrics.components.running("archiver");
                archiver.run(stop).await;
                Ok(())
            });
        }
    }

    // Hub mirror health through the leaf link, when a hub is configured.
    if let Some(cfg) = config.hub.clone() {
        let fut = crate::hub::health::run(
            client.clone(),
            site.clone(),
            cfg,
            metrics.clone(),
            sup.stop_flag(Stage::Work),
        );
        sup.spawn("hub", Stage::Work, false, async move {
            fut.await;
            Ok(())
        });
        metrics.components.running("hub");
    }

    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut ready = false;
    let mut reloader = Reloader {
        path,
        running: original,
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
                let mut sources_started = true;
                for l in &links {
                    let (_, connects, _) = (l.connected)();
                    if !sup.is_running(&l.component) {
                        sources_started = false;
                    } else if connects > 0 || waited {
                        metrics.components.running(&l.component);
                    } else {
                        sources_started = false;
                    }
                }
                let engine_line = engine_ready_rx.borrow().clone();
                let archiver_started = !archiver_on
                    || metrics.components.snapshot().get("archiver").is_some_and(|c| c.state == supervise::State::Running);
                // The lease too: until it is written, clients would see
                // this service's keys as stale.
                // A standby holds no lease and runs no engine by design.
                let standby = engine_on && !role_rx.borrow().active && role_rx.borrow().since.is_some();
                let lease_held = metrics.lease_held.load(Ordering::Relaxed) || standby;
                let engine_line = engine_line.or_else(|| standby.then(|| {
                    format!("standby: the engine runs on {}", role_rx.borrow().holder.clone().unwrap_or_else(|| "another instance".into()))
                }));
                if sources_started
                    && archiver_started
                    && lease_held
                    && (!engine_on || engine_line.is_some())
                {
                    ready = true;
                    if engine_on {
                        metrics.components.running("engine");
                    }
                    let line = engine_line.unwrap_or_else(|| {
                        format!(
                            "running {}; {} source(s)",
                            runs.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "),
                            links.len()
                        )
                    });
                    if let Some((g, t)) = &gauges_now {
                        g.refresh(&mut t.lock().unwrap_or_else(|p| p.into_inner()));
                    }
                    metrics.ready.store(true, Ordering::Relaxed);
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
    metrics.ready.store(false, Ordering::Relaxed);

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
    /// The config the daemon runs (zones included).
    running: Config,
    model: watch::Sender<Arc<Model>>,
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
        let restart = fields_needing_restart(&self.running, &new);
        if !restart.is_empty() {
            tracing::warn!(fields = ?restart, "SIGHUP: these fields changed and need a restart (`systemctl restart`); running on with the old config");
            return;
        }
        let old_keys: Vec<String> = self.running.presence_entries().map(|(k, _)| k).collect();
        let new_keys: Vec<String> = new.presence_entries().map(|(k, _)| k).collect();
        if old_keys != new_keys {
            tracing::warn!(
                before = ?old_keys,
                after = ?new_keys,
                "SIGHUP: zones or persons were added or removed, which needs a restart; running on with the old config"
            );
            return;
        }
        if !engine_on {
            tracing::info!("SIGHUP: this instance runs no engine; nothing to swap");
            self.running = new;
            return;
        }
        let model = Arc::new(Model::from_config(&new));
        self.model.send_replace(model);
        self.running = new;
    }
}

/// Top-level fields (and, for `zones`/`persons`, nothing) whose change a
/// reload cannot apply.
fn fields_needing_restart(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return vec!["(config cannot be compared)".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| *k != "zones" && *k != "persons")
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// The once-a-second gauges: MQTT/serial counts, buffer waits, LD2410
/// rejects, and each source's link state for health.
struct Gauges {
    links: Vec<(String, &'static str, Probe)>,
    mqtt: Vec<Arc<sources::mqtt::MqttStatus>>,
    serial: Vec<Arc<sources::serial::SerialStatus>>,
    metrics: Arc<Metrics>,
    grace: Duration,
}

/// Per link: when it went down (start counts as down), and the reading
/// count with the instant it last moved.
struct LinkTrack {
    down_since: Option<tokio::time::Instant>,
    last: (u64, Option<tokio::time::Instant>),
}

impl Gauges {
    /// Refreshes every gauge and the source links from the statuses;
    /// called every second and once more just before READY, so health
    /// never lags what READY claims.
    fn refresh(&self, track: &mut [LinkTrack]) {
        let now = tokio::time::Instant::now();
        let mut health = Vec::with_capacity(self.links.len());
        for ((name, kind, probe), t) in self.links.iter().zip(track.iter_mut()) {
            let (up, _, readings) = probe();
            match (up, t.down_since) {
                (true, _) => t.down_since = None,
                (false, None) => t.down_since = Some(now),
                (false, Some(_)) => {}
            }
            if readings != t.last.0 {
                t.last = (readings, Some(now));
            }
            let down = t.down_since.map(|d| now - d);
            health.push(crate::metrics::SourceHealth {
                name: name.clone(),
                kind: (*kind).to_owned(),
                up,
                down_seconds: down.map(|d| d.as_secs_f64()),
                last_reading_seconds: t.last.1.map(|l| (now - l).as_secs_f64()),
                readings,
                degraded: down.is_some_and(|d| d >= self.grace),
            });
        }
        self.metrics.set_source_health(health);
        let up = self
            .mqtt
            .iter()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .count();
        Metrics::set(&self.metrics.mqtt_connected, up as u64);
        let full: u64 = self
            .mqtt
            .iter()
            .map(|s| s.buffer_full.load(Ordering::Relaxed))
            .sum();
        Metrics::set(&self.metrics.buffer_full, full);
        let open = self
            .serial
            .iter()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .count();
        Metrics::set(&self.metrics.serial_connected, open as u64);
    }

    fn track(&self) -> Vec<LinkTrack> {
        let start = tokio::time::Instant::now();
        self.links
            .iter()
            .map(|_| LinkTrack {
                down_since: Some(start),
                last: (0, None),
            })
            .collect()
    }
}

/// Rehydration reads every zone at once; glibc keeps that peak mapped
/// unless asked, and an edge host's daemon runs for months at its idle
/// size, not its start-up peak.
fn release_startup_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
