//! The `[nats]` section (which leaf nats-server, as whom, over what) and
//! the `[lease]` section, with their checks. The store owns them: it is
//! what `connect` and the lease keeper read.

use crate::base::problems::Problems;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The site's leaf nats-server.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// How long one connection attempt may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a JetStream request (publish ack, KV write) may take before
    /// it counts as failed and is retried.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// File with this instance's NKEY user seed (`SU...`). A leading
    /// `$CREDENTIALS_DIRECTORY/` is resolved against systemd's credentials
    /// directory, so the seed never has to enter the Nix store.
    pub nkey_seed_file: Option<PathBuf>,
    /// TLS to the leaf (`[nats.tls]`); when present, the connection must
    /// be TLS.
    pub tls: Option<NatsTls>,
}

/// `[nats.tls]`: the CA that signed the server's certificate, and an
/// optional client certificate for servers that verify clients. Paths are
/// resolved like other secret paths (a leading `$CREDENTIALS_DIRECTORY/`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file with the CA certificate(s) the server's certificate must
    /// chain to; without it, the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), for a server with `verify: true`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: default_nats_url(),
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            nkey_seed_file: None,
            tls: None,
        }
    }
}

fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Checks `[nats]`, pushing every problem found.
pub fn check(nats: &NatsConfig, p: &mut Problems) {
    if let Err(reason) = check_nats_url(&nats.url) {
        p.push("nats.url", reason);
    }
    p.positive("nats.connect_timeout", nats.connect_timeout);
    p.positive("nats.request_timeout", nats.request_timeout);
    if let Some(tls) = &nats.tls {
        check_tls(tls, p);
    }
}

fn check_tls(tls: &NatsTls, p: &mut Problems) {
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => p.push(
            "nats.tls.key_file",
            "is missing: a client certificate (cert_file) needs its private key",
        ),
        (None, Some(_)) => p.push(
            "nats.tls.cert_file",
            "is missing: a private key (key_file) needs its client certificate",
        ),
        _ => {}
    }
    for (field, path) in [
        ("nats.tls.ca_file", &tls.ca_file),
        ("nats.tls.cert_file", &tls.cert_file),
        ("nats.tls.key_file", &tls.key_file),
    ] {
        if path.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            p.push(field, "is empty: give a file path or leave it out");
        }
    }
}

/// Accepts what async-nats accepts for a server: `nats://`, `tls://` or no
/// scheme, a host and an optional port (4222 when absent), several
/// separated by commas. Credentials in the URL are refused: the config is
/// world-readable in the Nix store.
fn check_nats_url(url: &str) -> Result<(), String> {
    if url.trim().is_empty() {
        return Err("is empty: give the leaf server, e.g. `nats://127.0.0.1:4222`".into());
    }
    for server in url.split(',').map(str::trim) {
        check_nats_server(server).map_err(|why| format!("{server:?}: {why}"))?;
    }
    Ok(())
}

/// One server of `nats.url`, read by the NATS client's own address type
/// (what `connect` will parse), plus what the client would accept and the
/// deployment must not have: credentials in a world-readable file, a
/// websocket scheme, port 0, a path.
fn check_nats_server(server: &str) -> Result<(), String> {
    const FORMS: &str = "use `nats://host:port`, `tls://host:port` or `host:port`";
    let addr: async_nats::ServerAddr = server
        .parse()
        .map_err(|e: std::io::Error| format!("{e}: {FORMS}"))?;
    if addr.is_websocket() {
        return Err(format!("a websocket address is not supported: {FORMS}"));
    }
    let url = addr.clone().into_inner();
    if addr.has_user_pass() || url.password().is_some() {
        return Err(
            "holds credentials: the config is world-readable, give the NKEY seed as a file instead"
                .into(),
        );
    }
    if addr.host().is_empty() {
        return Err(format!("names no host: {FORMS}"));
    }
    if url.port() == Some(0) {
        return Err("port 0 is not a port (1 to 65535)".into());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "has a path or query, which a NATS server address has not: {FORMS}"
        ));
    }
    Ok(())
}

/// The service's lease `owners.<service>`: clients mark the keys of a
/// service whose lease is gone as stale.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// How long the lease outlives the last renewal (per-message TTL of
    /// the lease key): after a crash, clients see this service's keys as
    /// stale within this time (plus up to 1 s of server expiry tick).
    /// Whole seconds, at least 3s; renewed every third of it.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: default_lease_ttl(),
        }
    }
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// Checks `[lease]`, pushing every problem found.
pub fn check_lease(lease: &LeaseConfig, p: &mut Problems) {
    let ttl = lease.ttl;
    if ttl.subsec_nanos() != 0 || ttl < crate::base::ownership::MIN_TTL {
        p.push(
            "lease.ttl",
            format!(
                "{} is not allowed: use whole seconds, at least {}s (the server expires leases on a 1 s tick and the lease is renewed every third of it)",
                humantime::format_duration(ttl),
                crate::base::ownership::MIN_TTL.as_secs()
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_urls() {
        for ok in [
            "nats://127.0.0.1:4222",
            "tls://leaf.example:4443",
            "127.0.0.1:4222",
            "localhost",
            "nats://[::1]:4222",
            "nats://a:4222, nats://b:4222",
        ] {
            assert_eq!(check_nats_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "http://127.0.0.1:4222",
            "nats://user:pw@127.0.0.1:4222",
            "nats://127.0.0.1:0",
            "nats://127.0.0.1:99999",
            "nats://:4222",
            "nats://[::1",
            "nats://host/path",
        ] {
            assert!(check_nats_url(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
