//! `/healthz` and `/metrics` over HTTP, on loopback by default.

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

/// 200 only when ready (state rehydrated, consumer bound) and connected
/// to the leaf; the body says which part is missing.
async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let ready = m.ready.load(Ordering::Relaxed);
    let nats = m.nats_connected.load(Ordering::Relaxed);
    let mut body = format!("ready: {ready}\nnats_connected: {nats}\n");
    if m.archive_enabled.load(Ordering::Relaxed) {
        // Detail only: a slow S3 does not make the daemon unhealthy.
        body.push_str(&format!(
            "archive_pending: {}\narchive_s3_ok: {}\n",
            m.archive_pending.load(Ordering::Relaxed),
            m.archive_s3_ok.load(Ordering::Relaxed)
        ));
    }
    // Hub mirrors are a detail, not the daemon's own health: a stalled
    // mirror is reported here but does not turn the answer into 503.
    let mirrors = m.mirrors();
    if mirrors.watched {
        let stalled = mirrors
            .report
            .iter()
            .filter(|h| h.state == crate::hub::health::State::Stalled)
            .count();
        body.push_str(&format!(
            "hub_reachable: {}\nmirrors_stalled: {stalled}\n",
            mirrors.hub_reachable
        ));
        for h in &mirrors.report {
            body.push_str(&format!(
                "mirror {}: {} lag_messages={} lag_seconds={} last_contact_seconds={}\n",
                h.mirror,
                h.state.as_str(),
                h.lag_messages.map_or("-".into(), |v| v.to_string()),
                h.lag_seconds.map_or("-".into(), |v| format!("{v:.1}")),
                h.last_contact_seconds
                    .map_or("-".into(), |v| format!("{v:.1}")),
            ));
        }
    }
    let code = if ready && nats {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
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

pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(metrics);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}
