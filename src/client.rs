//! State-first clients: `get` one zone, `watch` a snapshot then deltas.

use crate::engine::ZoneState;
use crate::naming;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use std::io::Write;

/// One key as a client sees it.
#[derive(Debug, serde::Serialize)]
pub struct View {
    pub key: String,
    pub revision: u64,
    /// False for a deleted key.
    pub present: bool,
    pub value: Option<serde_json::Value>,
}

impl View {
    fn from_entry(e: kv::Entry) -> View {
        let present = e.operation == kv::Operation::Put;
        let value = if present {
            Some(serde_json::from_slice(&e.value).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&e.value).into_owned())
            }))
        } else {
            None
        };
        View {
            key: e.key,
            revision: e.revision,
            present,
            value,
        }
    }

    /// A readable line: zone, state, confidence, since, revision, and the
    /// rules that currently push confidence up or down.
    pub fn line(&self) -> String {
        let Some(v) = &self.value else {
            return format!("{:<20} (deleted)  rev {}", self.key, self.revision);
        };
        match serde_json::from_value::<ZoneState>(v.clone()) {
            Ok(z) => {
                let why: Vec<String> = z
                    .evidence
                    .iter()
                    .filter(|e| (e.lr - 1.0).abs() > 1e-9)
                    .map(|e| format!("{}×{:.2}", e.sensor, e.lr))
                    .collect();
                format!(
                    "{:<20} {:<9} {:>5.1}%  since {}  rev {}{}{}",
                    self.key,
                    z.state.as_str(),
                    z.confidence * 100.0,
                    z.since,
                    self.revision,
                    if why.is_empty() { "" } else { "  " },
                    why.join(" ")
                )
            }
            Err(_) => format!("{:<20} {}  rev {}", self.key, v, self.revision),
        }
    }
}

async fn presence(client: async_nats::Client) -> anyhow::Result<kv::Store> {
    let js = jetstream::new(client);
    js.get_key_value(naming::PRESENCE_BUCKET)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "KV bucket presence is not there ({e}): run `presenced provision` first"
            )
        })
}

/// Prints one zone; an unknown zone is an error.
pub async fn get(client: async_nats::Client, zone: &str, json: bool) -> anyhow::Result<()> {
    if !naming::is_presence_key(zone) {
        anyhow::bail!(
            "{zone:?} is not a zone id ([a-z0-9_-], 1 to 64 characters) nor a person key (person.<id>)"
        );
    }
    let store = presence(client).await?;
    let entry = store
        .entry(zone)
        .await?
        .ok_or_else(|| anyhow::anyhow!("zone {zone:?} has no state in KV presence"))?;
    let view = View::from_entry(entry);
    if json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        println!("{}", view.line());
    }
    Ok(())
}

/// Prints every matching key (the snapshot), then each change as it happens.
pub async fn watch(client: async_nats::Client, pattern: &str, json: bool) -> anyhow::Result<()> {
    let store = presence(client).await?;
    let status = store.status().await?;
    let mut in_snapshot = status.values() > 0;
    let last = status.info.state.last_sequence;
    let mut stream = store.watch_with_history(pattern).await?;
    let mut out = std::io::stdout();
    if !in_snapshot && !json {
        writeln!(out, "-- snapshot: no keys yet; watching --")?;
    }
    while let Some(entry) = stream.next().await {
        let entry = entry?;
        let end_of_snapshot = in_snapshot && (entry.delta == 0 || entry.revision >= last);
        let view = View::from_entry(entry);
        if json {
            writeln!(out, "{}", serde_json::to_string(&view)?)?;
        } else {
            writeln!(out, "{}", view.line())?;
        }
        if end_of_snapshot {
            in_snapshot = false;
            if !json {
                writeln!(out, "-- end of snapshot; watching for changes --")?;
            }
        }
        out.flush()?;
    }
    Ok(())
}
