//! A 3-node hub cluster (domain `hub`, leafnode listener on every node) and
//! the leaf of a site linked to it, as the NixOS modules run them.

use super::nats::{ClusterPorts, NatsOptions, NatsServer};
use super::{free_port, http_get, wait, Proxy};
use presenced::naming::{Site, HUB_DOMAIN};
use std::time::Duration;

/// How long a fresh cluster may take to elect its JetStream meta leader on
/// a loaded machine.
const CLUSTER_READY: Duration = Duration::from_secs(30);

/// Three clustered hub nodes; each killed on `Drop`.
pub struct Hub {
    pub nodes: Vec<NatsServer>,
}

impl Hub {
    /// Starts three nodes routed to each other and waits until every node
    /// reports JetStream healthy (meta leader elected).
    pub fn start() -> Hub {
        Hub::start_with(3)
    }

    /// `n` clustered nodes (`1`: a single node, no cluster).
    pub fn start_with(n: usize) -> Hub {
        Hub::start_authorized(n, "")
    }

    /// `n` clustered nodes, each with `authorization` (the block
    /// `presenced acl-hub` prints) in its config, as the NixOS hub module
    /// deploys them: leaves must link as their site's leafnode identity
    /// ([`leaf_of_as`]) and clients connect as the hub's admin.
    pub fn start_authorized(n: usize, authorization: &str) -> Hub {
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let nodes = (0..n)
            .map(|i| {
                NatsServer::start(NatsOptions {
                    domain: Some(HUB_DOMAIN.into()),
                    leafnode_listen: true,
                    server_name: Some(format!("hub-{}", i + 1)),
                    extra: authorization.to_owned(),
                    cluster: (n > 1).then(|| ClusterPorts {
                        port: route_ports[i],
                        routes: route_ports
                            .iter()
                            .enumerate()
                            .filter(|&(j, _)| j != i)
                            .map(|(_, &p)| p)
                            .collect(),
                    }),
                    ..Default::default()
                })
            })
            .collect();
        let hub = Hub { nodes };
        hub.wait_healthy();
        hub
    }

    /// Waits until every running node's `/healthz` is 200 (JetStream meta
    /// leader known, streams current).
    pub fn wait_healthy(&self) {
        for node in &self.nodes {
            if node.pid() == 0 {
                continue;
            }
            wait::wait_until(
                &format!("hub node on port {} is healthy", node.port),
                CLUSTER_READY,
                || matches!(http_get(node.monitor_addr(), "/healthz"), Some((200, _))),
            );
        }
    }

    /// Leafnode URLs of every node (a leaf lists them all).
    pub fn leafnode_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.leafnode_url().expect("hub nodes listen for leafnodes"))
            .collect()
    }

    /// Client URLs of every node (async-nats takes the list and fails
    /// over between them).
    pub fn client_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// One [`Proxy`] in front of each node's leafnode port: link a leaf
    /// to [`LinkProxies::urls`] and cut its whole link at once.
    pub fn link_proxies(&self) -> LinkProxies {
        LinkProxies(
            self.nodes
                .iter()
                .map(|n| {
                    let port = n.leafnode_port.expect("hub nodes listen for leafnodes");
                    Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                })
                .collect(),
        )
    }

    /// Number of leafnode connections all nodes together hold.
    pub fn leafnode_count(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.pid() != 0)
            .filter_map(|n| http_get(n.monitor_addr(), "/leafz"))
            .filter_map(|(_, body)| {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                v["leafnodes"].as_u64()
            })
            .sum::<u64>() as usize
    }
}

/// Proxies in front of every hub node: a site's whole leafnode link.
pub struct LinkProxies(pub Vec<Proxy>);

impl LinkProxies {
    pub fn urls(&self) -> Vec<String> {
        self.0.iter().map(Proxy::leaf_url).collect()
    }

    pub fn cut(&self) {
        for p in &self.0 {
            p.cut();
        }
    }

    pub fn restore(&self) {
        for p in &self.0 {
            p.restore();
        }
    }
}

/// The leaf of `site` (domain `leaf-<site>`) linked to the given leafnode
/// URLs (a hub's, or a [`super::proxy::Proxy`] in front of one).
pub fn leaf_of(site: &Site, remotes: Vec<String>) -> NatsServer {
    NatsServer::start(NatsOptions {
        domain: Some(site.leaf_domain()),
        leaf_remotes: remotes,
        server_name: Some(site.leaf_domain()),
        ..Default::default()
    })
}

/// [`leaf_of`], the link authenticating as the site's leafnode identity
/// (`seed`), as a hub under `presenced acl-hub` requires.
pub fn leaf_of_as(site: &Site, remotes: Vec<String>, seed: &str) -> NatsServer {
    NatsServer::start(NatsOptions {
        domain: Some(site.leaf_domain()),
        leaf_remotes: remotes,
        server_name: Some(site.leaf_domain()),
        remote_seed: Some(seed.to_owned()),
        ..Default::default()
    })
}
