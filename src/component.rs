//! What the daemon hands every component it starts.
//!
//! A component (sources and ingest, engine, archiver, lease, Home
//! Assistant output, hub watch, HTTP) has one `start` function taking a
//! [`Ctx`] and its own config section: it registers its metrics with
//! [`Ctx::metrics`], spawns its task under [`Ctx::sup`] (whose stage
//! flags are the shutdown signal), and returns whatever the components
//! started after it need. The daemon starts each with one line
//! (docs/ARCHITECTURE.md, "Adding a component").

use crate::metrics::Metrics;
use crate::naming::Site;
use crate::supervise::Supervisor;
use async_nats::jetstream;
use std::sync::Arc;

/// The shared context of a component's start.
pub struct Ctx<'a> {
    /// This instance's site.
    pub site: &'a Site,
    /// This service's name in the ownership map (`service`).
    pub service: &'a str,
    /// The connection to the leaf, and its JetStream context.
    pub client: &'a async_nats::Client,
    pub js: &'a jetstream::Context,
    /// Where the component registers its metrics.
    pub metrics: &'a Arc<Metrics>,
    /// Spawns and stops the component's tasks; its stage flags and
    /// tokens are the shutdown signal.
    pub sup: &'a mut Supervisor,
}
