//! Permission violations the server reports, turned into an ERROR line, a
//! metric and an `AUDIT` record.
//!
//! The server refuses a publish or subscription it does not allow with an
//! asynchronous `-ERR`, which async-nats hands to the event callback; the
//! operation itself just never completes. So the callback is where a
//! misconfigured ACL becomes visible, and where the daemon learns it must
//! stop instead of waiting on an ack that will never come.

use super::audit_limit::{Entry, Limiter, BURST, PER_SECOND};
use crate::naming::Site;
use crate::store::metrics::{LinkMetrics, PERMISSION_VIOLATION};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the server refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Publish,
    Subscribe,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
        }
    }
}

/// One refused operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub operation: Operation,
    pub subject: String,
}

/// Reads a violation from a server error such as
/// `Permissions Violation for Publish to "$KV.presence.hall"`.
pub fn parse(message: &str) -> Option<Violation> {
    let lower = message.to_ascii_lowercase();
    let at = lower.find("permissions violation for ")?;
    let rest = &message[at + "permissions violation for ".len()..];
    let operation = if rest.to_ascii_lowercase().starts_with("publish") {
        Operation::Publish
    } else if rest.to_ascii_lowercase().starts_with("subscription") {
        Operation::Subscribe
    } else {
        return None;
    };
    let open = rest.find('"')?;
    let tail = &rest[open + 1..];
    let close = tail.find('"')?;
    Some(Violation {
        operation,
        subject: tail[..close].to_owned(),
    })
}

/// Reads a violation from an async-nats event.
pub fn from_event(event: &async_nats::Event) -> Option<Violation> {
    match event {
        async_nats::Event::ServerError(async_nats::ServerError::Other(m)) => parse(m),
        _ => None,
    }
}

/// The JSON of an `AUDIT` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub v: u32,
    pub kind: String,
    pub service: String,
    pub site: String,
    pub subject: String,
    pub operation: Operation,
    /// How many refusals of this operation and subject the record stands
    /// for: 1, or more when a flood was folded (see
    /// [`super::audit_limit`]).
    #[serde(default = "one")]
    pub count: u64,
    /// When the record was written (for a folded record: after the last
    /// refusal it counts).
    pub time: Timestamp,
}

fn one() -> u64 {
    1
}

impl AuditRecord {
    pub fn permission_violation(site: &Site, service: &str, v: &Violation) -> AuditRecord {
        AuditRecord::folded(site, service, v, 1)
    }

    pub fn folded(site: &Site, service: &str, v: &Violation, count: u64) -> AuditRecord {
        AuditRecord {
            v: 1,
            kind: "permission_violation".to_owned(),
            service: service.to_owned(),
            site: site.as_str().to_owned(),
            subject: v.subject.clone(),
            operation: v.operation,
            count,
            time: Timestamp::now(),
        }
    }
}

/// Where the event callback sends violations.
pub type Sender = mpsc::UnboundedSender<Violation>;
pub type Receiver = mpsc::UnboundedReceiver<Violation>;

pub fn channel() -> (Sender, Receiver) {
    mpsc::unbounded_channel()
}

/// The daemon and the CLI wire this sender into their NATS connection
/// (`store::connect::As::violations`): a refusal reported by the server is
/// counted and sent to the audit task (the daemon), or only sent (a CLI,
/// which names its refusals when it fails).
impl crate::store::connect::EventHook for Sender {
    fn on_event(&self, event: &async_nats::Event, link: Option<&LinkMetrics>) -> bool {
        let Some(v) = from_event(event) else {
            return false;
        };
        match link {
            Some(m) => report(v, Some(m), Some(self)),
            None => {
                let _ = self.send(v);
            }
        }
        true
    }
}

/// Counts and reports one violation (called from the event callback).
/// With a sink, the audit task logs it (rate limited, with its record);
/// without, it is logged here.
pub fn report(v: Violation, link: Option<&LinkMetrics>, sink: Option<&Sender>) {
    let (subject, operation) = (v.subject.clone(), v.operation);
    // Unsent when there is no audit task, or it is gone (the daemon is
    // stopping): then the line is written here.
    let audited = sink.is_some_and(|s| s.send(v).is_ok());
    crate::emit!(
        PERMISSION_VIOLATION,
        link.map(|m| &*m.permission_violations),
        if !audited;
        service = "-",
        subject = %subject,
        operation = operation.as_str(),
        count = 1u64
    );
}

