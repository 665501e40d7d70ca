//! `/healthz` and `/metrics` over HTTP, on loopback by default; the
//! status page (module `page`, handed in as extra routes) is served
//! beside them.

pub mod config;

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;

/// Overall health: what `/healthz` answers and `presenced status` exits
/// with (0, 1, 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Healthy,
    /// Working, but something the site needs is missing: an optional
    /// component failed, a source link is down past its grace, the lease
    /// is not held.
    Degraded,
    /// Not doing its job: not ready, leaf unreachable, or a component it
    /// runs failed.
    Down,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Degraded => "degraded",
            Verdict::Down => "down",
        }
    }
}

/// How long ingest or the engine may retry writes before `/healthz` says
/// so: one retried publish during a leader change is not an outage.
const STALL_GRACE: f64 = 2.0;

/// Least lead of a zone clock over the system clock reported as a step
/// back, whatever `ingest.max_clock_skew` says.
const CLOCK_AHEAD_MIN_MS: i64 = 5_000;

fn get_u64(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// The whole health report, as JSON on `/healthz`: the verdict, every
/// cause of a worse verdict by name, and the detail behind it.
pub fn report(m: &Metrics) -> (Verdict, serde_json::Value) {
    use serde_json::json;
    // Each component's values, from the metrics it registered at its
    // start (absent: not run, or not started yet).
    let ingest = m.handle::<crate::ingest::metrics::IngestMetrics>();
    let engine = m.handle::<crate::engine::metrics::EngineMetrics>();
    let link = m.handle::<crate::store::metrics::LinkMetrics>();
    let lease_metrics = m.handle::<crate::store::metrics::LeaseMetrics>();
    let supervised = m.handle::<crate::supervise::Registry>();
    let ready = supervised.as_ref().is_some_and(|s| s.is_ready());
    let nats = link
        .as_ref()
        .is_some_and(|l| l.connected.load(Ordering::Relaxed));
    let mut down = Vec::new();
    let mut degraded = Vec::new();
    if !ready {
        down.push("not ready: starting, or state not rehydrated yet".to_owned());
    }
    if !nats {
        down.push("not connected to the leaf nats-server".to_owned());
    }
    let stalled = ingest
        .as_ref()
        .and_then(|i| crate::metrics::stall_of(&i.stalled));
    if let Some((secs, error)) = stalled.as_ref().filter(|(s, _)| *s >= STALL_GRACE) {
        down.push(format!(
            "ingest cannot store input in SENSORS for {secs:.0}s (holding it and retrying): {error}"
        ));
    }
    let engine_stalled = engine
        .as_ref()
        .and_then(|e| crate::metrics::stall_of(&e.stalled));
    if let Some((secs, error)) = engine_stalled.as_ref().filter(|(s, _)| *s >= STALL_GRACE) {
        down.push(format!(
            "engine cannot commit transitions and zone states for {secs:.0}s (retrying): {error}"
        ));
    }
    let (newest_zone_ms, ahead_ok_ms) = engine.as_ref().map_or((0, 0), |e| {
        (
            get_u64(&e.zone_clock_max_ms) as i64,
            get_u64(&e.clock_ahead_ok_ms) as i64,
        )
    });
    let ahead_ms = newest_zone_ms - crate::time::Timestamp::now().0;
    if newest_zone_ms > 0 && ahead_ms > ahead_ok_ms.max(CLOCK_AHEAD_MIN_MS) {
        degraded.push(format!(
            "zone clock {:.0}s ahead of the system clock (was it stepped back?): debounce timers and overrides fire that much late",
            ahead_ms as f64 / 1000.0
        ));
    }
    let components = supervised
        .as_ref()
        .map(|s| s.snapshot())
        .unwrap_or_default();
    for (name, c) in &components {
        if c.state == crate::supervise::State::Failed {
            let cause = format!(
                "component {name} failed: {}",
                c.cause.as_deref().unwrap_or("no cause recorded")
            );
            if c.essential {
                down.push(cause);
            } else {
                degraded.push(cause);
            }
        }
    }
    let sources = m
        .handle::<crate::ingest::metrics::SourceLinks>()
        .map(|l| l.get())
        .unwrap_or_default();
    for s in sources.iter().filter(|s| s.degraded) {
        degraded.push(format!(
            "source {} ({}) link down for {:.0}s",
            s.name,
            s.kind,
            s.down_seconds.unwrap_or(0.0)
        ));
    }
    let lease = lease_metrics
        .as_ref()
        .is_some_and(|l| l.held.load(Ordering::Relaxed));
    let role = lease_metrics.as_ref().and_then(|l| l.role());
    // A standby holds no lease by design (the active instance does).
    let standby = role.as_ref().is_some_and(|r| !r.active);
    if ready && !lease && !standby {
        degraded
            .push("lease in KV owners not held: clients see this service's keys as stale".into());
    }
    let verdict = if !down.is_empty() {
        Verdict::Down
    } else if !degraded.is_empty() {
        Verdict::Degraded
    } else {
        Verdict::Healthy
    };
    let runs = m.runs.read().unwrap_or_else(|p| p.into_inner()).clone();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut body = json!({
        "status": verdict.as_str(),
        // Which process answered: a supervisor (the sandbox, a test) that
        // finds its listen port taken by another daemon must not take that
        // daemon's health for its own child's.
        "pid": std::process::id(),
        "ready": ready,
        "nats_connected": nats,
        "causes": down.iter().chain(&degraded).collect::<Vec<_>>(),
        "runs": runs,
        "components": components,
        "sources": sources,
        "lease": { "held": lease },
    });
    if let Some(i) = ingest
        .as_ref()
        .filter(|_| runs.iter().any(|r| r == "ingest"))
    {
        body["ingest"] = json!({
            "buffer_depth": get(&i.buffer_depth),
            "buffer_capacity": get(&i.buffer_capacity),
            "observations_stored": get(&i.observations_stored),
            "rejects": get(&i.rejects),
            "last_reject": i.last_reject(),
            "stalled_seconds": stalled.as_ref().map(|(s, _)| *s),
        });
        // The sources run only on the holder of the service's lease;
        // every instance of the service says so (ingest::start).
        if let Some(r) = &role {
            body["ingest"]["role"] = json!(if r.active { "active" } else { "standby" });
            body["ingest"]["since"] = json!(r.since);
            body["ingest"]["holder"] = json!(r.holder);
            body["ingest"]["takeovers"] = json!(lease_metrics
                .as_ref()
                .map_or(0, |l| get(&l.engine_takeovers)));
            body["ingest"]["shared"] = json!(if r.active {
                "this instance holds the service's lease and runs its sources; other instances of the service stand by"
            } else if r.another_runs_ingest() {
                "shared with the instance holding the service's lease, which runs the sources; this one takes over when that lease lapses"
            } else {
                "this instance runs its sources: the lease holder does not run ingest, or none is seen holding the lease"
            });
        }
    }
    if let Some(e) = engine
        .as_ref()
        .filter(|_| runs.iter().any(|r| r == "engine"))
    {
        body["engine"] = json!({
            "pending": get(&e.consumer_pending),
            "zones": get(&e.zones),
            "zones_occupied": get(&e.zones_occupied),
            "stalled_seconds": engine_stalled.as_ref().map(|(s, _)| *s),
        });
        if let Some(r) = &role {
            body["engine"]["role"] = json!(if r.active { "active" } else { "standby" });
            body["engine"]["since"] = json!(r.since);
            body["engine"]["holder"] = json!(r.holder);
            let takeovers = lease_metrics
                .as_ref()
                .map_or(0, |l| get(&l.engine_takeovers));
            body["engine"]["takeovers"] = json!(takeovers);
        }
    }
    // Components' own sections (the archiver's, the hub mirrors'):
    // detail only, they do not make the answer 503.
    for (name, section) in m.health_sections() {
        body[name] = section;
    }
    (verdict, body)
}

/// 200 only when healthy; otherwise 503 with the causes named. The body
/// is JSON ([`report`]).
async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let (verdict, body) = report(&m);
    let code = if verdict == Verdict::Healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body:#}\n"),
    )
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        m.render(),
    )
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .with_state(metrics)
}

