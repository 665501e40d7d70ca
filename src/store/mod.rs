//! JetStream plumbing: connecting to the leaf, provisioning streams and
//! buckets, compare-and-set KV writes and rehydration, liveness leases.

pub mod connect;
pub mod kv;
pub mod leader;
pub mod lease;
pub mod provision;
pub mod publish;

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
