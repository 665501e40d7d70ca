//! JetStream plumbing: connecting to the leaf, provisioning streams and
//! buckets, compare-and-set KV writes and rehydration, liveness leases.

pub mod connect;
pub mod kv;
pub mod lease;
pub mod provision;
pub mod publish;

pub use connect::{connect, connect_as, ConnectError};
