//! A refusal in words an operator can act on: which subject the server
//! refused, and which entry of the ownership map would allow it.
//!
//! The server refuses an operation with an asynchronous error, and the
//! operation then fails some other way (a timeout, "no responders", a
//! missing stream): without this, a missing grant looks like a missing
//! bucket. The CLI collects the refusals of its connection and names them
//! when a command fails.

use super::access::{Component, Keyspace};
use super::violation::{Operation, Violation};
use crate::naming;
use std::sync::{Arc, Mutex};

/// The grant that would allow `subject`, as an ownership-map entry for
/// `service`; `None` when no entry of the map grants it to a service (the
/// admin's JetStream API, another service's key, `$SYS`, ...).
pub fn grant(subject: &str, service: &str) -> Option<String> {
    let reads = |k: Keyspace| {
        Some(format!(
            "reads = [\"{}\"] in [services.{service}] (the keyspace {k})",
            k.name()
        ))
    };
    let runs = |c: Component, k: Keyspace| {
        Some(format!(
            "runs = [\"{}\"] in [services.{service}] (the writer of {k}; one service per component)",
            c.name()
        ))
    };
    let bucket_keyspace = |b: &str| match b {
        naming::PRESENCE_BUCKET => Some(Keyspace::Presence),
        naming::DEBOUNCE_BUCKET => Some(Keyspace::Debounce),
        naming::OWNERS_BUCKET => Some(Keyspace::Owners),
        naming::ARCHIVE_BUCKET => Some(Keyspace::Archive),
        naming::SNAPSHOTS_OBJECT => Some(Keyspace::Snapshots),
        _ => None,
    };
    let stream_keyspace = |s: &str| {
        if let Some(b) = s.strip_prefix("KV_").or_else(|| s.strip_prefix("OBJ_")) {
            return bucket_keyspace(b);
        }
        match s {
            naming::SENSORS_STREAM => Some(Keyspace::Sensors),
            naming::EVENTS_STREAM => Some(Keyspace::Events),
            naming::REJECTED_STREAM => Some(Keyspace::Rejected),
            naming::AUDIT_STREAM => Some(Keyspace::Audit),
            _ => None,
        }
    };
    let owner = |k: Keyspace| Component::ALL.into_iter().find(|c| c.owns().contains(&k));
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        ["$JS", "hub", "API", "STREAM", "INFO" | "LEADER", ..] => Some(format!(
            "runs = [\"engine\"] in [services.{service}] (the engine's `[hub]` reads its hub mirrors; `presenced status` reads them as the engine's service or as the site's admin)"
        )),
        ["$JS", "API", "STREAM", "INFO", s] | ["$JS", "FC", s, ..] => {
            stream_keyspace(s).and_then(reads)
        }
        ["$JS", "API", "DIRECT", "GET", s, ..] => stream_keyspace(s).and_then(reads),
        ["$JS", "API", "CONSUMER", "CREATE", s, rest @ ..] => {
            if *s == naming::SENSORS_STREAM && rest.first() == Some(&naming::ENGINE_CONSUMER) {
                return None;
            }
            stream_keyspace(s).and_then(reads)
        }
        ["$JS", "API", "CONSUMER", "MSG", "NEXT", s, c] => {
            if *s == naming::SENSORS_STREAM && *c == naming::ENGINE_CONSUMER {
                runs(Component::Engine, Keyspace::Sensors)
            } else {
                stream_keyspace(s).and_then(reads)
            }
        }
        ["$JS", "API", ..] => None,
        ["$KV", b, key @ ..] => match bucket_keyspace(b)? {
            Keyspace::Owners if key.join(".") == service => Some(format!(
                "[services.{service}] (every service writes its own lease)"
            )),
            Keyspace::Owners => None,
            k => owner(k).and_then(|c| runs(c, k)),
        },
        ["$O", b, ..] => bucket_keyspace(b).and_then(|k| owner(k).and_then(|c| runs(c, k))),
        ["cmd", _, "presence", ..] => reads(Keyspace::Commands),
        ["sensors", ..] => runs(Component::Ingest, Keyspace::Sensors),
        ["rejected", ..] => runs(Component::Ingest, Keyspace::Rejected),
        ["live", ..] => runs(Component::Ingest, Keyspace::Live),
        ["events", ..] => runs(Component::Engine, Keyspace::Events),
        ["audit", "events", _, who] if *who == service => Some(format!(
            "[services.{service}] (every service writes its own audit subject)"
        )),
        ["_INBOX", who, ..] if *who == service => Some(format!("[services.{service}]")),
        _ => None,
    }
}

