//! Reading AUDIT as an operator would: every record on one subject, in
//! order. The last message alone is not enough: a service's subject also
//! carries its takeover records, which may land after a violation.

use async_nats::jetstream;
use futures::StreamExt;
use presenced::acl::violation::AuditRecord;
use presenced::naming;
use std::time::Duration;

/// The permission-violation records on `subject` of AUDIT, in order;
/// other records there (takeovers, a test's own plain payloads) are
/// skipped.
pub async fn violation_records(js: &jetstream::Context, subject: &str) -> Vec<AuditRecord> {
    let stream = js
        .get_stream(naming::AUDIT_STREAM)
        .await
        .expect("the AUDIT stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            ..Default::default()
        })
        .await
        .expect("an ordered consumer on AUDIT");
    let mut messages = consumer.messages().await.expect("AUDIT messages");
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
        let m = m.expect("an AUDIT message");
        if let Ok(r) = serde_json::from_slice::<AuditRecord>(&m.payload) {
            if r.kind == "permission_violation" {
                out.push(r);
            }
        }
    }
    out
}
