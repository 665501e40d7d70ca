//! The sandbox's nats-server configs, rendered by the `nats-config`
//! renderer so that the sandbox runs the leaf and hub an edge host runs.

use super::plan::{Plan, SitePlan};

#[derive(Debug, thiserror::Error)]
#[error("cannot render the nats-server config of {what}: {message}")]
pub struct RenderError {
    pub what: String,
    pub message: String,
}

/// Config of hub node `index`: JetStream domain `hub`, routes to the other
/// nodes, a leafnode listener, the hub's authorization block.
pub fn hub_node(plan: &Plan, index: usize) -> Result<String, RenderError> {
    let what = plan
        .hub
        .get(index)
        .map(|h| h.name.clone())
        .unwrap_or_default();
    Err(RenderError {
        what,
        message: "the nats-config renderer is not available in this build".to_owned(),
    })
}

/// Config of a site's leaf: JetStream domain `leaf-<site>`, the leafnode
/// remote to every hub node, its MQTT listener, the site's authorization.
pub fn leaf(plan: &Plan, site: &SitePlan) -> Result<String, RenderError> {
    let _ = plan;
    Err(RenderError {
        what: site.leaf.server_name.clone(),
        message: "the nats-config renderer is not available in this build".to_owned(),
    })
}
