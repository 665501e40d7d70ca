//! Connecting to the site's leaf nats-server.

use super::config::NatsConfig;
use super::metrics::LinkMetrics;
use crate::base::backoff::Backoff;
use crate::metrics::Metrics;
use async_nats::{ConnectOptions, Event};
use std::path::{Path, PathBuf};
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
    Identity(#[from] crate::base::secrets::IdentityError),
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("{field} = {path}: {reason}")]
    TlsFile {
        field: &'static str,
        path: String,
        reason: String,
    },
    /// The TLS handshake failed; `problem` says why in an operator's
    /// words, with what to check.
    #[error("TLS with {url} failed: {problem}")]
    Tls { url: String, problem: String },
}

/// A TLS file of `[nats.tls]`, resolved and checked to hold what it
/// should, so a wrong path is reported by its config field rather than as
/// a handshake failure.
fn tls_file(field: &'static str, path: &Path, marker: &str) -> Result<PathBuf, ConnectError> {
    let fail = |reason: String| ConnectError::TlsFile {
        field,
        path: path.display().to_string(),
        reason,
    };
    let resolved = crate::base::secrets::resolve_secret_path(path).map_err(fail)?;
    let text = std::fs::read_to_string(&resolved)
        .map_err(|e| fail(format!("cannot read {}: {e}", resolved.display())))?;
    if !text.contains(marker) {
        return Err(fail(format!(
            "{} holds no PEM {marker:?} block",
            resolved.display()
        )));
    }
    Ok(resolved)
}

/// The TLS error inside a connect error, if the handshake is what failed
/// (async-nats reports most handshake failures as I/O errors).
fn rustls_error(e: &async_nats::ConnectError) -> Option<&rustls::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        cause = c.source();
    }
    None
}

/// Why a TLS handshake failed and what to check, or `None` when the
/// failure was not about TLS.
fn tls_problem(cfg: &NatsConfig, e: &async_nats::ConnectError) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    let tls = cfg.tls.as_ref();
    let trusted = match tls.and_then(|t| t.ca_file.as_ref()) {
        Some(ca) => format!("the CA in nats.tls.ca_file ({})", ca.display()),
        None if tls.is_some() => {
            "the system's trusted CAs (nats.tls.ca_file is not set)".to_owned()
        }
        None => "the system's trusted CAs ([nats.tls] is not configured)".to_owned(),
    };
    let Some(r) = rustls_error(e) else {
        return (e.kind() == async_nats::ConnectErrorKind::Tls)
            .then(|| format!("{e}; check [nats.tls] (ca_file, cert_file, key_file)"));
    };
    let client_cert = tls.is_some_and(|t| t.cert_file.is_some());
    let why = match r {
        R::InvalidCertificate(C::UnknownIssuer) => {
            format!("the server's certificate is not signed by {trusted}")
        }
        R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the server's certificate does not name the host in nats.url".to_owned()
        }
        R::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the server's certificate has expired".to_owned()
        }
        R::AlertReceived(A::CertificateRequired | A::HandshakeFailure) if !client_cert => {
            "the server requires a client certificate: set nats.tls.cert_file and nats.tls.key_file".to_owned()
        }
        R::AlertReceived(A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::CertificateRequired | A::HandshakeFailure) => {
            "the server refused the client certificate in nats.tls.cert_file (is it signed by the CA the server's tls.ca_file names?)".to_owned()
        }
        _ => format!("check {trusted} and the client certificate, if any"),
    };
    Some(format!("{why} ({r})"))
}

/// Who connects: the service name (inbox prefix, audit subject) and the
/// hook that sees the connection's events, where permission violations go.
#[derive(Clone)]
pub struct As<H = NoHook> {
    pub service: Option<String>,
    /// The daemon and the CLI pass the violation reporter's sender
    /// (`acl::violation::Sender` implements [`EventHook`]).
    pub violations: Option<H>,
}

impl<H> Default for As<H> {
    fn default() -> Self {
        As {
            service: None,
            violations: None,
        }
    }
}

/// Sees every event of the connection before it is logged. The store knows
/// nothing of what an event means to the ACL: the permission-violation
/// reporter (`acl::violation`) is wired here by whoever connects.
pub trait EventHook: Clone + Send + Sync + 'static {
    /// True when the hook handled the event (then it is not logged again).
    /// `link` is the daemon's link metrics; `None` for a command-line
    /// connection.
    fn on_event(&self, event: &Event, link: Option<&LinkMetrics>) -> bool;
}

/// No hook: events are only logged and counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHook;

impl EventHook for NoHook {
    fn on_event(&self, _: &Event, _: Option<&LinkMetrics>) -> bool {
        false
    }
}

