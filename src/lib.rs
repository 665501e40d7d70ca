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
//! - [`client`]: the state-first clients (`watch`, `get`, `status`).
//! - [`replay`]: the pure engine over recorded readings, offline: replay a
//!   candidate config, tune likelihoods from labelled time, the HTML report.
//! - [`sandbox`]: a whole deployment on loopback (`presenced sandbox`).
//! - [`acl`]: the ownership map (access file), NKEY identities, the
//!   permissions generated from them, and the server's refusals explained.
//! - [`hub`]: the hub's mirrors of each site, their provisioning and health.
//! - [`natsconf`]: the one writer of nats-server config: leaf, hub node
//!   and the `authorization` blocks [`acl`] describes.
//!
//! The command line is not here: the binary's `src/cli/` holds one file
//! per subcommand (its clap arguments and a thin call into this library).

pub mod acl;
pub mod archive;
pub mod client;
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
pub mod replay;
pub mod sandbox;
pub mod sources;
pub mod store;
pub mod supervise;
pub mod systemd;
pub mod time;
