//! Permission refusals of the archive commands, named as refusals.
//!
//! nats-server refuses an operation with an asynchronous `-ERR`; the
//! operation itself just never completes, which a command would report
//! as a timeout or a missing bucket. The archive commands connect with a
//! violation sink ([`crate::acl::violation`]) and turn what it caught
//! into an error that says which subject was refused to whom, and which
//! grant of the ownership map would allow it.

use crate::acl::violation::{Operation, Receiver, Violation};
use crate::naming;

/// The refusals the server reported on this connection.
pub struct Refusals {
    rx: Option<Receiver>,
    /// The service the command runs as (the config's `service`).
    pub service: String,
    seen: Vec<Violation>,
}

impl Refusals {
    pub fn new(service: &str, rx: Option<Receiver>) -> Refusals {
        Refusals {
            rx,
            service: service.to_owned(),
            seen: Vec::new(),
        }
    }

    /// Without a sink (tests of the library): never reports one.
    pub fn none(service: &str) -> Refusals {
        Refusals::new(service, None)
    }

    /// Waits for the next refusal (forever without a sink).
    pub async fn next(&mut self) -> Violation {
        match &mut self.rx {
            Some(rx) => match rx.recv().await {
                Some(v) => {
                    self.seen.push(v.clone());
                    v
                }
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Takes what arrived so far without waiting.
    pub fn drain(&mut self) -> &[Violation] {
        if let Some(rx) = &mut self.rx {
            while let Ok(v) = rx.try_recv() {
                self.seen.push(v);
            }
        }
        &self.seen
    }

    /// The error for refusal `v`.
    pub fn named(&self, v: &Violation) -> String {
        named(&self.service, v)
    }

    /// Every refusal seen, one line each; `None` when there was none.
    pub fn describe(&mut self) -> Option<String> {
        let service = self.service.clone();
        let seen = self.drain();
        if seen.is_empty() {
            return None;
        }
        let mut lines: Vec<String> = Vec::new();
        for v in seen {
            let l = named(&service, v);
            if !lines.contains(&l) {
                lines.push(l);
            }
        }
        Some(lines.join("\n"))
    }
}

/// `permission refused: ...` naming the subject, the identity and the
/// grant that would allow it.
pub fn named(service: &str, v: &Violation) -> String {
    let verb = match v.operation {
        Operation::Publish => "publish to",
        Operation::Subscribe => "subscribe to",
    };
    format!(
        "permission refused: nats-server refused service {service:?} (the identity of nats.nkey_seed_file) to {verb} {:?}; {}",
        v.subject,
        grant_for(v)
    )
}

/// Which grant of the ownership map covers `v`, in the words of the
/// access file.
pub fn grant_for(v: &Violation) -> String {
    let s = v.subject.as_str();
    let restorable = [naming::PRESENCE_BUCKET, naming::DEBOUNCE_BUCKET];
    for b in restorable {
        if s.starts_with(&format!("$KV.{b}.")) {
            return format!(
                "restore writes KV {b}: run restore as a service with runs = [\"restore\"] in the ownership map"
            );
        }
        if s == naming::js::stream_purge(&naming::kv_stream(b)) {
            return format!(
                "restore replaces KV {b} (purge): run restore as a service with runs = [\"restore\"] in the ownership map"
            );
        }
    }
    let obj = naming::obj_stream(naming::SNAPSHOTS_OBJECT);
    if s.contains(&obj) || s.starts_with(&format!("$O.{}.", naming::SNAPSHOTS_OBJECT)) {
        return "reading object store snapshots needs reads = [\"snapshots\"], or a service that runs archiver or restore".to_owned();
    }
    let archive = naming::kv_stream(naming::ARCHIVE_BUCKET);
    if s.contains(&archive) || s.starts_with(&format!("$KV.{}.", naming::ARCHIVE_BUCKET)) {
        return "the upload outbox (KV archive) is the archiver's: run this as the service that runs archiver, or grant reads = [\"archive\"] to list it".to_owned();
    }
    for b in restorable {
        if s.contains(&naming::kv_stream(b)) {
            return format!(
                "reading KV {b} needs reads = [\"{b}\"], or a service that runs engine or restore"
            );
        }
    }
    if s.starts_with("_INBOX.") {
        return "replies come to _INBOX.<service>.>: the config's service must be the name of this identity in the ownership map (services.<name>)".to_owned();
    }
    "no grant of the ownership map covers it (see docs/SECURITY.md)".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(subject: &str) -> Violation {
        Violation {
            operation: Operation::Publish,
            subject: subject.to_owned(),
        }
    }

    #[test]
    fn refusals_name_subject_identity_and_grant() {
        let m = named("presenced", &v("$JS.API.STREAM.PURGE.KV_presence"));
        assert!(
            m.contains("\"presenced\"")
                && m.contains("$JS.API.STREAM.PURGE.KV_presence")
                && m.contains("runs = [\"restore\"]"),
            "{m}"
        );
        assert!(grant_for(&v("$KV.debounce.restore=probe")).contains("runs = [\"restore\"]"));
        assert!(
            grant_for(&v("$JS.API.STREAM.INFO.OBJ_snapshots")).contains("reads = [\"snapshots\"]")
        );
        assert!(grant_for(&v("$JS.API.STREAM.INFO.KV_archive")).contains("archiver"));
        assert!(
            grant_for(&v("$JS.API.CONSUMER.CREATE.KV_presence")).contains("reads = [\"presence\"]")
        );
        assert!(grant_for(&v("foo")).contains("no grant"));
    }
}