fn options<H: EventHook>(
    cfg: &NatsConfig,
    name: &str,
    metrics: Option<Arc<Metrics>>,
    who: &As<H>,
) -> Result<ConnectOptions, ConnectError> {
    let mut opts = ConnectOptions::new()
        .name(name)
        .connection_timeout(cfg.connect_timeout)
        .request_timeout(Some(cfg.request_timeout))
        // Reconnect forever: the leaf is local and comes back; giving up
        // would turn a nats-server restart into a daemon restart.
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| {
            Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
                .delay_after(u32::try_from(attempt).unwrap_or(u32::MAX))
        })
        .client_capacity(65_536)
        .subscription_capacity(65_536);
    if let Some(path) = &cfg.nkey_seed_file {
        let seed = crate::base::secrets::read_seed(path)?;
        opts = opts.nkey(seed);
    }
    if let Some(tls) = &cfg.tls {
        opts = opts.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            opts = opts.add_root_certificates(tls_file("nats.tls.ca_file", ca, "CERTIFICATE")?);
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            opts = opts.add_client_certificate(
                tls_file("nats.tls.cert_file", cert, "CERTIFICATE")?,
                tls_file("nats.tls.key_file", key, "PRIVATE KEY")?,
            );
        }
    }
    if let Some(service) = &who.service {
        // The ACL grants each service its own inbox prefix only.
        opts = opts.custom_inbox_prefix(crate::naming::inbox_prefix(service));
    }
    let hook = who.violations.clone();
    if let (None, Some(hook)) = (&metrics, &hook) {
        // A CLI: no metrics, but its refusals are named when it fails.
        let hook = hook.clone();
        opts = opts.event_callback(move |event| {
            let hook = hook.clone();
            async move {
                hook.on_event(&event, None);
            }
        });
    }
    if let Some(link) = metrics.map(|m| m.handle_or_register::<LinkMetrics>()) {
        let connected_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
        opts = opts.event_callback(move |event| {
            let link = link.clone();
            let connected_once = connected_once.clone();
            let hook = hook.clone();
            async move {
                if hook
                    .as_ref()
                    .is_some_and(|h| h.on_event(&event, Some(&link)))
                {
                    return;
                }
                match event {
                    Event::Connected => {
                        link.connected.store(true, Ordering::Relaxed);
                        if connected_once.swap(true, Ordering::Relaxed) {
                            crate::emit!(super::metrics::NATS_RECONNECTED, &link.reconnects);
                        }
                    }
                    Event::Disconnected => {
                        link.connected.store(false, Ordering::Relaxed);
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

pub use crate::base::secrets::read_secret;

/// Connects, retrying with capped backoff until `deadline` (None: forever).
/// The daemon uses this so that it can start before its nats-server and
/// only report READY once connected.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
    metrics: Option<Arc<Metrics>>,
    deadline: Option<Duration>,
) -> Result<async_nats::Client, ConnectError> {
    connect_as(cfg, name, metrics, deadline, &As::<NoHook>::default()).await
}

/// [`connect`] as a named service of the ownership map: its own inbox
/// prefix, and permission violations reported to `who.violations`.
pub async fn connect_as<H: EventHook>(
    cfg: &NatsConfig,
    name: &str,
    metrics: Option<Arc<Metrics>>,
    deadline: Option<Duration>,
    who: &As<H>,
) -> Result<async_nats::Client, ConnectError> {
    let start = tokio::time::Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut warned = false;
    loop {
        let opts = options(cfg, name, metrics.clone(), who)?;
        // A comma-separated list: the client fails over between servers
        // (the hub's nodes).
        let urls: Vec<&str> = cfg.url.split(',').map(str::trim).collect();
        match opts.connect(urls).await {
            Ok(client) => {
                if let Some(m) = &metrics {
                    let link = m.handle_or_register::<LinkMetrics>();
                    link.connected.store(true, Ordering::Relaxed);
                }
                if warned {
                    tracing::info!(url = %cfg.url, "connected to nats-server");
                }
                return Ok(client);
            }
            Err(source) => {
                let tls = tls_problem(cfg, &source);
                // A caller with a deadline (the CLI) gets a TLS problem at
                // once: waiting does not change a certificate.
                if deadline.is_some_and(|d| tls.is_some() || start.elapsed() >= d) {
                    let url = cfg.url.clone();
                    return Err(match tls {
                        Some(problem) => ConnectError::Tls { url, problem },
                        None => ConnectError::Connect { url, source },
                    });
                }
                if !warned {
                    if let Some(problem) = &tls {
                        // A certificate problem rarely goes away by itself,
                        // but a server certificate can be replaced: keep
                        // trying, loudly.
                        tracing::error!(url = %cfg.url, error = %problem, "TLS with nats-server failed; retrying");
                    } else {
                        tracing::warn!(url = %cfg.url, error = %source, "cannot connect to nats-server yet; retrying");
                    }
                    warned = true;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}
