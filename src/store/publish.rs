//! Pipelined JetStream publishing with a bounded window.
//!
//! async-nats holds a permit for every ack future until it is awaited or
//! dropped, so sending more publishes than the context's in-flight limit
//! before awaiting any would wait forever. This sends with at most
//! `window` acks outstanding (a sliding window) and returns the results in
//! input order.

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, message::PublishMessage};
use std::collections::VecDeque;

/// Acks outstanding per pipelined call. Two callers (ingest and engine)
/// share one context, whose limit is set well above twice this.
pub const WINDOW: usize = 1024;

/// In-flight limit for the daemon's JetStream context.
pub const CONTEXT_INFLIGHT: usize = 4 * WINDOW;

pub async fn publish_all(
    js: &jetstream::Context,
    messages: Vec<(String, PublishMessage)>,
) -> Vec<Result<PublishAck, PublishError>> {
    let mut results = Vec::new();
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    for (subject, msg) in messages {
        if in_flight.len() >= WINDOW {
            if let Some(fut) = in_flight.pop_front() {
                results.push(settle(fut).await);
            }
        }
        in_flight.push_back(js.send_publish(subject, msg).await);
    }
    for fut in in_flight {
        results.push(settle(fut).await);
    }
    results
}

async fn settle(
    sent: Result<jetstream::context::PublishAckFuture, PublishError>,
) -> Result<PublishAck, PublishError> {
    sent?.await
}
