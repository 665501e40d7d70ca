//! A 3-node hub cluster (domain `hub`, leafnode listener on every node) and
//! the leaf of a site linked to it, as the NixOS modules run them.

use super::nats::{ClusterPorts, NatsOptions, NatsServer};
use super::process::ProcError;
use super::{http_get, wait, Proxy};
use presenced::naming::{Site, HUB_DOMAIN};
use presenced_procs::{free_ports, retry_on_taken_port};
use std::time::Duration;

/// How long a fresh cluster may take to elect its JetStream meta leader on
/// a loaded machine.
const CLUSTER_READY: Duration = Duration::from_secs(30);

/// Three clustered hub nodes; each killed on `Drop`.
pub struct Hub {
    pub nodes: Vec<NatsServer>,
    /// Why each earlier start of the cluster was abandoned (a route port
    /// taken), for the harness's own test.
    pub restarted_because: Vec<String>,
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
        Hub::start_first_on(n, authorization, None)
    }

    /// [`Hub::start_authorized`], the first node's route port `first` on
    /// the first attempt: a test holds a port, hands it here, and sees the
    /// cluster start on others.
    ///
    /// The route ports are picked ahead (each node lists its peers'), so
    /// another process may take one before its node binds it: the node
    /// says `address already in use` and exits, and the whole cluster is
    /// started again on fresh route ports.
    pub fn start_first_on(n: usize, authorization: &str, first: Option<u16>) -> Hub {
        let mut restarted_because = Vec::new();
        let hub = retry_on_taken_port(
            |attempt| {
                let mut route_ports = free_ports(n).expect("free route ports on 127.0.0.1");
                if let Some(port) = first.filter(|_| attempt == 1) {
                    route_ports[0] = port;
                }
                let nodes = (0..n)
                    .map(|i| {
                        NatsServer::try_start(NatsOptions {
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
                    .collect::<Result<Vec<_>, _>>()?;
                let mut hub = Hub {
                    nodes,
                    restarted_because: Vec::new(),
                };
                hub.wait_started()?;
                Ok(hub)
            },
            ProcError::port_taken,
            |_, why| {
                eprintln!("hub: {why}; starting the cluster again on fresh route ports");
                restarted_because.push(why.to_owned());
            },
        )
        .unwrap_or_else(|error| panic!("hub: {error}"));
        Hub {
            restarted_because,
            ..hub
        }
    }

    /// Waits until every node is healthy, failing with the first node
    /// that exited meanwhile (a route port taken makes a node exit after
    /// it answered: the routes are bound after the client port).
    fn wait_started(&mut self) -> Result<(), ProcError> {
        let start = std::time::Instant::now();
        loop {
            let healthy = self
                .nodes
                .iter()
                .all(|node| matches!(http_get(node.monitor_addr(), "/healthz"), Some((200, _))));
            for node in &mut self.nodes {
                if let Some(error) = node.exited() {
                    return Err(error);
                }
            }
            if healthy {
                return Ok(());
            }
            assert!(
                start.elapsed() < CLUSTER_READY,
                "hub nodes not healthy within {CLUSTER_READY:?} (JetStream meta leader)"
            );
            std::thread::sleep(wait::POLL);
        }
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