/// One refusal explained for `service`.
pub fn explain(v: &Violation, service: &str) -> String {
    let op = match v.operation {
        Operation::Publish => "publish to",
        Operation::Subscribe => "subscription to",
    };
    let fix = match grant(&v.subject, service) {
        Some(g) => format!(
            "the ownership map allows it with {g}; then regenerate the ACL (`presenced acl`), reload nats-server and run `presenced provision --access` again"
        ),
        None => format!(
            "no grant of the ownership map gives this to service {service}: it is the admin's, or another identity's"
        ),
    };
    format!(
        "nats-server refused the {op} {:?} for service {service} (a permissions violation, not a missing stream or bucket): {fix}",
        v.subject
    )
}

/// The refusals a CLI connection was told of, in order.
#[derive(Clone, Default)]
pub struct Refusals(Arc<Mutex<Vec<Violation>>>);

impl Refusals {
    pub fn push(&self, v: Violation) {
        if let Ok(mut all) = self.0.lock() {
            all.push(v);
        }
    }

    pub fn first(&self) -> Option<Violation> {
        self.0.lock().ok().and_then(|all| all.first().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(subject: &str) -> Violation {
        Violation {
            operation: Operation::Publish,
            subject: subject.to_owned(),
        }
    }

    #[test]
    fn refusals_name_the_grant_that_would_allow_them() {
        let g = |s: &str| grant(s, "dashboard");
        assert!(g("$JS.API.STREAM.INFO.KV_presence")
            .unwrap()
            .starts_with("reads = [\"presence\"] in [services.dashboard]"));
        assert!(g("$JS.API.DIRECT.GET.KV_owners.$KV.owners.x")
            .unwrap()
            .contains("reads = [\"owners\"]"));
        assert!(g("$JS.API.CONSUMER.CREATE.SENSORS.d-1.sensors.home.>")
            .unwrap()
            .contains("reads = [\"sensors\"]"));
        assert_eq!(
            g("$JS.API.CONSUMER.CREATE.SENSORS.engine.sensors.home.>"),
            None
        );
        assert!(g("cmd.home.presence.hall")
            .unwrap()
            .contains("reads = [\"commands\"]"));
        assert!(g("$KV.presence.hall")
            .unwrap()
            .contains("runs = [\"engine\"]"));
        assert!(g("$KV.archive.x")
            .unwrap()
            .contains("runs = [\"archiver\"]"));
        assert!(g("$KV.owners.dashboard").is_some());
        assert_eq!(g("$KV.owners.presenced"), None);
        assert_eq!(g("$JS.API.STREAM.CREATE.SENSORS"), None);
        assert!(g("$JS.hub.API.STREAM.INFO.SENSORS-home")
            .unwrap()
            .contains("runs = [\"engine\"]"));
        assert_eq!(g("$SYS.REQ.SERVER.PING"), None);
        let text = explain(&publish("$JS.API.STREAM.INFO.KV_presence"), "dashboard");
        assert!(text.contains("refused the publish to \"$JS.API.STREAM.INFO.KV_presence\""));
        assert!(text.contains("not a missing stream or bucket"));
        assert!(explain(&publish("$JS.API.STREAM.CREATE.X"), "dashboard").contains("admin"));
    }
}
