//! `presenced run`: wires sources, ingest, engine, HTTP and systemd
//! together and shuts them down in order.

use crate::config::Config;
use crate::engine::runner::Runner;
use crate::engine::Model;
use crate::metrics::Metrics;
use crate::naming::{self, Site};
use crate::sources::{self, Item};
use crate::{http, ingest, store, systemd};
use anyhow::Context as _;
use async_nats::jetstream;
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

/// JetStream context for the daemon: enough acks in flight for pipelined
/// batches, and a bounded wait for each.
pub fn jetstream_context(client: async_nats::Client, config: &Config) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.nats.request_timeout)
        .max_ack_inflight(store::publish::CONTEXT_INFLIGHT)
        .build(client)
}

pub async fn run(mut config: Config) -> anyhow::Result<()> {
    let site = Site::new(&config.site)?;
    let metrics = Arc::new(Metrics::default());
    let model = Arc::new(Model::from_config(&config));
    // The compiled model is all the engine needs; with thousands of zones
    // the parsed copy would only hold memory. Home Assistant discovery
    // describes the zones from it, so it keeps them when enabled.
    let zones = config.take_presence_entries();
    let ha_zones = config.homeassistant.as_ref().map(|_| zones);
    let (stop_tx, stop_rx) = watch::channel(false);

    let http_task = if config.http.enabled {
        let listener = http::bind(config.http.listen)
            .await
            .with_context(|| format!("cannot listen on http.listen = {}", config.http.listen))?;
        tracing::info!(listen = %config.http.listen, "serving /healthz and /metrics");
        Some(tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            stop_rx.clone(),
        )))
    } else {
        None
    };

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
            return Ok(());
        }
    };
    let js = jetstream_context(client.clone(), &config);
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
    let refused = |v: crate::acl::violation::Violation| {
        anyhow::anyhow!(
            "nats-server refused to let service {} {} {:?}: the ACL does not grant what this service needs; regenerate it with `presenced acl` (see docs/SECURITY.md)",
            config.service,
            v.operation.as_str(),
            v.subject
        )
    };

    // Sources → bounded buffer → ingest → SENSORS.
    Metrics::set(&metrics.buffer_capacity, config.ingest.buffer as u64);
    let (tx, rx) = mpsc::channel::<Item>(config.ingest.buffer.max(1));
    let ingest_task = tokio::spawn(ingest::run(
        js.clone(),
        site.clone(),
        config.ingest.max_in_flight,
        config.ingest.reject_log_every,
        rx,
        metrics.clone(),
    ));
    let (sources_stop_tx, sources_stop_rx) = watch::channel(false);
    let mut source_tasks = Vec::new();
    for (name, src) in &config.mqtt {
        let status = Arc::new(sources::mqtt::MqttStatus::default());
        let client_id = src
            .client_id
            .clone()
            .unwrap_or_else(|| format!("presenced-{site}-{name}"));
        let task = tokio::spawn(sources::mqtt::run(
            name.clone(),
            src.clone(),
            client_id,
            sources::mqtt::RunOptions {
                rules: sources::mqtt::DecodeRules {
                    strict: config.ingest.strict_topics,
                    max_clock_skew: config.ingest.max_clock_skew,
                },
                stored: Some(ingest::StoredDeliveries::new(js.clone(), site.clone())),
            },
            tx.clone(),
            status.clone(),
            sources_stop_rx.clone(),
        ));
        source_tasks.push((name.clone(), task, status));
    }
    let mut serial_tasks = Vec::new();
    for (name, src) in &config.serial {
        let status = Arc::new(sources::serial::SerialStatus::default());
        let task = tokio::spawn(sources::serial::run(
            name.clone(),
            src.clone(),
            config.ingest.max_clock_skew,
            tx.clone(),
            status.clone(),
            sources_stop_rx.clone(),
        ));
        metrics.add_serial_port(sources::serial::PortMetrics::new(
            name,
            &src.device,
            &status,
        ));
        serial_tasks.push((name.clone(), task, status));
    }
    drop(tx);
    let mqtt_gauge = {
        let metrics = metrics.clone();
        let statuses: Vec<_> = source_tasks.iter().map(|(_, _, s)| s.clone()).collect();
        let serials: Vec<_> = serial_tasks.iter().map(|(_, _, s)| s.clone()).collect();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let up = statuses
                    .iter()
                    .filter(|s| s.connected.load(Ordering::Relaxed))
                    .count();
                Metrics::set(&metrics.mqtt_connected, up as u64);
                let full: u64 = statuses
                    .iter()
                    .map(|s| s.buffer_full.load(Ordering::Relaxed))
                    .sum();
                Metrics::set(&metrics.buffer_full, full);
                let open = serials
                    .iter()
                    .filter(|s| s.connected.load(Ordering::Relaxed))
                    .count();
                Metrics::set(&metrics.serial_connected, open as u64);
                for (i, gauge) in metrics.serial_frame_rejects.iter().enumerate() {
                    let n = serials
                        .iter()
                        .map(|s| s.frame_rejects[i].load(Ordering::Relaxed))
                        .sum();
                    Metrics::set(gauge, n);
                }
            }
        })
    };

    // Engine: rehydrate, bind the consumer, then report READY.
    let runner = tokio::select! {
        r = Runner::start(
            js.clone(),
            site.clone(),
            model.clone(),
            metrics.clone(),
            config.engine.batch,
        ) => r.context("engine start")?,
        Some(v) = refused_rx.recv() => return Err(refused(v)),
    };
    release_startup_memory();
    let consumer = js
        .get_stream(naming::SENSORS_STREAM)
        .await
        .context("stream SENSORS is missing on the leaf: run `presenced provision` first")?
        .get_consumer::<jetstream::consumer::pull::Config>(naming::ENGINE_CONSUMER)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "consumer `engine` on SENSORS is missing ({e}): run `presenced provision` first"
            )
        })?;
    let ready_metrics = metrics.clone();
    let mut engine_task = tokio::spawn(runner.run(consumer, stop_rx.clone(), move |r: &Runner| {
        ready_metrics.ready.store(true, Ordering::Relaxed);
        let line = r.status_line();
        tracing::info!(status = %line, "ready");
        systemd::ready(&line);
    }));

    // The lease says this service runs; clients mark its keyspaces stale
    // once it is gone.
    let (lease_stop_tx, lease_stop_rx) = watch::channel(false);
    let (held_tx, held_rx) = watch::channel(false);
    let lease = store::lease::Lease::new(
        &config.service,
        &components(config.archive.is_some()),
        crate::time::Timestamp::now(),
    );
    {
        let metrics = metrics.clone();
        let mut held = held_rx.clone();
        tokio::spawn(async move {
            while held.changed().await.is_ok() {
                let now = *held.borrow_and_update();
                metrics.lease_held.store(now, Ordering::Relaxed);
            }
        });
    }
    let lease_task = tokio::spawn(store::lease::keep(
        js.clone(),
        lease,
        config.lease.ttl,
        lease_stop_rx,
        held_tx,
    ));

    // Home Assistant follows KV presence; started once the engine owns it.
    let ha_task = config
        .homeassistant
        .clone()
        .zip(ha_zones)
        .map(|(ha, zones)| {
            tokio::spawn(crate::homeassistant::run(
                ha,
                site.clone(),
                zones,
                js.clone(),
                held_rx.clone(),
                stop_rx.clone(),
            ))
        });

    // The archiver, when configured: snapshots and uploads beside the
    // engine; a missing bucket or credential file fails the start.
    let archive_task = match config.archive.clone() {
        Some(cfg) => {
            let archiver = crate::archive::worker::Archiver::start(
                js.clone(),
                site.clone(),
                cfg,
                metrics.clone(),
                config.nats.nkey_seed_file.as_deref(),
            )
            .await
            .context("archive")?;
            Some(tokio::spawn(archiver.run(stop_rx.clone())))
        }
        None => None,
    };

    // Hub mirror health through the leaf link, when a hub is configured.
    let hub_task = config.hub.clone().map(|cfg| {
        tokio::spawn(crate::hub::health::run(
            client.clone(),
            site.clone(),
            cfg,
            metrics.clone(),
            stop_rx.clone(),
        ))
    });

    let engine_failed = tokio::select! {
        _ = &mut term => {
            tracing::info!("stopping: signal received");
            None
        }
        Some(v) = refused_rx.recv() => Some(refused(v)),
        r = &mut engine_task => Some(match r {
            Ok(Ok(())) => anyhow::anyhow!("engine stopped unexpectedly"),
            Ok(Err(e)) => anyhow::Error::new(e).context("engine failed"),
            Err(e) => anyhow::anyhow!("engine task panicked: {e}"),
        }),
    };
    systemd::stopping();
    metrics.ready.store(false, Ordering::Relaxed);

    // Drain: stop input, let ingest store what it holds, then stop the
    // engine and the rest, all within engine.drain_timeout.
    let drain = async {
        // The lease goes first: clients see this service's keys as stale
        // from the moment it starts to stop.
        let _ = lease_stop_tx.send(true);
        let _ = lease_task.await;
        let _ = sources_stop_tx.send(true);
        for (name, task, _) in source_tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(source = %name, error = %e, "source failed"),
                Err(e) => tracing::error!(source = %name, error = %e, "source task panicked"),
            }
        }
        for (name, task, _) in serial_tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(source = %name, error = %e, "serial source failed"),
                Err(e) => {
                    tracing::error!(source = %name, error = %e, "serial source task panicked")
                }
            }
        }
        let _ = ingest_task.await;
        let _ = stop_tx.send(true);
        if engine_failed.is_none() {
            let _ = engine_task.await;
        }
        if let Some(task) = archive_task {
            let _ = task.await;
        }
        if let Some(task) = ha_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "Home Assistant output failed"),
                Err(e) => tracing::error!(error = %e, "Home Assistant task panicked"),
            }
        }
        let _ = mqtt_gauge.await;
        if let Some(task) = hub_task {
            let _ = task.await;
        }
        if let Some(h) = http_task {
            let _ = h.await;
        }
        // Folded refusals of a flood are written before the exit.
        audit.finish(Duration::from_secs(2)).await;
        let _ = client.flush().await;
    };
    let engine_failed_msg = engine_failed.as_ref().map(|e| format!("{e:#}"));
    if tokio::time::timeout(config.engine.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?config.engine.drain_timeout, "drain did not finish in time; exiting anyway (unacknowledged input will be redelivered)");
    } else {
        tracing::info!("stopped cleanly");
    }
    match engine_failed_msg {
        Some(msg) => Err(anyhow::anyhow!(msg)),
        None => Ok(()),
    }
}

/// The components this daemon runs, as its lease announces them: the
/// archiver too when `[archive]` is configured.
fn components(archiver: bool) -> Vec<crate::acl::access::Component> {
    use crate::acl::access::Component;
    let mut c = vec![Component::Ingest, Component::Engine];
    if archiver {
        c.push(Component::Archiver);
    }
    c
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
