//! Single writer enforced by the server: NKEY identities, the ownership
//! map (who writes and reads which keyspace), the nats-server
//! authorization block generated from it, and the audit of violations.

pub mod access;
pub mod audit_limit;
pub mod explain;
pub mod hub;
pub mod identity;
pub mod published;
pub mod render;
pub mod violation;
