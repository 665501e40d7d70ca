//! The leaf layer: modules that import nothing from the rest of the crate,
//! so every other module may use them without forming a cycle (the test
//! `module_graph` in `tests/it/layout.rs` keeps it so).
//!
//! - [`naming`]: the only place subjects, streams, buckets and domains are
//!   spelled.
//! - [`ownership`]: keyspaces, the components that own them, lease bounds.
//! - [`problems`]: problems found in a config, gathered all at once.
//! - [`secrets`]: secret file paths, reading them, NKEY seeds.
//! - [`backoff`]: the one retry policy (capped exponential, with jitter).
//! - [`time`]: timestamps as stored.

pub mod backoff;
pub mod naming;
pub mod ownership;
pub mod problems;
pub mod secrets;
pub mod time;