/// Binds first (so a taken port fails the start loudly), then serves until
/// `shutdown` turns true.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Starts the HTTP listener of `[http]` (component `http`, essential),
/// serving `/healthz`, `/metrics` and `extra` (the status page). It
/// starts before the connection to the leaf, so that health can say the
/// leaf is unreachable: it takes the supervisor and metrics rather than a
/// whole [`crate::component::Ctx`]. A listen address that cannot be bound
/// is fatal. Nothing is started when `enabled` is false.
pub async fn start(
    sup: &mut crate::supervise::Supervisor,
    metrics: &Arc<Metrics>,
    cfg: &config::HttpConfig,
    extra: Router,
) -> anyhow::Result<()> {
    use crate::supervise::{self, Stage};
    if !cfg.enabled {
        return Ok(());
    }
    let listener = bind(cfg.listen).await.map_err(|e| {
        supervise::fatal(anyhow::anyhow!(
            "cannot listen on http.listen = {}: {e}",
            cfg.listen
        ))
    })?;
    tracing::info!(listen = %cfg.listen, "serving /healthz, /metrics and the status page");
    let stop = sup.stop_flag(Stage::Http);
    let m = metrics.clone();
    sup.spawn("http", Stage::Http, true, async move {
        serve(listener, m, extra, stop).await;
        Ok(())
    });
    sup.registry().running("http");
    Ok(())
}

/// `extra` adds routes beside `/healthz` and `/metrics` (the status page
/// and its 404 fallback).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    extra: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(metrics).merge(extra);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}
