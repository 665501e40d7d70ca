//! How a key is shown: a JSON line or a row of the readable table.

use super::follow::{Entry, Op};
use crate::engine::ZoneState;

/// Why a line is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Part of the current state, before any change.
    Snapshot,
    /// The key changed.
    Change,
    /// The key did not change, but whether its owner is alive did.
    Owner,
}

/// One key as a client sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct View {
    pub event: Event,
    pub key: String,
    pub revision: u64,
    /// False for a deleted key.
    pub present: bool,
    pub op: Op,
    pub value: Option<serde_json::Value>,
    /// True when the service owning the key's bucket has no live lease:
    /// the value is the last one it wrote. `null` when unknown (no lease
    /// information available).
    pub stale: Option<bool>,
    /// The key is in KV but not in the config given to the client: no
    /// engine keeps it, so it is also stale. Remove it with `presenced
    /// cmd forget <zone>`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unconfigured: bool,
}

impl View {
    pub fn new(event: Event, e: &Entry, stale: Option<bool>) -> View {
        let present = e.op == Op::Put;
        let value = if present {
            Some(serde_json::from_slice(&e.value).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&e.value).into_owned())
            }))
        } else {
            None
        };
        View {
            event,
            key: e.key.clone(),
            revision: e.revision,
            present,
            op: e.op,
            value,
            stale,
            unconfigured: false,
        }
    }

    /// Marks the view unconfigured (and stale) when `configured` is known
    /// and lacks its key.
    pub fn against(mut self, configured: Option<&std::collections::BTreeSet<String>>) -> View {
        if configured.is_some_and(|c| !c.contains(&self.key)) {
            self.unconfigured = true;
            self.stale = Some(true);
        }
        self
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The table's header, matching [`View::row`].
    pub fn header() -> String {
        format!(
            "{:<20} {:<9} {:>6}  {:<24} {:>8}  {:<5}  {:<8}  WHY",
            "ZONE", "STATE", "CONF", "SINCE", "REV", "STALE", "EVENT"
        )
    }

    /// A readable row: zone, state, confidence, since, revision, stale,
    /// why the line is there, and the rules that currently push
    /// confidence up or down.
    pub fn row(&self) -> String {
        let stale = match self.stale {
            _ if self.unconfigured => "unconfigured",
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let event = match self.event {
            Event::Snapshot => "snapshot",
            Event::Change => "change",
            Event::Owner => "owner",
        };
        let (state, conf, since, why) = match &self.value {
            None => (
                "(deleted)".to_owned(),
                String::new(),
                String::new(),
                String::new(),
            ),
            Some(v) => match serde_json::from_value::<ZoneState>(v.clone()) {
                Ok(z) => {
                    let held = z
                        .manual
                        .as_ref()
                        .map(|m| format!("override by {} until {}", m.by, m.until));
                    let why: Vec<String> = held
                        .into_iter()
                        .chain(
                            z.evidence
                                .iter()
                                .filter(|e| (e.lr - 1.0).abs() > 1e-9)
                                .map(|e| format!("{}×{:.2}", e.sensor, e.lr)),
                        )
                        .collect();
                    (
                        z.state.as_str().to_owned(),
                        format!("{:.1}%", z.confidence * 100.0),
                        z.since.to_string(),
                        why.join(" "),
                    )
                }
                Err(_) => ("?".to_owned(), String::new(), String::new(), v.to_string()),
            },
        };
        format!(
            "{:<20} {:<9} {:>6}  {:<24} {:>8}  {:<5}  {:<8}  {}",
            self.key, state, conf, since, self.revision, stale, event, why
        )
        .trim_end()
        .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(value: &str) -> Entry {
        Entry {
            key: "hall".into(),
            revision: 7,
            op: Op::Put,
            value: Bytes::from(value.to_owned()),
        }
    }

    #[test]
    fn json_line_has_key_value_revision_and_stale() {
        let v = View::new(Event::Snapshot, &entry("{\"a\":1}"), Some(true));
        let j: serde_json::Value = serde_json::from_str(&v.json()).unwrap();
        assert_eq!(j["key"], "hall");
        assert_eq!(j["revision"], 7);
        assert_eq!(j["stale"], true);
        assert_eq!(j["event"], "snapshot");
        assert_eq!(j["value"]["a"], 1);
        let unknown = View::new(Event::Change, &entry("x"), None);
        let j: serde_json::Value = serde_json::from_str(&unknown.json()).unwrap();
        assert!(j["stale"].is_null());
        assert_eq!(j["value"], "x");
    }

    #[test]
    fn row_of_a_deleted_key() {
        let mut e = entry("");
        e.op = Op::Delete;
        let row = View::new(Event::Change, &e, Some(false)).row();
        assert!(row.starts_with("hall"), "{row}");
        assert!(row.contains("(deleted)") && row.contains(" no "), "{row}");
    }
}