/// The audit task's line for `count` folded occurrences of `v`, counted
/// already by [`report`].
fn log(service: &str, v: &Violation, count: u64) {
    tracing::event!(
        PERMISSION_VIOLATION.level,
        event = PERMISSION_VIOLATION.name,
        service,
        subject = %v.subject,
        operation = v.operation.as_str(),
        count,
        "{}",
        PERMISSION_VIOLATION.message
    );
}

/// The running audit of one connection's violations.
pub struct Audit {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Audit {
    /// Asks the task to write what is pending and stop, without waiting.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Writes what is pending (whatever the rate) and stops; gives up
    /// after `deadline` (the connection may be gone).
    pub async fn finish(mut self, deadline: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(deadline, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// Starts [`audit`] on its own task.
pub fn spawn_audit(
    client: async_nats::Client,
    site: Site,
    service: String,
    rx: Receiver,
    fatal: Option<mpsc::UnboundedSender<Violation>>,
) -> Audit {
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(audit(client, site, service, rx, fatal, stop_rx));
    Audit {
        stop: Some(stop_tx),
        task,
    }
}

/// Logs each violation at ERROR and publishes it to `AUDIT` on the
/// service's own subject, rate limited (see [`super::audit_limit`]), and
/// hands every one on to `fatal` (the daemon stops on a refused write: it
/// would otherwise wait forever for acks). Runs until the senders are gone
/// or `stop` fires, then writes what is pending.
pub async fn audit(
    client: async_nats::Client,
    site: Site,
    service: String,
    mut rx: Receiver,
    fatal: Option<mpsc::UnboundedSender<Violation>>,
    mut stop: oneshot::Receiver<()>,
) {
    let subject = site.audit_subject(&service);
    let mut limiter = Limiter::new(BURST, PER_SECOND, Instant::now());
    let write = |e: Entry| {
        let client = client.clone();
        let subject = subject.clone();
        let site = site.clone();
        let service = service.clone();
        async move {
            log(&service, &e.violation, e.count);
            // Refusing our own audit subject would loop: logged only.
            if e.violation.subject == subject {
                tracing::error!(subject = %subject, "this service may not write its own audit subject; fix the ACL");
                return;
            }
            let record = AuditRecord::folded(&site, &service, &e.violation, e.count);
            match serde_json::to_vec(&record) {
                Ok(bytes) => {
                    if let Err(e) = client.publish(subject.clone(), bytes.into()).await {
                        tracing::error!(error = %e, "cannot publish the audit record of a permission violation");
                    }
                    let _ = client.flush().await;
                }
                Err(e) => tracing::error!(error = %e, "cannot encode an audit record"),
            }
        }
    };
    loop {
        let wait = limiter.next_due(Instant::now());
        let v = tokio::select! {
            v = rx.recv() => v,
            _ = &mut stop => None,
            _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))), if wait.is_some() => {
                for e in limiter.due(Instant::now()) {
                    write(e).await;
                }
                continue;
            }
        };
        let Some(v) = v else { break };
        if let Some(e) = limiter.admit(v.clone(), Instant::now()) {
            write(e).await;
        }
        if let Some(f) = &fatal {
            let _ = f.send(v);
        }
    }
    for e in limiter.drain() {
        write(e).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_messages() {
        assert_eq!(
            parse("Permissions Violation for Publish to \"$KV.presence.hall\""),
            Some(Violation {
                operation: Operation::Publish,
                subject: "$KV.presence.hall".to_owned()
            })
        );
        assert_eq!(
            parse("permissions violation for subscription to \"live.home.>\""),
            Some(Violation {
                operation: Operation::Subscribe,
                subject: "live.home.>".to_owned()
            })
        );
        assert_eq!(parse("authorization violation"), None);
        assert_eq!(parse("Permissions Violation for Publish to"), None);
    }

    #[test]
    fn audit_record_json_names_service_site_subject_operation_time() {
        let site = Site::new("home").unwrap();
        let v = Violation {
            operation: Operation::Publish,
            subject: "$KV.presence.x".to_owned(),
        };
        let r = AuditRecord::permission_violation(&site, "ingest", &v);
        let j: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(j["service"], "ingest");
        assert_eq!(j["site"], "home");
        assert_eq!(j["subject"], "$KV.presence.x");
        assert_eq!(j["operation"], "publish");
        assert!(j["time"].as_str().unwrap().ends_with('Z'));
    }
}
