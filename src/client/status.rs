//! `presenced status`: the whole site in one answer, with an exit code a
//! script or a monitoring check can use (docs/OPERATIONS.md).
//!
//! It reads what any operator identity can read (the admin of the
//! sandbox and the docs, or the service's own): the daemon's `/healthz`
//! on `http.listen` for components and sources, KV `owners` for leases,
//! KV `presence` for the zones, the `engine` consumer for the backlog,
//! and the hub mirrors when `[hub]` is configured. A read nats-server
//! refuses is reported as a refusal naming the subject, not as missing.

use crate::config::Config;
use crate::http::Verdict;
use crate::naming::{self, Site};
use crate::store::lease::{self, Leases};
use crate::time::Timestamp;
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

/// How long each part may take: status must answer even when the site
/// does not.
const PART_TIMEOUT: Duration = Duration::from_secs(5);

/// What `status` found; `verdict` is the exit code's source.
pub struct Report {
    pub verdict: Verdict,
    pub json: Value,
    pub causes: Vec<String>,
    /// The hub mirrors as the readable table, with `[hub]`.
    pub hub_table: Option<String>,
}

struct Findings {
    down: Vec<String>,
    degraded: Vec<String>,
}

/// A failed read: refused by the ACL (named with its subject and the
/// grant that would allow it, as every CLI command names a refusal) or
/// another error.
fn describe(
    what: &str,
    e: impl std::fmt::Display,
    refused: &mut crate::acl::violation::Receiver,
    service: &str,
) -> String {
    let e = e.to_string();
    if e.starts_with(REFUSED) {
        return format!("{what}: {e}");
    }
    let mut why = Vec::new();
    while let Ok(v) = refused.try_recv() {
        why.push(crate::acl::explain::explain(&v, service));
    }
    if !why.is_empty() {
        format!("{what}: {REFUSED}{}", why.join("; "))
    } else if e.to_ascii_lowercase().contains("permission") {
        format!("{what}: {REFUSED}{e}")
    } else {
        format!("cannot read {what}: {e}")
    }
}

/// How a refusal starts in the report (and how [`describe`] knows one).
const REFUSED: &str = "refused: ";

/// `fut`, cut short by the first permission violation the connection
/// reports: a refused request would otherwise wait for its timeout.
async fn guarded<T>(
    fut: impl std::future::Future<Output = Result<T, String>>,
    refused: &mut crate::acl::violation::Receiver,
    service: &str,
) -> Result<T, String> {
    tokio::select! {
        r = fut => r,
        Some(v) = refused.recv() => Err(format!(
            "{REFUSED}{}",
            crate::acl::explain::explain(&v, service)
        )),
    }
}

/// GET `/healthz` over plain HTTP/1.0 (loopback, no TLS).
async fn healthz(addr: std::net::SocketAddr) -> Result<(u16, Value), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw);
        let code: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("not an HTTP answer")?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v = serde_json::from_str(body).map_err(|e| format!("not a presenced /healthz: {e}"))?;
        Ok((code, v))
    };
    tokio::time::timeout(PART_TIMEOUT, fut)
        .await
        .map_err(|_| "no answer in 5s".to_owned())?
}

