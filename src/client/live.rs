//! `presenced watch --live`: every accepted reading as it arrives, from
//! the core NATS subjects `live.<site>.<sensor>` ingest publishes (no
//! history: only what arrives while it runs).

use crate::naming::Site;
use futures::StreamExt;
use std::io::Write;

/// Prints each live reading of the sensors matching `pattern` (`>` for
/// all) until killed: the payload as a JSON line with `json`, else one
/// aligned line. Survives nats-server restarts (the client subscribes
/// again on reconnect); readings sent meanwhile are not replayed.
pub async fn watch_live(
    client: async_nats::Client,
    site: &Site,
    pattern: &str,
    json: bool,
) -> anyhow::Result<()> {
    super::check_pattern(pattern)?;
    let subject = format!("live.{site}.{pattern}");
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {subject}: {e}"))?;
    client
        .flush()
        .await
        .map_err(|e| anyhow::anyhow!("subscribe to {subject}: {e}"))?;
    let mut out = std::io::stdout();
    if !json {
        writeln!(
            out,
            "{:<24} {:<10} {:<26} source",
            "sensor", "value", "observed_at"
        )?;
    }
    out.flush()?;
    while let Some(m) = sub.next().await {
        if json {
            out.write_all(&m.payload)?;
            out.write_all(b"\n")?;
        } else {
            let v: serde_json::Value = match serde_json::from_slice(&m.payload) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("presenced: {}: not a reading ({e})", m.subject);
                    continue;
                }
            };
            let text = |k: &str| match &v[k] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            writeln!(
                out,
                "{:<24} {:<10} {:<26} {}",
                text("sensor"),
                text("value"),
                text("observed_at"),
                text("source")
            )?;
        }
        out.flush()?;
    }
    Ok(())
}
