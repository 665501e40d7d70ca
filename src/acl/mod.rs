//! Single writer enforced by the server: NKEY identities, the ownership
//! map (who writes and reads which keyspace), the nats-server
//! authorization block generated from it, and the audit of violations.

pub mod access;
pub mod audit_limit;
pub mod explain;
pub mod hub;
/// NKEY identities live with the other secrets in the leaf layer.
pub use crate::base::secrets as identity;
pub mod published;
pub mod render;
pub mod violation;