/// Collects the report. Never fails: every part that cannot be read
/// becomes a cause.
pub async fn collect(config: &Config) -> Report {
    let mut f = Findings {
        down: Vec::new(),
        degraded: Vec::new(),
    };
    let mut out = json!({ "site": config.site });
    let runs: Vec<&str> = config.components().iter().map(|c| c.name()).collect();
    out["runs"] = json!(runs);

    // The daemon itself, at http.listen. An operator's file (the admin's
    // in the sandbox) copies the daemon's listen address with `enabled =
    // false` so it binds nothing itself: it is read then too, and only
    // counts against the site when the file says the daemon serves it.
    {
        match healthz(config.http.listen).await {
            Ok((code, h)) => {
                match h["status"].as_str() {
                    Some("healthy") if code == 200 => {}
                    Some("degraded") => f.degraded.extend(causes_of(&h)),
                    _ => f.down.extend(causes_of(&h)),
                }
                out["daemon"] = h;
            }
            Err(e) if config.http.enabled => {
                f.down.push(format!(
                    "the daemon does not answer on http.listen = {} ({e}): is it running?",
                    config.http.listen
                ));
                out["daemon"] = Value::Null;
            }
            Err(e) => {
                out["daemon"] =
                    json!({ "unreachable": e, "listen": config.http.listen.to_string() });
            }
        }
    }

    let (tx, mut refused) = crate::acl::violation::channel();
    let who = crate::store::connect::As {
        service: Some(config.service.clone()),
        violations: Some(tx),
    };
    // Metrics only so that the connection reports permission violations
    // (to `refused`); nothing renders them.
    let client = match crate::store::connect_as(
        &config.nats,
        "presenced-status",
        Some(std::sync::Arc::new(crate::metrics::Metrics::default())),
        Some(PART_TIMEOUT),
        &who,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            f.down
                .push(format!("cannot reach the leaf nats-server: {e}"));
            return finish(out, f);
        }
    };
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(PART_TIMEOUT)
        .build(client.clone());

    // Leases.
    let mut leases = Leases::default();
    let mut leases_known = false;
    let mut lease_rows = Vec::new();
    match guarded(
        read_bucket(&js, naming::OWNERS_BUCKET),
        &mut refused,
        &config.service,
    )
    .await
    {
        Ok(entries) => {
            leases_known = true;
            for (key, value) in entries {
                match lease::parse(&value) {
                    Ok(l) => {
                        let expired = l.run_out(Timestamp::now());
                        lease_rows.push(json!({
                            "service": key,
                            "components": l.components,
                            "host": l.host,
                            "pid": l.pid,
                            "started": l.started,
                            "expires": l.expires,
                            "expired": expired,
                        }));
                        leases.apply(&key, Some(l));
                    }
                    Err(reason) => lease_rows.push(json!({ "service": key, "error": reason })),
                }
            }
            // Every component this file's site runs must be announced by
            // a live lease, whichever service holds it.
            for c in config.components() {
                let held = lease_rows.iter().any(|l| {
                    l["expired"] == false
                        && l["components"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x == c.name()))
                });
                if !held {
                    f.down.push(format!(
                        "no live lease in KV owners runs {}: it is not running",
                        c.name()
                    ));
                }
            }
        }
        Err(e) => f.down.push(describe(
            "KV owners (leases)",
            e,
            &mut refused,
            &config.service,
        )),
    }
    out["leases"] = json!(lease_rows);

    // Zones.
    let configured: BTreeSet<String> = config.presence_entries().map(|(k, _)| k).collect();
    match guarded(
        read_bucket(&js, naming::PRESENCE_BUCKET),
        &mut refused,
        &config.service,
    )
    .await
    {
        Ok(entries) => {
            let stored: BTreeSet<String> = entries.into_iter().map(|(k, _)| k).collect();
            let stale = leases_known && leases.stale(naming::PRESENCE_BUCKET, Timestamp::now());
            if stale && !stored.is_empty() {
                f.down.push(format!(
                    "{} zone(s) stale: no running engine holds a lease",
                    stored.len()
                ));
            }
            let unconfigured: Vec<&String> = stored.difference(&configured).collect();
            let missing: Vec<&String> = configured.difference(&stored).collect();
            out["zones"] = json!({
                "configured": configured.len(),
                "stored": stored.len(),
                "stale": if !leases_known { Value::Null } else if stale { json!(stored.len()) } else { json!(0) },
                "unconfigured": unconfigured,
                "not_stored": missing,
            });
        }
        Err(e) => f.down.push(describe(
            "KV presence (zones)",
            e,
            &mut refused,
            &config.service,
        )),
    }

    // Engine backlog.
    let backlog = async {
        let stream = js
            .get_stream(naming::SENSORS_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let mut consumer: async_nats::jetstream::consumer::Consumer<
            async_nats::jetstream::consumer::pull::Config,
        > = stream
            .get_consumer(naming::ENGINE_CONSUMER)
            .await
            .map_err(|e| e.to_string())?;
        consumer
            .info()
            .await
            .map(|i| i.num_pending)
            .map_err(|e| e.to_string())
    };
    match guarded(backlog, &mut refused, &config.service).await {
        Ok(n) => out["backlog"] = json!({ "sensors_pending": n }),
        Err(e) => f.degraded.push(describe(
            "the SENSORS consumer `engine` (backlog)",
            e,
            &mut refused,
            &config.service,
        )),
    }

    // Hub mirrors, as before.
    if let Some(hub) = &config.hub {
        if let Ok(site) = Site::new(&config.site) {
            let report = crate::hub::health::status(&client, &site, hub).await;
            for h in &report {
                if h.state == crate::hub::health::State::Stalled {
                    f.degraded.push(format!("hub mirror {} stalled", h.mirror));
                }
            }
            out["hub"] = json!(report);
            let mut r = finish(out, f);
            r.hub_table = Some(crate::hub::health::table(&report));
            return r;
        }
    }
    finish(out, f)
}

fn causes_of(h: &Value) -> Vec<String> {
    let list: Vec<String> = h["causes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        vec![format!("the daemon reports {}", h["status"])]
    } else {
        list.into_iter().map(|c| format!("daemon: {c}")).collect()
    }
}

