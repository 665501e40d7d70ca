//! Connecting to the site's leaf nats-server.

use crate::config::NatsConfig;
use crate::metrics::Metrics;
use async_nats::{ConnectOptions, Event};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NKEY seed file {path}: {source}")]
    Seed {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] crate::acl::identity::IdentityError),
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
}

/// Who connects: the service name (inbox prefix, audit subject) and where
/// permission violations go.
#[derive(Clone, Default)]
pub struct As {
    pub service: Option<String>,
    pub violations: Option<crate::acl::violation::Sender>,
}

fn options(
    cfg: &NatsConfig,
    name: &str,
    metrics: Option<Arc<Metrics>>,
    who: &As,
) -> Result<ConnectOptions, ConnectError> {
    let mut opts = ConnectOptions::new()
        .name(name)
        .connection_timeout(cfg.connect_timeout)
        .request_timeout(Some(cfg.request_timeout))
        // Reconnect forever: the leaf is local and comes back; giving up
        // would turn a nats-server restart into a daemon restart.
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis((50u64 << attempt.min(6) as u64).min(2_000))
        })
        .client_capacity(65_536)
        .subscription_capacity(65_536);
    if let Some(path) = &cfg.nkey_seed_file {
        let seed = crate::acl::identity::read_seed(path)?;
        opts = opts.nkey(seed);
    }
    if let Some(service) = &who.service {
        // The ACL grants each service its own inbox prefix only.
        opts = opts.custom_inbox_prefix(crate::naming::inbox_prefix(service));
    }
    let sink = who.violations.clone();
    if let Some(metrics) = metrics {
        let connected_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
        opts = opts.event_callback(move |event| {
            let metrics = metrics.clone();
            let connected_once = connected_once.clone();
            let sink = sink.clone();
            async move {
                if let Some(v) = crate::acl::violation::from_event(&event) {
                    crate::acl::violation::report(v, Some(&metrics), sink.as_ref());
                    return;
                }
                match event {
                    Event::Connected => {
                        metrics.nats_connected.store(true, Ordering::Relaxed);
                        if connected_once.swap(true, Ordering::Relaxed) {
                            Metrics::inc(&metrics.nats_reconnects);
                            tracing::info!("reconnected to nats-server");
                        }
                    }
                    Event::Disconnected => {
                        metrics.nats_connected.store(false, Ordering::Relaxed);
                        tracing::warn!("disconnected from nats-server; reconnecting");
                    }
                    Event::ServerError(err) => {
                        tracing::error!(error = %err, "nats-server reported an error")
                    }
                    Event::ClientError(err) => tracing::error!(error = %err, "nats client error"),
                    Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "slow consumer: messages dropped by the client")
                    }
                    other => tracing::info!(event = %other, "nats connection event"),
                }
            }
        });
    }
    Ok(opts)
}

/// Reads a secret file (see [`crate::config::resolve_secret_path`]),
/// trimming one trailing newline (editors add one).
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    let path = crate::config::resolve_secret_path(path).map_err(std::io::Error::other)?;
    let text = std::fs::read_to_string(path)?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// Connects, retrying with capped backoff until `deadline` (None: forever).
/// The daemon uses this so that it can start before its nats-server and
/// only report READY once connected.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
    metrics: Option<Arc<Metrics>>,
    deadline: Option<Duration>,
) -> Result<async_nats::Client, ConnectError> {
    connect_as(cfg, name, metrics, deadline, &As::default()).await
}

/// [`connect`] as a named service of the ownership map: its own inbox
/// prefix, and permission violations reported to `who.violations`.
pub async fn connect_as(
    cfg: &NatsConfig,
    name: &str,
    metrics: Option<Arc<Metrics>>,
    deadline: Option<Duration>,
    who: &As,
) -> Result<async_nats::Client, ConnectError> {
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let opts = options(cfg, name, metrics.clone(), who)?;
        // A comma-separated list: the client fails over between servers
        // (the hub's nodes).
        let urls: Vec<&str> = cfg.url.split(',').map(str::trim).collect();
        match opts.connect(urls).await {
            Ok(client) => {
                if let Some(m) = &metrics {
                    m.nats_connected.store(true, Ordering::Relaxed);
                }
                if warned {
                    tracing::info!(url = %cfg.url, "connected to nats-server");
                }
                return Ok(client);
            }
            Err(source) => {
                if deadline.is_some_and(|d| start.elapsed() >= d) {
                    return Err(ConnectError::Connect {
                        url: cfg.url.clone(),
                        source,
                    });
                }
                if !warned {
                    tracing::warn!(url = %cfg.url, error = %source, "cannot connect to nats-server yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
