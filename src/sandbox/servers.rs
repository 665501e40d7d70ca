//! The sandbox's nats-server configs, rendered by the `nats-config`
//! renderer ([`crate::natsconf`]) so that the sandbox runs the leaf and hub
//! an edge host runs. Only the descriptions are made here.

use super::plan::{Plan, SitePlan};
use crate::natsconf::{Cluster, HubLink, HubNode, Leaf, LeafListen, Mqtt, SyncInterval};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("cannot render the nats-server config of {what}: {source}")]
pub struct RenderError {
    pub what: String,
    pub source: crate::natsconf::NatsConfError,
}

/// Cluster name of the sandbox's hub.
pub const HUB_CLUSTER: &str = "presenced-hub";

/// The description of hub node `index`: JetStream domain `hub`, routes to
/// the other nodes, a leafnode listener, the hub's authorization block.
pub fn hub_description(plan: &Plan, index: usize) -> Option<HubNode> {
    let h = plan.hub.get(index)?;
    let mut node = HubNode::new(&h.name, h.store_dir.clone());
    node.listen = format!("127.0.0.1:{}", h.client_port);
    node.monitor_port = h.monitor_port;
    node.log_file = Some(h.log_file.clone());
    node.cluster = Some(Cluster {
        name: HUB_CLUSTER.to_owned(),
        listen: format!("127.0.0.1:{}", h.cluster_port),
        routes: plan.hub_routes_except(index),
    });
    node.leafnodes = LeafListen {
        listen: format!("127.0.0.1:{}", h.leafnode_port),
        ..LeafListen::default()
    };
    node.authorization_include = Some(file_name(&h.authorization_path));
    Some(node)
}

/// The description of a site's leaf: JetStream domain `leaf-<site>`, the
/// leafnode remote to every hub node, its MQTT listener, the site's ACL.
pub fn leaf_description(plan: &Plan, site: &SitePlan) -> Leaf {
    let mut leaf = Leaf::new(&site.site, site.leaf.store_dir.clone());
    leaf.server_name = Some(site.leaf.server_name.clone());
    leaf.listen = site.leaf.client_url().replace("nats://", "");
    leaf.monitor_port = site.leaf.monitor_port;
    leaf.log_file = Some(site.leaf.log_file.clone());
    // The edge default (sync every second) as on a real site.
    leaf.jetstream.sync_interval = SyncInterval::default();
    let mut hub = HubLink::new(plan.hub_leafnode_urls());
    hub.nkey_include = Some(file_name(&site.leaf.hub_nkey_include));
    hub.reconnect = Duration::from_secs(1);
    leaf.hub = Some(hub);
    leaf.mqtt = Some(Mqtt {
        listen: format!("127.0.0.1:{}", site.leaf.mqtt_port),
    });
    leaf.authorization_include = Some(file_name(&site.leaf.authorization_path));
    leaf
}

/// An include as nats-server resolves it: relative to the directory of the
/// config, where the plan puts every included file.
fn file_name(path: &Path) -> PathBuf {
    path.file_name().map(PathBuf::from).unwrap_or_default()
}

/// Config text of hub node `index`.
pub fn hub_node(plan: &Plan, index: usize) -> Result<String, RenderError> {
    let what = plan
        .hub
        .get(index)
        .map_or_else(|| format!("hub node {index}"), |h| h.name.clone());
    let node = hub_description(plan, index).ok_or_else(|| RenderError {
        what: what.clone(),
        source: crate::natsconf::NatsConfError::Invalid {
            origin: "sandbox plan".to_owned(),
            problems: vec![crate::natsconf::Problem {
                path: "hub".to_owned(),
                reason: format!("the plan has {} hub nodes", plan.hub.len()),
            }],
        },
    })?;
    node.render().map_err(|source| RenderError { what, source })
}

/// Config text of a site's leaf.
pub fn leaf(plan: &Plan, site: &SitePlan) -> Result<String, RenderError> {
    leaf_description(plan, site)
        .render()
        .map_err(|source| RenderError {
            what: site.leaf.server_name.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::plan::{ports_needed, Input};

    #[test]
    fn configs_render_with_every_part_the_sandbox_needs() {
        let ports: Vec<u16> = (30_000..30_000 + ports_needed(2) as u16).collect();
        let p = Plan::new(
            &Input {
                sites: 2,
                dir: PathBuf::from("/tmp/sbx"),
            },
            &ports,
        )
        .unwrap();
        let h = hub_node(&p, 1).unwrap();
        assert!(h.contains("domain: \"hub\""), "{h}");
        assert!(h.contains(&p.hub[0].route_url()) && h.contains(&p.hub[2].route_url()));
        assert!(!h.contains(&p.hub[1].route_url()), "{h}");
        assert!(h.contains(&format!("127.0.0.1:{}", p.hub[1].leafnode_port)));
        assert!(h.contains("include \"authorization.conf\""), "{h}");
        let l = leaf(&p, &p.sites[1]).unwrap();
        assert!(l.contains("domain: \"leaf-site-2\""), "{l}");
        assert!(l.contains(&format!("127.0.0.1:{}", p.sites[1].leaf.mqtt_port)));
        for u in p.hub_leafnode_urls() {
            assert!(l.contains(&u), "{l}");
        }
        assert!(
            l.contains("include \"leafnode-nkey.conf\"")
                && l.contains("include \"authorization.conf\""),
            "{l}"
        );
        assert!(hub_node(&p, 7).is_err());
    }
}
