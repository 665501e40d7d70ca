//! presenced: presence detection for edge hosts, with all durable state in a
//! NATS JetStream leaf node.
//!
//! # Layout
//!
//! - [`naming`]: the only place subjects, streams, buckets and domains are
//!   spelled (the contract behind the ACLs).
//! - [`config`]: the TOML config and its validation.
//! - [`sources`]: MQTT (and later serial) input, turned into observations.
//! - [`ingest`]: observations into stream `SENSORS`, rejects into `REJECTED`.
//! - [`engine`]: pure evidence fusion, debounce and state machine, plus the
//!   runner that consumes `SENSORS` and writes KV `presence`/`debounce`.
//! - [`store`]: JetStream plumbing: provisioning, CAS writes, rehydration.
//! - [`archive`]: snapshots into the object store, uploaded to S3, and
//!   restore.
//! - [`supervise`]: one cancellation token and join set for every task of
//!   the daemon; failures named in health and metrics, fatal ones exit.
//! - [`http`], [`metrics`], [`systemd`]: the daemon's outward face;
//!   [`page`]: the live status page on the HTTP listener.
//! - [`client`], [`cmd`]: the state-first clients and the command sender.
//! - [`sandbox`]: a whole deployment on loopback (`presenced sandbox`).

pub mod acl;
pub mod archive;
pub mod client;
pub mod cmd;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod homeassistant;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod metrics;
pub mod naming;
pub mod natsconf;
pub mod observation;
pub mod page;
pub mod sandbox;
pub mod sources;
pub mod store;
pub mod supervise;
pub mod systemd;
pub mod time;
