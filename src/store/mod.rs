//! JetStream plumbing: connecting to the leaf, provisioning streams and
//! buckets, compare-and-set KV writes and rehydration, liveness leases.

pub mod config;
pub mod connect;
pub mod keeper;
pub mod kv;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod provision;
pub mod publish;
pub mod published;

pub use connect::{connect, connect_as, ConnectError};

/// A fresh consumer name `<purpose>-<unique>` for a reader's own
/// consumer: readers of `SENSORS` may create named consumers only, and
/// two of them must not share a name (creating one with another's name
/// would update it). The unique part is the NUID the client makes for
/// inboxes.
pub fn consumer_name(client: async_nats::Client, purpose: &str) -> String {
    let inbox = client.new_inbox();
    let unique = inbox.rsplit('.').next().unwrap_or_default();
    format!("{purpose}-{unique}")
}

/// JetStream context of the daemon and the commands that write like it:
/// enough acks in flight for pipelined batches, and a bounded wait for
/// each.
pub fn jetstream_context(
    client: async_nats::Client,
    nats: &config::NatsConfig,
) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new()
        .timeout(nats.request_timeout)
        .max_ack_inflight(publish::CONTEXT_INFLIGHT)
        .build(client)
}
