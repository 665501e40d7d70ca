//! presenced: presence detection for edge hosts, with all durable state in a
//! NATS JetStream leaf node.
//!
//! # Layout
//!
//! Top-level modules import each other in one direction only (the test
//! `layout` in `tests/it/` fails on a cycle). From the bottom up:
//!
//! - [`base`]: the leaf layer, importing nothing from the crate: [`naming`]
//!   (the only place subjects, streams, buckets and domains are spelled),
//!   ownership (keyspaces, components, lease bounds), secrets, the one
//!   backoff policy, [`time`].
//! - [`observation`], [`supervise`] (one cancellation token and join set
//!   for every task; failures named in health and metrics, fatal ones
//!   exit), [`systemd`], [`natsconf`] (nats-server configuration).
//! - [`metrics`]: counters and gauges in plain values; components hand it
//!   readings or register a collector.
//! - [`sources`]: MQTT, serial and ESPresense input turned into
//!   observations, with their config sections and checks
//!   (`sources::config`, `sources::check`).
//! - [`store`]: JetStream plumbing: connecting (with an event hook, and
//!   its `[nats]` section), provisioning, CAS writes, leases, the
//!   published ownership table.
//! - [`hub`]: the hub's mirrors of this site and their health (with its
//!   `[hub]` section).
//! - [`acl`]: the access file, the nats-server `authorization` it renders,
//!   permission violations (wired into the connection's event hook).
//! - [`ingest`]: observations into stream `SENSORS`, rejects into `REJECTED`.
//! - [`engine`]: pure evidence fusion, debounce and state machine, plus the
//!   runner that consumes `SENSORS` and writes KV `presence`/`debounce`,
//!   and the zones' config section (`engine::config`).
//! - [`config`]: the top TOML config, holding the components' sections,
//!   parsed with every problem at once, and the checks that span sections.
//! - [`homeassistant`], [`http`], [`archive`] (snapshots into the object
//!   store, uploaded to S3, and restore).
//! - [`client`]: the state-first clients (`watch`, `get`, `status`) and
//!   the command sender; [`sandbox`]: a whole deployment on loopback
//!   (`presenced sandbox`).
//! - [`page`]: the live status page on the HTTP listener and the fleet
//!   page.
//! - [`replay`]: the pure engine over recorded readings, offline: replay a
//!   candidate config, tune likelihoods from labelled time, the HTML report.
//! - [`daemon`]: starts the configured components.
//!
//! The command line is not here: the binary's `src/cli/` holds one file
//! per subcommand (its clap arguments and a thin call into this library).

pub mod acl;
pub mod archive;
pub mod base;
pub mod client;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod homeassistant;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod logging;
pub mod metrics;
pub mod natsconf;
pub mod observation;
pub mod page;
pub mod replay;
pub mod sandbox;
pub mod sources;
pub mod store;
pub mod supervise;
pub mod systemd;

// The leaf modules every other module uses, at their old paths.
pub use base::{naming, time};
