//! The engine's pipelined writes: one batch's `EVENTS` publishes stay in
//! flight while the next batch goes through the core, and that batch's
//! KV compare-and-set writes go out together with the next batch's
//! `EVENTS` publishes.
//!
//! Why: written one wave after the other (`EVENTS`, wait; KV, wait; then
//! the next batch), every batch cost two rounds of writes and the engine
//! and nats-server took turns, the engine idle while the server stored,
//! the server idle (for the engine) while it decoded and applied. Here a
//! batch costs about one round and both can work at once (whether that
//! raises the rate on two shared cores is the benchmark's to say:
//! docs/PERFORMANCE.md). What must not change is what is durable when:
//! for every batch its transitions are in `EVENTS` before any zone state
//! that contains them is written to KV, and its last message is
//! acknowledged only once those KV writes are durable. So the stages of
//! one batch stay in order and only different batches' stages overlap:
//!
//! ```text
//! batch n:    core ─ EVENTS ────────┐ KV ──── ack
//! batch n+1:          core ─────────┴ EVENTS ────┐ KV ─── ack
//! batch n+2:                           core ─────┴ EVENTS ...
//! ```
//!
//! The KV values are encoded when the core applied the batch (the zone
//! state moves on with the next one) and each key's expected revision is
//! filled in when its write is sent, after the previous batch's writes of
//! the same keys were acknowledged: the revisions chain. A crash anywhere
//! leaves `EVENTS` at most two batches ahead of KV instead of one; the
//! replay after a restart regenerates those transitions with the same
//! `Nats-Msg-Id`s, and `EVENTS` drops them as duplicates, as it did for
//! one batch. With no next batch waiting, a batch completes as soon as
//! its `EVENTS` acks are in (its KV writes could not go out earlier), so
//! a lone reading waits no longer than before. Failures are handled by
//! the runner's sequential commit ([`super::runner`]): it writes the
//! batches not yet durable as one.

use super::{Pending, Transition};
use crate::store::publish::WINDOW;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self};
use bytes::Bytes;
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;

/// `EVENTS` acks one batch may leave outstanding while the engine goes on
/// with the next (a batch with more reads the older ones while sending).
/// At its peak the engine then holds this many, plus a window per bucket
/// for the KV writes ([`crate::store::kv::write_batch`]), beside ingest's
/// window: half a window below the context's in-flight limit
/// ([`crate::store::publish::CONTEXT_INFLIGHT`]), which leaves room for
/// the lease's renewals and the rest.
pub(super) const EVENTS_AHEAD: usize = WINDOW / 2;

/// One batch's writes, planned when the core applied it.
pub(super) struct Commit {
    /// In the order the core emitted them.
    pub transitions: Vec<Transition>,
    /// `(subject, message)` of each transition, same order.
    pub events: Vec<(String, PublishMessage)>,
    /// Zones whose state the batch changed.
    pub dirty: BTreeSet<String>,
    /// `presence` value of each dirty zone as of this batch.
    pub presence: Vec<(String, Bytes)>,
    /// `debounce` writes: zone, value (`None` deletes the key) and the
    /// pending deadline it records.
    pub debounce: Vec<(String, Option<Bytes>, Option<Pending>)>,
    /// The batch's last message: acknowledging it (ack policy "all")
    /// acknowledges the batch.
    pub ack: Option<jetstream::Message>,
    /// False if a value did not encode (never seen): the runner commits
    /// such a batch sequentially.
    pub encoded: bool,
}

impl Commit {
    /// The debounce entry this commit leaves for `zone`, if it writes one.
    pub fn debounce_of(&self, zone: &str) -> Option<Option<Pending>> {
        self.debounce
            .iter()
            .find(|(z, _, _)| z == zone)
            .map(|(_, _, p)| *p)
    }
}

/// The acks of a commit's `EVENTS` publishes, in order.
type Acks = Vec<Result<PublishAck, PublishError>>;

/// A commit whose `EVENTS` publishes are out, their acks not yet read.
pub(super) struct InFlight {
    pub commit: Commit,
    /// Acks read already (the window slid past them), in order.
    settled: Acks,
    /// The rest, read in order; polled by [`InFlight::stored`] while the
    /// runner waits for the next batch, resumed by [`InFlight::settle`].
    rest: Pin<Box<dyn Future<Output = Acks> + Send>>,
    /// `rest`'s output once it completed.
    done: Option<Acks>,
    has_events: bool,
}

impl InFlight {
    /// Sends the commit's `EVENTS` publishes, leaving at most
    /// [`EVENTS_AHEAD`] acks unread (older ones are read first, as
    /// [`crate::store::publish::publish_all`] does).
    pub async fn send(js: &jetstream::Context, mut commit: Commit) -> InFlight {
        let messages = std::mem::take(&mut commit.events);
        let has_events = !messages.is_empty();
        let mut settled = Vec::new();
        let mut waiting = VecDeque::with_capacity(messages.len().min(EVENTS_AHEAD));
        for (subject, msg) in messages {
            if waiting.len() >= EVENTS_AHEAD {
                if let Some(fut) = waiting.pop_front() {
                    settled.push(settle(fut).await);
                }
            }
            waiting.push_back(js.send_publish(subject, msg).await);
        }
        InFlight {
            commit,
            settled,
            rest: Box::pin(futures::future::join_all(waiting.into_iter().map(settle))),
            done: None,
            has_events,
        }
    }

    /// Whether the commit published anything to `EVENTS`.
    pub fn has_events(&self) -> bool {
        self.has_events
    }

    /// Completes once every `EVENTS` ack is in (then the commit's KV
    /// writes may go out). Cancel-safe: dropped before completing, the
    /// acks read so far are kept for the next call.
    pub async fn stored(&mut self) {
        if self.done.is_none() {
            self.done = Some(self.rest.as_mut().await);
        }
    }

    /// Reads every ack: one result per transition, in order.
    pub async fn settle(mut self) -> (Commit, Acks) {
        self.stored().await;
        let mut results = self.settled;
        results.extend(self.done.unwrap_or_default());
        (self.commit, results)
    }
}

/// [`InFlight::stored`] of the commit in flight; never completes without
/// one.
pub(super) async fn stored(in_flight: &mut Option<InFlight>) {
    match in_flight {
        Some(f) => f.stored().await,
        None => std::future::pending().await,
    }
}

async fn settle(sent: Result<PublishAckFuture, PublishError>) -> Result<PublishAck, PublishError> {
    sent?.await
}
