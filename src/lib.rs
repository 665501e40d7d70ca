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
//! - [`metrics`]: the registry and its rendering, in plain values; it
//!   declares no family: every component declares its own metrics
//!   (`<component>::metrics`, readiness in `supervise::metrics`) and
//!   registers a collector.
//! - [`observation`], [`supervise`] (one cancellation token and join set
//!   for every task; failures named in health and metrics, fatal ones
//!   exit; the `[health]` section), [`systemd`], [`natsconf`] (nats-server
//!   configuration).
//! - [`component`]: the context every component's `start` takes (site,
//!   service, NATS client, metrics, supervisor); [`logging`]: the `[log]`
//!   section and the tracing subscriber.
//! - [`sources`]: MQTT, serial and ESPresense input turned into
//!   observations, with their config sections and checks
//!   (`sources::config`, `sources::check`).
//! - [`store`]: JetStream plumbing: connecting (with an event hook, and
//!   its `[nats]` section), provisioning, CAS writes, leases (started by
//!   `store::keeper`), the published ownership table; the link's and the
//!   lease's metrics (`store::metrics`).
//! - [`hub`]: the hub's mirrors of this site and their health (with its
//!   `[hub]` section, its metrics, and `hub::start`).
//! - [`acl`]: the access file, the nats-server `authorization` it renders,
//!   permission violations (wired into the connection's event hook).
//! - [`ingest`]: observations into stream `SENSORS`, rejects into
//!   `REJECTED`; `ingest::start` starts the sources, ingest and the
//!   sources' gauges, and registers ingest's metrics (`ingest::metrics`).
//! - [`engine`]: pure evidence fusion, debounce and state machine, plus the
//!   runner that consumes `SENSORS` and writes KV `presence`/`debounce`
//!   (started under the leader lease by `engine::start`), its metrics
//!   (`engine::metrics`), and the zones' config section (`engine::config`).
//! - [`config`]: the top TOML config, holding the components' sections,
//!   parsed with every problem at once, and the checks that span sections.
//! - [`homeassistant`], [`http`] (`/healthz`, `/metrics`, the `[http]`
//!   section), [`archive`] (snapshots into the object store, uploaded to
//!   S3, and restore; the `[archive]` section; the archive commands,
//!   returning values for the CLI to print). Each has a `start`.
//! - [`client`]: the state-first clients (`watch`, `get`, `status`) and
//!   the command sender; [`sandbox`]: a whole deployment on loopback
//!   (`presenced sandbox`).
//! - [`page`]: the live status page on the HTTP listener and the fleet
//!   page.
//! - [`replay`]: the pure engine over recorded readings, offline: replay a
//!   candidate config, tune likelihoods from labelled time, the HTML report.
//! - [`daemon`]: starts the configured components, one `start` call each
//!   (docs/ARCHITECTURE.md, "Adding a component"), sends READY, reloads
//!   on SIGHUP, drains on shutdown.
//!
//! The command line is not here: the binary's `src/cli/` holds one file
//! per subcommand (its clap arguments and a thin call into this library).

pub mod acl;
pub mod archive;
pub mod base;
pub mod client;
pub mod component;
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
