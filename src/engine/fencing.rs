//! The engine's permission to write under a leader lease (several engine
//! instances per site, `store::leader`): the runner asks [`Fencing`]
//! before every write, and its `EVENTS` messages carry the server-side
//! fence.
//!
//! Three fences, from the cheapest to the one that cannot be raced:
//!
//! - the lease's own ([`Fence::valid`]: the last acknowledged renewal is
//!   younger than the TTL less a margin, by the monotonic clock);
//! - KV: a new holder rewrites every zone at takeover, so a former
//!   holder's compare-and-set writes fail (the runner reports that here
//!   with [`Fencing::stop`]);
//! - `EVENTS`: the new holder's first write is its takeover record, and
//!   every `EVENTS` publish expects the holder's own record to be the
//!   last under `events.<site>.takeover.<service>`
//!   (`Nats-Expected-Last-Subject-Sequence` with
//!   `Nats-Expected-Last-Subject-Sequence-Subject`), so the server
//!   refuses a former holder's publish even one sent after its check.
//!
//! Without a lease (`Runner::start`) every write is allowed and `EVENTS`
//! messages carry no expectation.

use crate::base::backoff::Backoff;
use crate::naming::{self, Site};
use crate::store::leader::{Fence, TakeoverRecord};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use std::time::Duration;

/// `Nats-Expected-Last-Subject-Sequence` checks the last sequence under
/// this subject instead of the published one (nats-server 2.11 and later).
const EXPECTED_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// One runner's write permission.
pub(super) struct Fencing {
    /// The leader lease's fence; `None` for an engine without a lease.
    lease: Option<Fence>,
    /// Set once a write was refused by any fence: nothing more is
    /// written and the run loop returns.
    fenced: bool,
    /// (takeover subject, sequence of this tenure's record in `EVENTS`).
    events: Option<(String, u64)>,
}

impl Fencing {
    pub(super) fn new(lease: Option<Fence>) -> Fencing {
        Fencing {
            lease,
            fenced: false,
            events: None,
        }
    }

    /// Whether this runner writes under a leader lease.
    pub(super) fn leased(&self) -> bool {
        self.lease.is_some()
    }

    pub(super) fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether writes may go out: always without a lease; with one,
    /// while its fence is valid. Records a refusal.
    pub(super) fn may_write(&mut self) -> bool {
        if self.fenced {
            return false;
        }
        if self.lease.as_ref().is_some_and(|f| !f.valid()) {
            self.fenced = true;
        }
        !self.fenced
    }

    /// Another writer showed itself: close the lease's fence (the keeper
    /// steps down on its next round) and write nothing more.
    pub(super) fn stop(&mut self) {
        if let Some(f) = &self.lease {
            f.revoke();
        }
        self.fenced = true;
    }

    /// Records this tenure's takeover in `EVENTS`
    /// (`events.<site>.takeover.<service>`): the new holder's first write,
    /// before it reads any state, so the stream reads: the old holder's
    /// transitions, the takeover, the new holder's; and from here on the
    /// server refuses the old holder's `EVENTS` publishes. Retried until
    /// stored or the lease is lost (then fenced); the id makes a retry a
    /// duplicate, whose ack carries the first copy's sequence.
    pub(super) async fn begin(&mut self, js: &jetstream::Context, site: &Site) {
        let Some(lease) = self.lease.clone() else {
            return;
        };
        let Some(record) = lease.tenure() else {
            tracing::error!("engine started under a lease without a takeover record; not writing");
            self.fenced = true;
            return;
        };
        let subject = site.takeover_subject(&record.service);
        let id = naming::takeover_msg_id(site, &record.service, record.revision);
        let Some(body) = encode(&record) else {
            self.fenced = true;
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            if !lease.valid() {
                tracing::warn!("takeover record not written: the leader lease was lost first");
                self.fenced = true;
                return;
            }
            let msg = PublishMessage::build()
                .payload(body.clone())
                .message_id(id.clone());
            let sent = async { js.send_publish(subject.clone(), msg).await?.await };
            match sent.await {
                Ok(ack) => {
                    tracing::info!(subject = %subject, sequence = ack.sequence, from = ?record.from, to = %record.to, revision = record.revision, "takeover recorded in EVENTS");
                    self.events = Some((subject, ack.sequence));
                    return;
                }
                Err(e) => {
                    tracing::warn!(subject = %subject, error = %e, "cannot record the takeover in EVENTS; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// An `EVENTS` message of this holder: with its takeover record's
    /// sequence as the expected last one under the takeover subject.
    pub(super) fn events_message(&self, payload: Bytes, id: String) -> PublishMessage {
        let msg = PublishMessage::build().payload(payload).message_id(id);
        match &self.events {
            Some((subject, seq)) => msg
                .expected_last_subject_sequence(*seq)
                .header(EXPECTED_SUBJECT, subject.as_str()),
            None => msg,
        }
    }

    /// Whether a failed `EVENTS` publish was the server-side fence's
    /// refusal (then call [`Fencing::events_refused`]).
    pub(super) fn is_fence_refusal(&self, kind: PublishErrorKind) -> bool {
        self.events.is_some() && kind == PublishErrorKind::WrongLastSequence
    }

    /// `EVENTS` refused a publish for its expected takeover sequence:
    /// another holder recorded a takeover after ours (stop writing), or
    /// our record is gone (aged out after `EVENTS`' max age, or purged by
    /// hand), then it is recorded again, on the condition that the
    /// takeover subject is empty, so a newer holder's record still wins.
    pub(super) async fn events_refused(&mut self, js: &jetstream::Context, site: &Site) {
        let Some((subject, seq)) = self.events.clone() else {
            return;
        };
        let Some(record) = self.lease.as_ref().and_then(Fence::tenure) else {
            return;
        };
        let Some(body) = encode(&record) else {
            return;
        };
        let id = format!(
            "{}.again.{seq}",
            naming::takeover_msg_id(site, &record.service, record.revision)
        );
        let msg = PublishMessage::build()
            .payload(body)
            .message_id(id)
            .expected_last_subject_sequence(0);
        let ack = async { js.send_publish(subject.clone(), msg).await?.await };
        match ack.await {
            Ok(ack) => {
                tracing::warn!(subject = %subject, was = seq, now = ack.sequence, "this holder's takeover record is gone from EVENTS (aged out or purged): recorded again");
                self.events = Some((subject, ack.sequence));
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                tracing::warn!(subject = %subject, expected = seq, "EVENTS refused a publish: another engine recorded a takeover after this one; this instance stops writing and stands by");
                self.stop();
            }
            Err(e) => {
                tracing::warn!(subject = %subject, error = %e, "cannot check the takeover record in EVENTS; retrying");
            }
        }
    }
}

fn encode(record: &TakeoverRecord) -> Option<Bytes> {
    match serde_json::to_vec(record) {
        Ok(b) => Some(Bytes::from(b)),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the takeover record");
            None
        }
    }
}
