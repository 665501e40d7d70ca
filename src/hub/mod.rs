//! The hub side of a site: its mirrors on the 3-node hub cluster, their
//! health as the site sees it, and the nudge that makes them resume at once
//! after a leafnode link comes back.
//!
//! - [`mirrors`]: which mirrors a site has and provisioning them.
//! - [`health`]: lag, last contact and stall of each mirror (pure), plus
//!   the poller that reads them through the leaf link.
//! - [`catchup`]: the nudge after a link's return.
//! - [`config`]: the `[hub]` section and its checks.
//! - [`metrics`]: the mirrors' metrics and `/healthz` section.

pub mod catchup;
pub mod config;
pub mod health;
pub mod link;
pub mod metrics;
pub mod mirrors;

/// Starts the hub watch (component `hub`, not essential): the health of
/// this site's hub mirrors, read through the leaf's link, into metrics
/// and `/healthz`.
pub fn start(ctx: &mut crate::component::Ctx<'_>, cfg: config::HubWatch) {
    use crate::supervise::Stage;
    let own = std::sync::Arc::new(metrics::HubMetrics::default());
    ctx.metrics.add_collector(own.clone());
    let fut = health::run(
        ctx.client.clone(),
        ctx.site.clone(),
        cfg,
        own,
        ctx.sup.stop_flag(Stage::Work),
    );
    ctx.sup.spawn("hub", Stage::Work, false, async move {
        fut.await;
        Ok(())
    });
    ctx.sup.registry().running("hub");
}