fn finish(mut out: Value, f: Findings) -> Report {
    let verdict = if !f.down.is_empty() {
        Verdict::Down
    } else if !f.degraded.is_empty() {
        Verdict::Degraded
    } else {
        Verdict::Healthy
    };
    let causes: Vec<String> = f.down.into_iter().chain(f.degraded).collect();
    out["status"] = json!(verdict.as_str());
    out["causes"] = json!(causes);
    Report {
        verdict,
        json: out,
        causes,
        hub_table: None,
    }
}

/// Every live key of a KV bucket with its value.
async fn read_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
) -> Result<Vec<(String, bytes::Bytes)>, String> {
    let fut = async {
        let kv = js.get_key_value(bucket).await.map_err(|e| e.to_string())?;
        let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(|e| e.to_string())?);
        }
        let mut out = Vec::new();
        for k in names {
            if let Some(v) = kv.get(&k).await.map_err(|e| e.to_string())? {
                out.push((k, v));
            }
        }
        Ok(out)
    };
    tokio::time::timeout(PART_TIMEOUT * 2, fut)
        .await
        .map_err(|_| "no answer in 10s".to_owned())?
}

/// Prints the report (JSON or readable) and returns the exit code:
/// 0 healthy, 1 degraded, 2 down.
pub async fn run(config: &Config, as_json: bool) -> u8 {
    let r = collect(config).await;
    // Scripts read stdout; the reasons also go to stderr, where a
    // monitoring check or a person at a terminal sees them anyway.
    for c in &r.causes {
        eprintln!("presenced status: {c}");
    }
    if as_json {
        println!("{:#}", r.json);
    } else {
        print!("{}", readable(&r));
    }
    match r.verdict {
        Verdict::Healthy => 0,
        Verdict::Degraded => 1,
        Verdict::Down => 2,
    }
}

fn readable(r: &Report) -> String {
    let j = &r.json;
    let mut s = format!(
        "site {}: {}\n",
        j["site"].as_str().unwrap_or("?"),
        r.verdict.as_str()
    );
    for c in &r.causes {
        s.push_str(&format!("  ! {c}\n"));
    }
    if let Some(z) = j.get("zones") {
        s.push_str(&format!(
            "zones: {} configured, {} stored, {} stale",
            z["configured"], z["stored"], z["stale"]
        ));
        if let Some(u) = z["unconfigured"].as_array().filter(|u| !u.is_empty()) {
            let names: Vec<&str> = u.iter().filter_map(|v| v.as_str()).collect();
            s.push_str(&format!(
                "; unconfigured (in KV, not in the config): {}",
                names.join(", ")
            ));
        }
        s.push('\n');
    }
    if let Some(b) = j.get("backlog") {
        s.push_str(&format!(
            "backlog: {} reading(s) in SENSORS not yet applied\n",
            b["sensors_pending"]
        ));
    }
    for l in j["leases"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "lease {}: {} on {} (pid {}) since {}{}\n",
            l["service"].as_str().unwrap_or("?"),
            l["components"],
            l["host"].as_str().unwrap_or("?"),
            l["pid"],
            l["started"].as_str().unwrap_or("?"),
            if l["expired"] == true { " EXPIRED" } else { "" }
        ));
    }
    if let Some(d) = j.get("daemon").filter(|d| !d.is_null()) {
        s.push_str(&format!(
            "daemon: {}\n",
            d["status"].as_str().unwrap_or("?")
        ));
        // Who runs the engine and the sources of a service several
        // instances share (the leader lease).
        for part in ["engine", "ingest"] {
            let p = &d[part];
            if let Some(role) = p["role"].as_str() {
                s.push_str(&format!(
                    "  {part}: {role} since {}, lease holder {}, {} takeover(s) here{}\n",
                    p["since"].as_str().unwrap_or("?"),
                    p["holder"].as_str().unwrap_or("unknown"),
                    p["takeovers"],
                    p["shared"]
                        .as_str()
                        .map_or(String::new(), |t| format!(" ({t})")),
                ));
            }
        }
        for (name, c) in d["components"].as_object().into_iter().flatten() {
            s.push_str(&format!(
                "  component {name}: {}\n",
                c["state"].as_str().unwrap_or("?")
            ));
        }
        for src in d["sources"].as_array().into_iter().flatten() {
            let age = src["last_reading_seconds"]
                .as_f64()
                .map_or("never".to_owned(), |a| format!("{a:.0}s ago"));
            s.push_str(&format!(
                "  source {} ({}): link {}, last reading {age}\n",
                src["name"].as_str().unwrap_or("?"),
                src["kind"].as_str().unwrap_or("?"),
                if src["up"] == true { "up" } else { "down" },
            ));
        }
    }
    if let Some(t) = &r.hub_table {
        s.push_str(t);
    }
    s
}
